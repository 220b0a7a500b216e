"""Benchmark: W4A4 vs BF16 video fidelity (PSNR/SSIM per frame) for percentile and max calibration.

Why: the point of the tail-aware masks is that W4A4 videos stay close to BF16. For the tiny and the
medium random-weight models this runs the real flow (``hif4fmt calibrate`` on a prompt file, then
``hif4fmt build`` with ``--statistic percentile`` (p99.9, the default) and ``--statistic max``), renders
held-out prompts with BF16 and with each state from the same seeds, and reports the mean PSNR/SSIM
of W4A4 vs BF16. A third row, "no mask", quantizes the same layers with m = 1 (plain HiF4 W4A4, no
smoothing) as the baseline measured in the same run. Random weights have no trained outlier
channels, so the differences here are smaller than on Wan2.2 itself; the numbers show the pipeline
works end to end and rank the variants, they are not the paper's figures.

    python benchmarks/runtime_fidelity.py [--models tiny,medium] [--prompts FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BUNDLED_PROMPTS = ROOT / "tools" / "prompts" / "tiny_calibration.json"
FALLBACK_PROMPTS = [  # OpenS2V "cap" layout, used when the bundled prompt file is absent
    {"cap": "a small dog runs across a green field in the morning light"},
    {"cap": "a boat moves slowly over a calm blue lake under white clouds"},
    {"cap": "a woman walks down a city street at night with bright lights"},
    {"cap": "snow falls on a quiet forest while the camera pans slowly"},
]
HELD_OUT_PROMPTS = ("a red dragon flies over a mountain lake at sunset", "a golden car drives fast on a wet road")
CALIBRATION = ["--num-prompts", "4", "--height", "64", "--width", "64", "--frames", "9", "--steps", "6",
               "--max-sequence-length", "32", "--device", "cpu", "--no-progress"]
RENDER = {"height": 128, "width": 128, "frames": 17, "steps": 10, "guidance": 3.5, "max_sequence_length": 32}


def _hif4fmt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hif4fmt", *args], check=True, capture_output=True, text=True)


def _unit_mask_state(source: Path, out: Path) -> Path:
    """Write a copy of the state at ``source`` with every mask = 1 (plain HiF4 W4A4); return ``out``."""
    from dataclasses import replace

    from hif4fmt.state import read_state, write_state

    state = read_state(source)
    layers = tuple(replace(layer, mask=np.ones(layer.in_features, np.float32), mask_stats=None, record=None)
                   for layer in state.layers)
    write_state(out, replace(state, layers=layers, calibration={**state.calibration, "note": "masks set to 1"},
                             layout=None))
    return out


def _render_all(pipe, seeds: list[int]) -> list[np.ndarray]:
    from wan_runtime.generate import GenerationSettings, generate_frames
    from wan_runtime.placeholder import placeholder_image

    pipe.set_progress_bar_config(disable=True)
    image = placeholder_image(RENDER["width"], RENDER["height"])
    return [generate_frames(pipe, image, GenerationSettings(prompt, seed=seed, **RENDER))
            for prompt in HELD_OUT_PROMPTS for seed in seeds]


def measure_model(name: str, folder: Path, prompts: Path, seeds: list[int]) -> dict:
    """Return {variant: {"mean_psnr_db", "min_psnr_db", "mean_ssim"}} for one model."""
    from tools.make_tiny_wan import make_tiny_wan
    from wan_runtime.frame_metrics import compare_videos
    from wan_runtime.loader import load_pipeline

    base = make_tiny_wan(folder / name, seed=0, medium=(name == "medium"))
    stats = folder / f"{name}-stats.safetensors"
    _hif4fmt("calibrate", "--base", str(base), "--prompts", str(prompts), "--out", str(stats), *CALIBRATION)
    states = {}
    for statistic in ("percentile", "max"):
        states[statistic] = folder / f"{name}-{statistic}.hif4"
        _hif4fmt("build", "--base", str(base), "--stats", str(stats), "--out", str(states[statistic]),
                 "--statistic", statistic, "--no-progress")
    states["no mask"] = _unit_mask_state(states["percentile"], folder / f"{name}-unit.hif4")
    reference = _render_all(load_pipeline(base, None), seeds)
    result = {}
    for variant, state in states.items():
        videos = _render_all(load_pipeline(base, state), seeds)
        scores = [compare_videos(ref, test) for ref, test in zip(reference, videos)]
        psnr = [s["mean_psnr_db"] for s in scores if s["mean_psnr_db"] is not None]
        result[variant] = {"mean_psnr_db": float(np.mean(psnr)), "min_psnr_db": float(min(s["min_psnr_db"] for s in scores)),
                           "mean_ssim": float(np.mean([s["mean_ssim"] for s in scores])), "videos": len(videos)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,medium", help="comma list of tiny, medium")
    parser.add_argument("--prompts", type=Path, default=None, help="calibration prompts (default: bundled file)")
    parser.add_argument("--seeds", default="0,1", help="comma list of render seeds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="runtime_fidelity_") as temp:
        prompts = args.prompts or (BUNDLED_PROMPTS if BUNDLED_PROMPTS.is_file() else None)
        if prompts is None:
            prompts = Path(temp) / "prompts.json"
            prompts.write_text(json.dumps(FALLBACK_PROMPTS))
        for name in args.models.split(","):
            results[name] = measure_model(name, Path(temp), prompts, seeds)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
        return
    print(f"W4A4 vs BF16, {len(HELD_OUT_PROMPTS)} held-out prompts x seeds {seeds}, "
          f"{RENDER['frames']} frames {RENDER['width']}x{RENDER['height']}, {RENDER['steps']} steps")
    print(f"{'model':8s} {'masks':12s} {'mean PSNR dB':>13s} {'min PSNR dB':>12s} {'mean SSIM':>10s}")
    for name, variants in results.items():
        for variant, r in variants.items():
            print(f"{name:8s} {variant:12s} {r['mean_psnr_db']:13.2f} {r['min_psnr_db']:12.2f} {r['mean_ssim']:10.4f}")


if __name__ == "__main__":
    main()

"""Benchmark: W4A4 vs BF16 video fidelity (PSNR/SSIM per frame) for each mask recipe, with the spread.

Why: the point of the tail-aware masks is that W4A4 videos stay close to BF16. For the tiny and the
medium random-weight models this runs the real flow (``hif4fmt calibrate`` on a prompt file, then
``hif4fmt build`` with ``--statistic percentile`` (p99.9, the default) and ``--statistic max``), renders
held-out prompts with BF16 and with each state from the same seeds, and reports PSNR/SSIM of W4A4 vs
BF16 per video: mean +- std and min..max over prompts x seeds. "no mask" quantizes the same layers with
m = 1 (plain HiF4 W4A4, no smoothing), the baseline measured in the same run. The layer error column
is the build report's mean relative output error on held-out calibration rows (``build --report``).

``--outliers`` runs on the outlier test model (``make_tiny_wan --outliers``: planted massive channels
and text-token spikes, the same BF16 function; docs/calibration.md), where the masks matter. Where
``hif4fmt build`` has the search flags (``--search``, ``--search-rotation``, ``--retain-block auto``)
more variants are built: "percentile + auto blocks" (the paper's recipe plus the 2 blocks
``--retain-block auto`` picks for it), "chosen", "chosen + auto blocks", "+ rotation" (search with
rotation + auto blocks), and the auto-block variants again with ``--rank-weight step`` ("...,
step-weighted"). Always measured too:
"percentile + rotation": the percentile state with the Hadamard rotation set on every layer (built
here, no search), and "rotation, no mask".

    python benchmarks/runtime_fidelity.py [--models tiny,medium] [--outliers] [--prompts FILE] [--seeds 0,1]
                                          [--variants 'A;B'] [--json]
    python benchmarks/runtime_fidelity.py --from-json RUN.json [--outliers] [--seeds 0,1]   # its table again
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
HELD_OUT_PROMPTS = ("a red dragon flies over a mountain lake at sunset", "a golden car drives fast on a wet road",
                    "an old man walks slowly through the snow in a dark forest",
                    "a white bird flies across the sky over a quiet river, wide shot")
CALIBRATION = ["--num-prompts", "4", "--height", "64", "--width", "64", "--frames", "9", "--steps", "6",
               "--max-sequence-length", "32", "--device", "cpu", "--no-progress"]
RENDER = {"height": 128, "width": 128, "frames": 17, "steps": 10, "guidance": 3.5, "max_sequence_length": 32}


# table rows, in this order (--json sorts its keys)
VARIANT_ORDER = ("no mask", "rotation, no mask", "max", "percentile", "percentile + rotation",
                 "percentile + auto blocks", "percentile + auto blocks, step-weighted", "chosen",
                 "chosen + auto blocks", "chosen + auto blocks, step-weighted", "+ rotation")
SEARCH_FLAGS = ("--search", "--search-rotation", "--retain-block", "--rank-weight")  # the search variants need all


def _hif4fmt(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "hif4fmt", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"hif4fmt {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def _build_has_search() -> bool:
    help_text = _hif4fmt("build", "--help")
    return all(flag in help_text for flag in SEARCH_FLAGS) and "auto" in help_text


def _unit_mask_state(source: Path, out: Path) -> Path:
    """Write a copy of the state at ``source`` with every mask = 1 (plain HiF4 W4A4); return ``out``."""
    from dataclasses import replace

    from hif4fmt.state import read_state, write_state

    state = read_state(source)
    layers = tuple(replace(layer, mask=np.ones(layer.in_features, np.float32), mask_stats=None, record=None, recipe=None)
                   for layer in state.layers)
    write_state(out, replace(state, layers=layers, calibration={**state.calibration, "note": "masks set to 1"},
                             layout=None))
    return out


def _rotated_state(source: Path, out: Path) -> Path:
    """Write a copy of the state at ``source`` with rotation "hadamard-64" on every layer; return ``out``."""
    from dataclasses import replace

    from hif4fmt.state import ROTATION_HADAMARD64, read_state, write_state

    state = read_state(source)
    layers = tuple(replace(layer, rotation=ROTATION_HADAMARD64) for layer in state.layers)
    write_state(out, replace(state, layers=layers, calibration={**state.calibration, "note": "rotation on every layer"}))
    return out


def _render_all(pipe, seeds: list[int]) -> list[np.ndarray]:
    from wan_runtime.generate import GenerationSettings, generate_frames
    from wan_runtime.placeholder import placeholder_image

    pipe.set_progress_bar_config(disable=True)
    image = placeholder_image(RENDER["width"], RENDER["height"])
    return [generate_frames(pipe, image, GenerationSettings(prompt, seed=seed, **RENDER))
            for prompt in HELD_OUT_PROMPTS for seed in seeds]


def _layer_error(report: Path, variant: str) -> float | None:
    summary = json.loads(report.read_text())["summary"].get(variant, {})
    return summary.get("mean")


def _state_layer_error(state_path: Path, base: Path, stats: Path) -> float:
    """Return the mean over the state's layers of ||y_q - y|| / ||y|| on the held-out calibration rows.

    As ``build --report`` measures it (float32 rows, ``hif4fmt.report``'s definition) but with each
    layer's own mask and rotation: y_q = HiF4(R(x * m)) HiF4(R(W / m))^T + b, R = identity or H64 / 8.
    So the rotation variants, which the build report does not cover, get a layer error too.
    """
    import torch

    from hif4fmt.base import BaseCheckpoint
    from hif4fmt.calibration.stats_file import read_stats
    from hif4fmt.codec.rotation import rotate_torch
    from hif4fmt.hifloat4 import fake_quantize
    from hif4fmt.state import read_state

    state = read_state(state_path)
    errors = []
    with BaseCheckpoint.open(base) as checkpoint, read_stats(stats) as stats_file:
        for layer in state.layers:
            component = checkpoint.components[layer.component]
            rows = stats_file.load_layer(layer.component, layer.module).holdout.to(torch.float32)
            if rows.shape[0] == 0:
                continue
            weight = torch.from_numpy(component.read_tensor_numpy(f"{layer.module}.weight", np.float32))
            bias_name = f"{layer.module}.bias"
            bias = (torch.from_numpy(component.read_tensor_numpy(bias_name, np.float32))
                    if component.has_tensor(bias_name) else None)
            mask = torch.from_numpy(np.ascontiguousarray(layer.mask, dtype=np.float32))
            rotate = rotate_torch if layer.rotation else (lambda values: values)
            reference = torch.nn.functional.linear(rows, weight, bias)
            quantized = torch.nn.functional.linear(fake_quantize(rotate(rows * mask)),
                                                   fake_quantize(rotate(weight / mask)), bias)
            errors.append(float((quantized - reference).double().norm() / reference.double().norm()))
    return float(np.mean(errors))


def _build(base: Path, stats: Path, out: Path, *flags: str) -> tuple[Path, Path]:
    report = out.with_suffix(".report.json")
    _hif4fmt("build", "--base", str(base), "--stats", str(stats), "--out", str(out), "--report", str(report),
             "--no-progress", *flags)
    return out, report


def _states(name: str, folder: Path, base: Path, stats: Path, prompts: Path, search: bool,
            wanted: tuple[str, ...] | None = None) -> dict:
    """Return {variant: (state path, report's layer error or None, chosen / percentile on the report rows or None)}
    for the ``wanted`` variants (None: all; "percentile" always, the baseline of the paired gains)."""
    def want(variant: str) -> bool:
        return wanted is None or variant in wanted

    percentile, report = _build(base, stats, folder / f"{name}-percentile.hif4", "--statistic", "percentile")
    states = {"percentile": (percentile, _layer_error(report, "percentile"), None)}
    unit = _unit_mask_state(percentile, folder / f"{name}-unit.hif4")
    if want("no mask"):
        states["no mask"] = (unit, _layer_error(report, "none"), None)
    if want("max"):
        states["max"] = (_build(base, stats, folder / f"{name}-max.hif4", "--statistic", "max")[0],
                         _layer_error(report, "max"), None)
    auto = ("--retain-block", "auto", "--prompts", str(prompts))
    if search:
        for variant, flags in (("percentile + auto blocks", auto),  # the paper's recipe + the blocks rank picks
                               ("percentile + auto blocks, step-weighted", (*auto, "--rank-weight", "step"))):
            if want(variant):
                states[variant] = (_build(base, stats, folder / f"{name}-{_file_stem(variant)}.hif4", *flags)[0],
                                   None, None)
        for variant, flags in (("chosen", ("--search",)), ("chosen + auto blocks", ("--search", *auto)),
                               ("chosen + auto blocks, step-weighted", ("--search", *auto, "--rank-weight", "step")),
                               ("+ rotation", ("--search", "--search-rotation", *auto))):
            if not want(variant):
                continue
            state, chosen_report = _build(base, stats, folder / f"{name}-{_file_stem(variant)}.hif4", *flags)
            # the search reports on the other half of the held-out rows: chosen / percentile on those rows
            ratio = _layer_error(chosen_report, "chosen") / _layer_error(chosen_report, "percentile")
            states[variant] = (state, _layer_error(chosen_report, "chosen"), ratio)
    if want("percentile + rotation"):
        states["percentile + rotation"] = (_rotated_state(percentile, folder / f"{name}-rotated.hif4"), None, None)
    if want("rotation, no mask"):
        states["rotation, no mask"] = (_rotated_state(unit, folder / f"{name}-unit-rotated.hif4"), None, None)
    return states


def _file_stem(variant: str) -> str:
    """Return a file-name form of a variant name ("chosen + auto blocks" -> "chosen_+_auto_blocks")."""
    return variant.replace(", ", "_").replace(" ", "_")


def _spread(values: list[float]) -> dict:
    """Return mean, std (population, ddof 0), min and max of ``values``."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(min(values)),
            "max": float(max(values))}


def make_calibrated_model(name: str, folder: Path, prompts: Path, outliers: bool) -> tuple[Path, Path]:
    """Write the tiny or medium model under ``folder`` and calibrate it with ``CALIBRATION``; return (base, stats)."""
    from tools.make_tiny_wan import make_tiny_wan

    base = make_tiny_wan(folder / name, seed=0, medium=(name == "medium"), outliers=outliers)
    stats = folder / f"{name}-stats.safetensors"
    _hif4fmt("calibrate", "--base", str(base), "--prompts", str(prompts), "--out", str(stats), *CALIBRATION)
    return base, stats


def measure_model(name: str, folder: Path, prompts: Path, seeds: list[int], outliers: bool = False,
                  variants: tuple[str, ...] | None = None) -> dict:
    """Return {variant: {"psnr_db": spread, "ssim": spread, "layer_error", "videos", ...}} for one model.

    A spread is {"mean", "std", "min", "max"} over the held-out prompts x ``seeds`` (per video: the mean
    over its frames); ``variants`` renders only those (None: all). ``layer_error``: the build report's mean
    relative layer error (search variants: on the report half of the rows), None where not reported.
    ``psnr_gain_vs_percentile_db``: the spread of the paired per-video difference PSNR(variant) -
    PSNR(percentile) (same prompt, same seed), so a gain is stated with the spread of the gain itself.
    """
    from wan_runtime.frame_metrics import compare_videos
    from wan_runtime.loader import load_pipeline

    base, stats = make_calibrated_model(name, folder, prompts, outliers)
    states = _states(name, folder, base, stats, prompts, _build_has_search(), variants)
    reference = _render_all(load_pipeline(base, None), seeds)
    result = {}
    for variant, (state, layer_error, versus_percentile) in states.items():
        videos = _render_all(load_pipeline(base, state), seeds)
        scores = [compare_videos(ref, test) for ref, test in zip(reference, videos)]
        per_video = [s["mean_psnr_db"] for s in scores]  # None: every frame identical (no finite PSNR)
        psnr = [value for value in per_video if value is not None]
        result[variant] = {"psnr_db": _spread(psnr), "psnr_db_per_video": per_video,
                           "ssim": _spread([s["mean_ssim"] for s in scores]),
                           "min_frame_psnr_db": float(min(s["min_psnr_db"] for s in scores)),
                           "layer_error": layer_error, "layer_error_with_rotation": _state_layer_error(state, base, stats),
                           "layer_error_vs_percentile": versus_percentile,
                           "videos": len(videos)}
    for variant in result.values():  # paired: the same prompt and seed rendered with both states
        pairs = [(a, b) for a, b in zip(variant["psnr_db_per_video"], result["percentile"]["psnr_db_per_video"])
                 if a is not None and b is not None]
        variant["psnr_gain_vs_percentile_db"] = _spread([a - b for a, b in pairs]) if pairs else None
    return result


def print_table(results: dict, seeds: list[int], outliers: bool) -> None:
    """Print the markdown table of ``results`` (as ``--json`` writes them) for the README and docs."""
    model = "outlier model" if outliers else "plain model"
    print(f"W4A4 vs BF16 ({model}), {len(HELD_OUT_PROMPTS)} held-out prompts x seeds {seeds}, "
          f"{RENDER['frames']} frames {RENDER['width']}x{RENDER['height']}, {RENDER['steps']} steps; "
          "per video: mean over frames; spread over videos")
    print("layer error: build --report's mean (n/a: not reported; search variants: on the report half of the "
          "held-out rows, x: chosen / percentile there) / recomputed on all held-out rows with each layer's rotation")
    print("| model | variant | layer error (report / recomputed) | PSNR dB mean +- std | PSNR dB min..max "
          "| PSNR gain vs percentile, paired, dB | SSIM mean +- std |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, variants in results.items():
        order = sorted(variants, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER))
        for variant in order:
            r = variants[variant]
            p, q = r["psnr_db"], r["ssim"]
            error = ("n/a" if r["layer_error"] is None else f"{r['layer_error']:.4f}") \
                + ("" if r["layer_error_vs_percentile"] is None else f" ({r['layer_error_vs_percentile']:.3f}x)") \
                + f" / {r['layer_error_with_rotation']:.4f}"
            g = r["psnr_gain_vs_percentile_db"]
            gain = "n/a" if g is None else f"{g['mean']:+.2f} +- {g['std']:.2f} ({g['min']:+.2f}..{g['max']:+.2f})"
            print(f"| {name} | {variant} | {error} | {p['mean']:.2f} +- {p['std']:.2f} | {p['min']:.2f}..{p['max']:.2f} "
                  f"| {gain} | {q['mean']:.4f} +- {q['std']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,medium", help="comma list of tiny, medium")
    parser.add_argument("--prompts", type=Path, default=None, help="calibration prompts (default: bundled file)")
    parser.add_argument("--seeds", default="0,1", help="comma list of render seeds")
    parser.add_argument("--outliers", action="store_true", help="the outlier test model (make_tiny_wan --outliers)")
    parser.add_argument("--variants", default=None,
                        help=f"semicolon list of variants to render (default: all of {'; '.join(VARIANT_ORDER)})")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                        help="print the table of a run saved with --json (no measuring)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.from_json is not None:
        print_table(json.loads(args.from_json.read_text()), seeds, args.outliers)
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    variants = None if args.variants is None else tuple(v.strip() for v in args.variants.split(";"))
    unknown = sorted(set(variants or ()) - set(VARIANT_ORDER))
    if unknown:
        parser.error(f"--variants: unknown {'; '.join(unknown)}; choose from {'; '.join(VARIANT_ORDER)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="runtime_fidelity_") as temp:
        prompts = args.prompts or (BUNDLED_PROMPTS if BUNDLED_PROMPTS.is_file() else None)
        if prompts is None:
            prompts = Path(temp) / "prompts.json"
            prompts.write_text(json.dumps(FALLBACK_PROMPTS))
        for name in args.models.split(","):
            results[name] = measure_model(name, Path(temp), prompts, seeds, args.outliers, variants)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
        return
    print_table(results, seeds, args.outliers)


if __name__ == "__main__":
    main()

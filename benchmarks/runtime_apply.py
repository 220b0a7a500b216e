"""Benchmark: time and memory to load the W4A4 pipeline (base + .hif4 state) vs a plain BF16 load.

Why: the runtime rebuilds the quantized experts at load time, so loading must stay close to a plain
``from_pretrained`` (issue goal: <= 1.5x) and must never hold two full copies of an expert (peak memory).
Each measurement runs in a fresh Python process (clean RSS and peak); the modes are interleaved and
repeated (--repeats, default 5), and the median is reported with the spread (min..max). The page cache
is warmed first, so every mode reads the safetensors files from RAM: the times compare CPU work, not
the disk. What each mode does:

  bf16_lazy    WanImageToVideoPipeline.from_pretrained. diffusers maps the safetensors files (mmap) and
               reads a weight's pages only when it is first used, so this mode has read almost nothing.
               Shown for reference only; it is not a fair baseline for a load that must read every weight.
  bf16_read    the same, then every weight of both experts read once (a sum over each tensor): every
               weight is now resident in RAM, as after a real first forward step. THE BASELINE.
  bf16_read_paused  bf16_read with Python's cyclic garbage collector paused during the load, as
               load_pipeline does (wan_runtime.loader.collector_paused): the like-for-like baseline,
               so the ratio to it is what applying the state costs, not what pausing the collector saves.
  w4a4         wan_runtime.load_pipeline(base, state, verify=False): reads every target weight, quantizes
               HiF4(W / m) into packed form, swaps the linears, copies the rest out of the file mapping.
  w4a4_verify  wan_runtime.load_pipeline(base, state): the same plus the fingerprint check (hashing every
               tensor of the base), reported separately.
  codec        only the arithmetic: every target weight is read first (not timed), then the time of
               HiF4(W / m) over all of them is measured (``hifloat4.quantize_divided_many``, one call
               per expert, as the loader does; the compiled kernel when built). Its time gives a lower
               bound for w4a4 on this machine: bf16_read_paused + codec, i.e. a loader with zero
               overhead besides reading the weights and the codec itself.

Two ratios answer two questions. w4a4 / bf16_lazy is the issue's goal (load_pipeline with a state vs
a plain diffusers from_pretrained, <= 1.5x). w4a4 / bf16_read_paused is like for like (both read every
weight, both with the collector paused): what applying the state costs.

Memory: peak RSS (VmHWM) and RSS after loading, minus the process's RSS after its imports; "expert MB"
is the bytes of every parameter and buffer of the two experts (packed HiF4 for W4A4). The base is the
--medium tiny model (10 blocks, inner dim 768, 2 x 190 MB BF16) with synthetic masks.

    python benchmarks/runtime_apply.py [--base DIR --state FILE] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("bf16_lazy", "bf16_read", "bf16_read_paused", "w4a4", "w4a4_verify", "codec")
MIB = 1024 * 1024
GOAL = 1.5  # issue 5: W4A4 load time at most 1.5x the BF16 load


def _memory_mib() -> dict[str, float]:
    """Return VmRSS, VmHWM, RssAnon, RssFile of this process in MiB (Linux /proc)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def _expert_bytes(pipe) -> int:
    return sum(t.numel() * t.element_size() for name in ("transformer", "transformer_2")
               for t in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()])


def _codec_only(base: str, state_path: str) -> dict:
    """Read every target weight of the state (untimed), then time HiF4(W / m) over all of them."""
    import numpy as np
    import torch
    from diffusers import WanTransformer3DModel

    from hif4fmt.hifloat4 import quantize_divided_many
    from hif4fmt.state import read_state

    state = read_state(state_path)
    seconds = elements = 0
    for component in state.components:
        model = WanTransformer3DModel.from_pretrained(base, subfolder=component, dtype=torch.bfloat16)
        work = []
        for layer in state.layers_of(component):
            weight = model.get_submodule(layer.module).weight.detach()
            weight.sum()  # read the pages now, as bf16_read does
            work.append((weight, torch.from_numpy(np.ascontiguousarray(layer.mask, np.float32)).to(weight.dtype)))
        started = time.perf_counter()
        quantize_divided_many(work, state.recipe.encoder)  # what the loader runs: one call per expert
        seconds += time.perf_counter() - started
        elements += sum(weight.numel() for weight, _ in work)
        del model, work
    return {"seconds": seconds, "weights": elements}


def worker(mode: str, base: str, state: str) -> dict:
    """Run one measurement in this process; return seconds and memory (MiB) as a dict."""
    import torch
    from diffusers import WanImageToVideoPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from wan_runtime import load_pipeline

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if mode == "codec":
        return _codec_only(base, state)
    before = _memory_mib()
    started = time.perf_counter()
    if mode.startswith("bf16"):
        import contextlib

        from wan_runtime.loader import collector_paused

        with collector_paused() if mode == "bf16_read_paused" else contextlib.nullcontext():
            pipe = WanImageToVideoPipeline.from_pretrained(base, dtype=torch.bfloat16)
            if mode != "bf16_lazy":
                for name in ("transformer", "transformer_2"):
                    for tensor in getattr(pipe, name).parameters():
                        tensor.sum()  # touch every page once
    else:
        pipe = load_pipeline(base, state, verify=(mode == "w4a4_verify"))
    seconds = time.perf_counter() - started
    after = _memory_mib()
    return {"seconds": seconds, "peak_mib": after["VmHWM"] - before["VmRSS"], "rss_mib": after["VmRSS"] - before["VmRSS"],
            "anon_mib": after["RssAnon"] - before["RssAnon"], "file_mib": after["RssFile"] - before["RssFile"],
            "expert_weight_bytes": _expert_bytes(pipe)}


def run_worker(mode: str, base: Path, state: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", mode, "--base", str(base), "--state", str(state)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Return medians per mode and key, the spread of the times, the ratios and the lower bound."""
    result = {}
    for mode, mode_runs in runs.items():
        summary = {key: statistics.median(run[key] for run in mode_runs) for key in mode_runs[0]}
        times = [run["seconds"] for run in mode_runs]
        summary["seconds_min"], summary["seconds_max"] = min(times), max(times)
        result[mode] = summary
    lazy, read, w4a4, codec = result["bf16_lazy"], result["bf16_read"], result["w4a4"], result["codec"]
    paused = result["bf16_read_paused"]
    bound_seconds = paused["seconds"] + codec["seconds"]  # like for like: both loads with the collector paused
    result["ratios"] = {
        "w4a4_vs_bf16_lazy_time": w4a4["seconds"] / lazy["seconds"],  # the baseline: plain from_pretrained
        "w4a4_vs_bf16_read_time": w4a4["seconds"] / read["seconds"],
        "w4a4_verify_vs_bf16_read_time": result["w4a4_verify"]["seconds"] / read["seconds"],
        "w4a4_vs_bf16_read_paused_time": w4a4["seconds"] / paused["seconds"],  # like for like
        "bf16_read_paused_vs_bf16_read_time": paused["seconds"] / read["seconds"],
        "w4a4_vs_bf16_expert_weight_bytes": w4a4["expert_weight_bytes"] / read["expert_weight_bytes"],
        "w4a4_peak_vs_bf16_resident": w4a4["peak_mib"] / read["rss_mib"],
        "w4a4_resident_vs_bf16_resident": w4a4["rss_mib"] / read["rss_mib"],
    }
    result["bound"] = {
        "codec_weights": codec["weights"],
        "codec_weights_per_second": codec["weights"] / codec["seconds"],
        "w4a4_lower_bound_seconds": bound_seconds,
        "w4a4_lower_bound_vs_bf16_read_paused_time": bound_seconds / paused["seconds"],
        "goal": GOAL,
        "goal_met_vs_plain_from_pretrained": w4a4["seconds"] / lazy["seconds"] <= GOAL,
        "goal_met_like_for_like": w4a4["seconds"] / paused["seconds"] <= GOAL,
    }
    return result


def print_report(result: dict, repeats: int) -> None:
    print(f"base: {result['base']}; median (min..max) of {repeats} fresh processes per mode, modes interleaved")
    print(f"{'mode':16s} {'seconds':>8s} {'min..max':>13s} {'peak MiB':>9s} {'RSS MiB':>8s} {'anon MiB':>9s} "
          f"{'file MiB':>9s} {'expert MB':>10s}")
    for mode in MODES:
        r = result[mode]
        spread = f"{r['seconds_min']:.3f}..{r['seconds_max']:.3f}"
        if mode == "codec":
            print(f"{mode:16s} {r['seconds']:8.3f} {spread:>13s}   (HiF4(W / m) of {r['weights'] / 1e6:.1f} M weights "
                  "only, weights already read)")
            continue
        print(f"{mode:16s} {r['seconds']:8.3f} {spread:>13s} {r['peak_mib']:9.1f} {r['rss_mib']:8.1f} "
              f"{r['anon_mib']:9.1f} {r['file_mib']:9.1f} {r['expert_weight_bytes'] / 1e6:10.1f}")
    for name, value in result["ratios"].items():
        print(f"{name:36s} {value:6.3f}x")
    bound = result["bound"]
    print(f"goal {GOAL}x vs a plain from_pretrained: {'met' if bound['goal_met_vs_plain_from_pretrained'] else 'NOT met'}; "
          f"like for like (both with the collector paused): "
          f"{'met' if bound['goal_met_like_for_like'] else 'NOT met'}")
    print(f"lower bound like for like on this machine: codec {bound['codec_weights_per_second'] / 1e6:.0f} M weights/s "
          f"x {bound['codec_weights'] / 1e6:.1f} M weights = {result['codec']['seconds']:.3f} s on top of "
          f"bf16_read_paused -> w4a4 >= {bound['w4a4_lower_bound_seconds']:.3f} s = "
          f"{bound['w4a4_lower_bound_vs_bf16_read_paused_time']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="pipeline folder (default: build the --medium tiny model)")
    parser.add_argument("--state", type=Path, help=".hif4 state for --base (default: synthetic masks)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.base), str(args.state))))
        return
    with tempfile.TemporaryDirectory(prefix="runtime_apply_") as temp:
        base, state = args.base, args.state
        if base is None:
            from tools.make_tiny_wan import make_tiny_wan

            base = make_tiny_wan(Path(temp) / "medium", seed=0, medium=True)
        if state is None:
            from tools.make_tiny_wan import write_synthetic_state

            state = write_synthetic_state(base, Path(temp) / "medium.hif4")
        for file in sorted(base.rglob("*.safetensors")):  # warm the page cache
            file.read_bytes()
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_worker(mode, base, state))
    result = summarize(runs)
    result["base"] = str(args.base or "tools/make_tiny_wan.py --medium (built in a temp folder)")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print_report(result, args.repeats)


if __name__ == "__main__":
    main()

"""Benchmark: time and memory to load the W4A4 pipeline (base + .hif4 state) vs a plain BF16 load.

Why: the runtime rebuilds the quantized experts at load time, so loading must stay close to a plain
``from_pretrained`` (goal: <= 1.5x) and must never hold two full copies of an expert (peak memory).
Each measurement runs in a fresh Python process (clean RSS and peak), three times, median reported;
page cache is warmed first, so the times compare CPU work, not the disk. Modes:

  bf16_lazy    WanImageToVideoPipeline.from_pretrained (diffusers default: weights mmapped, read lazily)
  bf16_read    the same, then every transformer weight read once (what the first forward step pays)
  w4a4         wan_runtime.load_pipeline(base, state, verify=False)
  w4a4_verify  wan_runtime.load_pipeline(base, state) (fingerprint check included)

Memory: peak RSS (VmHWM) and RSS after loading, minus the process's RSS after its imports; "weight
bytes" is the bytes of every parameter and buffer of the two experts (packed HiF4 for W4A4).
The base is the --medium tiny model (10 layers, inner dim 768, 2 x 190 MB BF16) with synthetic masks.

    python benchmarks/runtime_apply.py [--base DIR --state FILE] [--repeats 3] [--json]
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

MODES = ("bf16_lazy", "bf16_read", "w4a4", "w4a4_verify")
MIB = 1024 * 1024


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


def worker(mode: str, base: str, state: str) -> dict:
    """Run one load in this process; return seconds and memory (MiB) as a dict."""
    import torch
    from diffusers import WanImageToVideoPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from wan_runtime import load_pipeline

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    before = _memory_mib()
    started = time.perf_counter()
    if mode.startswith("bf16"):
        pipe = WanImageToVideoPipeline.from_pretrained(base, dtype=torch.bfloat16)
        if mode == "bf16_read":
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="pipeline folder (default: build the --medium tiny model)")
    parser.add_argument("--state", type=Path, help=".hif4 state for --base (default: synthetic masks)")
    parser.add_argument("--repeats", type=int, default=3)
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
    result = {mode: {key: statistics.median(run[key] for run in runs[mode]) for key in runs[mode][0]} for mode in MODES}
    lazy, read, w4a4 = result["bf16_lazy"], result["bf16_read"], result["w4a4"]
    result["ratios"] = {
        "w4a4_vs_bf16_lazy_time": w4a4["seconds"] / lazy["seconds"],
        "w4a4_vs_bf16_read_time": w4a4["seconds"] / read["seconds"],
        "w4a4_verify_vs_bf16_read_time": result["w4a4_verify"]["seconds"] / read["seconds"],
        "w4a4_vs_bf16_expert_weight_bytes": w4a4["expert_weight_bytes"] / read["expert_weight_bytes"],
        "w4a4_peak_vs_bf16_resident": w4a4["peak_mib"] / read["rss_mib"],
        "w4a4_resident_vs_bf16_resident": w4a4["rss_mib"] / read["rss_mib"],
    }
    result["base"] = str(args.base or "tools/make_tiny_wan.py --medium (built in a temp folder)")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(f"base: {result['base']}; median of {args.repeats} fresh processes each")
    print(f"{'mode':12s} {'seconds':>8s} {'peak MiB':>9s} {'RSS MiB':>8s} {'anon MiB':>9s} {'file MiB':>9s} {'expert MB':>10s}")
    for mode in MODES:
        r = result[mode]
        print(f"{mode:12s} {r['seconds']:8.3f} {r['peak_mib']:9.1f} {r['rss_mib']:8.1f} {r['anon_mib']:9.1f} "
              f"{r['file_mib']:9.1f} {r['expert_weight_bytes'] / 1e6:10.1f}")
    for name, value in result["ratios"].items():
        print(f"{name:36s} {value:6.3f}x")


if __name__ == "__main__":
    main()

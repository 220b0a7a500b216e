"""Throughput of the calibration sketch against the cheapest statistic and against the layer it observes.

Why this benchmark exists: the hook runs on every call of every quantized linear during calibration, so
its cost must stay a modest fraction of the model's own work. For activation blocks shaped like
Wan2.2-A14B's (inner 5120, FFN 13824; BF16) it times, in one run on the same tensors:

  * baseline  ``x.abs().amax(0)``: the per-channel max alone (what a max-only calibration would do);
  * sketch    ``ChannelSketch.update(x)``: histogram + exact max/min + non-finite count;
  * holdout   ``HoldoutSample.offer(x, ...)``: bottom-64 row selection by splitmix64 key;
  * linear    ``x @ W.T`` with W (out_features, channels) BF16 of the real layer: its own matmul;

and prints each as elements per second and as a ratio to the baseline, then the sketch's cost as a
fraction of the layer's matmul (the hook's overhead on that layer's forward, roughly). No timing is
asserted anywhere.

    .venv/bin/python benchmarks/calibration_sketch_speed.py [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hif4fmt.calibration.hooks import HoldoutSample
from hif4fmt.calibration.sketch import ChannelSketch, SketchGrid

# label -> (in_features, out_features) of Wan2.2-A14B's quantized linears
SHAPES = {"attention 5120 -> 5120": (5120, 5120), "ffn.net.0 5120 -> 13824": (5120, 13824),
          "ffn.net.2 13824 -> 5120": (13824, 5120)}


def _time(function, repeats: int) -> float:
    """Return the median wall time in seconds of ``function()`` over ``repeats`` runs after one warm-up."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="activation rows per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    grid = SketchGrid()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens per call, "
          f"grid {grid.bins} bins")
    print(f"{'activation':26} {'method':9} {'seconds':>9} {'Melem/s':>9} {'x baseline':>10}")
    ratios = []
    for label, (channels, out_features) in SHAPES.items():
        x = (torch.randn(args.tokens, channels, generator=g) * 2).to(torch.bfloat16)
        weight = (torch.randn(out_features, channels, generator=g) * 0.02).to(torch.bfloat16)
        sketch = ChannelSketch(grid, channels)
        sample = HoldoutSample(64, channels)
        calls = iter(range(10 ** 6))
        timings = {
            "baseline": _time(lambda: x.abs().amax(0), args.repeats),
            "sketch": _time(lambda: sketch.update(x), args.repeats),
            "holdout": _time(lambda: sample.offer(x, 0, next(calls)), args.repeats),
            "linear": _time(lambda: x @ weight.T, max(1, args.repeats // 2)),
        }
        elements = x.numel()
        for method, seconds in timings.items():
            print(f"{label:26} {method:9} {seconds:9.4f} {elements / seconds / 1e6:9.1f} "
                  f"{seconds / timings['baseline']:10.2f}")
        ratios.append(f"{label}: {timings['sketch'] / timings['linear']:.2f}")
    print("sketch time / layer matmul time:", ", ".join(ratios))
    print("A14B sketch memory: 4,792,320 input channels x", grid.bins, "bins x 8 bytes =",
          f"{4_792_320 * grid.bytes_per_channel / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

"""Throughput of the calibration sketch against the cheapest statistic and against the layer it observes.

Why this benchmark exists: the hook runs on every call of every quantized linear during calibration, so
its cost must stay a modest fraction of the model's own work. For activation blocks shaped like
Wan2.2-A14B's (inner 5120, FFN 13824; BF16) it times, in one run on the same tensors:

  * baseline  ``x.abs().amax(0)``: the per-channel max alone (what a max-only calibration would do);
  * sketch    ``ChannelSketch.update(x)``: histogram + exact max/min + non-finite count;
  * holdout   ``HoldoutSample.offer(x, ...)``: bottom-64 row selection by splitmix64 key;
  * linear    ``x @ W.T`` with W (channels, channels) BF16: the layer's own matmul (for scale);

and prints each as elements per second and as a ratio to the baseline. No timing is asserted anywhere.

    .venv/bin/python benchmarks/calibration_sketch_speed.py [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hif4fmt.calibration.hooks import HoldoutSample
from hif4fmt.calibration.sketch import ChannelSketch, SketchGrid

SHAPES = {"attention input (5120)": 5120, "ffn.net.2 input (13824)": 13824}


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
    for label, channels in SHAPES.items():
        x = (torch.randn(args.tokens, channels, generator=g) * 2).to(torch.bfloat16)
        weight = (torch.randn(channels, channels, generator=g) * 0.02).to(torch.bfloat16)
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
    print("A14B sketch memory: 4,792,320 input channels x", grid.bins, "bins x 8 bytes =",
          f"{4_792_320 * grid.bytes_per_channel / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

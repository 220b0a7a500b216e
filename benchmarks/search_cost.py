"""What ``build --search`` costs per layer at Wan2.2-A14B shapes, as a ratio to the plain build's mask work.

Why this benchmark exists: the search must be affordable for A14B (800 quantized linears, 9 with 5120
input channels and 1 with 13824 per block). For each A14B layer shape it times ``search_layer`` (the
default 20 candidates: 4 percentiles x 5 alphas, the global recipe among them; optionally x rotation) on 32
selection rows against, in the same run, the plain build's per-layer work (``w_i`` and one mask) plus one
HiF4 fake-quantization of the whole weight (what a runtime load does once per layer), and prints the
per-layer time, the ratio, and the extrapolated total over the 800 layers.

    python benchmarks/search_cost.py [--rows 32] [--rotation] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hif4fmt.hifloat4 import fake_quantize
from hif4fmt.masks import compute_mask, weight_channel_absmax
from hif4fmt.method.search import SearchGrid, search_layer
from hif4fmt.recipe import Recipe

A14B_SHAPES = {"attn1/attn2 q, k, v, out (x 8 per block)": (5120, 5120),  # (out_features, in_features)
               "ffn.net.0 (x 1 per block)": (13824, 5120), "ffn.net.2 (x 1 per block)": (5120, 13824)}
A14B_LAYERS = {"attn1/attn2 q, k, v, out (x 8 per block)": 640, "ffn.net.0 (x 1 per block)": 80,
               "ffn.net.2 (x 1 per block)": 80}  # both experts, 40 blocks each


def _best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="selection rows (half of --holdout-rows)")
    parser.add_argument("--rotation", action="store_true", help="also try every candidate rotated")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    grid = SearchGrid.parse(rotation=args.rotation)
    recipe = Recipe()
    total = 0.0
    print(f"torch threads {torch.get_num_threads()}; {len(grid.candidates(recipe))} candidates, {args.rows} rows")
    for name, (out_features, in_features) in A14B_SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(torch.bfloat16).float()
        rows = torch.randn(args.rows, in_features, generator=generator).to(torch.bfloat16)
        absmax = rows.float().abs().max(0).values.double().numpy()
        stats = {p: absmax * (0.9 if p is not None else 1.0) for p in (99.0, 99.9, 99.99, None)}

        def plain() -> None:
            w = weight_channel_absmax(weight.numpy())
            mask = compute_mask(w, stats[99.9], 0.5, 1e-6)
            fake_quantize(weight / torch.from_numpy(mask))

        def searched() -> None:
            search_layer(rows, weight, None, weight_channel_absmax(weight.numpy()), stats, grid, recipe)

        baseline = _best_of(args.repeats, plain)
        cost = _best_of(args.repeats, searched)
        total += cost * A14B_LAYERS[name]
        print(f"{name:40s} {out_features} x {in_features}: search {cost:.3f} s per layer, "
              f"{cost / baseline:.2f}x the plain per-layer work ({baseline:.3f} s)")
    print(f"A14B, 800 layers: search adds about {total / 60:.1f} minutes on this machine")


if __name__ == "__main__":
    main()

"""Throughput and peak memory of ``fake_quantize`` on the Wan2.2 FFN shape, as ratios to ``x.clone()``.

Why this script exists: the codec runs on every activation of every quantized layer, so its speed is
printed against the cheapest possible pass over the same tensor, measured in the same run: a plain
``x.clone()`` of the 5120 x 13824 BF16 matrix. Goal: within 8x of the copy on a 2-core CPU, and at most
3x the input size of extra peak memory. Each figure is the median of ``--repeat`` runs.
Also printed: packed ``quantize`` (what the runtime does to every weight at load) and ``dequantize``
(what it does to every weight at each forward). ``quantize`` is timed through each of its
implementations (``hifloat4.QUANTIZE_PATHS``, same bytes): the compiled kernel
(``hif4fmt.codec.kernel``, when built), the bit-pattern torch path (``hif4fmt.codec.swar``) and the
general float32 path (``hif4fmt.codec.encoders``); and ``quantize_divided(W, m)``, the runtime's
HiF4(W / m), against ``quantize(W / m)``.
Usage: python benchmarks/codec_speed.py [--rows 5120] [--cols 13824] [--repeat 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import hif4fmt.hifloat4 as codec_api
from hif4fmt.codec import kernel
from hif4fmt.hifloat4 import dequantize, fake_quantize, quantize, quantize_divided


def timed(fn, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5120)
    parser.add_argument("--cols", type=int, default=13824)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    x = torch.empty(args.rows, args.cols, dtype=torch.bfloat16, device=args.device).normal_()
    input_bytes = x.numel() * x.element_size()
    if args.device == "cpu":
        baseline_rss = peak_rss_bytes()
        y = fake_quantize(x)  # first call: also the memory measurement (peak RSS grows monotonically)
        extra_peak = peak_rss_bytes() - baseline_rss
        del y
    else:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y = fake_quantize(x)
        extra_peak = torch.cuda.max_memory_allocated() - before
        del y
    clone_s = timed(lambda: x.clone(), args.repeat, args.device)
    fake_s = timed(lambda: fake_quantize(x), args.repeat, args.device)
    pack_s = timed(lambda: quantize(x), max(1, args.repeat // 2), args.device)
    packed = quantize(x)
    unpack_s = timed(lambda: dequantize(packed), max(1, args.repeat // 2), args.device)
    path_s = {}
    chosen = codec_api._quantize_path
    for path in codec_api.QUANTIZE_PATHS:
        if path == "kernel" and (args.device != "cpu" or not kernel.enabled()):
            continue
        codec_api._quantize_path = lambda encoder, device, path=path: path
        try:
            path_s[path] = timed(lambda: quantize(x), max(1, args.repeat // 2), args.device)
        finally:
            codec_api._quantize_path = chosen
    mask = torch.empty(args.cols, dtype=x.dtype, device=args.device).uniform_(0.25, 4.0)
    divided_s = timed(lambda: quantize_divided(x, mask), max(1, args.repeat // 2), args.device)
    divide_then_s = timed(lambda: quantize(x / mask), max(1, args.repeat // 2), args.device)
    elements = x.numel()
    print(f"device {args.device}, threads {torch.get_num_threads()}, input {args.rows} x {args.cols} bf16 "
          f"({input_bytes / 2**20:.0f} MiB)")
    print(f"x.clone()          {clone_s * 1e3:9.1f} ms   {elements / clone_s / 1e9:6.2f} Gelem/s   1.00x")
    print(f"fake_quantize(x)   {fake_s * 1e3:9.1f} ms   {elements / fake_s / 1e9:6.2f} Gelem/s   "
          f"{fake_s / clone_s:.2f}x the copy (goal <= 8x; path: "
          f"{codec_api._fake_quantize_path('toolkit', x.device)})")
    print(f"quantize(x) packed {pack_s * 1e3:9.1f} ms   {elements / pack_s / 1e9:6.2f} Gelem/s   "
          f"{pack_s / clone_s:.2f}x the copy (path: {chosen('toolkit', x.device)}; kernel: {kernel.status()})")
    for path, seconds in path_s.items():
        print(f"  via {path:14s} {seconds * 1e3:9.1f} ms   {elements / seconds / 1e9:6.2f} Gelem/s   "
              f"{seconds / clone_s:.2f}x the copy")
    print(f"quantize_divided   {divided_s * 1e3:9.1f} ms   {elements / divided_s / 1e9:6.2f} Gelem/s   "
          f"{divided_s / clone_s:.2f}x the copy; quantize(x / m) {divide_then_s / divided_s:.2f}x slower")
    print(f"dequantize(packed) {unpack_s * 1e3:9.1f} ms   {elements / unpack_s / 1e9:6.2f} Gelem/s   "
          f"{unpack_s / clone_s:.2f}x the copy (path: {codec_api._dequantize_path(x.device)})")
    print(f"peak extra memory of fake_quantize: {extra_peak / 2**20:.0f} MiB = {extra_peak / input_bytes:.2f}x "
          f"the input (goal <= 3x; the output itself is 1x)")


if __name__ == "__main__":
    main()

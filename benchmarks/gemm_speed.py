"""Benchmark: the integer HiF4 GEMM vs BF16 ``torch.matmul`` at Wan2.2-A14B layer shapes, with its accuracy.

Why: the W4A4 model is only worth running if its arithmetic is real: an int8 GEMM with one float32
rescale per 64-element unit (spec/hifloat4.md 8) instead of a BF16 matmul of dequantized operands.
This prints, per layer shape, the time and TFLOP/s (2 * M * N * K operations) of each variant and its
ratio to the BF16 matmul measured in the same run (median of --repeats after a warm-up, variants
interleaved so a machine that slows down affects all alike):

on the CPU (default when no GPU):
  bf16_matmul     torch.matmul(x, W.T) in BF16 (what nn.Linear runs), the baseline
  fp32_matmul     torch.matmul in float32 (on CPUs without AVX-512 BF16 torch's BF16 matmul is far
                  slower than float32: this second baseline says so)
  integer_gemm    the compiled integer GEMM on already quantized operands (hif4fmt.codec.kernel.gemm)
  w4a4_integer    the whole W4A4 layer, arithmetic "integer": HiF4(x * m) to int8 + the GEMM
  w4a4_simulated  the whole W4A4 layer, arithmetic "simulated" (the toolkit's QLinear: dequantize, F.linear)
on a CUDA device (--device cuda, the default when one is there):
  bf16_matmul (cuBLAS) and triton_gemm (hif4fmt.codec.triton_gemm on quantized operands), tokens 4096
  to 65536.

Accuracy (CPU, --accuracy-tokens rows): the largest error against float64 of the dequantized operands,
relative to the largest output, for the integer product and for the BF16 matmul of the same
dequantized operands. Memory (CPU): the peak resident growth of one forward of each layer variant,
each in a fresh process after a warm-up forward (Linux: /proc/self/clear_refs resets the peak); the
integer layer never makes a dequantized weight.

    python benchmarks/gemm_speed.py [--tokens 2048] [--shapes 5120x5120,5120x13824,13824x5120] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hif4fmt.hifloat4 as api  # noqa: E402
from hif4fmt.codec import integer, kernel  # noqa: E402

A14B_SHAPES = "5120x5120,5120x13824,13824x5120"  # in x out features of the A14B block linears
GPU_TOKENS = (4096, 16384, 65536)  # 720p x 81 frames is about 75,600 tokens per CFG branch


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def _layer(in_features: int, out_features: int, seed: int = 0):
    """Return (x-free) pieces of one layer: BF16 weight, bias, mask, the packed HiF4(W / m)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=g) * in_features**-0.5).to(torch.bfloat16)
    bias = (torch.randn(out_features, generator=g) * 0.01).to(torch.bfloat16)
    mask = np.exp(np.random.default_rng(seed).normal(0, 0.5, in_features)).astype(np.float32)
    return weight, bias, mask


def _median_times(variants: dict, repeats: int, synchronize=lambda: None) -> dict[str, list[float]]:
    times = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, run in variants.items():
            synchronize()
            started = time.perf_counter()
            run()
            synchronize()
            if round_index:
                times[name].append(time.perf_counter() - started)
    return times


def cpu_speed(tokens: int, shapes, repeats: int) -> list[dict]:
    from wan_runtime.hif4_linear import HiF4Linear

    results = []
    for in_features, out_features in shapes:
        weight, bias, mask = _layer(in_features, out_features)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, in_features, generator=g).to(torch.bfloat16)
        linear = nn.Linear(in_features, out_features).to(torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        layers = {name: HiF4Linear.from_linear(linear, mask, arithmetic=name) for name in ("integer", "simulated")}
        x32, w32 = x.float(), weight.float()
        operand = integer.quantize_activation(x, layers["integer"].mask)
        packed = layers["integer"].packed_weight
        out = torch.empty(tokens, out_features, dtype=torch.bfloat16)
        bias32 = bias.float()
        with torch.inference_mode():
            variants = {
                "bf16_matmul": lambda: torch.matmul(x, weight.T),
                "fp32_matmul": lambda: torch.matmul(x32, w32.T),
                "integer_gemm": lambda: kernel.gemm(operand.q, operand.scale, operand.sums, packed.codes, packed.meta,
                                                    bias32, out, in_features),
                "w4a4_integer": lambda: layers["integer"](x),
                "w4a4_simulated": lambda: layers["simulated"](x),
            }
            times = _median_times(variants, repeats)
        seconds = {name: statistics.median(values) for name, values in times.items()}
        operations = 2 * tokens * in_features * out_features
        results.append({
            "shape": [tokens, in_features, out_features], "seconds": seconds,
            "seconds_min_max": {name: [min(v), max(v)] for name, v in times.items()},
            "tflops": {name: operations / s / 1e12 for name, s in seconds.items()},
            "vs_bf16_matmul": {name: s / seconds["bf16_matmul"] for name, s in seconds.items()},
            "vs_fp32_matmul": {name: s / seconds["fp32_matmul"] for name, s in seconds.items()},
        })
    return results


def accuracy(tokens: int, in_features: int, out_features: int) -> dict:
    """Return the largest error vs float64 (relative to the largest output) of the integer and BF16 products."""
    weight, _, _ = _layer(in_features, out_features, seed=2)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    channels = torch.exp2(torch.randn(in_features, generator=g) * 3)  # channel scales across 2^-9 .. 2^9
    x = (torch.distributions.StudentT(torch.tensor(3.0)).sample((tokens, in_features)) * channels).to(torch.bfloat16)
    a, b = api.quantize(x), api.quantize(weight)
    da, db = api.dequantize(a, torch.float32), api.dequantize(b, torch.float32)
    exact = da.double() @ db.double().T
    scale = float(exact.abs().max())
    integer_error = float((api.matmul(a, b).double() - exact).abs().max()) / scale
    bf16_error = float(((da.to(torch.bfloat16) @ db.to(torch.bfloat16).T).double() - exact).abs().max()) / scale
    return {"shape": [tokens, in_features, out_features], "integer_max_error_rel": integer_error,
            "bf16_max_error_rel": bf16_error, "bf16_over_integer": bf16_error / integer_error if integer_error else None}


MEMORY_CHILD = r"""
import sys, numpy as np, torch
from torch import nn
sys.path.insert(0, sys.argv[1])
from wan_runtime.hif4_linear import HiF4Linear
variant, tokens, k, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
linear = nn.Linear(k, n).to(torch.bfloat16)
layer = linear if variant == "bf16" else HiF4Linear.from_linear(linear, np.ones(k, np.float32), arithmetic=variant)
if variant != "bf16":
    del linear
x = torch.randn(tokens, k).to(torch.bfloat16)
with torch.inference_mode():
    layer(x[:8])  # warm-up: thread pools and libraries loaded (not the big buffers)
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    y = layer(x)
    peak = status_kib("VmHWM")
print(peak - before)
"""


def forward_peak_memory(tokens: int, in_features: int, out_features: int) -> dict:
    """Return {variant: peak resident growth in MiB of one forward, measured in a fresh process}."""
    peaks = {}
    for variant in ("bf16", "integer", "simulated"):
        done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT), variant, str(tokens), str(in_features),
                               str(out_features)], capture_output=True, text=True, check=True)
        peaks[variant] = int(done.stdout.split()[-1]) / 1024
    output_mib = tokens * out_features * 2 / 2**20
    return {"shape": [tokens, in_features, out_features], "peak_growth_mib": peaks, "bf16_output_mib": output_mib,
            "bf16_weight_mib": in_features * out_features * 2 / 2**20}


def gpu_speed(shapes, repeats: int, tokens_list, device: torch.device) -> list[dict]:
    """Time the Triton kernel against BF16 torch.matmul on ``device`` (CUDA; the CPU only under TRITON_INTERPRET=1)."""
    from hif4fmt.codec import triton_gemm

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for in_features, out_features in shapes:
        weight, _, _ = _layer(in_features, out_features)
        weight = weight.to(device)
        packed = api.quantize(weight)
        b = integer.expand(packed)
        for tokens in tokens_list:
            x = torch.randn(tokens, in_features, device=device).to(torch.bfloat16)
            a = integer.quantize_activation(x)
            variants = {"bf16_matmul": lambda: torch.matmul(x, weight.T),
                        "triton_gemm": lambda: triton_gemm.product(a, b)}
            times = _median_times(variants, repeats, synchronize)
            seconds = {name: statistics.median(values) for name, values in times.items()}
            operations = 2 * tokens * in_features * out_features
            check = triton_gemm.product(a, b)
            reference = integer.product_torch(a, b) if tokens <= 4096 else None
            results.append({
                "shape": [tokens, in_features, out_features], "seconds": seconds,
                "tflops": {name: operations / s / 1e12 for name, s in seconds.items()},
                "vs_bf16_matmul": {name: s / seconds["bf16_matmul"] for name, s in seconds.items()},
                "triton_equals_torch_reference": None if reference is None else bool(torch.equal(check, reference)),
            })
            del x, a, check
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="activation rows on the CPU")
    parser.add_argument("--gpu-tokens", default=",".join(str(t) for t in GPU_TOKENS))
    parser.add_argument("--shapes", default=A14B_SHAPES, help="IN x OUT features, comma separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy-tokens", type=int, default=256)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shapes = _shapes(args.shapes)
    result: dict = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["speed"] = gpu_speed(shapes, args.repeats, [int(t) for t in args.gpu_tokens.split(",")],
                                    torch.device("cuda"))
    else:
        result["kernel"] = kernel.status()
        result["speed"] = cpu_speed(args.tokens, shapes, args.repeats)
        result["accuracy"] = [accuracy(args.accuracy_tokens, k, n) for k, n in shapes]
        if not args.no_memory:
            result["memory"] = [forward_peak_memory(args.tokens, k, n) for k, n in shapes]
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(f"device {args.device}" + (f" ({result['gpu']})" if "gpu" in result else f", {result['threads']} threads; "
                                     f"kernel: {result['kernel']}"))
    for row in result["speed"]:
        tokens, k, n = row["shape"]
        print(f"\n{tokens} tokens x {k} -> {n} (median of {args.repeats}; ratio = time / BF16 matmul time)")
        for name, seconds in row["seconds"].items():
            extra = f"   vs fp32 {row['vs_fp32_matmul'][name]:6.3f}" if "vs_fp32_matmul" in row else ""
            print(f"  {name:16s} {seconds * 1e3:10.2f} ms  {row['tflops'][name]:8.3f} TFLOP/s   "
                  f"vs bf16 {row['vs_bf16_matmul'][name]:6.3f}{extra}")
    for row in result.get("accuracy", []):
        print(f"\naccuracy {row['shape']}: max error / max |output| vs float64: integer {row['integer_max_error_rel']:.2e}, "
              f"bf16 matmul of the dequantized operands {row['bf16_max_error_rel']:.2e}")
    for row in result.get("memory", []):
        peaks = ", ".join(f"{name} {mib:.1f}" for name, mib in row["peak_growth_mib"].items())
        print(f"peak resident growth of one forward {row['shape']} (MiB): {peaks}; the BF16 output alone is "
              f"{row['bf16_output_mib']:.1f}, a BF16 weight {row['bf16_weight_mib']:.1f}")


if __name__ == "__main__":
    main()

"""Benchmark: one W4A4 transformer forward step vs the BF16 step, on CPU, for each W4A4 arithmetic.

Why: the W4A4 layers run either the integer arithmetic (int8 GEMM with one float32 rescale per
64-element unit, spec/hifloat4.md 8: the runtime's default where the compiled kernel is built) or the
simulated one (the toolkit's QLinear: weight dequantized at every forward, activation fake-quantized,
BF16 F.linear); this measures what a step costs with each against BF16. Two copies of the expert are
loaded, one left in BF16 and one quantized; the variants (bf16, w4a4_integer, w4a4_simulated: the
same quantized model with its layers switched) are run in turn, --repeats rounds after one warm-up
round, so a machine that slows down or speeds up during the run affects all alike; medians are
reported with the spread (min..max). Same inputs for all. The model is the --medium tiny model's
high-noise expert (10 blocks, inner dim 768, ffn 3072) with synthetic masks.

    python benchmarks/runtime_forward.py [--height 256 --width 256 --frames 17] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hif4fmt.codec import kernel  # noqa: E402
from hif4fmt.state import read_state  # noqa: E402
from tools.make_tiny_wan import make_tiny_wan, write_synthetic_state  # noqa: E402
from wan_runtime.hif4_linear import HiF4Linear  # noqa: E402
from wan_runtime.loader import quantize_transformer_  # noqa: E402

VAE_SPATIAL_STRIDE = 8
VAE_TEMPORAL_STRIDE = 4
TEXT_TOKENS = 64


def _time_variants(variants: dict, inputs: dict, repeats: int) -> dict[str, list[float]]:
    """Return seconds per call of each ``variants[name]()`` model, run in turn, after one warm-up round."""
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            for name, prepare in variants.items():
                model = prepare()
                started = time.perf_counter()
                model(**inputs)
                if round_index:
                    times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="pipeline folder (default: build the --medium tiny model)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="runtime_forward_") as temp:
        base = args.base or make_tiny_wan(Path(temp) / "medium", seed=0, medium=True)
        state = read_state(write_synthetic_state(base, Path(temp) / "medium.hif4"))
        model = WanTransformer3DModel.from_pretrained(base, subfolder="transformer", dtype=torch.bfloat16).eval()
        config = model.config
        generator = torch.Generator().manual_seed(0)
        latent_frames = (args.frames - 1) // VAE_TEMPORAL_STRIDE + 1
        inputs = {
            "hidden_states": torch.randn(1, config.in_channels, latent_frames, args.height // VAE_SPATIAL_STRIDE,
                                         args.width // VAE_SPATIAL_STRIDE, generator=generator).to(torch.bfloat16),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config.text_dim, generator=generator).to(torch.bfloat16),
            "return_dict": False,
        }
        tokens = latent_frames * (args.height // VAE_SPATIAL_STRIDE // 2) * (args.width // VAE_SPATIAL_STRIDE // 2)
        quantized = WanTransformer3DModel.from_pretrained(base, subfolder="transformer", dtype=torch.bfloat16).eval()
        quantize_transformer_(quantized, "transformer", state)
        layers = [m for m in quantized.modules() if isinstance(m, HiF4Linear)]

        def switched(arithmetic: str):
            def prepare():
                for layer in layers:
                    layer.arithmetic = arithmetic
                return quantized
            return prepare

        times = _time_variants({"bf16": lambda: model, "w4a4_integer": switched("integer"),
                                "w4a4_simulated": switched("simulated")}, inputs, args.repeats)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    bf16 = seconds["bf16"]
    result = {
        "tokens": tokens, "blocks": config.num_layers, "inner_dim": config.num_attention_heads * config.attention_head_dim,
        "hif4_layers": len(layers), "threads": torch.get_num_threads(), "seconds": seconds,
        "seconds_min_max": {name: [min(values), max(values)] for name, values in times.items()},
        "kernel": kernel.status(),
        "ratios": {"w4a4_integer_vs_bf16": seconds["w4a4_integer"] / bf16,
                   "w4a4_simulated_vs_bf16": seconds["w4a4_simulated"] / bf16,
                   "w4a4_integer_vs_simulated": seconds["w4a4_integer"] / seconds["w4a4_simulated"]},
    }
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(f"one transformer step: {tokens} tokens, {result['blocks']} blocks, inner dim {result['inner_dim']}, "
          f"{len(layers)} HiF4 linears, {result['threads']} CPU threads (median and min..max of {args.repeats}, "
          "variants interleaved)")
    for name, value in seconds.items():
        low, high = result["seconds_min_max"][name]
        print(f"{name:22s} {value:8.3f} s   ({low:.3f}..{high:.3f})")
    for name, value in result["ratios"].items():
        print(f"{name:30s} {value:6.3f}")


if __name__ == "__main__":
    main()

"""Quantization error of HiF4 against NVFP4 and MXFP4, measured in the same run.

Why this script exists: the inference paper reports HiF4 MSE about 24% below NVFP4 on Gaussian data
(HiF4/NVFP4 ~ 0.76; reference implementation of the toolkit encoder: NVFP4/HiF4 = 1.31, MXFP4/HiF4 =
1.92). This prints MSE, relative MSE and the ratios for a 4096 x 4096 N(0,1) BF16 matrix, a Student-t
(df 3) matrix and a synthetic layer-like weight (per-input-channel log-normal scales with a few outlier
channels, quantized along in_features as in a Linear). Usage: python benchmarks/codec_error.py [--size N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_fp4 import fake_quantize_mxfp4, fake_quantize_nvfp4  # noqa: E402

from hif4fmt.hifloat4 import fake_quantize  # noqa: E402


def matrices(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(size, size, generator=g)
    student = torch.distributions.StudentT(torch.tensor(3.0)).sample((size, size))
    channel_scale = torch.exp(torch.randn(1, size, generator=g) * 0.5)
    outliers = torch.rand(1, size, generator=g) < 0.01
    channel_scale = torch.where(outliers, channel_scale * 10, channel_scale)
    layer_like = torch.randn(size, size, generator=g) * channel_scale * (1 / size**0.5)
    return {"N(0,1)": gaussian, "Student-t df=3": student, "layer-like weight": layer_like}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="square matrix side (default 4096)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'input':<20} {'HiF4 MSE':>11} {'rel MSE':>9} {'NVFP4 MSE':>11} {'MXFP4 MSE':>11} "
          f"{'HiF4/NVFP4':>10} {'NVFP4/HiF4':>10} {'MXFP4/HiF4':>10}")
    for name, x in matrices(args.size).items():
        x = x.to(torch.bfloat16).float()
        power = (x**2).mean().item()
        errors = {}
        for label, quantizer in (("hif4", fake_quantize), ("nvfp4", fake_quantize_nvfp4), ("mxfp4", fake_quantize_mxfp4)):
            errors[label] = ((quantizer(x).float() - x) ** 2).mean().item()
        print(f"{name:<20} {errors['hif4']:>11.4e} {errors['hif4'] / power:>9.4e} {errors['nvfp4']:>11.4e} "
              f"{errors['mxfp4']:>11.4e} {errors['hif4'] / errors['nvfp4']:>10.3f} "
              f"{errors['nvfp4'] / errors['hif4']:>10.3f} {errors['mxfp4'] / errors['hif4']:>10.3f}")


if __name__ == "__main__":
    main()

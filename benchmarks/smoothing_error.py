"""What the tail-aware statistic buys on activations with outliers, measured on a synthetic linear layer.

Why this benchmark exists: the random-weight tiny Wan model has no activation outliers, so its videos
cannot show the difference between a percentile mask, a max mask and no mask. Real diffusion
transformers have two kinds of outliers: persistent outlier *channels* (a few input channels are
10-100x larger on every token) and rare *token spikes* (a handful of tokens with huge values). The first
is what SmoothQuant-style masks fix; the second is what makes the max a bad statistic, because one spike
sets a_i for a whole channel. This script builds such activations, calibrates on one sample, evaluates on
a fresh sample of the same distribution, and prints the relative output error

    ||HiF4(x * m) @ HiF4(W / m).T - x @ W.T||_F / ||x @ W.T||_F

for no mask (m = 1), the max mask and the p-th percentile mask (hif4fmt.masks.compute_mask, the same
code ``hif4fmt build`` uses), as ratios to the no-mask error measured in the same run.

    python benchmarks/smoothing_error.py [--tokens 8192] [--channels 1024] [--percentile 99.9] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from hif4fmt.hifloat4 import fake_quantize
from hif4fmt.masks import compute_mask, weight_channel_absmax

OUTLIER_CHANNEL_FRACTION = 0.01   # persistent outlier channels
OUTLIER_CHANNEL_GAIN = 30.0       # their scale relative to a typical channel
SPIKE_FRACTION = 2e-4             # fraction of (token, channel) entries that spike
SPIKE_GAIN = 300.0                # spike magnitude relative to the channel's scale
WEIGHT_STD = 0.02


def make_activations(tokens: int, channels: int, generator: torch.Generator,
                     channel_scale: torch.Tensor, spikes: bool) -> torch.Tensor:
    """Return (tokens, channels) float32 activations: per-channel Gaussian, optional sparse token spikes."""
    x = torch.randn(tokens, channels, generator=generator) * channel_scale
    if spikes:
        hit = torch.rand(tokens, channels, generator=generator) < SPIKE_FRACTION
        x = torch.where(hit, x.sign() * channel_scale * SPIKE_GAIN, x)
    return x.to(torch.bfloat16).to(torch.float32)


def relative_error(x: torch.Tensor, weight: torch.Tensor, mask: np.ndarray | None) -> float:
    """Return the relative Frobenius output error of the W4A4 product against the float product."""
    reference = x @ weight.T
    if mask is None:
        m = torch.ones(x.shape[1])
    else:
        m = torch.from_numpy(mask).to(torch.float32)
    approx = fake_quantize(x * m) @ fake_quantize(weight / m).T
    return float(torch.linalg.norm(approx - reference) / torch.linalg.norm(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--percentile", type=float, default=99.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    channel_scale = torch.exp(0.5 * torch.randn(args.channels, generator=generator))
    outliers = torch.randperm(args.channels, generator=generator)[: max(1, int(OUTLIER_CHANNEL_FRACTION * args.channels))]
    channel_scale[outliers] *= OUTLIER_CHANNEL_GAIN
    weight = (torch.randn(args.channels, args.channels, generator=generator) * WEIGHT_STD)
    weight = weight.to(torch.bfloat16).to(torch.float32)
    w_absmax = weight_channel_absmax(weight.numpy())

    print(f"linear {args.channels} -> {args.channels}, {args.tokens} calibration + {args.tokens} evaluation tokens; "
          f"{outliers.numel()} outlier channels x{OUTLIER_CHANNEL_GAIN:g}")
    print(f"{'activations':<22}{'alpha':>6}{'none':>9}{'max':>9}{f'p{args.percentile:g}':>9}"
          f"{'max/none':>10}{'pct/none':>10}{'pct/max':>9}")
    for spikes in (False, True):
        calibration = make_activations(args.tokens, args.channels, generator, channel_scale, spikes)
        evaluation = make_activations(args.tokens, args.channels, generator, channel_scale, spikes)
        magnitude = calibration.abs()
        a_max = magnitude.max(dim=0).values.double().numpy()
        a_pct = torch.quantile(magnitude.double(), args.percentile / 100.0, dim=0).numpy()
        none = relative_error(evaluation, weight, None)
        for alpha in (0.3, 0.5, 0.7):
            err_max = relative_error(evaluation, weight, compute_mask(w_absmax, a_max, alpha, 1e-6))
            err_pct = relative_error(evaluation, weight, compute_mask(w_absmax, a_pct, alpha, 1e-6))
            label = "channels + spikes" if spikes else "outlier channels"
            print(f"{label:<22}{alpha:>6.1f}{none:>9.4f}{err_max:>9.4f}{err_pct:>9.4f}"
                  f"{err_max / none:>10.3f}{err_pct / none:>10.3f}{err_pct / err_max:>9.3f}")


if __name__ == "__main__":
    main()

"""Test helper: every non-NaN BF16 value once, the exhaustive input of the codec tests."""

from __future__ import annotations

import torch

ROW = 640  # values per row: 10 units of 64


def every_bf16_value(shuffle_seed: int | None) -> torch.Tensor:
    """Every non-NaN BF16 value once (zero padded to whole 640-wide rows), sorted by bit pattern or shuffled.

    Sorted, each unit spans a narrow range, so every unit scale occurs, clamps and subnormals included;
    shuffled, units mix wide ranges (most elements far below their unit's maximum).
    """
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = patterns[~torch.isnan(patterns.float())]
    if shuffle_seed is not None:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(shuffle_seed))]
    padded = torch.zeros(-(-values.numel() // ROW) * ROW, dtype=torch.bfloat16)
    padded[: values.numel()] = values
    return padded.view(-1, ROW)

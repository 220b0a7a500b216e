"""NVFP4 and MXFP4 reference fake-quantizers, written in the project to compare HiF4 against.

Why this module exists: ``codec_error.py`` prints HiF4's error as a ratio to its two FP4 peers measured
in the same run, so the peers must be implemented here, plainly, from their public definitions:
- MXFP4 (OCP MX v1.0): E2M1 elements {0, 0.5, 1, 1.5, 2, 3, 4, 6}, 32-element blocks along the last
  axis, E8M0 block scale 2^(floor(log2 amax) - 2), elements saturate at 6.
- NVFP4: E2M1 elements, 16-element blocks, block scale amax / 6 rounded to FP8 E4M3 after dividing by a
  per-tensor FP32 scale amax_tensor / (6 * 448) = amax_tensor / 2688.
E2M1 rounding is round-to-nearest-even on its grid. Inputs float32 (BF16 values); outputs float32.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0  # largest E2M1 magnitude
E4M3_MAX = 448.0  # largest FP8 E4M3 (fn) magnitude
MX_BLOCK = 32  # MXFP4 elements per shared E8M0 scale
NV_BLOCK = 16  # NVFP4 elements per shared E4M3 scale
E2M1_EMAX = 2  # exponent of E2M1's largest binade (4..6)


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Return float32 ``v`` rounded to the E2M1 grid (ties to even), saturating at +-6."""
    a = v.abs()
    fine = torch.round(a * 2) / 2  # [0, 2): step 0.5
    mid = torch.round(a)  # [2, 4): step 1
    coarse = torch.round(a / 2) * 2  # [4, 6]: step 2
    q = torch.where(a < 2, fine, torch.where(a < 4, mid, coarse)).clamp(max=E2M1_MAX)
    return torch.copysign(q, v)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last axis {x.shape[-1]} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def fake_quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """Return MXFP4 quantize-dequantize of float32 ``x`` along the last axis (32-element blocks)."""
    blocks = _blocks(x.float(), MX_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))) - E2M1_EMAX
    scale = torch.exp2(exponent)
    return (round_e2m1(blocks / scale) * scale).reshape(x.shape)


def fake_quantize_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """Return NVFP4 quantize-dequantize of float32 ``x`` along the last axis (16-element blocks)."""
    x = x.float()
    tensor_amax = x.abs().amax()
    tensor_scale = tensor_amax / (E2M1_MAX * E4M3_MAX) if tensor_amax > 0 else torch.tensor(1.0)
    blocks = _blocks(x, NV_BLOCK)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = (block_amax / E2M1_MAX / tensor_scale).clamp(max=E4M3_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn).float()  # round to E4M3, nearest even
    scale = block_scale * tensor_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, round_e2m1(blocks / safe) * scale, torch.zeros_like(blocks)).reshape(x.shape)

"""The optional 64-point Hadamard rotation inside each HiF4 unit: R = blockdiag(H64 / 8) along K.

Why this module exists: an outlier channel puts its whole HiF4 unit on one coarse scale. Rotating each
unit of 64 input channels by the orthonormal Sylvester Hadamard matrix H64 / 8 spreads one channel's
energy over all 64, and because R R^T = I the product is unchanged before quantization:
``(x R) (W R)^T = x W^T``. A state records the rotation per layer (spec/state-v1.md, layer key
``rotation``: ``"hadamard-64"``); the builder's error model, the search and both runtime arithmetics
apply it with the functions here, to the masked operands (``x * m`` and ``W / m``) just before HiF4.

The transform is a fast Walsh-Hadamard transform with a fixed butterfly order (6 stages of pairwise
``a + b`` and ``a - b`` in the input's float dtype, then an exact multiplication by 1/8), so it gives the
same bits on every device and instruction set: IEEE additions are correctly rounded and their order is
fixed here, unlike a matmul by H whose summation order belongs to the BLAS. Sylvester order:
``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, so ``H64[i, j] = (-1)^popcount(i & j)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hif4fmt.codec.format import HIF4

ROTATION_SIZE = HIF4.unit            # 64: one rotation per HiF4 unit along the last axis
ROTATION_STAGES = 6                  # log2(64) butterfly stages
ROTATION_SCALE = 0.125               # 1 / sqrt(64): makes H64 orthonormal; a power of two, so exact


def hadamard_matrix(size: int = ROTATION_SIZE) -> np.ndarray:
    """Return the (size, size) float64 Sylvester Hadamard matrix H (entries +-1, unnormalised)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    index = np.arange(size)
    parity = np.vectorize(lambda v: bin(v).count("1") & 1)(index[:, None] & index[None, :])
    return np.where(parity == 1, -1.0, 1.0)


def _check_width(width: int, where: str) -> None:
    if width % ROTATION_SIZE:
        raise ValueError(f"{where}: the last axis ({width}) is not a whole number of {ROTATION_SIZE}-element "
                         f"HiF4 units; the Hadamard rotation needs whole units")


def rotate_numpy(values: np.ndarray) -> np.ndarray:
    """Return ``values @ blockdiag(H64 / 8)`` along the last axis (same float dtype, same shape).

    ``values`` is a float32 or float64 array whose last axis is a multiple of 64. R is symmetric and
    orthonormal, so this function is also its own inverse up to rounding.
    """
    _check_width(values.shape[-1], "rotate_numpy")
    out = np.array(values, copy=True)
    shape = out.shape
    units = out.reshape(-1, shape[-1] // ROTATION_SIZE, ROTATION_SIZE)
    half = 1
    for _ in range(ROTATION_STAGES):  # stage h pairs element j with j + h inside blocks of 2h
        pairs = units.reshape(units.shape[0], units.shape[1], ROTATION_SIZE // (2 * half), 2, half)
        first, second = pairs[:, :, :, 0, :].copy(), pairs[:, :, :, 1, :].copy()
        pairs[:, :, :, 0, :] = first + second
        pairs[:, :, :, 1, :] = first - second
        half *= 2
    units *= units.dtype.type(ROTATION_SCALE)
    return units.reshape(shape)


def rotate_torch(values: Any) -> Any:
    """Return ``values @ blockdiag(H64 / 8)`` along the last axis for a torch float tensor (its dtype).

    The same butterfly order as ``rotate_numpy``: equal bits for equal float32 input on any device. Each
    stage writes ``a + b`` and ``a - b`` into a preallocated buffer (the input is never written), which is
    about five times faster than stacking new tensors per stage: the search and rank call it per candidate.
    """
    import torch

    _check_width(values.shape[-1], "rotate_torch")
    shape = values.shape
    current = values.reshape(-1, ROTATION_SIZE)
    spare = torch.empty_like(current)
    half = 1
    for stage in range(ROTATION_STAGES):  # stage h pairs element j with j + h inside blocks of 2h
        source = current.view(current.shape[0], ROTATION_SIZE // (2 * half), 2, half)
        target = spare.view(source.shape)
        torch.add(source[:, :, 0], source[:, :, 1], out=target[:, :, 0])
        torch.sub(source[:, :, 0], source[:, :, 1], out=target[:, :, 1])
        current, spare = spare, (torch.empty_like(spare) if stage == 0 else current)  # never write the input
        half *= 2
    return current.mul_(ROTATION_SCALE).view(shape)

"""Mask values between memory (float32) and disk (float32, float16 or bfloat16), plus their statistics.

Why this module exists: the writer and the reader must convert masks the same way, bit for bit
(spec 4.8). float16 rounds to nearest even (numpy's cast); bfloat16 keeps the high 16 bits of the
float32 after rounding to nearest even, done with integer bit operations because numpy has no bfloat16.
Relative rounding error per value: 0 for float32, at most 2**-11 (4.9e-4) for float16 inside its
normal range 6.1e-5..65504, at most 2**-8 (3.9e-3) for bfloat16.
"""

from __future__ import annotations

import math

import numpy as np

from hif4fmt.constants import MASK_DTYPES
from hif4fmt.state.model import MaskStats

BF16_SHIFT = 16  # bfloat16 = the high 16 bits of a float32
BF16_HALF = 0x7FFF  # rounding bias below one bfloat16 step; +1 more when the kept LSB is odd (ties to even)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Return uint16 bfloat16 bit patterns of finite float32 ``values``, rounded to nearest even."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + BF16_HALF + ((bits >> BF16_SHIFT) & 1)) >> BF16_SHIFT
    return rounded.astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Return float32 values of uint16 bfloat16 bit patterns (exact widening)."""
    return (bits.astype(np.uint32) << BF16_SHIFT).view(np.float32)


def encode_mask(mask: np.ndarray, dtype: str) -> bytes:
    """Return the little-endian bytes of float32 ``mask`` stored as ``dtype`` (a key of MASK_DTYPES)."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(mask).astype("<u2").tobytes()
    with np.errstate(over="ignore", under="ignore"):
        return mask.astype(MASK_DTYPES[dtype][0]).tobytes()


def decode_mask(data: bytes, dtype: str) -> np.ndarray:
    """Return float32 ``(n,)`` values of a stored mask (``n = len(data) / bytes per value``)."""
    stored = np.frombuffer(data, dtype=MASK_DTYPES[dtype][0])
    if dtype == "bfloat16":
        return bfloat16_bits_to_float32(stored)
    return stored.astype(np.float32)


def first_invalid_value(values: np.ndarray) -> int | None:
    """Return the index of the first value that is NaN, infinite, zero or negative, else None."""
    bad = ~(np.isfinite(values) & (values > 0))
    if not bad.any():
        return None
    return int(np.argmax(bad))


def mask_stats(values: np.ndarray) -> MaskStats:
    """Return min, max and exactly rounded mean (math.fsum, so identical on every machine) as float64."""
    wide = values.astype(np.float64)
    return MaskStats(float(wide.min()), float(wide.max()), math.fsum(wide.tolist()) / wide.size)

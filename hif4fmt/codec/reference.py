"""A spec-literal, torch-free reference of HiF4 encode/decode (spec/hifloat4.md sections 3-4).

Why this module exists: the fast torch codec fuses and reorders steps for speed; this module follows
the spec text step by step, in numpy float32, one operation per spec line, so tests can prove the
fast path produces the same bytes, and ``tools/make_hif4_vectors.py`` can generate the golden vectors
from an implementation that reads like the spec. Slow by design; do not use it on large tensors.

Inputs are float32 numpy arrays of shape (U, 64) (U units) holding BF16-representable values;
outputs are the packed bytes of spec section 4: element bytes (U, 32) and metadata bytes (U, 4).
"""

from __future__ import annotations

import numpy as np

from hif4fmt.codec.format import HIF4, ea_code_value

F32 = np.float32


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Return float32 ``x`` rounded to the nearest BF16 value (ties to even), as float32. NaN stays NaN."""
    x = np.asarray(x, dtype=F32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(F32)
    return np.where(np.isnan(x), x, rounded).astype(F32)


def e6m2_round(sf: np.ndarray) -> np.ndarray:
    """Return ``round_half_even(sf * 2^(2-e)) * 2^(e-2)`` with ``e = floor(log2 sf)`` (spec 3.1 step 3)."""
    mantissa, exponent = np.frexp(sf)  # sf = mantissa * 2^exponent, mantissa in [0.5, 1)
    e = exponent - 1  # floor(log2 sf)
    return np.ldexp(np.rint(np.ldexp(sf, 2 - e)), e - 2).astype(F32)


def e6m2_encode(sf: np.ndarray) -> np.ndarray:
    """Return uint8 E6M2 codes for float32 scales that are exact E6M2 values in [2^-48, 49152]."""
    mantissa, exponent = np.frexp(sf)
    e = exponent - 1
    m = (np.ldexp(sf, -e) - 1.0) * 4.0  # 0, 1, 2 or 3
    return ((e + HIF4.ea_exponent_bias) * 4 + m).astype(np.uint8)


def _maxima(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ax = np.abs(x).astype(F32)
    m4 = ax.reshape(-1, 16, 4).max(axis=-1)
    m8 = ax.reshape(-1, 8, 8).max(axis=-1)
    m64 = ax.max(axis=-1, keepdims=True)
    return ax, m4, m8, m64


def encode_units_toolkit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (magnitude codes (U,64), Ea codes (U,), Eb bits (U,8), Ec bits (U,16)) by spec 3.1."""
    ax, m4, m8, m64 = _maxima(x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        sf = bf16_round(m64 * F32(HIF4.toolkit_r7))  # step 2
        sf = np.clip(sf, F32(HIF4.scale_min), F32(HIF4.scale_max)).astype(F32)
        sf = e6m2_round(sf)  # step 3
        r = bf16_round(F32(1.0) / sf)  # step 4
        eb = (m8 * r) >= F32(4.0)  # step 5
        s2 = np.where(eb, F32(2.0), F32(1.0)).astype(F32)
        s2_per4 = np.repeat(s2, 2, axis=-1)
        ec = (m4 * r / s2_per4) >= F32(2.0)  # step 6
        s3 = np.where(ec, F32(2.0), F32(1.0)).astype(F32)
        s2_el = np.repeat(s2_per4, 4, axis=-1)
        s3_el = np.repeat(s3, 4, axis=-1)
        v = ax / s2_el / s3_el * r  # step 7, in this order
        c = np.floor(v * F32(4.0) + F32(0.5))
        c = np.where(c >= 8, F32(7.0), c)
    return c.astype(np.uint8), e6m2_encode(sf[:, 0]), eb, ec


def encode_units_ascend(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (magnitude codes, Ea, Eb, Ec) by the Ascend variant (spec 3.2): BF16 after every product."""
    ax, m4, m8, m64 = _maxima(x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        raw = bf16_round(m64 * F32(HIF4.toolkit_r7))
        sf = e6m2_round(np.clip(raw, F32(HIF4.scale_min), F32(HIF4.scale_max)).astype(F32))
        r = np.where(raw == 0, F32(0.0), bf16_round(F32(1.0) / sf)).astype(F32)
        eb = bf16_round(m8 * r) >= F32(4.0)
        rb = np.repeat(np.where(eb, F32(0.5), F32(1.0)), 2, axis=-1).astype(F32)
        ec = bf16_round(bf16_round(m4 * r) * rb) >= F32(2.0)
        rc = np.where(ec, F32(0.5), F32(1.0)).astype(F32)
        scale = bf16_round(r * (rb * rc))
        v = bf16_round(ax * np.repeat(scale, 4, axis=-1))
        c = np.minimum(np.rint(v * F32(4.0)), F32(7.0))  # ties to even
    return c.astype(np.uint8), e6m2_encode(sf[:, 0]), eb, ec


REFERENCE_ENCODERS = {"toolkit": encode_units_toolkit, "ascend": encode_units_ascend}


def pack_units(x: np.ndarray, magnitude: np.ndarray, ea: np.ndarray, eb: np.ndarray, ec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (element bytes (U,32), metadata bytes (U,4)) per spec 4; sign = sign bit of x."""
    sign = np.signbit(x).astype(np.uint8)
    nibbles = (sign << 3) | magnitude
    element_bytes = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
    weights = (1 << np.arange(8)).astype(np.uint32)
    eb_byte = (eb.astype(np.uint32) * weights).sum(axis=-1)
    ec_lo = (ec[:, :8].astype(np.uint32) * weights).sum(axis=-1)
    ec_hi = (ec[:, 8:].astype(np.uint32) * weights).sum(axis=-1)
    meta = np.stack([ea.astype(np.uint32), eb_byte, ec_lo, ec_hi], axis=-1).astype(np.uint8)
    return element_bytes, meta


def quantize_units(x: np.ndarray, encoder: str = "toolkit") -> tuple[np.ndarray, np.ndarray]:
    """Return packed (element bytes (U,32), metadata (U,4)) of float32 BF16-valued units ``x`` (U,64)."""
    x = np.asarray(x, dtype=F32).reshape(-1, HIF4.unit)
    return pack_units(x, *REFERENCE_ENCODERS[encoder](x))


def dequantize_units(element_bytes: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """Return float32 (U,64) values decoded from element bytes (U,32) and metadata (U,4) by spec 4-5."""
    element_bytes = np.asarray(element_bytes, dtype=np.uint8).reshape(-1, HIF4.unit // 2)
    meta = np.asarray(meta, dtype=np.uint8).reshape(-1, HIF4.meta_bytes_per_unit)
    out = np.empty((element_bytes.shape[0], HIF4.unit), dtype=F32)
    for u in range(element_bytes.shape[0]):
        sf = ea_code_value(int(meta[u, 0]))
        for i in range(HIF4.unit):
            byte = int(element_bytes[u, i // 2])
            nibble = byte & 0xF if i % 2 == 0 else byte >> 4
            eb_bit = (int(meta[u, 1]) >> (i // 8)) & 1
            group4 = i // 4
            ec_bit = (int(meta[u, 2 + group4 // 8]) >> (group4 % 8)) & 1
            magnitude = (nibble & 7) / 4.0 * 2.0 ** (eb_bit + ec_bit) * sf
            out[u, i] = -magnitude if nibble & 8 else magnitude
    return out

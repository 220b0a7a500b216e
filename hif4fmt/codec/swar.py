"""HiF4 toolkit encoding and HiF4 decoding on BF16 bit patterns, with whole-tensor integer tricks.

Why this module exists: the general encoders (``encoders.py``) work on float32 units (R, G, 16, 4),
where the per-group steps (the maximum of every 4 elements, a per-group multiplier broadcast over its
4 elements, two codes per byte, a unit's bits into bytes) are strided or innermost-broadcast tensor
operations that torch runs one element at a time, and every small step is one more tensor operation
with its fixed cost. This module produces the same bytes and values with few, contiguous operations,
by treating BF16 values as 16-bit integers and several of them as one wider integer (SWAR, "SIMD
within a register"). The unit scale (spec 3.1 steps 2-4) is ``encoders.toolkit_unit_scale``, the
function the general toolkit encoder calls; the Eb/Ec decision is rewritten on exponents (see
``_group_scales``). Tests compare this path with the spec-literal reference on every BF16 value and
with the general path on adversarial inputs (tests/test_hifloat4_codec.py).

The tricks (lanes are little-endian):
- |x| of a BF16 value is its bit pattern & 0x7FFF, and non-negative BF16 patterns order like the values
  (NaN patterns above inf = 0x7F80), so maxima are taken on int16 and a NaN shows up in its unit's max.
- maximum of every 4 consecutive elements: P = max(v[i], v[i+1]), Q = max(P[i], P[i+2]), read at every
  4th position: two contiguous passes instead of strided ones.
- a value per Ec group (4 elements) is repeated over its elements by multiplying its BF16 pattern, as
  int64, by 0x0001_0001_0001_0001 (4 lanes of 16 bits) and reading the int64 as 4 BF16 values; a power
  of two 2^k is applied to a positive normal BF16 pattern by adding k << 7.
- two element codes per byte: an int32 holding two int16 codes n0 | n1 << 16 gives
  p | p >> 12, whose low byte is n0 | n1 << 4, first element in the low nibble (spec 4).
- 8 flags of 0/1 in the 8 bytes of an int64 fold into one byte with v |= v >> 7, >> 14, >> 28; the E6M2
  code of an E6M2-exact float32 scale is its pattern >> 21 minus a constant.
- decoding: a 256-entry table maps a code byte to its two signed magnitude codes (+-c, as BF16) in one
  int32; times the repeated BF16 step sf * 2^(Eb+Ec) / 4 the product is exact (3 x 3 significant bits).

Work on a block of rows: the int16 maxima in row chunks of about ``chunk_elements``, then the scales
of the whole block at once (per-group tensors: 1/4 of the elements or fewer, so the fixed cost of
each tensor operation is paid once per block), then the float32 element passes in row chunks again,
so their temporaries stay in cache.

Scope: the toolkit encoder (the Ascend variant rounds differently and keeps the general path), input
already rounded to BF16, rows padded to whole units, a little-endian host, NaN-free blocks (the
callers fall back to the general path, which reports or propagates the NaN). Layers: format,
encoders -> swar -> ``hif4fmt.hifloat4``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from hif4fmt.codec.encoders import toolkit_unit_scale
from hif4fmt.codec.format import HIF4

LITTLE_ENDIAN = sys.byteorder == "little"  # the lane tricks read int64/int32 as little-endian 16-bit lanes

BF16_MAGNITUDE_MASK = 0x7FFF  # BF16 bits 0-14: |x|
BF16_SIGN_BIT = -0x8000  # BF16 bit 15 (as int16): the sign
BF16_INF_BITS = 0x7F80  # +inf; a magnitude pattern above it is NaN
BF16_MANTISSA_BITS = 7  # adding k << 7 to a positive normal BF16 pattern multiplies it by 2^k
F32_MANTISSA_BITS = 23  # float32: exponent field from bit 23, bias 127
F32_EXPONENT_BIAS = 127
REPEAT_4_LANES = 0x0001_0001_0001_0001  # int64 multiplier: one 16-bit value into 4 lanes
LOW_LANE_BITS = 0x0001_0001  # int32 of two 16-bit lanes: bit 0 of each lane
PAIR_SIGN_BITS = 0x0008_0008  # int32 of two element codes: bit 3 (the sign) of each lane
SIGN_TO_PAIR_SHIFT = 12  # BF16 signs (bits 15, 31 of an int32 pair) -> element code bit 3 (bits 3, 19)
NIBBLE_PAIR_SHIFT = 12  # second code of an int32 pair (bit 16) -> high nibble of the low byte (bit 4)
BYTE_MASK = 0xFF
HALF = torch.tensor(0.5)  # the + 0.5 of spec 3.1 step 7, as a tensor for addcmul
EB_BYTE_SHIFT, EC_BITS_SHIFT, EC_BITS_MASK = 8, 16, 0xFFFF  # metadata word: Ea | Eb << 8 | Ec << 16


def _code_pair_table() -> torch.Tensor:
    """Return int32 (256,): for each code byte, its two signed magnitude codes +-c as BF16 lanes.

    Low lane = low nibble (the first element, spec 4). The value of code n is (-1)^(n >> 3) * (n & 7),
    code 0x8 giving -0.0; the decoder multiplies it by the step sf * 2^(Eb+Ec) / 4.
    """
    nibble = torch.arange(16)
    sign = torch.where((nibble & HIF4.sign_mask) != 0, -1.0, 1.0)
    lane = ((nibble & HIF4.magnitude_mask).to(torch.float32) * sign).to(torch.bfloat16).view(torch.int16)
    byte = torch.arange(256)
    pairs = torch.stack((lane[byte & 0xF], lane[byte >> 4]), dim=-1)  # (256, 2) int16
    return pairs.contiguous().view(torch.int32).view(256)


CODE_PAIR_VALUES = _code_pair_table()
EB_BIT_OF_EC_GROUP = torch.arange(HIF4.ec_per_unit, dtype=torch.int32) // HIF4.ec_per_eb  # Ec group i: Eb bit i // 2
EC_BIT_OF_EC_GROUP = torch.arange(HIF4.ec_per_unit, dtype=torch.int32)
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the decode table and the Eb / Ec bit positions on ``device`` (made once per device)."""
    if device not in _TABLES:
        _TABLES[device] = (CODE_PAIR_VALUES.to(device), EB_BIT_OF_EC_GROUP.to(device), EC_BIT_OF_EC_GROUP.to(device))
    return _TABLES[device]


def _bf16_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Return float32 values of int16 BF16 bit patterns (any strides)."""
    return bits.view(torch.bfloat16).to(torch.float32)


def _bf16_pattern(values: torch.Tensor) -> torch.Tensor:
    """Return as int32 the BF16 bit patterns of float32 ``values``, exact and positive in BF16."""
    return values.to(torch.bfloat16).view(torch.int16).to(torch.int32)


def _row_chunks(rows: int, padded: int, chunk_elements: int):
    step = max(1, chunk_elements // max(padded, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


@dataclass
class GroupScales:
    """The toolkit scales of (R, G) units (spec 3.1 steps 2-6), the Ec-group ones as int32 lane pairs.

    scale:      (R, G, 1) float32, the E6M2 unit scale sf.
    reciprocal: (R, G, 1) float32, r = bf16(1 / sf).
    eb:         (R, G, 8) int32, the Eb bits (0 or 1).
    doublings:  (R, G, 8) int32, two 16-bit lanes per Eb group: Eb + Ec of its two Ec groups (0..2).
    ec:         (R, G, 8) int32, two 16-bit lanes per Eb group: the Ec bits.
    """

    scale: torch.Tensor
    reciprocal: torch.Tensor
    eb: torch.Tensor
    doublings: torch.Tensor
    ec: torch.Tensor


def _max4_patterns(bits: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Return int16 (R, G, 16): the largest |x| pattern of each Ec group of BF16 patterns ``bits`` (R, P).

    Worked in row chunks so the two shifted-maximum passes stay in cache (spec 3.1 step 1).
    """
    rows, padded = bits.shape
    max4 = torch.empty((rows, padded // HIF4.ec_group), dtype=torch.int16, device=bits.device)
    for start, stop in _row_chunks(rows, padded, chunk_elements):
        flat = (bits[start:stop] & BF16_MAGNITUDE_MASK).view(-1)
        pair = torch.maximum(flat[:-1], flat[1:])  # pair[i] = max of elements i, i+1
        quad = torch.maximum(pair[:-2], pair[2:])  # i .. i+3
        max4[start:stop] = quad[:: HIF4.ec_group].view(stop - start, -1)
    return max4.view(rows, padded // HIF4.unit, HIF4.ec_per_unit)


def _group_scales(bits: torch.Tensor, chunk_elements: int) -> GroupScales | None:
    """Return the toolkit scales of BF16 patterns ``bits`` (R, P), or None when a unit holds a NaN.

    With u = m4 * r per Ec group (exact in float32: two 8-bit significands) the toolkit's bits are
    Eb = (m8 * r >= 4) = (the larger u of the Eb group >= 4) and Ec = (u / 2^Eb >= 2). With
    level = min(max(floor(log2 u), 0), 2) (0: u < 2, 1: 2 <= u < 4, 2: u >= 4, inf included), that is
    Eb = (the larger level of the Eb group == 2) and Eb + Ec = max(level, Eb). floor(log2 u) is the
    float32 exponent field of u minus 127 (a subnormal or zero u gives level 0, as it should).
    """
    max4_bits = _max4_patterns(bits, chunk_elements)
    max64_bits = max4_bits.amax(dim=-1, keepdim=True)
    if bool((max64_bits > BF16_INF_BITS).any()):
        return None
    scale, reciprocal = toolkit_unit_scale(_bf16_to_float(max64_bits))  # spec 3.1 steps 2-4
    exponent = _bf16_to_float(max4_bits).mul_(reciprocal).view(torch.int32) >> F32_MANTISSA_BITS
    level = exponent.clamp_(F32_EXPONENT_BIAS, F32_EXPONENT_BIAS + 2).sub_(F32_EXPONENT_BIAS)
    lanes = level.to(torch.int16).view(torch.int32)  # (R,G,8): level of Ec group 2j | of 2j+1 << 16
    top = (lanes >> 1) & LOW_LANE_BITS  # per lane: level == 2
    eb = (top | (top >> 16)) & 1  # spec 3.1 step 5
    eb_lanes = eb * LOW_LANE_BITS
    doublings = lanes | (eb_lanes & ~top)  # per lane: max(level, Eb) = Eb + Ec
    return GroupScales(scale, reciprocal, eb, doublings, doublings - eb_lanes)  # spec 3.1 step 6


def _scaled_lanes(values: torch.Tensor, doublings: torch.Tensor, direction: int) -> torch.Tensor:
    """Return (R, G, 8) int32 lane pairs: BF16 patterns of ``values`` (R, G, 1) * 2^(direction * Eb+Ec)."""
    return torch.add(_bf16_pattern(values) * LOW_LANE_BITS, doublings, alpha=direction << BF16_MANTISSA_BITS)


def _repeated(pattern_lanes: torch.Tensor, rows: int) -> torch.Tensor:
    """Return int16 (R, P) BF16 patterns: each 16-bit lane of (R, G, 8) int32 over its Ec group's 4 elements."""
    repeated = pattern_lanes.view(torch.int16).to(torch.int64) * REPEAT_4_LANES
    return repeated.view(torch.int16).view(rows, -1)


def _rounded_magnitudes(magnitude_bits: torch.Tensor, multiplier_lanes: torch.Tensor) -> torch.Tensor:
    """Return float32 (R, P): min(|x| * multiplier + 0.5, 7.5), whose floor is the magnitude code c.

    multiplier = r / 2^(Eb+Ec) * 4 per Ec group. Spec 3.1 step 7 is c = min(floor(t + 0.5), 7) with
    t = |x| / s2 / s3 * r * 4 (the same number: dividing by a power of two commutes with the exact
    product by r); floor(min(t + 0.5, 7.5)) is the same number again, and t + 0.5 is computed in one
    rounding (the product t is exact, so a fused multiply-add rounds the same way).
    """
    multiplier = _bf16_to_float(_repeated(multiplier_lanes, magnitude_bits.shape[0]))
    rounded = torch.addcmul(HALF.to(multiplier.device), multiplier, _bf16_to_float(magnitude_bits))  # t + 0.5
    return rounded.clamp_(max=HIF4.max_magnitude_code + 0.5)


def _ea_codes(scale: torch.Tensor) -> torch.Tensor:
    """Return int32 E6M2 codes of float32 ``scale`` (exact E6M2 values in [2^-48, 49152]).

    Such a float32 has only its exponent field e and the top 2 mantissa bits m set, so its pattern
    >> 21 is e << 2 | m, and the E6M2 code (e - 127 + 48) << 2 | m is that minus (127 - 48) << 2.
    """
    bits = scale.view(torch.int32) >> (F32_MANTISSA_BITS - HIF4.ea_mantissa_bits)
    return bits - ((F32_EXPONENT_BIAS - HIF4.ea_exponent_bias) << HIF4.ea_mantissa_bits)


def _fold_flags(flags: torch.Tensor) -> torch.Tensor:
    """Return int64 (..., n/8): flags (..., n) of 0/1 gathered 8 per byte, flag j at bit j (spec 4)."""
    v = flags.to(torch.uint8).view(torch.int64)  # 8 flags, one per byte
    v = v | (v >> 7)
    v = v | (v >> 14)
    v = v | (v >> 28)
    return v & BYTE_MASK


def _meta_bytes(scales: GroupScales) -> torch.Tensor:
    """Return uint8 (R, G*4) unit metadata: Ea, Eb bits, Ec bits of groups 0-7, of groups 8-15 (spec 4)."""
    rows = scales.scale.shape[0]
    ea = _ea_codes(scales.scale)  # (R,G,1)
    eb = _fold_flags(scales.eb)  # (R,G,1)
    ec = _fold_flags(scales.ec.view(torch.int16).view(rows, -1, HIF4.ec_per_unit))  # (R,G,2)
    return torch.cat((ea.to(torch.int64), eb, ec), dim=-1).to(torch.uint8).view(rows, -1)


def _pack_codes(rounded: torch.Tensor, bits: torch.Tensor, out: torch.Tensor) -> None:
    """Write into uint8 ``out`` (R, P/2) the code bytes of rounded magnitudes (R, P) and BF16 bits (R, P)."""
    pairs = rounded.to(torch.int16).view(torch.int32)  # n0 | n1 << 16 (truncation = floor: c)
    pairs.bitwise_or_((bits.view(torch.int32) >> SIGN_TO_PAIR_SHIFT) & PAIR_SIGN_BITS)  # sign -> bit 3
    pairs.bitwise_or_(pairs >> NIBBLE_PAIR_SHIFT)
    out.copy_(pairs)  # int32 -> uint8 keeps the low byte (modulo 256): n0 | n1 << 4


def quantize_toolkit(rows: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, chunk_elements: int) -> bool:
    """Write the toolkit encoding of BF16 ``rows`` (R, P) into ``codes`` (R, P/2) and ``meta`` (R, P/16).

    ``rows`` contiguous, P a multiple of 64; same bytes as ``encode_toolkit`` + ``packing``. Returns
    False, writing nothing, when a unit holds a NaN (packed HiF4 has no NaN code).
    """
    bits = rows.view(torch.int16)
    scales = _group_scales(bits, chunk_elements)
    if scales is None:
        return False
    meta.copy_(_meta_bytes(scales))
    multiplier_lanes = _scaled_lanes(scales.reciprocal * 4.0, scales.doublings, -1)
    for start, stop in _row_chunks(rows.shape[0], rows.shape[1], chunk_elements):
        chunk = bits[start:stop]
        rounded = _rounded_magnitudes(chunk & BF16_MAGNITUDE_MASK, multiplier_lanes[start:stop])
        _pack_codes(rounded, chunk, codes[start:stop])
    return True


def ea_values(ea_code: torch.Tensor) -> torch.Tensor:
    """Return float32 values (1 + m/4) * 2^(E-48) of int32 E6M2 codes, built as float32 bit patterns."""
    exponent = (ea_code >> HIF4.ea_mantissa_bits) - HIF4.ea_exponent_bias + F32_EXPONENT_BIAS
    mantissa = ea_code & 0x3
    return ((exponent << F32_MANTISSA_BITS) | (mantissa << (F32_MANTISSA_BITS - HIF4.ea_mantissa_bits))).view(
        torch.float32)


def dequantize_rows(codes: torch.Tensor, meta: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """Write the values of code bytes (R, P/2) and metadata (R, G*4) into ``out`` (R, K <= P).

    Every value is exact in BF16 and float32 (``out``'s dtype rounds it otherwise). Returns None, or,
    when a unit has the reserved Ea code 0xFF, the int32 Ea codes (R, G) for the caller to report
    (nothing is written then).
    """
    table, eb_bit, ec_bit = _tables(codes.device)
    rows = codes.shape[0]
    word = meta.contiguous().view(torch.int32)  # (R, G): Ea | Eb << 8 | Ec << 16 (spec 4)
    ea_code = word & BYTE_MASK
    if bool((ea_code == HIF4.ea_reserved_code).any()):
        return ea_code
    eb = ((word >> EB_BYTE_SHIFT) & BYTE_MASK).unsqueeze(-1)
    ec = ((word >> EC_BITS_SHIFT) & EC_BITS_MASK).unsqueeze(-1)
    doublings = ((eb >> eb_bit) & 1).add_((ec >> ec_bit) & 1)  # (R, G, 16): Eb + Ec per Ec group
    step = (ea_values(ea_code) * HIF4.magnitude_step).unsqueeze(-1) * (1 << doublings).to(torch.float32)
    step_lanes = (step.to(torch.bfloat16).view(torch.int16).to(torch.int64) * REPEAT_4_LANES).view(torch.bfloat16)
    signed_codes = torch.index_select(table, 0, codes.reshape(-1).to(torch.int32)).view(torch.bfloat16)
    values = signed_codes.mul_(step_lanes.view(-1)).view(rows, -1)
    out.copy_(values[:, : out.shape[1]] if out.shape[1] != values.shape[1] else values)
    return None

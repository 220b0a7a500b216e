"""Bit packing of HiF4 element codes and unit metadata into bytes (spec section 4).

Why this module exists: the packed layout is the storage contract shared by the codec, the spec's
test vectors and any independent reader, so it lives in one place, with the bit diagrams:

element bytes, two 4-bit codes per byte, first element in the low nibble::

    bit  7654:3210
         e1  : e0        e = s (bit 3) | c (bits 0-2)

metadata, 4 bytes per 64-element unit::

    byte 0: Ea (E6M2 code)
    byte 1: Eb bits for the 8 groups of 8, group j at bit j (LSB first)
    byte 2: Ec bits for groups of 4 numbered 0-7, group j at bit j
    byte 3: Ec bits for groups of 4 numbered 8-15, group 8+j at bit j
"""

from __future__ import annotations

import torch

from hif4fmt.codec.format import HIF4

_LOW_NIBBLE = 0x0F
_NIBBLE_BITS = 4


def _bit_weights(count: int, device: torch.device) -> torch.Tensor:
    return (1 << torch.arange(count, device=device, dtype=torch.int32)).to(torch.int32)


def pack_nibbles(element_codes: torch.Tensor) -> torch.Tensor:
    """Return uint8 (..., K/2) from element codes (..., K) in 0..15, first element in the low nibble."""
    codes = element_codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << _NIBBLE_BITS)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Return uint8 element codes (..., 2*B) from packed bytes (..., B): low nibble first."""
    low = packed & _LOW_NIBBLE
    high = packed >> _NIBBLE_BITS
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_metadata(ea_code: torch.Tensor, eb: torch.Tensor, ec: torch.Tensor) -> torch.Tensor:
    """Return uint8 (..., G*4) metadata from Ea (..., G) int, Eb (..., G, 8) bool, Ec (..., G, 16) bool."""
    device = ea_code.device
    weights8 = _bit_weights(8, device)
    eb_byte = (eb.to(torch.int32) * weights8).sum(dim=-1)
    ec_bits = ec.to(torch.int32).unflatten(-1, (2, 8))
    ec_bytes = (ec_bits * weights8).sum(dim=-1)  # (..., G, 2): groups 0-7, groups 8-15
    meta = torch.cat((ea_code.to(torch.int32).unsqueeze(-1), eb_byte.unsqueeze(-1), ec_bytes), dim=-1)
    return meta.to(torch.uint8).flatten(-2)


def unpack_metadata(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return Ea (..., G) int32, Eb (..., G, 8) bool, Ec (..., G, 16) bool from uint8 (..., G*4)."""
    per_unit = meta.unflatten(-1, (-1, HIF4.meta_bytes_per_unit)).to(torch.int32)
    weights8 = _bit_weights(8, meta.device)
    ea_code = per_unit[..., 0]
    eb = (per_unit[..., 1:2] & weights8) != 0
    ec = ((per_unit[..., 2:4].unsqueeze(-1) & weights8) != 0).flatten(-2)
    return ea_code, eb, ec

"""The HiFloat4 format as one frozen record of facts (spec/hifloat4.md section 2).

Why this module exists: every number that defines HiF4 (unit size, sub-group sizes, the element code
table, the E6M2 scale code, its clamps, the 1/7 constant of the toolkit encoder) is declared here once,
and the encoders, the packer, the reference implementation and the vector generator read it from here.
Torch-free, so the numpy reference and the spec tooling can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

HIFLOAT4_SPEC_VERSION = "1.0"  # version of spec/hifloat4.md that this codec implements


@dataclass(frozen=True)
class HiF4Format:
    """Facts of the HiF4 number format; see spec/hifloat4.md section 2 for each field."""

    name: str = "hifloat4"
    unit: int = 64  # elements sharing one 32-bit metadata word, along the last axis    # spec 2.1
    eb_group: int = 8  # elements per Eb bit (x2 scale)                                   # spec 2.3
    ec_group: int = 4  # elements per Ec bit (further x2 scale)                            # spec 2.3
    element_bits: int = 4  # sign bit 3, magnitude code bits 0-2                           # spec 2.2
    sign_mask: int = 0x8  # element bit 3: sign
    magnitude_mask: int = 0x7  # element bits 0-2: magnitude code c, value c/4
    max_magnitude_code: int = 7  # c = 7 means 1.75
    magnitude_step: float = 0.25  # value of one magnitude code step (c/4)
    ea_exponent_bias: int = 48  # E6M2: value (1 + m/4) * 2^(E - 48)                       # spec 2.4
    ea_mantissa_bits: int = 2
    ea_exponent_bits: int = 6
    ea_reserved_code: int = 0xFF  # E=63, m=3: reserved, never produced, rejected on decode
    scale_min: float = 2.0**-48  # Ea code 0x00
    scale_max: float = 49152.0  # 1.5 * 2^15, Ea code 0xFE
    meta_bytes_per_unit: int = 4  # Ea, Eb (8 bits), Ec (16 bits), LSB first              # spec 2.5
    toolkit_r7: float = 0.142578125  # 1/7 rounded to BF16 (0x3E12)                       # spec 3.1

    @property
    def eb_per_unit(self) -> int:
        return self.unit // self.eb_group  # 8

    @property
    def ec_per_unit(self) -> int:
        return self.unit // self.ec_group  # 16

    @property
    def ec_per_eb(self) -> int:
        return self.eb_group // self.ec_group  # 2

    @property
    def bits_per_value(self) -> float:
        return (self.unit * self.element_bits + 8 * self.meta_bytes_per_unit) / self.unit  # 4.5


HIF4 = HiF4Format()

# Magnitude code c (bits 0-2) -> value relative to the unit scale before Eb/Ec: c/4.   # spec 2.2
MAGNITUDE_VALUES = tuple(c * HIF4.magnitude_step for c in range(HIF4.max_magnitude_code + 1))


def ea_code_value(code: int) -> float:
    """Return the float value of an 8-bit E6M2 code: (1 + m/4) * 2^(E - 48). Reserved 0xFF -> ValueError."""
    if not 0 <= code <= 0xFE:
        raise ValueError(f"Ea code {code:#04x}: expected 0x00..0xFE (0xFF is reserved)")
    exponent, mantissa = code >> HIF4.ea_mantissa_bits, code & 0x3
    return (1.0 + mantissa / 4.0) * 2.0 ** (exponent - HIF4.ea_exponent_bias)

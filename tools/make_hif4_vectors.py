"""Generate the golden HiF4 test vectors in spec/vectors/hifloat4-v1.json from the spec-literal reference.

Why this script exists: spec/hifloat4.md promises test vectors that an independent implementation can
check itself against. They are computed by ``hif4fmt.codec.reference`` (numpy, spec-literal, no torch),
never by the fast codec, so a test comparing the fast codec to these files compares two implementations.
Deterministic: running it twice writes the same bytes. Usage: ``python tools/make_hif4_vectors.py [OUT]``.

File layout (spec 7): {"spec_version", "format", "cases": [{"name", "description", "shape": [K],
"input_bf16": [hex u16 ...], "expected": {encoder: {"elements": hex bytes, "meta": hex bytes,
"dequantized_bf16": [hex u16 ...]}}}]}. Inputs are one row of K elements; K not a multiple of 64 is
zero-padded for encoding and the padding's codes are included in "elements"/"meta".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from hif4fmt.codec import reference
from hif4fmt.codec.format import HIF4, HIFLOAT4_SPEC_VERSION

F32 = np.float32
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "hifloat4-v1.json"
ENCODER_NAMES = ("toolkit", "ascend")


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """Return uint16 BF16 bit patterns of float32 values (rounded to nearest even first)."""
    return (reference.bf16_round(np.asarray(values, dtype=F32)).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(F32)


def unit_with(prefix: list[float]) -> list[float]:
    return list(prefix) + [0.0] * (HIF4.unit - len(prefix))


def cases() -> list[tuple[str, str, list[float]]]:
    """Return (name, description, values) for every vector; values are rounded to BF16 on output."""
    rng = np.random.default_rng(20261124)
    all_codes = [7.0] + [0.0] * 7 + [c / 4 for c in range(8)] + [-(c / 4) for c in range(8)]  # -(0/4) is -0.0
    out = [
        ("all_element_codes",
         "Unit max 7 gives sf = 1 (7 * r7 = 0.998046875 rounds to 1.0 in BF16); elements 8-23 hold "
         "+0..+1.75 and -0..-1.75 with Eb = Ec = 0, i.e. all 16 element codes.",
         unit_with(all_codes)),
        ("ties_between_codes",
         "sf = 1 (max 7); elements 8-15 hold the ties 0.125, 0.375, ..., 1.875 and 16-23 their negatives: "
         "the toolkit rounds ties away from zero, Ascend to even; 1.875 saturates to 1.75.",
         unit_with([7.0] + [0.0] * 7 + [(2 * c + 1) / 8 for c in range(8)] + [-(2 * c + 1) / 8 for c in range(8)])),
        ("eb_threshold_exactly_4",
         "sf = 1: group 1 (elements 8-15) has max exactly 4.0 (Eb set), group 2 max 3.984375, the BF16 "
         "value just below 4 (Eb clear).",
         unit_with([7.0] + [0.0] * 7 + [4.0, 1.0] + [0.0] * 6 + [3.984375, 1.0])),
        ("ec_threshold_exactly_2",
         "sf = 1: group of 4 number 2 (elements 8-11) has max exactly 2.0 (Ec set), number 3 max 1.9921875 "
         "(Ec clear; 1.9921875 rounds to code 8 -> saturates at 7).",
         unit_with([7.0] + [0.0] * 7 + [2.0, 0.5, 0.0, 0.0, 1.9921875, 0.5])),
        ("e6m2_round_carry_up",
         "max 13.125: bf16(13.125 * r7) = 1.875, E6M2 rounding 7.5 -> 8 (ties to even) carries into the "
         "exponent: sf = 2.0.",
         unit_with([13.125, 1.0, -2.0, 3.0, 0.5])),
        ("e6m2_round_tie_down",
         "max 11.375: bf16(11.375 * r7) = 1.625, E6M2 rounding 6.5 -> 6 (ties to even): sf = 1.5.",
         unit_with([11.375, 1.0, -2.0, 3.0, 0.5])),
        ("scale_clamp_low_2pow_minus48",
         "All elements tiny (max 1e-20 < 7 * 2^-48): sf clamps to 2^-48 (Ea 0x00) and everything rounds to 0.",
         unit_with([1e-20, -1e-21, 5e-21])),
        ("scale_clamp_low_keeps_elements",
         "max 3 * 2^-48: sf clamps to 2^-48 but elements keep their values on that scale (no flush to zero).",
         unit_with([3 * 2.0**-48, -2.0**-48, 0.5 * 2.0**-48, 2.0**-50])),
        ("scale_clamp_high_49152",
         "max 1e30: sf clamps to 49152 (Ea 0xFE); the max saturates to 1.75 * 4 * 49152 = 344064.",
         unit_with([1e30, -1e30, 3e5, 1e5, 1.0])),
        ("infinity_saturates",
         "+inf and -inf saturate to +-344064; the other elements of the unit go to zero.",
         unit_with([float("inf"), float("-inf"), 1.0, -5.0, 1000.0])),
        ("all_zero_unit", "An all-zero unit: sf = 2^-48, all codes 0.", [0.0] * HIF4.unit),
        ("negative_zeros",
         "-0 and tiny negatives keep the sign bit (code 0x8), decoding to -0.0.",
         unit_with([1.0, -0.0, -1e-3, -0.0, 0.0])),
        ("one_outlier_gaussian",
         "N(0,1) unit with one outlier of 100: the outlier's groups get Eb/Ec, the rest lose resolution.",
         list(np.where(np.arange(64) == 37, 100.0, rng.standard_normal(64)))),
        ("gaussian_unit", "A N(0,1) unit.", list(rng.standard_normal(64))),
        ("student_t3_unit", "A Student-t (df 3) unit: heavy tails.", list(rng.standard_t(3, 64))),
        ("large_magnitudes", "N(0,1) * 2^40.", list(rng.standard_normal(64) * 2.0**40)),
        ("padding_k1", "K = 1: padded with 63 zeros.", [-2.5]),
        ("padding_k63", "K = 63: padded with 1 zero.", list(rng.standard_normal(63))),
        ("padding_k65", "K = 65: two units, the second padded with 63 zeros.", list(rng.standard_normal(65))),
        ("padding_k100", "K = 100: two units, 28 zeros of padding.", list(rng.standard_normal(100))),
    ]
    # Units where the two encoders give different codes, found by a seeded search.
    differing = []
    search = rng.standard_normal((4096, 64)).astype(F32)
    search = reference.bf16_round(search)
    toolkit_bytes = reference.quantize_units(search, "toolkit")
    ascend_bytes = reference.quantize_units(search, "ascend")
    for u in range(search.shape[0]):
        if not (np.array_equal(toolkit_bytes[0][u], ascend_bytes[0][u]) and np.array_equal(toolkit_bytes[1][u], ascend_bytes[1][u])):
            differing.append(u)
        if len(differing) == 4:
            break
    for n, u in enumerate(differing):
        out.append((f"encoders_differ_{n}", "A N(0,1) unit on which the toolkit and Ascend encoders give different codes.",
                    list(search[u])))
    return out


def vector(name: str, description: str, values: list[float]) -> dict:
    """Return one case: inputs as BF16 bits, and per encoder the packed bytes and decoded BF16 bits."""
    with np.errstate(over="ignore"):
        inputs = bf16_bits(np.array(values, dtype=np.float64).astype(F32))
    k = len(values)
    pad = (-k) % HIF4.unit
    units = np.concatenate([from_bf16_bits(inputs), np.zeros(pad, dtype=F32)]).reshape(-1, HIF4.unit)
    expected = {}
    for encoder in ENCODER_NAMES:
        elements, meta = reference.quantize_units(units, encoder)
        decoded = reference.dequantize_units(elements, meta).reshape(-1)[:k]
        expected[encoder] = {
            "elements": elements.tobytes().hex(),
            "meta": meta.tobytes().hex(),
            "dequantized_bf16": [f"{b:04x}" for b in bf16_bits(decoded)],
        }
    return {"name": name, "description": description, "shape": [k],
            "input_bf16": [f"{b:04x}" for b in inputs], "expected": expected}


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    document = {
        "spec_version": HIFLOAT4_SPEC_VERSION,
        "format": "hifloat4",
        "unit": HIF4.unit,
        "encoders": list(ENCODER_NAMES),
        "cases": [vector(*case) for case in cases()],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(document['cases'])} cases to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Behaviours spec/state-v1.md settles explicitly (issue 15, item 13), each proved on a crafted file."""

from __future__ import annotations

import pytest

from hif4fmt.errors import StateFormatError
from hif4fmt.state import encode_state, read_state, read_state_bytes
from state_support import assemble, split_file, tiny_state


def _parts():
    major, minor, header, data = split_file(encode_state(tiny_state()))
    return header, data


def _read(header, data, load_tensors=True):
    return read_state_bytes(assemble(header, data), load_tensors=load_tensors, name="crafted.hif4")


def test_readers_do_not_enforce_the_writers_1_mib_limit_on_producer_and_calibration():
    header, data = _parts()
    header["producer"] = {"notes": ["x" * 60_000] * 20}  # 1.2 MB of canonical msgpack
    header["calibration"] = {"notes": ["y" * 60_000] * 20}
    state = _read(header, data)
    assert len(state.producer["notes"]) == 20 and len(state.calibration["notes"]) == 20


def test_both_layers_and_excluded_are_required_but_not_an_entry_per_bound_component():
    header, data = _parts()
    component = next(iter(header["components"]))
    del header["components"][component]["excluded"]
    with pytest.raises(StateFormatError, match="excluded"):
        _read(header, data)


def test_a_retained_block_naming_an_unbound_component_is_accepted():
    header, data = _parts()
    assert "transformer_2" not in header["base"]["components"]
    header["recipe"]["retained_blocks"] = ["transformer_2:3"]
    assert [str(b) for b in _read(header, data).recipe.retained_blocks] == ["transformer_2:3"]


def test_format_version_must_be_spelled_major_dot_minor_exactly():
    header, data = _parts()
    for spelling in ("1", "1.00", "01.0", " 1.0", "1.0 "):
        header["format_version"] = spelling
        with pytest.raises(StateFormatError, match="format_version"):
            _read(header, data)


def test_a_header_only_read_checks_mask_stats_types_but_not_their_values():
    header, data = _parts()
    component = next(iter(header["components"]))
    header["components"][component]["layers"][0]["mask_stats"] = {"min": 5.0, "max": -1.0, "mean": 0.0}
    assert _read(header, data, load_tensors=False)  # header only: values not compared
    with pytest.raises(StateFormatError, match="mask_stats .* disagree with the stored mask"):
        _read(header, data)
    header["components"][component]["layers"][0]["mask_stats"] = {"min": 1, "max": 2.0, "mean": 1.5}
    with pytest.raises(StateFormatError, match="min"):
        _read(header, data, load_tensors=False)  # an int is not a float, even header-only


def test_tensor_names_may_hold_dash_and_slash_and_unreferenced_tensor_values_are_not_checked():
    import hashlib
    import struct

    header, data = _parts()
    last = max(header["tensors"].values(), key=lambda t: t["offsets"][1])["offsets"][1]
    begin = -(-last // 64) * 64
    zeros = struct.pack("<4f", 0.0, -1.0, float("inf"), float("nan"))  # would be invalid mask values
    header["tensors"]["zz-extra/a-b.c"] = {"dtype": "float32", "shape": [4], "offsets": [begin, begin + 16],
                                           "sha256": hashlib.sha256(zeros).hexdigest()}
    state = _read(header, data + bytes(begin - len(data)) + zeros)
    assert state.layout.tensor_count == len(header["tensors"])


def test_undecodable_msgpack_names_the_header_byte_range():
    header_bytes = b"\xc1" + bytes(7)  # 0xc1 is never used by msgpack
    with pytest.raises(StateFormatError, match=r"header \(file bytes 64\.\.72\) is not valid msgpack"):
        read_state_bytes(assemble(header_bytes, b""), name="crafted.hif4")


def test_the_golden_vector_is_valid_although_its_fingerprint_is_not_the_function_of_its_components():
    from hif4fmt.fingerprint import combine_fingerprint

    state = read_state("spec/vectors/state/tiny-v1.hif4")
    assert state.base.fingerprint != combine_fingerprint(state.base.components)

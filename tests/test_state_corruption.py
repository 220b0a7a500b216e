"""Every class of corrupt or invalid .hif4 file raises its typed error, naming where and what."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import struct

import msgpack
import numpy as np
import pytest

from hif4fmt.errors import (
    ChecksumError,
    Hif4Error,
    RecipeError,
    StateFormatError,
    StateWriteError,
    UnsupportedVersionError,
)
from hif4fmt.recipe import Recipe, RetainedBlock
from hif4fmt.state import encode_state, read_state, read_state_bytes
from state_support import assemble, split_file, tiny_state

MASK0 = "transformer/blocks.0.attn1.to_q.mask"


@pytest.fixture(scope="module")
def good() -> bytes:
    return encode_state(tiny_state())


@pytest.fixture()
def parts(good):
    major, minor, header, section = split_file(good)
    return copy.deepcopy(header), section


def test_bad_magic_raises_state_format_error(good):
    with pytest.raises(StateFormatError, match="bad magic"):
        read_state_bytes(b"GGUF" + good[4:])


def test_unknown_major_version_raises_unsupported_version_error_naming_both_versions(good):
    data = good[:8] + struct.pack("<HH", 2, 3) + good[12:]
    with pytest.raises(UnsupportedVersionError, match=r"2\.3 is not supported.*1\.x"):
        read_state_bytes(data)


def test_truncation_at_every_offset_raises_state_format_error(good):
    for length in range(len(good)):
        for load_tensors in (True, False):
            with pytest.raises(StateFormatError):
                read_state_bytes(good[:length], load_tensors=load_tensors)


def test_truncated_file_on_disk_raises_state_format_error(tmp_path, good):
    (tmp_path / "t.hif4").write_bytes(good[: len(good) - 10])
    with pytest.raises(StateFormatError, match="t.hif4"):
        read_state(tmp_path / "t.hif4")


def test_header_length_beyond_the_file_raises_state_format_error(good):
    data = good[:12] + struct.pack("<Q", len(good)) + good[20:]
    with pytest.raises(StateFormatError, match="runs past the end"):
        read_state_bytes(data)


@pytest.mark.parametrize("length", [0, 64 * 1024 * 1024 + 1, 2**64 - 1])
def test_header_length_zero_or_over_the_limit_raises_state_format_error(good, length):
    data = good[:12] + struct.pack("<Q", length) + good[20:]
    with pytest.raises(StateFormatError, match="header length"):
        read_state_bytes(data)


def test_nonzero_reserved_preamble_bytes_raise_state_format_error(good):
    with pytest.raises(StateFormatError, match="reserved"):
        read_state_bytes(good[:60] + b"\x01" + good[61:])


def test_flipped_header_byte_raises_checksum_error(good):
    data = bytearray(good)
    data[100] ^= 0x01
    with pytest.raises(ChecksumError, match="header checksum mismatch"):
        read_state_bytes(bytes(data))


def test_flipped_minor_version_raises_checksum_error(good):
    with pytest.raises(ChecksumError):
        read_state_bytes(good[:10] + struct.pack("<H", 1) + good[12:])


def test_flipped_tensor_byte_raises_checksum_error_naming_the_tensor(good):
    data = bytearray(good)
    data[-3] ^= 0x80
    with pytest.raises(ChecksumError, match=r"blocks\.1\.attn1\.to_q\.mask"):
        read_state_bytes(bytes(data))
    read_state_bytes(bytes(data), load_tensors=False)  # header-only reads never touch tensor bytes


def test_trailing_bytes_raise_state_format_error(good):
    with pytest.raises(StateFormatError, match="trailing"):
        read_state_bytes(good + b"\0")


def test_nonzero_padding_after_header_raises_state_format_error(parts):
    header, section = parts
    data = bytearray(assemble(header, section))
    header_end = 64 + struct.unpack("<Q", bytes(data[12:20]))[0]
    assert header_end % 64 != 0
    data[header_end] = 0x20
    with pytest.raises(StateFormatError, match="padding"):
        read_state_bytes(bytes(data))


def test_nonzero_padding_between_tensors_raises_state_format_error():
    state = tiny_state(in_features=72)  # 288 bytes per mask -> 32 zero bytes before the next at 320
    major, minor, header, section = split_file(encode_state(state))
    begin, end = header["tensors"][MASK0]["offsets"]
    assert (begin, end) == (0, 288) and section[end:end + 32] == bytes(32)
    bad = section[:end] + b"\x07" + section[end + 1:]
    with pytest.raises(StateFormatError, match="padding bytes before tensor"):
        read_state_bytes(assemble(header, bad))


def test_tensor_offsets_out_of_range_raise_state_format_error(parts):
    header, section = parts
    last = sorted(header["tensors"])[-1]
    begin, end = header["tensors"][last]["offsets"]
    header["tensors"][last]["offsets"] = [begin, end]
    with pytest.raises(StateFormatError, match="beyond|out of range|truncated"):
        read_state_bytes(assemble(header, section[:-64]))


def test_overlapping_tensors_raise_state_format_error(parts):
    header, section = parts
    second = sorted(header["tensors"])[1]
    begin, end = header["tensors"][second]["offsets"]
    header["tensors"][second]["offsets"] = [begin - 64, end - 64]
    with pytest.raises(StateFormatError, match="overlapping"):
        read_state_bytes(assemble(header, section))


def test_gap_between_tensors_raises_state_format_error(parts):
    header, section = parts
    second = sorted(header["tensors"])[1]
    begin, end = header["tensors"][second]["offsets"]
    header["tensors"][second]["offsets"] = [begin + 64, end + 64]
    with pytest.raises(StateFormatError, match="expected 256"):
        read_state_bytes(assemble(header, section[:begin] + bytes(64) + section[begin:]))


def test_tensor_length_that_disagrees_with_shape_raises_state_format_error(parts):
    header, section = parts
    header["tensors"][MASK0]["shape"] = [32]
    with pytest.raises(StateFormatError, match="needs 128"):
        read_state_bytes(assemble(header, section))


@pytest.mark.parametrize("value, label", [(np.nan, "nan"), (0.0, "0.0"), (-1.5, "-1.5"), (np.inf, "inf")])
def test_invalid_mask_values_are_refused_when_writing(value, label):
    state = tiny_state()
    mask = state.layers[1].mask.copy()
    mask[9] = value
    layers = (state.layers[0], dataclasses.replace(state.layers[1], mask=mask))
    with pytest.raises(StateWriteError, match=rf"blocks\.1\.attn1\.to_q: mask value {label}.*channel 9"):
        encode_state(dataclasses.replace(state, layers=layers))


@pytest.mark.parametrize("value", [np.nan, 0.0, -1.5, np.inf])
def test_invalid_mask_values_are_refused_when_reading(parts, value):
    header, section = parts
    begin, end = header["tensors"][MASK0]["offsets"]
    mask = np.frombuffer(section[begin:end], dtype="<f4").copy()
    mask[3] = value
    from state_support import replace_tensor
    section = replace_tensor(header, section, MASK0, mask.tobytes())
    with pytest.raises(StateFormatError, match=r"layer transformer/blocks\.0\.attn1\.to_q: mask value .* channel 3"):
        read_state_bytes(assemble(header, section))


def test_three_retained_blocks_are_refused_when_reading(parts):
    header, section = parts
    header["recipe"]["retained_blocks"] = ["transformer:5", "transformer:6", "transformer_2:7"]
    with pytest.raises(StateFormatError, match="3 retained blocks.*at most 2"):
        read_state_bytes(assemble(header, section))


def test_three_retained_blocks_are_refused_when_writing():
    state = tiny_state()
    recipe = Recipe(retained_blocks=(RetainedBlock("transformer", 5),))
    object.__setattr__(recipe, "retained_blocks", tuple(RetainedBlock("transformer", i) for i in (5, 6, 7)))
    with pytest.raises(RecipeError, match="at most 2"):
        encode_state(dataclasses.replace(state, recipe=recipe))


def test_quantized_layer_inside_a_retained_block_is_refused_on_write_and_read(parts):
    state = tiny_state()
    with pytest.raises(StateWriteError, match="retained block transformer:1"):
        encode_state(dataclasses.replace(state, recipe=Recipe(retained_blocks=("transformer:1",))))
    header, section = parts
    header["recipe"]["retained_blocks"] = ["transformer:0"]
    with pytest.raises(StateFormatError, match=r"blocks\.0\.attn1\.to_q: quantized, but it lies in retained block"):
        read_state_bytes(assemble(header, section))


def test_non_canonical_header_encodings_are_refused(parts):
    header, section = parts
    with pytest.raises(StateFormatError, match="not canonical"):
        read_state_bytes(assemble(dict(reversed(list(header.items()))), section, sort_keys=False))
    single = msgpack.packb({k: header[k] for k in sorted(header)}, use_bin_type=True, use_single_float=True)
    with pytest.raises(StateFormatError, match="not canonical"):
        read_state_bytes(assemble(single, section))


def test_bin_and_ext_values_in_the_header_are_refused(parts):
    for value in (b"\x00\x01", msgpack.ExtType(5, b"xy")):
        header, section = copy.deepcopy(parts)
        header["calibration"]["blob"] = value
        with pytest.raises(StateFormatError, match="msgpack|not allowed"):
            read_state_bytes(assemble(header, section))


def test_format_version_that_disagrees_with_the_preamble_is_refused(parts):
    header, section = parts
    header["format_version"] = "1.1"
    with pytest.raises(StateFormatError, match="disagrees"):
        read_state_bytes(assemble(header, section))


def test_mask_stats_that_disagree_with_the_mask_are_refused(parts):
    header, section = parts
    header["components"]["transformer"]["layers"][0]["mask_stats"]["max"] = 99.0
    with pytest.raises(StateFormatError, match="mask_stats"):
        read_state_bytes(assemble(header, section))


def test_missing_required_key_is_refused_naming_it(parts):
    header, section = parts
    del header["components"]["transformer"]["layers"][1]["weight_fingerprint"]
    with pytest.raises(StateFormatError, match="missing key 'weight_fingerprint'"):
        read_state_bytes(assemble(header, section))


def test_wrong_value_type_is_refused_naming_the_field(parts):
    header, section = parts
    header["components"]["transformer"]["layers"][0]["in_features"] = "64"
    with pytest.raises(StateFormatError, match="in_features: expected int, found str"):
        read_state_bytes(assemble(header, section))


def test_layer_of_an_unbound_component_is_refused_on_write_and_read(parts):
    state = tiny_state()
    layer = dataclasses.replace(state.layers[0], component="transformer_2")
    with pytest.raises(StateWriteError, match="not bound"):
        encode_state(dataclasses.replace(state, layers=(layer,)))
    header, section = parts
    header["components"]["transformer_2"] = {"layers": [], "excluded": [{"module": "x", "reason": "r"}]}
    with pytest.raises(StateFormatError, match="not bound"):
        read_state_bytes(assemble(header, section))


def test_duplicate_layers_are_refused_on_write_and_read(parts):
    state = tiny_state()
    with pytest.raises(StateWriteError, match="listed twice"):
        encode_state(dataclasses.replace(state, layers=(state.layers[0], state.layers[0])))
    header, section = parts
    header["components"]["transformer"]["excluded"].append({"module": "proj_out", "reason": "again"})
    with pytest.raises(StateFormatError, match="listed twice"):
        read_state_bytes(assemble(header, section))


def test_unsorted_layer_list_is_refused(parts):
    header, section = parts
    header["components"]["transformer"]["layers"].reverse()
    with pytest.raises(StateFormatError, match="not sorted"):
        read_state_bytes(assemble(header, section))


def test_mask_that_is_not_float32_in_features_is_refused_when_writing():
    state = tiny_state()
    for bad in (state.layers[0].mask.astype(np.float64), state.layers[0].mask[:32], list(state.layers[0].mask)):
        with pytest.raises(StateWriteError, match="float32 array of shape \\(64,\\)"):
            encode_state(dataclasses.replace(state, layers=(dataclasses.replace(state.layers[0], mask=bad),)))


def test_bad_names_and_digests_are_refused_when_writing():
    state = tiny_state()
    for change, pattern in (({"module": "blocks.0/../x"}, "module"), ({"weight_fingerprint": "ABC"}, "64 lowercase")):
        layer = dataclasses.replace(state.layers[0], **change)
        with pytest.raises(StateWriteError, match=pattern):
            encode_state(dataclasses.replace(state, layers=(layer,)))


def test_file_that_cannot_be_opened_raises_state_format_error(tmp_path):
    with pytest.raises(StateFormatError, match="cannot open"):
        read_state(tmp_path / "missing.hif4")
    with pytest.raises(StateFormatError, match="cannot open"):
        read_state(tmp_path)


def test_every_error_class_used_is_a_hif4_error():
    for cls in (StateFormatError, ChecksumError, UnsupportedVersionError, StateWriteError, RecipeError):
        assert issubclass(cls, Hif4Error)
    assert issubclass(ChecksumError, StateFormatError) and issubclass(UnsupportedVersionError, StateFormatError)


def test_tensor_sha256_must_match_even_if_header_is_valid(parts):
    header, section = parts
    header["tensors"][MASK0]["sha256"] = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ChecksumError, match="blocks.0.attn1.to_q.mask"):
        read_state_bytes(assemble(header, section))


class _ReadTracker:
    """A file wrapper that records the furthest byte any read reached."""

    def __init__(self, handle):
        self.handle, self.furthest = handle, 0

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()

    def read(self, size=-1):
        data = self.handle.read(size)
        self.furthest = max(self.furthest, self.handle.tell())
        return data


def test_header_only_read_never_reads_a_tensor_byte(tmp_path, monkeypatch):
    import hif4fmt.state.reader as reader_module

    path = tmp_path / "s.hif4"
    path.write_bytes(encode_state(tiny_state(layers=3, in_features=256)))
    trackers = []

    def tracking_open(file, mode="r", *args, **kwargs):
        trackers.append(_ReadTracker(open(file, mode, *args, **kwargs)))
        return trackers[-1]

    monkeypatch.setattr(reader_module, "open", tracking_open, raising=False)
    state = read_state(path, load_tensors=False)
    assert trackers[-1].furthest == state.layout.data_offset < state.layout.file_bytes
    read_state(path)
    assert trackers[-1].furthest == path.stat().st_size  # the full read does reach the masks


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.hif4"
    os.mkfifo(fifo)
    with pytest.raises(StateFormatError, match="not a regular file"):
        read_state(fifo)


@pytest.mark.parametrize("key, value, message", [
    ("percentile", 99, r"recipe\.percentile: stored 99 \(int\), canonical form is 99\.0"),
    ("alpha", 0, r"recipe\.alpha: stored 0 \(int\)"),
    ("eps", True, r"eps"),
    ("retained_blocks", ["transformer_2:1", "transformer:5"], r"recipe\.retained_blocks: stored"),
    ("retained_blocks", ["transformer:10", "transformer:2"], r"recipe\.retained_blocks: stored"),
    ("retained_blocks", ["transformer:3", "transformer:3"], r"duplicates"),
    ("retained_blocks", [" transformer:3"], r"is not COMPONENT:INDEX"),
    ("retained_blocks", ["transformer:03"], r"is not COMPONENT:INDEX"),
    ("retained_blocks", ["transformer:\u00b2"], r"is not COMPONENT:INDEX"),
    ("retained_blocks", ["transformer:1000000000"], r"is not COMPONENT:INDEX"),
    ("retained_blocks", [3], r"is not COMPONENT:INDEX"),
])
def test_recipe_in_any_but_its_canonical_spelling_is_refused(parts, key, value, message):
    header, section = parts
    header["recipe"][key] = value
    with pytest.raises(StateFormatError, match=message):
        read_state_bytes(assemble(header, section))


def test_canonical_retained_blocks_are_ordered_by_component_then_numeric_index(parts):
    header, section = parts
    header["recipe"]["retained_blocks"] = ["transformer:2", "transformer:10"]
    assert [str(b) for b in read_state_bytes(assemble(header, section)).recipe.retained_blocks] == [
        "transformer:2", "transformer:10"]


@pytest.mark.parametrize("reason, accepted", [
    ("kept\u00a0high precision \u2192 boundary", True), ("zero\u200bwidth", True), ("line\nbreak", False),
    ("bell\x07", False), ("c1 csi\x9b2J", False), ("delete\x7f", False), ("", False),
])
def test_reasons_are_text_without_control_characters_on_write_and_read(parts, reason, accepted):
    state = tiny_state()
    excluded = (dataclasses.replace(state.excluded[0], reason=reason),)
    header, section = parts
    header["components"]["transformer"]["excluded"][0]["reason"] = reason
    if accepted:
        assert read_state_bytes(encode_state(dataclasses.replace(state, excluded=excluded))).excluded[0].reason == reason
        read_state_bytes(assemble(header, section))
    else:
        with pytest.raises(StateWriteError, match="reason"):
            encode_state(dataclasses.replace(state, excluded=excluded))
        with pytest.raises(StateFormatError, match="reason"):
            read_state_bytes(assemble(header, section))


@pytest.mark.parametrize("hints, message", [
    ({"repo_id": "org/name\nlicense: mit"}, "control character U\\+000A"),
    ({"repo id": "org/name"}, "hub hint key"),
    ({"repo_id": ""}, "non-empty"),
    ({"repo_id": 5}, "must be a string"),
])
def test_hub_hints_are_names_to_text_on_write_and_read(parts, hints, message):
    state = tiny_state()
    with pytest.raises(StateWriteError, match=message):
        encode_state(dataclasses.replace(state, base=dataclasses.replace(state.base, hub_hints=hints)))
    header, section = parts
    header["base"]["hub_hints"] = hints
    with pytest.raises(StateFormatError, match=message):
        read_state_bytes(assemble(header, section))


def test_tensor_names_outside_the_allowed_characters_are_refused(parts):
    header, section = parts
    header["tensors"]["transformer/blocks.1.attn1.to_q.mask"]["shape"] = [64]
    header["tensors"]["transformer/x y"] = header["tensors"].pop("transformer/blocks.1.attn1.to_q.mask")
    header["components"]["transformer"]["layers"] = header["components"]["transformer"]["layers"][:1]
    with pytest.raises(StateFormatError, match="tensor name 'transformer/x y'"):
        read_state_bytes(assemble(header, section))


def test_nesting_counts_maps_and_arrays_only(parts):
    for maps, ok in ((30, True), (31, False)):  # under calibration (depth 2): innermost map at depth 32 / 33
        header, section = copy.deepcopy(parts)
        nested: object = 1
        for _ in range(maps):
            nested = {"k": nested}
        header["calibration"]["deep"] = nested
        if ok:
            assert read_state_bytes(assemble(header, section)).calibration["deep"]["k"]["k"]
            encode_state(dataclasses.replace(tiny_state(), calibration={"deep": nested}))
        else:
            with pytest.raises(StateFormatError, match="nested deeper than 32"):
                read_state_bytes(assemble(header, section))
            with pytest.raises(StateWriteError, match="nested deeper than 32"):
                encode_state(dataclasses.replace(tiny_state(), calibration={"deep": nested}))


def test_retained_block_the_format_cannot_store_is_refused_before_writing():
    with pytest.raises(RecipeError, match="transformer:1000000000"):
        Recipe(retained_blocks=(RetainedBlock("transformer", 10**9),))


def test_retained_block_the_format_cannot_store_is_refused_when_writing():
    """A recipe that bypassed validation (object.__setattr__) is still caught by the writer."""
    state = tiny_state()
    recipe = Recipe()
    object.__setattr__(recipe, "retained_blocks", (RetainedBlock("transformer", 10**9),))
    with pytest.raises((StateWriteError, RecipeError), match="transformer:1000000000"):
        encode_state(dataclasses.replace(state, recipe=recipe))


@pytest.mark.parametrize("label, payload, message", [
    ("1,000,001 maps", b"\xdc\x00\x02" + b"\xdd" + (500_000).to_bytes(4, "big") + b"\x80" * 500_000
     + b"\xdd" + (500_001).to_bytes(4, "big") + b"\x80" * 500_001, "more than 1000000 maps and arrays"),
    ("4,000,001 values", (b"\xdd" + (1_000_000).to_bytes(4, "big")) * 4 + b"\x91\x01"  # arrays in arrays
     + b"\x01" * 999_999 * 4, "more than 4000000 values"),
])
def test_headers_that_would_expand_into_too_many_objects_are_refused(label, payload, message):
    import spec_reader

    header = b"\x81\xa4blob" + payload  # {"blob": [...]}: small on disk, millions of Python objects
    data = assemble(header, b"")
    with pytest.raises(StateFormatError, match=message):
        read_state_bytes(data)
    with pytest.raises(spec_reader.SpecInvalid, match="too many"):
        spec_reader.read_state_bytes(data)


def test_writer_refuses_a_header_the_reader_would_refuse_for_its_size():
    runs: list = [1]
    for _ in range(4):  # four 1,000,000-entry arrays, each the first entry of the next
        runs = [runs] + [0] * 999_999
    state = dataclasses.replace(tiny_state(), calibration={"runs": runs})
    with pytest.raises(StateWriteError, match="more than 4000000 values"):
        encode_state(state)

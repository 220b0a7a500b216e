"""Golden bytes of format 1.0 and the hostile-file corpus, both produced by tools/make_state_vectors.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import hif4fmt.errors as errors
from hif4fmt.state import encode_state, read_state
import state_support  # noqa: F401  (puts the repo root on sys.path for tools.*)
from tools.make_state_vectors import (GOLDEN_1_1_NAME, GOLDEN_NAME, HOSTILE_DIR, VECTOR_DIR, golden_state,
                                      golden_state_1_1, hostile_files)

GOLDEN_SHA256 = "bbebd4bd4f277e5edb513debf291a8128b1c5ff8b2091c0aced44e93c4ed26a7"  # spec 10
GOLDEN_BYTES = 1360
GOLDEN_1_1_SHA256 = "6c550bab1d81ce003fd36a66f3977d08a1dc50cbcd7d13066a9245b22937d585"  # spec 10.1
GOLDEN_1_1_BYTES = 2640
MANIFEST = json.loads((HOSTILE_DIR / "manifest.json").read_text())


def test_golden_file_has_the_pinned_sha256():
    data = (VECTOR_DIR / GOLDEN_NAME).read_bytes()
    assert len(data) == GOLDEN_BYTES
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256


def test_writer_reproduces_the_golden_file_bit_for_bit():
    assert encode_state(golden_state()) == (VECTOR_DIR / GOLDEN_NAME).read_bytes()


def test_golden_file_reads_back_to_its_documented_content():
    state = read_state(VECTOR_DIR / GOLDEN_NAME)
    assert state == golden_state()
    (layer,) = state.layers
    assert layer.mask.tolist() == [0.5, 1.0, 2.0, 4.0]
    assert (layer.record.begin, layer.record.end) == (0, 16)
    assert (layer.mask_stats.min, layer.mask_stats.max, layer.mask_stats.mean) == (0.5, 4.0, 1.875)
    assert state.layout.data_offset == GOLDEN_BYTES - 16 and state.layout.data_offset % 64 == 0


def test_golden_file_preamble_bytes():
    data = (VECTOR_DIR / GOLDEN_NAME).read_bytes()
    assert data[:8].hex() == "89484946340d0a1a"
    assert data[8:12].hex() == "01000000"  # major 1, minor 0 (u16 little-endian)
    header_length = int.from_bytes(data[12:20], "little")
    assert hashlib.sha256(data[:20] + data[64:64 + header_length]).digest() == data[20:52]
    assert data[52:64] == bytes(12)
    assert data[-16:] == np.array([0.5, 1.0, 2.0, 4.0], dtype="<f4").tobytes()


def test_golden_1_1_file_is_pinned_and_reproduced_by_the_writer():
    data = (VECTOR_DIR / GOLDEN_1_1_NAME).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (GOLDEN_1_1_BYTES, GOLDEN_1_1_SHA256)
    assert data[8:12].hex() == "01000100"  # major 1, minor 1
    assert encode_state(golden_state_1_1()) == data


def test_golden_1_1_file_reads_back_to_its_documented_content():
    state = read_state(VECTOR_DIR / GOLDEN_1_1_NAME)
    assert state == golden_state_1_1()
    rotated, plain = state.layers
    assert (rotated.module, rotated.rotation, rotated.recipe.percentile, rotated.recipe.alpha) == (
        "blocks.0.attn1.to_k", "hadamard-64", 99.5, 0.25)
    assert plain.rotation is None and plain.recipe is None
    assert state.base.layout["name"] == "wan2.2-i2v-a14b" and len(state.base.tensors["transformer"]) == 3


def test_hostile_corpus_on_disk_is_what_the_tool_generates():
    generated = hostile_files()
    assert sorted(generated) == sorted(MANIFEST)
    for name, (data, error, _) in generated.items():
        assert (HOSTILE_DIR / name).read_bytes() == data, name
        assert MANIFEST[name]["error"] == error


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_hostile_file_raises_its_typed_error(name):
    expected = getattr(errors, MANIFEST[name]["error"])
    for load_tensors in (True, False):
        if not load_tensors and name in ("tensor_checksum.hif4", "nan_mask.hif4", "zero_mask.hif4",
                                         "negative_mask.hif4", "infinite_mask.hif4"):
            continue  # only detectable by reading tensor bytes, which header-only reads skip
        with pytest.raises(expected) as caught:
            read_state(HOSTILE_DIR / name, load_tensors=load_tensors)
        assert type(caught.value) is expected
        assert str(HOSTILE_DIR / name) in str(caught.value)


def test_golden_directory_path_is_spec_vectors_state():
    assert VECTOR_DIR == Path(__file__).resolve().parents[1] / "spec" / "vectors" / "state"

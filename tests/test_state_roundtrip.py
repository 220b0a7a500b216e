"""State files: round trips keep every field, rebuilds are byte-identical, masks convert bit-exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
import pytest

from hif4fmt.constants import ALIGNMENT, HEADER_OFFSET, STATE_MAGIC
from hif4fmt.errors import StateWriteError
from hif4fmt.recipe import Recipe, RetainedBlock
from hif4fmt.state import State, encode_state, read_state, read_state_bytes, write_state
from hif4fmt.state.masks import bfloat16_bits_to_float32, float32_to_bfloat16_bits
from state_support import assemble, build_base, split_file, state_for_base, tiny_state


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("base") / "wan")


@pytest.fixture(scope="module")
def full_state(base_dir):
    recipe = Recipe(statistic="percentile", percentile=99.5, alpha=0.6, eps=1e-5,
                    retained_blocks=(RetainedBlock("transformer_2", 1),), encoder="ascend")
    return state_for_base(base_dir, recipe, hub_hints={"repo_id": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                                                        "revision": "abc123"})


def test_round_trip_preserves_every_field(tmp_path, full_state):
    path = tmp_path / "s.hif4"
    write_state(path, full_state)
    back = read_state(path)
    assert back == full_state
    assert back.recipe == full_state.recipe and back.recipe.to_dict() == full_state.recipe.to_dict()
    assert back.calibration == full_state.calibration
    assert back.base == full_state.base and back.base.hub_hints["revision"] == "abc123"
    assert back.producer == {"name": "hif4fmt", "version": "0.1.0"}
    assert back.excluded == full_state.excluded
    assert [l.module for l in back.layers] == [l.module for l in full_state.layers]
    for original, read in zip(full_state.layers, back.layers):
        assert read.mask.dtype == np.float32 and read.mask.tobytes() == original.mask.tobytes()
        assert read.weight_fingerprint == original.weight_fingerprint
        assert (read.in_features, read.out_features) == (original.in_features, original.out_features)
    # 2 components x 2 blocks x 10 linears, minus the 10 of the retained block transformer_2:1
    assert len(back.layers) == 30
    assert len(back.excluded) == 10 + 2
    assert back.layout.file_bytes == path.stat().st_size


def test_header_only_read_gives_stats_and_records_but_no_masks(tmp_path, full_state):
    path = tmp_path / "s.hif4"
    write_state(path, full_state)
    header_only = read_state(path, load_tensors=False)
    full = read_state(path)
    for light, heavy in zip(header_only.layers, full.layers):
        assert light.mask is None
        assert light.record == heavy.record
        values = heavy.mask.astype(np.float64)
        assert light.mask_stats.min == values.min() and light.mask_stats.max == values.max()
        assert light.mask_stats.mean == pytest.approx(values.mean(), rel=1e-12)


def test_writing_the_same_state_twice_gives_identical_bytes(tmp_path, full_state):
    write_state(tmp_path / "a.hif4", full_state)
    write_state(tmp_path / "b.hif4", full_state)
    assert (tmp_path / "a.hif4").read_bytes() == (tmp_path / "b.hif4").read_bytes()


def test_rewriting_a_read_state_gives_identical_bytes(tmp_path, full_state):
    data = encode_state(full_state)
    assert encode_state(read_state_bytes(data)) == data


def test_construction_order_of_layers_and_maps_does_not_change_bytes(full_state):
    shuffled_layers = list(full_state.layers)
    shuffled_excluded = list(full_state.excluded)
    random.Random(7).shuffle(shuffled_layers)
    random.Random(8).shuffle(shuffled_excluded)
    reordered_calibration = dict(reversed(list(full_state.calibration.items())))
    base = dataclasses.replace(full_state.base, components=dict(reversed(list(full_state.base.components.items()))))
    other = State(full_state.recipe, reordered_calibration, base, tuple(shuffled_layers), tuple(shuffled_excluded))
    assert encode_state(other) == encode_state(full_state)


def test_tensors_are_in_name_order_on_64_byte_boundaries(full_state):
    data = encode_state(full_state)
    _, _, header, section = split_file(data)
    names = sorted(header["tensors"])
    position = 0
    for name in names:
        begin, end = header["tensors"][name]["offsets"]
        assert begin % ALIGNMENT == 0 and begin == -(-position // ALIGNMENT) * ALIGNMENT
        assert hashlib.sha256(section[begin:end]).hexdigest() == header["tensors"][name]["sha256"]
        position = end
    assert position == len(section)
    assert data[:8] == STATE_MAGIC and (len(data) - len(section)) % ALIGNMENT == 0 and HEADER_OFFSET == 64


def test_header_records_descriptors_recipe_and_binding(full_state):
    _, _, header, _ = split_file(encode_state(full_state))
    assert header["format"] == "hif4-state" and header["format_version"] == "1.0"
    for role in ("weight", "activation"):
        assert header["quantization"][role] == {"format": "hifloat4", "codec_spec": "hifloat4-spec 1.0",
                                                "unit": 64, "axis": -1, "axis_name": "in_features",
                                                "encoder": "ascend"}
    assert header["quantization"]["mask"]["dtype"] == "float32"
    assert header["recipe"] == full_state.recipe.to_dict()
    assert header["base"]["algorithm"] == "hif4fmt-sha256-tensors-v1"
    layer = header["components"]["transformer"]["layers"][0]
    assert sorted(layer) == ["in_features", "mask", "mask_stats", "module", "out_features", "weight_fingerprint"]
    assert layer["mask"] == f"transformer/{layer['module']}.mask"


@pytest.mark.parametrize("mask_dtype, bound", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_masks_round_trip_within_their_rounding_bound(mask_dtype, bound):
    state = tiny_state(mask_dtype, layers=3, in_features=256)
    data = encode_state(state)
    back = read_state_bytes(data)
    for original, read in zip(state.layers, back.layers):
        assert read.mask.dtype == np.float32
        relative = np.abs(read.mask.astype(np.float64) - original.mask) / original.mask
        assert relative.max() <= bound
    assert encode_state(back) == data  # conversion is idempotent: the rebuilt file is identical
    assert len(data) < len(encode_state(tiny_state("float32", layers=3, in_features=256)))


def test_bfloat16_conversion_rounds_to_nearest_even():
    values = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-7 + 2.0**-9, 3.0e38], dtype=np.float32)
    bits = float32_to_bfloat16_bits(values)
    # 1 + 2^-8 is a tie -> even (1.0); 1 + 3*2^-8 is a tie -> even (1 + 2^-6); above a tie rounds up
    assert [hex(b) for b in bits] == ["0x3f80", "0x3f80", "0x3f82", "0x3f81", "0x7f62"]
    assert bfloat16_bits_to_float32(bits)[0] == 1.0


def test_float16_overflow_is_refused_when_writing():
    state = tiny_state("float16")
    big = state.layers[0].mask.copy()
    big[5] = 1e6
    layers = (dataclasses.replace(state.layers[0], mask=big),) + state.layers[1:]
    with pytest.raises(StateWriteError, match=r"blocks\.0\.attn1\.to_q.*channel 5.*float16.*float32"):
        encode_state(dataclasses.replace(state, layers=layers))


def test_unknown_top_level_keys_are_preserved_in_extra(tmp_path):
    state = dataclasses.replace(tiny_state(), extra={"future_feature": {"level": 3, "names": ["a", "b"]}})
    write_state(tmp_path / "x.hif4", state)
    back = read_state(tmp_path / "x.hif4")
    assert back.extra == {"future_feature": {"level": 3, "names": ["a", "b"]}}
    assert encode_state(back) == (tmp_path / "x.hif4").read_bytes()


def test_extra_key_that_collides_with_a_header_key_is_refused():
    with pytest.raises(StateWriteError, match="recipe"):
        encode_state(dataclasses.replace(tiny_state(), extra={"recipe": 1}))


def test_a_newer_minor_version_with_new_keys_is_read():
    _, _, header, section = split_file(encode_state(tiny_state()))
    header["format_version"] = "1.7"
    header["new_in_1_7"] = "hello"
    header["components"]["transformer"]["layers"][0]["new_layer_key"] = 5  # nested: ignored
    back = read_state_bytes(assemble(header, section, minor=7))
    assert back.layout.format_version == "1.7"
    assert back.extra == {"new_in_1_7": "hello"}
    assert back.layers == tiny_state().layers


def test_state_equality_ignores_reader_layout_and_compares_masks_by_value():
    state = tiny_state()
    back = read_state_bytes(encode_state(state))
    assert back == state and back.layout is not None and state.layout is None
    changed = state.layers[0].mask.copy()
    changed[0] = np.nextafter(changed[0], np.float32(10))
    assert dataclasses.replace(state.layers[0], mask=changed) != state.layers[0]


def test_numpy_scalars_in_calibration_are_written_as_plain_numbers():
    state = dataclasses.replace(tiny_state(), calibration={"seed": np.int64(3), "guidance": np.float32(5.5),
                                                           "flag": np.bool_(True)})
    back = read_state_bytes(encode_state(state))
    assert back.calibration == {"seed": 3, "guidance": 5.5, "flag": True}
    assert type(back.calibration["seed"]) is int and type(back.calibration["guidance"]) is float


def test_bytes_do_not_depend_on_the_process_or_its_hash_seed(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import hashlib, sys\nsys.path[:0] = ['tests', '.']\nfrom state_support import tiny_state\n"
              "from hif4fmt.state import encode_state\n"
              "print(hashlib.sha256(encode_state(tiny_state('bfloat16', layers=5))).hexdigest())\n")
    digests = set()
    for seed in ("1", "2", "random"):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root,
                                env={**os.environ, "PYTHONHASHSEED": seed}, timeout=120)
        assert result.returncode == 0, result.stderr
        digests.add(result.stdout.strip())
    assert digests == {hashlib.sha256(encode_state(tiny_state("bfloat16", layers=5))).hexdigest()}

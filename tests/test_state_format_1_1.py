"""Format 1.1 (spec/state-v1.md 4.3, 4.6, 4.7, 8.1): layer recipes, rotation, base layout and tensor digests.

Proves: the new keys round-trip; a writer uses the lowest minor (1.0 without them, 1.1 with them); the
mask application string names R exactly when a layer is rotated; every rule the spec gives the new keys
is enforced on read; a 1.0 reader (tests/spec_reader.py, written from the 1.0 text) copes with a 1.1
state without rotation and refuses one with it; ``verify`` names each changed, added, removed or re-typed
base tensor and both layouts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import spec_reader
from hif4fmt.base import BaseCheckpoint
from hif4fmt.constants import MASK_APPLICATION, MASK_APPLICATION_ROTATED
from hif4fmt.errors import StateFormatError, StateWriteError
from hif4fmt.fingerprint import fingerprint_base
from hif4fmt.layouts import describe_layout
from hif4fmt.state import (BaseBinding, LayerRecipe, QuantizedLayer, State, TensorDigest, encode_state,
                           read_state_bytes)
from hif4fmt.verify import verify_state
from state_support import assemble, build_base, split_file, state_for_base, tiny_state

from hif4fmt.state.writer import write_state


def _with_layers(state: State, **changes) -> State:
    """Return ``state`` with ``changes`` applied to every quantized layer."""
    return dataclasses.replace(state, layers=tuple(dataclasses.replace(l, **changes) for l in state.layers))


def _state_1_1(base_dir, rotation=None) -> State:
    """Return a state for ``base_dir`` recording layout, tensors and one layer recipe per layer."""
    state = state_for_base(base_dir)
    fingerprint = fingerprint_base(base_dir)
    with BaseCheckpoint.open(base_dir) as base:
        binding = BaseBinding.from_fingerprint(fingerprint, base=base, layout=describe_layout(base_dir))
    layers = tuple(dataclasses.replace(l, recipe=LayerRecipe("percentile", 99.0 + i % 2 * 0.9, 0.25 * (i % 3)),
                                       rotation=rotation if i % 2 == 0 else None)
                   for i, l in enumerate(state.layers))
    return dataclasses.replace(state, base=binding, layers=layers)


def test_a_state_without_1_1_keys_is_written_as_1_0_and_with_them_as_1_1():
    plain = tiny_state()
    major, minor, header, _ = split_file(encode_state(plain))
    assert (major, minor, header["format_version"]) == (1, 0, "1.0")
    recipes = _with_layers(plain, recipe=LayerRecipe("max", None, 0.75))
    major, minor, header, _ = split_file(encode_state(recipes))
    assert (major, minor, header["format_version"]) == (1, 1, "1.1")
    assert header["components"]["transformer"]["layers"][0]["recipe"] == {"alpha": 0.75, "percentile": None,
                                                                           "statistic": "max"}
    assert header["quantization"]["mask"]["application"] == MASK_APPLICATION


def test_layer_recipes_rotation_layout_and_tensors_read_back_equal(tmp_path):
    base_dir = build_base(tmp_path / "base")
    state = _state_1_1(base_dir, rotation="hadamard-64")
    data = encode_state(state)
    back = read_state_bytes(data)
    assert back == state
    assert back.base.layout == describe_layout(base_dir)
    assert back.base.tensors == state.base.tensors and len(back.base.tensors["transformer"]) > 20
    assert [l.rotation for l in back.layers][:2] == ["hadamard-64", None]
    assert back.layers[1].recipe == LayerRecipe("percentile", 99.9, 0.25)
    assert encode_state(back) == data  # deterministic, and the reader loses nothing
    _, _, header, _ = split_file(data)
    assert header["quantization"]["mask"]["application"] == MASK_APPLICATION_ROTATED


def test_the_rotated_application_string_is_required_exactly_when_a_layer_is_rotated():
    rotated = _with_layers(tiny_state(), rotation="hadamard-64")
    _, _, header, data = split_file(encode_state(rotated))
    header["quantization"]["mask"]["application"] = MASK_APPLICATION
    with pytest.raises(StateFormatError, match="application.*names R"):
        read_state_bytes(assemble(header, data, minor=1))
    _, _, header, data = split_file(encode_state(_with_layers(tiny_state(), recipe=LayerRecipe("max", None, 0.5))))
    header["quantization"]["mask"]["application"] = MASK_APPLICATION_ROTATED
    with pytest.raises(StateFormatError, match="application"):
        read_state_bytes(assemble(header, data, minor=1))


@pytest.mark.parametrize("row_change, message", [
    ({"rotation": "none"}, "rotation 'none'"),
    ({"rotation": 1}, "rotation 1"),
    ({"recipe": {"statistic": "max", "percentile": 99.0, "alpha": 0.5}}, "must be nil"),
    ({"recipe": {"statistic": "percentile", "percentile": None, "alpha": 0.5}}, "percentile None"),
    ({"recipe": {"statistic": "percentile", "percentile": 99.9, "alpha": 1}}, "alpha 1"),
    ({"recipe": {"statistic": "percentile", "percentile": 100.5, "alpha": 0.5}}, r"\(0, 100\]"),
    ({"recipe": {"statistic": "mean", "percentile": None, "alpha": 0.5}}, "statistic 'mean'"),
    ({"recipe": {"statistic": "max", "alpha": 0.5}}, "missing key 'percentile'"),
])
def test_bad_layer_recipe_or_rotation_is_refused_naming_the_layer(row_change, message):
    _, _, header, data = split_file(encode_state(_with_layers(tiny_state(), recipe=LayerRecipe("max", None, 0.5))))
    header["components"]["transformer"]["layers"][0].update(row_change)
    with pytest.raises(StateFormatError, match=message) as info:
        read_state_bytes(assemble(header, data, minor=1))
    assert "blocks.0.attn1.to_q" in str(info.value)


def test_rotation_needs_whole_64_channel_units():
    state = _with_layers(tiny_state(in_features=96), rotation="hadamard-64")
    with pytest.raises(StateWriteError, match="multiple of 64"):
        encode_state(state)
    _, _, header, data = split_file(encode_state(tiny_state(in_features=96)))
    header["components"]["transformer"]["layers"][0]["rotation"] = "hadamard-64"
    header["quantization"]["mask"]["application"] = MASK_APPLICATION_ROTATED
    header["format_version"] = "1.1"
    with pytest.raises(StateFormatError, match="multiple of 64"):
        read_state_bytes(assemble(header, data, minor=1))


def test_base_tensors_that_contradict_a_weight_fingerprint_are_refused(tmp_path):
    state = _state_1_1(build_base(tmp_path / "base"))
    _, _, header, data = split_file(encode_state(state))
    first = state.layers[0]
    header["base"]["tensors"][first.component][f"{first.module}.weight"]["digest"] = "0" * 64
    with pytest.raises(StateFormatError, match="contradicts itself"):
        read_state_bytes(assemble(header, data, minor=1))
    tables = {c: dict(t) for c, t in state.base.tensors.items()}
    del tables[first.component][f"{first.module}.weight"]
    with pytest.raises(StateWriteError, match="base.tensors"):
        encode_state(dataclasses.replace(state, base=dataclasses.replace(state.base, tensors=tables)))


@pytest.mark.parametrize("change, message", [
    (lambda base: base["tensors"].update({"vae": {}}), "not bound"),
    (lambda base: base["tensors"]["transformer"]["proj_out.weight"].update({"dtype": "bf16"}), "dtype 'bf16'"),
    (lambda base: base["tensors"]["transformer"]["proj_out.weight"].update({"shape": [-1]}), "shape"),
    (lambda base: base["tensors"]["transformer"]["proj_out.weight"].update({"shape": [1] * 17}), "at most 16"),
    (lambda base: base["tensors"]["transformer"]["proj_out.weight"].pop("digest"), "missing key 'digest'"),
    (lambda base: base["layout"].update({"transformers": ["transformer", "transformer"]}), "twice"),
    (lambda base: base["layout"].pop("pipeline"), "missing key 'pipeline'"),
    (lambda base: base["layout"].update({"name": "a b"}), "layout name"),
])
def test_bad_base_layout_or_tensor_rows_are_refused(tmp_path, change, message):
    state = _state_1_1(build_base(tmp_path / "base"))
    tensors = dict(state.base.tensors)
    tensors["transformer"] = {**tensors["transformer"], "proj_out.weight": TensorDigest("BF16", (128, 128), "a" * 64)}
    state = dataclasses.replace(state, base=dataclasses.replace(state.base, tensors=tensors))
    _, _, header, data = split_file(encode_state(state))
    change(header["base"])
    with pytest.raises(StateFormatError, match=message):
        read_state_bytes(assemble(header, data, minor=1))


def test_a_1_0_reader_copes_with_1_1_keys_and_refuses_a_rotated_state(tmp_path):
    base_dir = build_base(tmp_path / "base")
    unrotated = encode_state(_state_1_1(base_dir))
    parsed = spec_reader.read_state_bytes(unrotated)  # ignores the layer recipes, layout and tensors
    assert len(parsed["masks"]) == len(_state_1_1(base_dir).layers)
    rotated = encode_state(_state_1_1(base_dir, rotation="hadamard-64"))
    with pytest.raises(spec_reader.SpecInvalid, match="application|quantization"):
        spec_reader.read_state_bytes(rotated)


def _changed_base(tmp_path, edit) -> tuple:
    """Return (state path, base copy) after ``edit(tensors)`` rewrites the copy's transformer tensors."""
    from tools.make_synthetic_base import write_component
    from hif4fmt.base import BaseCheckpoint as Checkpoint

    base_dir = build_base(tmp_path / "base")
    state_path = tmp_path / "s.hif4"
    write_state(state_path, _state_1_1(base_dir))
    copy = tmp_path / "copy"
    shutil.copytree(base_dir, copy)
    with Checkpoint.open(copy) as base:
        component = base.components["transformer"]
        tensors = {name: (component.tensor_info(name)[0], tuple(component.tensor_info(name)[1]),
                          bytes(component.read_tensor_bytes(name))) for name in component.tensor_names()}
    edit(tensors)
    shutil.rmtree(copy / "transformer")
    write_component(copy / "transformer", tensors)
    return state_path, copy


def _flip(raw: bytes) -> bytes:
    return bytes([raw[0] ^ 1]) + raw[1:]


@pytest.mark.parametrize("edit, problem, words", [
    (lambda t: t.update({"blocks.0.norm2.bias": ("BF16", (128,), bytes(256))}), "extra",
     "blocks.0.norm2.bias is in the base but not in the base the state was built on"),
    (lambda t: t.pop("proj_out.bias"), "missing", "proj_out.bias is missing from the base"),
    (lambda t: t.update({"proj_out.bias": ("F16",) + t["proj_out.bias"][1:]}), "dtype changed",
     "proj_out.bias: dtype changed from BF16 to F16"),
    (lambda t: t.update({"proj_out.bias": (t["proj_out.bias"][0], (32,), t["proj_out.bias"][2][:64])}),
     "shape changed", "proj_out.bias: shape changed from [64] to [32]"),
    (lambda t: t.update({"proj_out.bias": t["proj_out.bias"][:2] + (_flip(t["proj_out.bias"][2]),)}),
     "bytes differ", "proj_out.bias: bytes differ"),
])
def test_verify_names_a_changed_kept_tensor_and_what_differs(tmp_path, edit, problem, words):
    state_path, copy = _changed_base(tmp_path, edit)
    report = verify_state(state_path, copy)
    assert not report.ok
    check = report.components["transformer"]
    assert check.status == "differs" and check.differing_tensor_count == 1
    assert check.differing_tensors[0].problem == problem
    assert words in report.message and "rebuild the state for this base" in report.message
    assert report.components["transformer_2"].status == "match"


def test_verify_names_both_layouts_when_the_base_is_another_wan_layout(tmp_path):
    base_dir = build_base(tmp_path / "base")
    state_path = tmp_path / "s.hif4"
    write_state(state_path, _state_1_1(base_dir))
    other = build_base(tmp_path / "other", components=("transformer",), seed=7)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    report = verify_state(state_path, other)
    assert not report.ok
    assert ("the state was built for layout unknown (WanImageToVideoPipeline, transformer+transformer_2), "
            "this base has layout unknown (WanPipeline, transformer)") in report.message
    assert report.expected_layout["transformers"] == ["transformer", "transformer_2"]
    assert report.found_layout == {"name": "unknown", "pipeline": "WanPipeline", "transformers": ["transformer"]}


def test_the_a14b_config_folder_is_recognised_by_its_layout():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "tools" / "configs" / "wan2.2-i2v-a14b"
    assert describe_layout(folder) == {"name": "wan2.2-i2v-a14b", "pipeline": "WanImageToVideoPipeline",
                                       "transformers": ["transformer", "transformer_2"]}


@pytest.mark.parametrize("layout, repo, task, image", [
    ("wan2.2-t2v-a14b", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "text-to-video", ""),
    ("wan2.1-i2v-14b", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "image-to-video", "--image input.png "),
    ("wan2.2-ti2v-5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "text-to-video", "[--image input.png] "),
])
def test_the_model_card_follows_the_recorded_layout(layout, repo, task, image):
    from hif4fmt.card import render_model_card

    state = tiny_state()
    state = dataclasses.replace(state, base=dataclasses.replace(
        state.base, hub_hints={}, layout={"name": layout, "pipeline": "WanPipeline", "transformers": ["transformer"]}))
    card = render_model_card(state, "s.hif4", 1000)
    assert f"base_model: {repo}\n" in card and f"pipeline_tag: {task}\n" in card
    assert f"--state s.hif4 {image}--prompt" in card

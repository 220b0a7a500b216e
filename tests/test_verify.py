"""verify_state: a matching base passes; each kind of mismatch is detected and named precisely."""

from __future__ import annotations

import json
import shutil

import pytest

from hif4fmt.base import BaseCheckpoint, parse_safetensors_header
from hif4fmt.errors import BaseCheckpointError, BaseMismatchError, StateFormatError
from hif4fmt.state import write_state
from hif4fmt.verify import verify_state
from state_support import build_base, state_for_base
from tools.make_synthetic_base import write_component


@pytest.fixture(scope="module")
def bound(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base_dir = build_base(root / "wan")
    state_path = root / "s.hif4"
    write_state(state_path, state_for_base(base_dir))
    return base_dir, state_path


def _copy(base_dir, tmp_path):
    target = tmp_path / "base"
    shutil.copytree(base_dir, target)
    return target


def _rewrite_component(folder, mutate):
    """Rewrite ``folder``'s weights after ``mutate(tensors)`` edits the {name: (dtype, shape, bytes)} dict."""
    path = folder / "diffusion_pytorch_model.safetensors"
    entries, _ = parse_safetensors_header(path)
    data = path.read_bytes()
    tensors = {n: (e.dtype, e.shape, data[e.begin:e.begin + e.nbytes]) for n, e in entries.items()}
    mutate(tensors)
    path.unlink()
    write_component(folder, tensors)


def test_matching_base_verifies(bound):
    base_dir, state_path = bound
    report = verify_state(state_path, base_dir)
    assert report.ok and "matches" in report.message
    assert {n: c.status for n, c in report.components.items()} == {"transformer": "match", "transformer_2": "match"}
    assert report.expected_fingerprint == report.found_fingerprint
    report.raise_for_mismatch()
    json.dumps(report.to_dict())


def test_swapped_experts_are_reported_as_a_swap(bound, tmp_path):
    base_dir, state_path = bound
    swapped = _copy(base_dir, tmp_path)
    (swapped / "transformer").rename(swapped / "tmp")
    (swapped / "transformer_2").rename(swapped / "transformer")
    (swapped / "tmp").rename(swapped / "transformer_2")
    report = verify_state(state_path, swapped)
    assert not report.ok
    assert {c.status for c in report.components.values()} == {"swapped"}
    assert "transformer and transformer_2 are swapped" in report.message


def test_one_changed_weight_names_the_component_and_layer(bound, tmp_path):
    base_dir, state_path = bound
    changed = _copy(base_dir, tmp_path)

    def flip(tensors):
        dtype, shape, data = tensors["blocks.1.attn2.to_v.weight"]
        tensors["blocks.1.attn2.to_v.weight"] = (dtype, shape, bytes([data[0] ^ 1]) + data[1:])

    _rewrite_component(changed / "transformer_2", flip)
    report = verify_state(state_path, changed)
    assert not report.ok
    assert report.components["transformer"].status == "match"
    check = report.components["transformer_2"]
    assert check.status == "differs" and check.differing_count == 1 and check.checked_layers == 20
    assert [(d.module, d.problem) for d in check.differing_layers] == [("blocks.1.attn2.to_v", "weights differ")]
    assert "transformer_2: 1 of 20 quantized layers differ, first blocks.1.attn2.to_v" in report.message
    with pytest.raises(BaseMismatchError) as caught:
        report.raise_for_mismatch()
    assert caught.value.exit_code == 1


def test_missing_tensor_and_shape_change_are_named(bound, tmp_path):
    base_dir, state_path = bound
    changed = _copy(base_dir, tmp_path)

    def edit(tensors):
        del tensors["blocks.0.ffn.net.2.weight"]
        dtype, shape, data = tensors["blocks.0.attn1.to_q.weight"]
        tensors["blocks.0.attn1.to_q.weight"] = (dtype, (shape[0] // 2, shape[1] * 2), data)

    _rewrite_component(changed / "transformer", edit)
    check = verify_state(state_path, changed).components["transformer"]
    problems = {d.module: (d.problem, d.expected, d.found) for d in check.differing_layers}
    assert problems["blocks.0.ffn.net.2"][0] == "weight tensor missing"
    assert problems["blocks.0.attn1.to_q"] == ("shape changed", "[128, 128]", "[64, 256]")
    assert check.differing_count == 2


def test_change_outside_quantized_layers_is_reported_as_such(bound, tmp_path):
    base_dir, state_path = bound
    changed = _copy(base_dir, tmp_path)

    def edit(tensors):
        dtype, shape, data = tensors["blocks.0.norm2.weight"]
        tensors["blocks.0.norm2.weight"] = (dtype, shape, bytes(len(data)))

    _rewrite_component(changed / "transformer", edit)
    report = verify_state(state_path, changed)
    assert not report.ok
    assert "all 20 quantized layer weights match, but other tensors differ" in report.components["transformer"].detail


def test_missing_and_unbound_components_are_reported(bound, tmp_path):
    base_dir, state_path = bound
    report = verify_state(state_path, base_dir / "transformer")
    assert not report.ok
    assert report.components["transformer_2"].status == "missing"
    single_state = tmp_path / "single.hif4"
    write_state(single_state, state_for_base(base_dir / "transformer"))
    report = verify_state(single_state, base_dir)
    assert report.components["transformer_2"].status == "unbound" and not report.ok


def test_corrupt_state_or_bad_base_raise_typed_errors(bound, tmp_path):
    base_dir, state_path = bound
    corrupt = tmp_path / "c.hif4"
    data = bytearray(state_path.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(StateFormatError):
        verify_state(corrupt, base_dir)
    with pytest.raises(BaseCheckpointError):
        verify_state(state_path, tmp_path / "no_base")


def test_hub_hints_never_decide_a_match(bound, tmp_path):
    base_dir, _ = bound
    misleading = tmp_path / "misleading.hif4"
    write_state(misleading, state_for_base(base_dir, hub_hints={"repo_id": "someone/else", "revision": "0" * 40}))
    assert verify_state(misleading, base_dir).ok  # hints name another repo: the content decides, it matches
    snapshot = tmp_path / "models--Wan-AI--Wan2.2-I2V-A14B-Diffusers" / "snapshots" / ("a" * 40)
    shutil.copytree(base_dir, snapshot)
    hinted = tmp_path / "hinted.hif4"
    with BaseCheckpoint.open(snapshot) as opened:
        hints = opened.hub_hints()
    assert hints == {"repo_id": "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "revision": "a" * 40}
    write_state(hinted, state_for_base(snapshot, hub_hints=hints))  # hints taken from the hub-cache path
    assert verify_state(hinted, snapshot).ok

    def flip(tensors):
        dtype, shape, data = tensors["proj_out.bias"]
        tensors["proj_out.bias"] = (dtype, shape, bytes([data[0] ^ 0x80]) + data[1:])

    _rewrite_component(snapshot / "transformer", flip)  # same repo id and revision on disk, other content
    report = verify_state(hinted, snapshot)
    assert not report.ok and report.components["transformer"].status == "differs"


def test_mismatch_messages_name_the_whole_tensor_what_differs_and_the_fix(bound, tmp_path):
    from hif4fmt.cli.state_cmds import _render_verify

    base_dir, state_path = bound
    changed = _copy(base_dir, tmp_path)

    def edit(tensors):
        del tensors["blocks.0.ffn.net.2.weight"]
        dtype, shape, data = tensors["blocks.1.attn1.to_k.weight"]
        tensors["blocks.1.attn1.to_k.weight"] = ("F16", shape, data)  # same bytes, another dtype

    _rewrite_component(changed / "transformer", edit)
    report = verify_state(state_path, changed)
    text = _render_verify(report.to_dict())
    assert "transformer/blocks.0.ffn.net.2.weight is missing from the base" in text  # not cut to 16 characters
    assert "blocks.1.attn1.to_k.weight: dtype F16, the other quantized weights are BF16" in text
    assert "to fix: restore the base this state was built for" in report.message
    assert "rebuild the state for this base" in report.message and "--no-verify" in report.message


def test_a_state_whose_fingerprint_is_not_that_of_its_component_digests_says_so(bound, tmp_path):
    import dataclasses

    from hif4fmt.state import read_state, write_state

    base_dir, state_path = bound
    state = read_state(state_path)
    wrong = dataclasses.replace(state, base=dataclasses.replace(state.base, fingerprint="ab" * 32))
    write_state(tmp_path / "wrong.hif4", wrong)
    report = verify_state(tmp_path / "wrong.hif4", base_dir)
    assert not report.ok and {c.status for c in report.components.values()} == {"match"}
    assert "every component digest matches, but the state's base.fingerprint is not the spec 6.4" in report.message

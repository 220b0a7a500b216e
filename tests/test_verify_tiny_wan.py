"""End to end on the real tiny Wan2.2 layout (fixture ``tiny_wan_dir`` from tests/conftest.py, when present):
fingerprint it, bind a state to it, verify it, and detect the two experts swapped."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hif4fmt.base import BaseCheckpoint
from hif4fmt.fingerprint import fingerprint_base
from hif4fmt.recipe import Recipe
from hif4fmt.state import BaseBinding, ExcludedLayer, QuantizedLayer, State, read_state, write_state
from hif4fmt.verify import verify_state

BLOCK_LINEAR_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                         "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


@pytest.fixture(scope="module")
def tiny_wan(request):
    try:
        return request.getfixturevalue("tiny_wan_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tiny_wan_dir fixture (tests/conftest.py, helper 'runtime') is not available")


def test_state_bound_to_tiny_wan_verifies_and_a_swap_is_named(tiny_wan, tmp_path):
    fingerprint = fingerprint_base(tiny_wan)
    assert set(fingerprint.components) == {"transformer", "transformer_2"}
    layers, excluded = [], []
    with BaseCheckpoint.open(tiny_wan) as base:
        for name, component in base.components.items():
            for tensor in component.tensor_names():
                module = tensor[: -len(".weight")]
                if tensor.endswith(".weight") and module.startswith("blocks.") and module.endswith(BLOCK_LINEAR_SUFFIXES):
                    weight = component.read_tensor_numpy(tensor)
                    mask = np.sqrt(np.abs(weight).max(axis=0) + np.float32(1e-3)).astype(np.float32)
                    layers.append(QuantizedLayer(name, module, weight.shape[1], weight.shape[0], mask,
                                                 fingerprint.components[name].tensors[tensor]))
            excluded.append(ExcludedLayer(name, "proj_out", "boundary layer"))
    assert layers and len(layers) % 10 == 0
    path = tmp_path / "tiny.hif4"
    write_state(path, State(Recipe(), {"prompts": 1}, BaseBinding.from_fingerprint(fingerprint),
                            tuple(layers), tuple(excluded)))
    assert len(read_state(path).layers) == len(layers)
    assert verify_state(path, tiny_wan).ok
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_wan, swapped)
    (swapped / "transformer").rename(swapped / "x")
    (swapped / "transformer_2").rename(swapped / "transformer")
    (swapped / "x").rename(swapped / "transformer_2")
    report = verify_state(path, swapped)
    assert not report.ok and report.components["transformer"].status == "swapped"

"""HiF4Linear with rotation "hadamard-64": HiF4(R(x * m)) @ HiF4(R(W / m)).T + b in both arithmetics, from the state."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hif4fmt.codec.rotation import rotate_torch
from hif4fmt.errors import RuntimeLoadError
from hif4fmt.hifloat4 import fake_quantize, matmul, quantize
from wan_runtime.hif4_linear import ROTATION_HADAMARD64, HiF4Linear, pack_weight

IN_FEATURES, OUT_FEATURES = 192, 96  # three HiF4 units


def _operands(bias: bool = True, seed: int = 0):
    """Return (BF16 linear with an outlier weight column, float32 mask, BF16 mask, BF16 x with an outlier channel)."""
    torch.manual_seed(seed)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias).to(torch.bfloat16).requires_grad_(False)
    mask = np.random.default_rng(seed + 1).uniform(0.25, 4.0, IN_FEATURES).astype(np.float32)
    x = torch.randn(3, 5, IN_FEATURES, generator=torch.Generator().manual_seed(seed + 2)).to(torch.bfloat16)
    x[..., 70] *= 50.0  # an outlier channel in the second unit
    return linear, mask, torch.from_numpy(mask).to(torch.bfloat16), x


def _rotated(values: torch.Tensor) -> torch.Tensor:
    return rotate_torch(values.float())


def test_rotated_masked_operands_give_the_unrotated_product_before_quantization():
    linear, _, m, x = _operands()
    exact = x.double() @ linear.weight.double().T
    rotated = _rotated(x * m).double() @ _rotated(linear.weight / m).double().T
    # x * m and W / m are rounded to BF16 once each (2^-9 relative), the rotation adds float32 rounding
    assert torch.allclose(rotated, exact, rtol=0, atol=float(exact.abs().max()) * 2 ** -6)
    unrotated = (x * m).double() @ (linear.weight / m).double().T
    assert float((rotated - unrotated).abs().max()) <= float(exact.abs().max()) * 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_simulated_rotated_forward_is_the_qlinear_of_rotated_operands_bit_exact(bias):
    linear, mask, m, x = _operands(bias)
    layer = HiF4Linear.from_linear(linear, mask, arithmetic="simulated", rotation=ROTATION_HADAMARD64)
    expected = F.linear(fake_quantize(_rotated(x * m)).to(torch.bfloat16),
                        fake_quantize(_rotated(linear.weight / m)).to(torch.bfloat16), linear.bias)
    out = layer(x)
    assert layer.rotation == ROTATION_HADAMARD64 and out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert torch.equal(layer.dequantized_weight(), fake_quantize(_rotated(linear.weight / m)).to(torch.bfloat16))


@pytest.mark.parametrize("bias", [True, False])
def test_integer_rotated_forward_is_the_integer_product_of_rotated_operands(bias):
    linear, mask, m, x = _operands(bias)
    layer = HiF4Linear.from_linear(linear, mask, arithmetic="integer", rotation=ROTATION_HADAMARD64)
    product = matmul(quantize(_rotated(x * m)), quantize(_rotated(linear.weight / m)))
    expected = (product + linear.bias.float() if bias else product).to(torch.bfloat16)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("rotation", [None, ROTATION_HADAMARD64])
def test_integer_and_simulated_agree_with_rotation_as_without(rotation):
    # as without rotation: the integer result is at least as close to the exact product of the quantized
    # operands as the simulated one (whose BF16 matmul rounds), and the two differ by BF16 rounding only
    linear, mask, m, x = _operands()
    integer = HiF4Linear.from_linear(linear, mask, arithmetic="integer", rotation=rotation)(x).double()
    simulated = HiF4Linear.from_linear(linear, mask, arithmetic="simulated", rotation=rotation)(x).double()
    prepare = _rotated if rotation else (lambda values: values)
    exact = (fake_quantize(prepare(x * m)).double() @ fake_quantize(prepare(linear.weight / m)).double().T
             + linear.bias.double())
    assert (integer - exact).abs().max() <= (simulated - exact).abs().max()
    assert float((integer - simulated).abs().max()) <= float(exact.abs().max()) * 2 ** -7


def test_rotation_lowers_the_error_of_an_outlier_channel_without_mask():
    linear, _, _, x = _operands(bias=False)
    ones = np.ones(IN_FEATURES, np.float32)
    exact = x.double() @ linear.weight.double().T
    errors = {}
    for rotation in (None, ROTATION_HADAMARD64):
        out = HiF4Linear.from_linear(linear, ones, arithmetic="integer", rotation=rotation)(x).double()
        errors[rotation] = float((out - exact).norm() / exact.norm())
    assert errors[ROTATION_HADAMARD64] < errors[None]  # measured: 0.0988 vs 0.1089


def test_unknown_rotation_or_partial_unit_is_refused_naming_the_layer():
    linear, mask, _, _ = _operands()
    with pytest.raises(RuntimeLoadError, match="blocks.0.x.*'hadamard-32'"):
        HiF4Linear.from_linear(linear, mask, name="blocks.0.x", rotation="hadamard-32")
    narrow = nn.Linear(96, 8).to(torch.bfloat16)
    with pytest.raises(RuntimeLoadError, match="blocks.1.y.*multiple of 64"):
        pack_weight(narrow.weight, np.ones(96, np.float32), name="blocks.1.y", rotation=ROTATION_HADAMARD64)


ROTATED_ROLES = ("attn1.to_q", "ffn.net.0.proj")


@pytest.fixture(scope="module")
def rotated_state(tiny_wan_state, tmp_path_factory):
    """Return (path of the tiny synthetic state with attn1.to_q and ffn.net.0.proj rotated, that state)."""
    from hif4fmt.state import read_state, write_state

    state = read_state(tiny_wan_state)
    layers = tuple(replace(layer, rotation=ROTATION_HADAMARD64) if layer.module.endswith(ROTATED_ROLES) else layer
                   for layer in state.layers)
    path = tmp_path_factory.mktemp("rotated_state") / "rotated.hif4"
    write_state(path, replace(state, layers=layers))
    return path, read_state(path)


def test_state_layer_rotation_reaches_the_module_and_its_packed_weight(tiny_wan_dir, rotated_state):
    from wan_runtime.loader import load_pipeline, quantized_layers

    path, state = rotated_state
    pipe = load_pipeline(tiny_wan_dir, path)
    base = load_pipeline(tiny_wan_dir, None)
    by_name = {(layer.component, layer.module): layer for layer in state.layers}
    seen = 0
    for component, modules in quantized_layers(pipe).items():
        for module in modules:
            layer = by_name[(component, module.layer_name.split(".", 1)[1])]
            assert module.rotation == layer.rotation
            weight = getattr(base, component).get_submodule(layer.module).weight
            packed, _ = pack_weight(weight, layer.mask, rotation=layer.rotation)
            assert torch.equal(module.weight_codes, packed.codes) and torch.equal(module.weight_meta, packed.meta)
            seen += layer.rotation is not None
    assert seen == 2 * 2 * len(ROTATED_ROLES)  # 2 experts x 2 blocks x roles


def test_apply_state_passes_each_layers_rotation(tiny_wan_dir, rotated_state):
    from wan_runtime.loader import apply_state, load_pipeline, quantized_layers

    path, state = rotated_state
    pipe = load_pipeline(tiny_wan_dir, None)
    apply_state(pipe, state)
    rotations = {module.layer_name: module.rotation for modules in quantized_layers(pipe).values()
                 for module in modules}
    assert rotations == {f"{layer.component}.{layer.module}": layer.rotation for layer in state.layers}

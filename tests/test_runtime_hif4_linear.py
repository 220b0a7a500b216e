"""HiF4Linear: both W4A4 arithmetics bit-exact to their definitions, packed weights, refused masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torch.nn.functional as F

from hif4fmt.codec import kernel
from hif4fmt.errors import RuntimeLoadError
from hif4fmt.hifloat4 import fake_quantize, matmul, quantize
from wan_runtime.hif4_linear import HiF4Linear, default_arithmetic

BF16_BYTES = 2
PACKED_BYTES_PER_WEIGHT = 4.5 / 8  # 4-bit codes + one 32-bit word per 64 elements


def _linear(in_features: int, out_features: int, bias: bool = True, dtype=torch.bfloat16, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight[:, 3] *= 40.0  # an outlier input channel, as in real activations / weights
    return linear


def _mask(in_features: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 8.0, in_features).astype(np.float32)


def _layer_inputs(in_features: int, bias: bool):
    """Return (linear 192 out, float32 mask, BF16 mask, BF16 input (2, 7, in) with an outlier channel)."""
    mask = _mask(in_features)
    x = torch.randn(2, 7, in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x[..., 5] *= 60.0
    return _linear(in_features, 192, bias), mask, torch.from_numpy(mask).to(torch.bfloat16), x


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features", [128, 96])  # 96: the last unit is zero padded
def test_simulated_forward_equals_the_toolkit_qlinear_bit_exact(bias, in_features):
    # the challenge toolkit's QLinear: F.linear(HiF4(x * m), HiF4(W / m), b), the bias in the one rounding
    linear, mask, m, x = _layer_inputs(in_features, bias)
    layer = HiF4Linear.from_linear(linear, mask, name="test", arithmetic="simulated")
    expected = F.linear(fake_quantize(x * m), fake_quantize(linear.weight / m), linear.bias)
    out = layer(x)
    assert layer.arithmetic == "simulated"
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 192)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features", [128, 96])
def test_integer_forward_is_the_integer_product_of_the_same_operands(bias, in_features):
    linear, mask, m, x = _layer_inputs(in_features, bias)
    layer = HiF4Linear.from_linear(linear, mask, name="test", arithmetic="integer")
    product = matmul(quantize(x * m), quantize(linear.weight / m))  # float32 (2, 7, 192)
    expected = (product + linear.bias.float() if bias else product).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 192)
    assert torch.equal(out, expected)
    # and it is the simulated layer's value up to the simulated path's BF16 matmul rounding
    simulated = HiF4Linear.from_linear(linear, mask, arithmetic="simulated")(x).float()
    exact = (fake_quantize(x * m).double() @ fake_quantize(linear.weight / m).double().T
             + (linear.bias.double() if bias else 0))
    assert (out.double() - exact).abs().max() <= (simulated.double() - exact).abs().max()


def test_default_arithmetic_is_integer_where_the_kernel_runs_else_simulated(monkeypatch):
    linear = _linear(64, 64)
    assert HiF4Linear.from_linear(linear, _mask(64)).arithmetic == default_arithmetic("cpu")
    assert default_arithmetic("cpu") == ("integer" if kernel.enabled() else "simulated")
    with monkeypatch.context() as patch:
        patch.setattr(kernel, "enabled", lambda: False)
        assert HiF4Linear.from_linear(linear, _mask(64)).arithmetic == "simulated"
    with pytest.raises(RuntimeLoadError, match="arithmetic 'fast'"):
        HiF4Linear.from_linear(linear, _mask(64), arithmetic="fast")


@pytest.mark.parametrize("arithmetic", ["integer", "simulated"])
def test_forward_in_float32_model_computes_in_float32(arithmetic):
    linear = _linear(64, 64, dtype=torch.float32)
    mask = _mask(64)
    layer = HiF4Linear.from_linear(linear, mask, arithmetic=arithmetic)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    m = torch.from_numpy(mask)
    if arithmetic == "simulated":
        expected = F.linear(fake_quantize(x * m), fake_quantize(linear.weight / m), linear.bias)
    else:
        expected = matmul(quantize(x * m), quantize(linear.weight / m)) + linear.bias
    assert layer.compute_dtype == torch.float32 and layer(x).dtype == torch.float32
    assert torch.equal(layer(x), expected)


def test_packed_weight_is_kept_not_the_dequantized_one():
    linear = _linear(256, 128)
    layer = HiF4Linear.from_linear(linear, _mask(256))
    names = {name for name, _ in layer.named_parameters()} | {name for name, _ in layer.named_buffers()}
    assert names == {"bias", "weight_codes", "weight_meta", "mask"}
    assert layer.weight_codes.dtype == torch.uint8 and layer.weight_meta.dtype == torch.uint8
    assert layer.weight_nbytes == 128 * 256 * PACKED_BYTES_PER_WEIGHT
    assert layer.weight_nbytes / (128 * 256 * BF16_BYTES) == pytest.approx(0.28125)
    total = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    assert total == layer.weight_nbytes + 256 * BF16_BYTES + 128 * BF16_BYTES  # + BF16 mask + unchanged BF16 bias
    assert layer.state_dict().keys() == {"bias"}  # packed buffers are rebuilt from base + state, never saved


def test_dequantized_weight_is_hif4_of_weight_over_mask():
    linear = _linear(128, 64)
    mask = _mask(128)
    layer = HiF4Linear.from_linear(linear, mask)
    assert torch.equal(layer.dequantized_weight(), fake_quantize(linear.weight / torch.from_numpy(mask).to(torch.bfloat16)))


def test_bias_is_the_replaced_layers_parameter_unchanged():
    linear = _linear(64, 64)
    layer = HiF4Linear.from_linear(linear, _mask(64))
    assert layer.bias is linear.bias


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), 1e-45])
def test_mask_not_positive_finite_in_model_dtype_raises_runtime_load_error(bad):
    mask = _mask(64)
    mask[17] = bad
    with pytest.raises(RuntimeLoadError, match=r"layer blocks\.0\.attn1\.to_q: mask\[17\]"):
        HiF4Linear.from_linear(_linear(64, 64), mask, name="blocks.0.attn1.to_q")


def test_mask_of_wrong_length_raises_runtime_load_error():
    with pytest.raises(RuntimeLoadError, match=r"mask shape \(32,\) does not match in_features \(64,\)"):
        HiF4Linear.from_linear(_linear(64, 64), _mask(32), name="x")


def test_nan_weight_raises_runtime_load_error_naming_layer():
    linear = _linear(64, 64)
    with torch.no_grad():
        linear.weight[2, 9] = float("nan")
    with pytest.raises(RuntimeLoadError, match=r"layer ffn\.net\.2: cannot quantize W / m"):
        HiF4Linear.from_linear(linear, _mask(64), name="ffn.net.2")

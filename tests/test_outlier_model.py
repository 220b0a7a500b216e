"""The outlier test model (tools/plant_outliers.py, make_tiny_wan --outliers): same BF16 function, planted outliers.

The tolerance for "the same function": the outlier expert's output may differ from the plain expert's
by no more than the plain expert's own BF16 rounding error (its BF16 output against the same weights
run in float32). Measured on the tiny model: 0.32 % vs 0.50 % (relative L2 of the output).
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

from tools.make_tiny_wan import I2V_IN_CHANNELS, TINY, make_tiny_wan  # noqa: E402
from tools.plant_outliers import (plant_outliers,  # noqa: E402
                                  plant_outliers_in_folder)

EXPERTS = ("transformer", "transformer_2")
TEXT_TOKENS, REAL_TOKENS = 32, 6   # zero-padded prompt embedding: 6 real tokens of 32


@pytest.fixture(scope="module")
def outlier_dir(tiny_wan_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_outliers") / "base"
    shutil.copytree(tiny_wan_dir, folder)
    plans = plant_outliers_in_folder(folder, seed=0)
    return folder, plans


def _inputs():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, I2V_IN_CHANNELS, 3, 8, 8, generator=generator)
    text = torch.zeros(1, TEXT_TOKENS, TINY.text_d_model)
    text[:, :REAL_TOKENS] = torch.randn(1, REAL_TOKENS, TINY.text_d_model, generator=generator)
    return latents, torch.tensor([700.0]), text


def _load(folder, component, dtype=torch.bfloat16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder, subfolder=component, torch_dtype=dtype).eval()


def _run(model, capture=()):
    """Return (output float32, {module: input activations float32}) of ``model`` on the fixed inputs."""
    latents, timestep, text = _inputs()
    dtype = model.patch_embedding.weight.dtype
    captured, handles = {}, []
    for name in capture:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: captured.__setitem__(name, args[0].detach().float())))
    with torch.no_grad():
        out = model(latents.to(dtype), timestep, text.to(dtype), return_dict=False)[0].float()
    for handle in handles:
        handle.remove()
    return out, captured


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("component", EXPERTS)
def test_outlier_expert_computes_the_plain_function_within_bf16_rounding(tiny_wan_dir, outlier_dir, component):
    plain, _ = _run(_load(tiny_wan_dir, component))
    exact, _ = _run(_load(tiny_wan_dir, component, torch.float32))
    planted, _ = _run(_load(outlier_dir[0], component))
    bf16_rounding = _relative(plain, exact)
    assert 0 < _relative(planted, plain) <= bf16_rounding < 0.02


@pytest.mark.parametrize("component", EXPERTS)
def test_planted_channels_are_the_planned_10_to_100x_on_captured_activations(tiny_wan_dir, outlier_dir, component):
    plan = outlier_dir[1][component]
    assert {site.site for site in plan} == {"adaln-msa", "adaln-ffn", "norm2", "text", "value", "text-spike"}
    consumers = sorted({site.consumers[0] for site in plan})
    _, plain = _run(_load(tiny_wan_dir, component), consumers)
    _, planted = _run(_load(outlier_dir[0], component), consumers)
    for site in plan:
        name = site.consumers[0]
        ratio = planted[name].abs().amax(dim=(0, 1)) / plain[name].abs().amax(dim=(0, 1))
        for channel, factor in zip(site.channels, site.factors):
            assert 10 <= factor <= 100
            if site.site == "text-spike":  # the real tokens move factor x away from the unchanged padding value
                real = planted[name][0, :REAL_TOKENS, channel] - planted[name][0, -1, channel]
                plain_real = plain[name][0, :REAL_TOKENS, channel] - plain[name][0, -1, channel]
                assert torch.allclose(real, plain_real * factor, rtol=0.05, atol=1e-2 * factor)
                assert torch.allclose(planted[name][0, REAL_TOKENS:, channel], plain[name][0, REAL_TOKENS:, channel],
                                      rtol=0.02, atol=0.02)
            else:
                assert float(ratio[channel]) == pytest.approx(factor, rel=0.05), (site.site, name, channel)


def test_unplanted_channels_keep_their_activations(tiny_wan_dir, outlier_dir):
    plan = outlier_dir[1]["transformer"]
    site = next(site for site in plan if site.site == "norm2")
    name = site.consumers[0]
    _, plain = _run(_load(tiny_wan_dir, "transformer"), [name])
    _, planted = _run(_load(outlier_dir[0], "transformer"), [name])
    others = [c for c in range(plain[name].shape[-1]) if c not in site.channels]
    assert torch.allclose(planted[name][..., others], plain[name][..., others], rtol=0.02, atol=0.02)


def test_planting_is_deterministic_and_leaves_its_input_unchanged(tiny_wan_dir):
    from safetensors.torch import load_file

    state = load_file(tiny_wan_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    before = {name: tensor.clone() for name, tensor in state.items()}
    first, plan = plant_outliers(state, seed=3)
    second, plan_again = plant_outliers(state, seed=3)
    assert plan == plan_again and all(torch.equal(first[n], second[n]) for n in state)
    assert all(torch.equal(state[n], before[n]) for n in state)
    assert all(first[n].dtype == state[n].dtype for n in state)
    assert sum(not torch.equal(first[n], state[n]) for n in state) > len(plan)


def test_make_tiny_wan_outliers_writes_the_planted_folder_byte_identically(outlier_dir, tmp_path):
    rebuilt = make_tiny_wan(tmp_path / "again", seed=0, outliers=True)
    for path in sorted(outlier_dir[0].rglob("*")):
        if path.is_file():
            assert (rebuilt / path.relative_to(outlier_dir[0])).read_bytes() == path.read_bytes(), path


def test_layout_without_cross_attention_norm_skips_that_site_and_keeps_the_function():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                  in_channels=I2V_IN_CHANNELS, out_channels=16, text_dim=64, freq_dim=256,
                                  ffn_dim=128, num_layers=1, cross_attn_norm=False,
                                  qk_norm="rms_norm_across_heads").to(torch.bfloat16).eval()
    plain, _ = _run(model)
    planted_state, plan = plant_outliers(model.state_dict(), seed=1)
    model.load_state_dict(planted_state)
    planted, _ = _run(model)
    assert "norm2" not in {site.site for site in plan} and len(plan) == 6  # adaln x2, text, value x2, spike
    assert _relative(planted, plain) < 0.01

"""The layer-selection rule: exact counts on the real Wan2.2-I2V-A14B config, reasons, retained blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from hif4fmt.errors import BaseCheckpointError, RecipeError
from hif4fmt.recipe import Recipe, RetainedBlock
from hif4fmt.targets import (
    BLOCK_LINEAR_ROLES,
    BOUNDARY_REASON,
    IMAGE_EMBEDDER_REASON,
    UNKNOWN_BLOCK_LINEAR_REASON,
    classify_linear,
    component_configs,
    meta_transformers,
    plan_model,
)

ROOT = Path(__file__).resolve().parents[1]
A14B = ROOT / "tools" / "configs" / "wan2.2-i2v-a14b"
BOUNDARY_LINEARS = [
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "proj_out",
]
A14B_ROLES = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
              "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@pytest.fixture(scope="module")
def a14b_models():
    return meta_transformers(A14B)


def test_shipped_a14b_config_is_the_real_architecture():
    config = json.loads((A14B / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (40, 40, 128)
    assert (config["ffn_dim"], config["in_channels"], config["out_channels"]) == (13824, 36, 16)
    assert (config["text_dim"], config["freq_dim"], config["patch_size"]) == (4096, 256, [1, 2, 2])
    assert (config["qk_norm"], config["cross_attn_norm"], config["image_dim"]) == ("rms_norm_across_heads", True, None)
    assert (A14B / "transformer_2" / "config.json").read_text() == (A14B / "transformer" / "config.json").read_text()


def test_a14b_meta_model_has_400_quantized_and_6_kept_linears_per_transformer(a14b_models):
    plans = plan_model(a14b_models)
    assert sorted(plans) == ["transformer", "transformer_2"]
    for plan in plans.values():
        assert len(plan.quantized) == 400
        assert len(plan.kept) == 6
        assert sorted(plan.kept_names()) == sorted(BOUNDARY_LINEARS)
        assert {kept.reason for kept in plan.kept} == {BOUNDARY_REASON}
        expected = {f"blocks.{i}.{role}" for i in range(40) for role in A14B_ROLES}
        assert set(plan.quantized_names()) == expected
        assert plan.other_modules["Conv3d"] == 1  # the patch embedding stays high precision
        assert all(layer.in_features in (5120, 13824) for layer in plan.quantized)
        ffn_down = [layer for layer in plan.quantized if layer.role == "ffn.net.2"]
        assert {(layer.in_features, layer.out_features) for layer in ffn_down} == {(13824, 5120)}
    assert sum(len(plan.quantized) for plan in plans.values()) == 800


def test_a14b_model_is_built_on_meta_device_without_weights(a14b_models):
    parameters = list(a14b_models["transformer"].parameters())
    assert parameters and all(p.device.type == "meta" for p in parameters)


@pytest.mark.parametrize("module, quantize, reason", [
    ("blocks.0.attn1.to_q", True, None),
    ("blocks.39.attn2.to_out.0", True, None),
    ("blocks.7.attn2.add_k_proj", True, None),
    ("blocks.7.attn2.add_v_proj", True, None),
    ("blocks.12.ffn.net.0.proj", True, None),
    ("blocks.12.ffn.net.2", True, None),
    ("blocks.3.some_new_adapter", False, UNKNOWN_BLOCK_LINEAR_REASON),
    ("blocks.03.attn1.to_q", False, BOUNDARY_REASON),  # not a block index: never guessed
    ("proj_out", False, BOUNDARY_REASON),
    ("condition_embedder.time_proj", False, BOUNDARY_REASON),
    ("condition_embedder.image_embedder.ff.net.0.proj", False, IMAGE_EMBEDDER_REASON),
])
def test_classify_linear_applies_the_rule_by_path(module, quantize, reason):
    selected, why, _, role = classify_linear(module)
    assert (selected, why) == (quantize, reason)
    assert (role in BLOCK_LINEAR_ROLES) == quantize


def test_wan21_i2v_layout_quantizes_image_kv_projections_and_keeps_image_embedder():
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                      in_channels=36, out_channels=16, text_dim=64, freq_dim=256, ffn_dim=128,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      image_dim=64, added_kv_proj_dim=64)
    plan = plan_model({"transformer": model})["transformer"]
    assert len(plan.quantized) == 2 * 12
    assert "blocks.1.attn2.add_k_proj" in plan.quantized_names()
    reasons = {kept.layer.module: kept.reason for kept in plan.kept}
    image_kept = [name for name, reason in reasons.items() if reason == IMAGE_EMBEDDER_REASON]
    assert image_kept and all(name.startswith("condition_embedder.image_embedder.") for name in image_kept)


def test_retained_block_layers_are_kept_with_their_reason(a14b_models):
    plans = plan_model(a14b_models, [RetainedBlock("transformer_2", 39), RetainedBlock("transformer", 0)])
    first, second = plans["transformer"], plans["transformer_2"]
    assert (len(first.quantized), len(first.kept)) == (390, 16)
    assert (len(second.quantized), len(second.kept)) == (390, 16)
    retained = {kept.layer.module: kept.reason for kept in second.kept if kept.layer.block == 39}
    assert set(retained) == {f"blocks.39.{role}" for role in A14B_ROLES}
    assert set(retained.values()) == {"retained block 39"}


def test_three_retained_blocks_raise_recipe_error(a14b_models):
    blocks = [RetainedBlock("transformer", 0), RetainedBlock("transformer", 1), RetainedBlock("transformer_2", 2)]
    with pytest.raises(RecipeError, match="at most 2"):
        plan_model(a14b_models, blocks)
    with pytest.raises(RecipeError, match="at most 2"):
        Recipe(retained_blocks=tuple(blocks))


def test_retained_block_past_the_last_block_raises_recipe_error(a14b_models):
    with pytest.raises(RecipeError, match=r"has 40 blocks \(0..39\)"):
        plan_model(a14b_models, [RetainedBlock("transformer", 40)])


def test_component_configs_accepts_folder_component_folder_and_config_file():
    assert sorted(component_configs(A14B)) == ["transformer", "transformer_2"]
    assert list(component_configs(A14B / "transformer_2")) == ["transformer_2"]
    assert list(component_configs(A14B / "transformer" / "config.json")) == ["transformer"]


def test_missing_model_path_raises_base_checkpoint_error(tmp_path):
    with pytest.raises(BaseCheckpointError, match="no such file or folder"):
        component_configs(tmp_path / "absent")
    with pytest.raises(BaseCheckpointError, match="found neither"):
        component_configs(tmp_path)


def test_non_wan_config_raises_base_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(BaseCheckpointError, match="expected 'WanTransformer3DModel'"):
        meta_transformers(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BaseCheckpointError, match="cannot read the transformer config"):
        meta_transformers(tmp_path / "config.json")

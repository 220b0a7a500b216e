"""The tiny Wan2.2 I2V model of tools/make_tiny_wan.py: deterministic bytes, real layout, offline tokenizer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from tools.make_tiny_wan import I2V_IN_CHANNELS, SPECIAL_TOKENS, WAN22_I2V_BOUNDARY_RATIO, make_tiny_wan  # noqa: E402

HIF4_UNIT = 64


def _file_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def test_same_seed_rebuilds_byte_identical_files(tiny_wan_dir, tmp_path):
    rebuilt = make_tiny_wan(tmp_path / "again", seed=0)
    original, again = _file_bytes(tiny_wan_dir), _file_bytes(rebuilt)
    assert sorted(original) == sorted(again)
    differing = [name for name in original if original[name] != again[name]]
    assert differing == []


def test_experts_hold_different_weights(tiny_wan_dir):
    high = (tiny_wan_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    low = (tiny_wan_dir / "transformer_2" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert len(high) == len(low) and high != low


def test_layout_is_wan22_i2v_with_unit_multiple_linears(tiny_wan_dir):
    from safetensors import safe_open

    index = json.loads((tiny_wan_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["boundary_ratio"] == WAN22_I2V_BOUNDARY_RATIO
    assert index["image_encoder"] == [None, None] and index["image_processor"] == [None, None]
    for component in ("transformer", "transformer_2"):
        config = json.loads((tiny_wan_dir / component / "config.json").read_text())
        assert (config["in_channels"], config["out_channels"], config["image_dim"]) == (I2V_IN_CHANNELS, 16, None)
        with safe_open(tiny_wan_dir / component / "diffusion_pytorch_model.safetensors", "pt") as weights:
            block_linears = [name for name in weights.keys()
                             if name.startswith("blocks.") and name.endswith(".weight") and ".norm" not in name]
            assert len(block_linears) == 2 * 10  # 2 blocks x (8 attention + 2 FFN) linears
            for name in block_linears:
                tensor = weights.get_slice(name)
                assert tensor.get_dtype() == "BF16"
                assert all(size % HIF4_UNIT == 0 for size in tensor.get_shape()), name
    scheduler = json.loads((tiny_wan_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler"
    assert (scheduler["prediction_type"], scheduler["use_flow_sigmas"]) == ("flow_prediction", True)


def test_tokenizer_is_offline_and_appends_eos(tiny_wan_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_wan_dir / "tokenizer")
    pad, eos, unk = (tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS)
    ids = tokenizer("A cat walks zebra")["input_ids"]
    assert (pad, eos, unk) == (0, 1, 2)
    assert ids[-1] == eos and ids[-2] == unk and len(ids) == 5
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["a", "cat", "walks"]

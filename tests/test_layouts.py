"""The shipped configs of every Wan model: their layout, the per-expert plan on the meta device, the tiny
look-alikes of tools/make_tiny_wan.py, and statistics-file protocols from before the layout fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hif4fmt.calibration.protocol import CalibrationProtocol
from hif4fmt.errors import CalibrationError
from hif4fmt.layouts import LAYOUT_NAMES, describe_layout, pipeline_profile

CONFIGS = Path(__file__).resolve().parents[1] / "tools" / "configs"
# config folder -> (layout, {expert: (quantized, kept)}, blocks): 10 roles per block (12 with the CLIP
# image context of Wan2.1-I2V); kept: 5 embedder linears + proj_out (+ 2 image-embedder linears)
PLANS = {
    "wan2.2-i2v-a14b": ("wan2.2-i2v-a14b", {"transformer": (400, 6), "transformer_2": (400, 6)}, 40),
    "wan2.2-t2v-a14b": ("wan2.2-t2v-a14b", {"transformer": (400, 6), "transformer_2": (400, 6)}, 40),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v-5b", {"transformer": (300, 6)}, 30),
    "wan2.1-t2v-14b": ("wan2.1-t2v-14b", {"transformer": (400, 6)}, 40),
    "wan2.1-t2v-1.3b": ("wan2.1-t2v-14b", {"transformer": (300, 6)}, 30),
    "wan2.1-i2v-14b": ("wan2.1-i2v-14b", {"transformer": (480, 8)}, 40),
}


@pytest.mark.parametrize("folder", sorted(PLANS))
def test_shipped_config_is_recognised_as_its_layout(folder):
    assert describe_layout(CONFIGS / folder)["name"] == PLANS[folder][0]


def test_every_layout_has_a_shipped_config():
    assert {layout for layout, _, _ in PLANS.values()} == set(LAYOUT_NAMES)


@pytest.mark.parametrize("folder", sorted(PLANS))
def test_plan_on_the_meta_device_gives_the_per_expert_counts(folder):
    pytest.importorskip("diffusers")
    from hif4fmt.cli.build_cmds import plan_result

    result = plan_result(CONFIGS / folder)
    counts = {name: (entry["quantized_count"], entry["kept_count"]) for name, entry in result["components"].items()}
    assert counts == PLANS[folder][1]
    assert {entry["blocks"] for entry in result["components"].values()} == {PLANS[folder][2]}
    assert result["layout"]["name"] == PLANS[folder][0]


def test_wan21_i2v_plan_quantizes_the_image_context_projections_and_keeps_the_image_embedder():
    pytest.importorskip("diffusers")
    from hif4fmt.cli.build_cmds import plan_result

    entry = plan_result(CONFIGS / "wan2.1-i2v-14b")["components"]["transformer"]
    assert entry["quantized_roles"]["attn2.add_k_proj"] == entry["quantized_roles"]["attn2.add_v_proj"] == 40
    assert "condition_embedder.image_embedder.ff.net.0.proj" in entry["kept"]


def test_profiles_read_boundary_ratio_expand_timesteps_and_vae_stride():
    t2v = pipeline_profile(CONFIGS / "wan2.2-t2v-a14b")
    ti2v = pipeline_profile(CONFIGS / "wan2.2-ti2v-5b")
    assert (t2v.boundary_ratio, t2v.expand_timesteps, t2v.image_problem(True) is not None) == (0.875, False, True)
    assert (ti2v.boundary_ratio, ti2v.expand_timesteps, ti2v.image_problem(True)) == (None, True, None)
    assert ti2v.pipeline_for(True) == "WanImageToVideoPipeline" and ti2v.pipeline_for(False) == "WanPipeline"
    assert pipeline_profile(CONFIGS / "wan2.1-i2v-14b").image_encoder is True


def test_protocol_of_a_statistics_file_without_layout_fields_reads_as_wan22_i2v_a14b():
    old = CalibrationProtocol().to_dict()
    for key in ("layout", "experts", "image_source", "image_sha256"):
        old.pop(key)
    old["pipeline"] = "diffusers.WanImageToVideoPipeline"  # what the A14B-only calibrator wrote
    protocol = CalibrationProtocol.from_dict(old)
    assert (protocol.layout, protocol.experts, protocol.image_source) == (
        "wan2.2-i2v-a14b", ("transformer", "transformer_2"), "blank")
    assert CalibrationProtocol.from_dict(json.loads(json.dumps(protocol.to_dict()))) == protocol


@pytest.mark.parametrize("fields, message", [
    ({"experts": ("transformer",), "guidance_2": 2.0}, "one transformer"),
    ({"pipeline": "diffusers.WanPipeline"}, "image_source 'blank' with pipeline"),
    ({"image_source": "file"}, "image_sha256"),
    ({"experts": ("transformer", "transformer")}, "distinct"),
])
def test_protocol_refuses_inconsistent_layout_fields(fields, message):
    with pytest.raises(CalibrationError, match=message):
        CalibrationProtocol(**fields)


def test_tiny_ti2v_is_deterministic_and_has_the_48_channel_wan22_vae(tmp_path):
    pytest.importorskip("diffusers")
    from tools.make_tiny_wan import WAN22_VAE_Z_DIM, make_tiny_wan

    first = make_tiny_wan(tmp_path / "a", seed=5, layout="wan2.2-ti2v-5b")
    again = make_tiny_wan(tmp_path / "b", seed=5, layout="wan2.2-ti2v-5b")
    files = sorted(path.relative_to(first).as_posix() for path in first.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(again).as_posix() for path in again.rglob("*") if path.is_file())
    assert all((first / name).read_bytes() == (again / name).read_bytes() for name in files)
    vae = json.loads((first / "vae" / "config.json").read_text())
    assert (vae["z_dim"], vae["is_residual"], vae["patch_size"], vae["in_channels"], vae["scale_factor_spatial"]) == (
        WAN22_VAE_Z_DIM, True, 2, 12, 16)
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == WAN22_VAE_Z_DIM
    transformer = json.loads((first / "transformer" / "config.json").read_text())
    assert (transformer["in_channels"], transformer["out_channels"]) == (WAN22_VAE_Z_DIM, WAN22_VAE_Z_DIM)
    assert json.loads((first / "model_index.json").read_text())["expand_timesteps"] is True

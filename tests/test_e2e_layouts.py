"""Every Wan layout end to end: make the tiny model, calibrate, build, inspect, verify, render a W4A4 video.

Each layout runs the pipeline its model_index.json names (WanPipeline for text to video, no image;
WanImageToVideoPipeline with the blank image, through the CLIP encoder for Wan2.1-I2V; Wan2.2-TI2V
text only or with --image), records that in the protocol, and a state of one layout is refused on a
base of another with a message naming both layouts. Sizes are tiny (1 prompt, 2 steps, 5 frames).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402

from hif4fmt.layouts import LAYOUT_NAMES, describe_layout  # noqa: E402
from hif4fmt.state import read_state  # noqa: E402
from tools.make_tiny_wan import make_tiny_wan  # noqa: E402
from wan_runtime.cli import cli as runtime_cli  # noqa: E402
from wan_runtime.video import read_video  # noqa: E402

# (pipeline calibrated, experts, quantized linears per expert of the tiny model: 2 blocks x roles, side)
EXPECTED = {
    "wan2.2-i2v-a14b": ("WanImageToVideoPipeline", ["transformer", "transformer_2"], 20, 32),
    "wan2.2-t2v-a14b": ("WanPipeline", ["transformer", "transformer_2"], 20, 32),
    "wan2.2-ti2v-5b": ("WanPipeline", ["transformer"], 20, 64),  # Wan2.2 VAE stride 16 x patch 2 = 32
    "wan2.1-t2v-14b": ("WanPipeline", ["transformer"], 20, 32),
    "wan2.1-i2v-14b": ("WanImageToVideoPipeline", ["transformer"], 24, 32),  # + attn2.add_k_proj / add_v_proj
}
IMAGE_SOURCE = {"WanPipeline": "none", "WanImageToVideoPipeline": "blank"}
TEXT_TOKENS = {"wan2.1-i2v-14b": "512"}  # diffusers splits Wan2.1-I2V's [image | text] context at 512 tokens
from cli_support import run_hif4fmt  # noqa: E402
from hif4fmt.cli import main  # noqa: E402


hif4fmt = run_hif4fmt  # tests/cli_support.py


def small(layout: str) -> list[str]:
    side = str(EXPECTED[layout][3])
    return ["--height", side, "--width", side, "--frames", "5", "--steps", "2",
            "--max-sequence-length", TEXT_TOKENS.get(layout, "16"), "--no-progress"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("layout_prompts") / "prompts.json"
    path.write_text(json.dumps(["a red car drives on a city street"]))
    return path


@pytest.fixture(scope="module")
def bases(tiny_wan_dir, tmp_path_factory):
    """Return {layout: tiny base folder}; the default layout is the session's shared tiny model."""
    folder = tmp_path_factory.mktemp("layouts")
    return {name: tiny_wan_dir if name == "wan2.2-i2v-a14b" else make_tiny_wan(folder / name, seed=0, layout=name)
            for name in LAYOUT_NAMES}


@pytest.fixture(scope="module")
def states(bases, prompts, tmp_path_factory):
    """Calibrate and build every layout through the CLI; return {layout: (stats path, state path, summary)}."""
    folder = tmp_path_factory.mktemp("layout_states")
    monkeypatch = pytest.MonkeyPatch()
    built = {}
    try:
        for name, base in bases.items():
            stats, state = folder / f"{name}.stats", folder / f"{name}.hif4"
            for args in (["calibrate", "--base", str(base), "--prompts", str(prompts), "--out", str(stats),
                          "--num-prompts", "1", "--holdout-rows", "4", "--device", "cpu", "--json", *small(name)],
                         ["build", "--base", str(base), "--stats", str(stats), "--out", str(state), "--no-progress"]):
                monkeypatch.setattr(sys, "argv", ["hif4fmt", *args])
                with pytest.raises(SystemExit) as exit_info:
                    main()
                assert exit_info.value.code == 0, (name, args[0])
            built[name] = (stats, state)
    finally:
        monkeypatch.undo()
    return built


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_tiny_model_of_each_layout_is_recognised_as_that_layout(bases, layout):
    described = describe_layout(bases[layout])
    assert described == {"name": layout, "pipeline": EXPECTED[layout][0], "transformers": EXPECTED[layout][1]}
    index = json.loads((bases[layout] / "model_index.json").read_text())
    clip = layout == "wan2.1-i2v-14b"
    assert index.get("image_encoder", [None, None]) == (["transformers", "CLIPVisionModel"] if clip else [None, None])
    assert (bases[layout] / "image_encoder" / "config.json").is_file() == clip


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_calibration_protocol_records_pipeline_experts_and_image(states, layout):
    state = read_state(states[layout][1], load_tensors=False)
    protocol = state.calibration["protocol"]
    pipeline, experts, per_expert, _ = EXPECTED[layout]
    assert (protocol["layout"], protocol["pipeline"], protocol["experts"]) == (layout, f"diffusers.{pipeline}", experts)
    assert protocol["image_source"] == IMAGE_SOURCE[pipeline] and protocol["image_sha256"] is None
    assert {component: len(state.layers_of(component)) for component in state.components if
            state.layers_of(component)} == {expert: per_expert for expert in experts}


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_each_layout_inspects_verifies_and_renders_a_w4a4_video(capsys, monkeypatch, bases, states, layout, tmp_path):
    base, (_, state) = bases[layout], states[layout]
    code, out, _ = hif4fmt(capsys, monkeypatch, "inspect", str(state), "--json")
    assert code == 0
    quantized = {name: entry["quantized"] for name, entry in json.loads(out)["components"].items()}
    assert quantized == {expert: EXPECTED[layout][2] for expert in EXPECTED[layout][1]}
    code, out, _ = hif4fmt(capsys, monkeypatch, "verify", str(state), "--base", str(base))
    assert code == 0, out
    result = CliRunner().invoke(runtime_cli, ["generate", "--base", str(base), "--state", str(state),
                                              "--out", str(tmp_path / "v.mp4"), "--json", *small(layout)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["layout"], summary["pipeline"], summary["experts"]) == (layout, *EXPECTED[layout][:2])
    assert {name: info["hif4_layers"] for name, info in summary["quantization"].items()} == \
        {expert: EXPECTED[layout][2] for expert in EXPECTED[layout][1]}
    side = EXPECTED[layout][3]
    frames = read_video(tmp_path / "v.mp4")
    assert frames.shape == (5, side, side, 3) and float(np.std(frames)) > 0  # a picture, not a blank video


def test_a_state_of_one_layout_is_refused_on_a_base_of_another_naming_both(bases, states, tmp_path):
    result = CliRunner().invoke(runtime_cli, ["generate", "--base", str(bases["wan2.2-i2v-a14b"]), "--state",
                                              str(states["wan2.2-t2v-a14b"][1]), "--out", str(tmp_path / "v.mp4"),
                                              *small("wan2.2-i2v-a14b")])
    assert result.exit_code == 1
    message = str(result.exception) if result.exception else result.output
    assert "layout wan2.2-t2v-a14b" in message and "layout wan2.2-i2v-a14b" in message
    assert not (tmp_path / "v.mp4").exists()


def test_ti2v_calibrates_and_renders_with_an_image(capsys, monkeypatch, bases, prompts, tmp_path):
    from PIL import Image

    image = tmp_path / "first.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    base = bases["wan2.2-ti2v-5b"]
    code, out, err = hif4fmt(capsys, monkeypatch, "calibrate", "--base", str(base), "--prompts", str(prompts),
                             "--out", str(tmp_path / "s.stats"), "--num-prompts", "1", "--image", str(image),
                             "--device", "cpu", "--json", *small("wan2.2-ti2v-5b"))
    assert code == 0, err
    assert json.loads(out)["pipeline"] == "WanImageToVideoPipeline"
    from hif4fmt.calibration.stats_file import read_stats

    protocol = read_stats(tmp_path / "s.stats").header.protocol
    assert (protocol.image_source, protocol.pipeline) == ("file", "diffusers.WanImageToVideoPipeline")
    import hashlib

    assert protocol.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    result = CliRunner().invoke(runtime_cli, ["generate", "--base", str(base), "--image", str(image), "--out",
                                              str(tmp_path / "v.mp4"), "--json", *small("wan2.2-ti2v-5b")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["pipeline"] == "WanImageToVideoPipeline" and summary["image"] == str(image)


def test_text_to_video_models_refuse_an_image(capsys, monkeypatch, bases, prompts, tmp_path):
    image = tmp_path / "first.png"
    image.write_bytes(b"not read")
    code, _, err = hif4fmt(capsys, monkeypatch, "calibrate", "--base", str(bases["wan2.2-t2v-a14b"]), "--prompts",
                           str(prompts), "--out", str(tmp_path / "s.stats"), "--image", str(image), "--device", "cpu",
                           *small("wan2.2-t2v-a14b"))
    assert code == 2 and "text-to-video" in err and "wan2.2-t2v-a14b" in err
    result = CliRunner().invoke(runtime_cli, ["generate", "--base", str(bases["wan2.1-t2v-14b"]), "--image",
                                              str(image), "--out", str(tmp_path / "v.mp4")])
    assert result.exit_code == 2 and "text-to-video" in result.output


def test_defaults_come_from_the_model_not_from_a14b(bases, tmp_path):
    from hif4fmt.calibration.runner import protocol_for_base

    ti2v = protocol_for_base(bases["wan2.2-ti2v-5b"])
    assert (ti2v.height, ti2v.width, ti2v.frames, ti2v.guidance) == (704, 1280, 121, 5.0)
    t2v = protocol_for_base(bases["wan2.2-t2v-a14b"])
    assert (t2v.guidance, t2v.guidance_2, t2v.image_source) == (4.0, 3.0, "none")
    assert protocol_for_base(bases["wan2.2-t2v-a14b"], guidance=2.5).guidance_2 is None  # --guidance: both experts
    a14b = protocol_for_base(bases["wan2.2-i2v-a14b"])
    assert (a14b.height, a14b.width, a14b.frames, a14b.guidance) == (720, 1280, 61, 3.5)  # the paper's protocol
    help_text = CliRunner().invoke(runtime_cli, ["generate", "--help"]).output
    assert "the model's own" in " ".join(help_text.split())
    from hif4fmt.cli.build_cmds import calibrate_cmd

    calibrate_help = " ".join(CliRunner().invoke(calibrate_cmd, ["--help"]).output.split())
    assert "--height INTEGER pixels [default: the model's own" in calibrate_help


def test_wan21_i2v_refuses_a_text_length_other_than_512(bases, prompts, tmp_path):
    from hif4fmt.calibration.runner import protocol_for_base
    from hif4fmt.errors import CalibrationError

    with pytest.raises(CalibrationError, match="needs 512 text tokens"):
        protocol_for_base(bases["wan2.1-i2v-14b"], max_sequence_length=16)
    assert protocol_for_base(bases["wan2.1-i2v-14b"]).max_sequence_length == 512

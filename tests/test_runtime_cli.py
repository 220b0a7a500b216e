"""wan-runtime generate: playable MP4 + GIF, --compare with per-frame PSNR/SSIM, typed exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402

from tools.make_tiny_wan import make_tiny_wan  # noqa: E402
from wan_runtime.cli import cli  # noqa: E402
from wan_runtime.video import read_video  # noqa: E402

SMALL = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--guidance", "2.0",
         "--max-sequence-length", "16", "--no-progress"]


def _generate(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["generate", *SMALL, "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_generate_writes_playable_mp4_and_gif(tiny_wan_dir, tiny_wan_state, tmp_path):
    summary = _generate("--base", str(tiny_wan_dir), "--state", str(tiny_wan_state), "--out", str(tmp_path / "v.mp4"))
    assert summary["mode"] == "w4a4" and summary["verified"] is True
    assert summary["outputs"] == {"mp4": str(tmp_path / "v.mp4"), "gif": str(tmp_path / "v.gif")}
    assert summary["quantization"]["transformer_2"]["hif4_layers"] == 20
    for path in (tmp_path / "v.mp4", tmp_path / "v.gif"):
        frames = read_video(path)
        assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.mp4"]  # no temporary files left


def test_compare_writes_three_videos_and_per_frame_psnr_ssim(tiny_wan_dir, tiny_wan_state, tmp_path):
    summary = _generate("--base", str(tiny_wan_dir), "--state", str(tiny_wan_state), "--compare",
                        "--out", str(tmp_path / "cmp.mp4"))
    compare = summary["compare"]
    assert len(compare["psnr_db"]) == len(compare["ssim"]) == 5
    assert all(0.0 < s <= 1.0 for s in compare["ssim"]) and compare["mean_psnr_db"] > 20.0
    assert read_video(tmp_path / "cmp.mp4").shape == (5, 32, 96, 3)  # BF16 left, W4A4 right
    bf16, w4a4 = read_video(tmp_path / "cmp.bf16.mp4"), read_video(tmp_path / "cmp.w4a4.mp4")
    assert bf16.shape == w4a4.shape == (5, 32, 48, 3)
    assert set(summary["outputs"]) == {f"{v}_{k}" for v in ("bf16", "w4a4", "compare") for k in ("mp4", "gif")}


@pytest.mark.parametrize("arithmetic", ["integer", "simulated"])
def test_summary_says_which_arithmetic_ran(arithmetic, tiny_wan_dir, tiny_wan_state, tmp_path):
    summary = _generate("--base", str(tiny_wan_dir), "--state", str(tiny_wan_state), "--arithmetic", arithmetic,
                        "--out", str(tmp_path / "v.mp4"))
    assert summary["arithmetic"] == arithmetic
    assert {info["arithmetic"] for info in summary["quantization"].values()} == {arithmetic}
    result = CliRunner().invoke(cli, ["generate", *SMALL, "--base", str(tiny_wan_dir), "--state", str(tiny_wan_state),
                                      "--arithmetic", arithmetic, "--out", str(tmp_path / "t.mp4")],
                                catch_exceptions=False)
    assert result.exit_code == 0 and f"W4A4:     {arithmetic} arithmetic" in result.output


def test_default_arithmetic_is_reported_and_bf16_has_none(tiny_wan_dir, tiny_wan_state, tmp_path):
    from wan_runtime.hif4_linear import default_arithmetic

    summary = _generate("--base", str(tiny_wan_dir), "--state", str(tiny_wan_state), "--out", str(tmp_path / "v.mp4"))
    assert summary["arithmetic"] == default_arithmetic("cpu")
    assert _generate("--base", str(tiny_wan_dir), "--out", str(tmp_path / "b.mp4"))["arithmetic"] is None
    result = CliRunner().invoke(cli, ["generate", *SMALL, "--base", str(tiny_wan_dir), "--arithmetic", "integer",
                                      "--out", str(tmp_path / "x.mp4")])
    assert result.exit_code == 2 and "--arithmetic needs --state" in result.output


def test_text_summary_names_every_artifact(tiny_wan_dir, tmp_path):
    result = CliRunner().invoke(cli, ["generate", *SMALL, "--base", str(tiny_wan_dir), "--out",
                                      str(tmp_path / "b.mp4")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "mode:     bf16" in result.output
    assert f"wrote mp4: {tmp_path / 'b.mp4'}" in result.output and f"wrote gif: {tmp_path / 'b.gif'}" in result.output


def test_bad_sizes_and_compare_without_state_exit_2(tiny_wan_dir, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--base", str(tiny_wan_dir), "--height", "40", "--frames", "6",
                                      "--compare", "--out", str(tmp_path / "x.mp4")])
    assert result.exit_code == 2
    for text in ("height 40: must be a positive multiple of 16", "frames 6: must be 4k + 1", "--compare needs --state"):
        assert text in result.output
    assert not any(tmp_path.iterdir())


def test_wrong_base_exits_1_with_one_error_line_and_no_video(tiny_wan_state, tmp_path):
    other = make_tiny_wan(tmp_path / "other", seed=3)
    out = tmp_path / "never.mp4"
    done = subprocess.run([sys.executable, "-m", "wan_runtime", "generate", *SMALL, "--base", str(other),
                           "--state", str(tiny_wan_state), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "was built for base" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not out.exists()

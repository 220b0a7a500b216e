"""``hif4fmt plan | calibrate | build`` as a user runs them: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from hif4fmt.state import read_state

ROOT = Path(__file__).resolve().parents[1]
A14B_CONFIG = ROOT / "tools" / "configs" / "wan2.2-i2v-a14b" / "transformer" / "config.json"
TINY_OPTIONS = ["--num-prompts", "2", "--height", "32", "--width", "32", "--frames", "5", "--steps", "3",
                "--max-sequence-length", "32", "--holdout-rows", "8", "--device", "cpu", "--no-progress"]
from cli_support import run_hif4fmt  # noqa: E402


run = run_hif4fmt  # tests/cli_support.py


def test_plan_json_on_the_a14b_config_lists_400_quantized_and_6_kept(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "plan", str(A14B_CONFIG), "--json")
    assert code == 0
    result = json.loads(out)
    component = result["components"]["transformer"]
    assert isinstance(component["quantized"], list) and len(component["quantized"]) == 400
    assert isinstance(component["kept"], list) and len(component["kept"]) == 6
    assert "blocks.39.ffn.net.2" in component["quantized"] and "proj_out" in component["kept"]
    # BF16 (2 bytes) weights + biases per block: 8 attention linears 5120 -> 5120, FFN 5120 -> 13824 -> 5120
    per_block = 8 * (5120 * 5120 + 5120) + (5120 * 13824 + 13824) + (13824 * 5120 + 5120)
    assert component["quantized_bytes"] == 40 * 2 * per_block
    assert component["bytes_source"].startswith("assumed BF16")


def test_plan_json_on_the_a14b_folder_gives_800_quantized_over_both_experts(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "plan", str(A14B_CONFIG.parents[1]), "--json")
    result = json.loads(out)
    assert code == 0 and sorted(result["components"]) == ["transformer", "transformer_2"]
    assert [len(c["quantized"]) for c in result["components"].values()] == [400, 400]
    assert [len(c["kept"]) for c in result["components"].values()] == [6, 6]
    assert result["totals"]["quantized"] == 800 and result["totals"]["kept"] == 12


def test_plan_json_accepts_a_diffusers_folder_a_component_folder_and_a_config_file(capsys, monkeypatch,
                                                                                  tiny_wan_dir):
    results = {}
    for label, model in (("folder", tiny_wan_dir), ("component", tiny_wan_dir / "transformer_2"),
                         ("config", tiny_wan_dir / "transformer_2" / "config.json")):
        code, out, err = run(capsys, monkeypatch, "plan", str(model), "--json")
        assert code == 0, err
        results[label] = json.loads(out)["components"]
    assert sorted(results["folder"]) == ["transformer", "transformer_2"]
    assert list(results["component"]) == list(results["config"]) == ["transformer_2"]
    expected = results["folder"]["transformer_2"]
    assert results["component"]["transformer_2"] == results["config"]["transformer_2"] == expected
    assert len(expected["quantized"]) == 20 and expected["quantized"][0] == "blocks.0.attn1.to_q"
    assert len(expected["kept"]) == 6 and "proj_out" in expected["kept"]
    # a folder with weights reports the bytes it stores (the tiny base keeps its linears in BF16)
    assert expected["bytes_source"] == "checkpoint"
    assert expected["quantized_bytes"] == 2 * expected["quantized_parameters"]


def test_plan_text_says_400_quantized_and_6_kept(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "plan", str(A14B_CONFIG))
    assert code == 0
    assert "400 linears quantized to HiF4 W4A4" in out and "6 kept high precision" in out
    assert "boundary linear kept high precision" in out and "1 Conv3d" in out


def test_plan_with_three_retained_blocks_exits_2_with_one_line(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "plan", str(A14B_CONFIG.parents[1]), "--retain-block", "transformer:0",
                         "--retain-block", "transformer:1", "--retain-block", "transformer_2:5")
    assert code == 2 and out == ""
    assert err.startswith("error: 3 retained blocks") and "at most 2" in err and err.count("\n") == 1


def test_plan_of_a_missing_path_exits_2(capsys, monkeypatch, tmp_path):
    code, _, err = run(capsys, monkeypatch, "plan", str(tmp_path / "absent"))
    assert code == 2 and err.startswith("error:") and "no such file or folder" in err


def test_plan_runs_as_python_module():
    result = subprocess.run([sys.executable, "-m", "hif4fmt", "plan", str(A14B_CONFIG), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["quantized"] == 400


@pytest.fixture(scope="module")
def calibrated(tiny_wan_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_build")
    (folder / "prompts.json").write_text(json.dumps([{"cap": "a cat on a beach"}, {"cap": "a car in a city"}]))
    return folder


def test_calibrate_then_build_with_report(capsys, monkeypatch, tiny_wan_dir, calibrated):
    stats = calibrated / "stats.safetensors"
    with_progress = [option for option in TINY_OPTIONS if option != "--no-progress"]
    code, out, err = run(capsys, monkeypatch, "calibrate", "--base", str(tiny_wan_dir), "--prompts",
                         str(calibrated / "prompts.json"), "--out", str(stats), *with_progress, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["layers"] == 40 and summary["records"] == 2 and summary["processes"] == 1
    # the progress bar (stderr) counts prompts x steps: 2 x 3; calls show both experts x both CFG branches
    assert "calibrate: 100%" in err and "6/6" in err and "prompt 2/2" in err
    assert summary["components"]["transformer"]["calls"] + summary["components"]["transformer_2"]["calls"] == 2 * 3 * 2
    assert stats.is_file()
    code, out, err = run(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats", str(stats), "--out",
                         str(calibrated / "p99.hif4"), "--percentile", "99", "--alpha", "0.6", "--report",
                         str(calibrated / "report.json"), "--no-progress")
    assert code == 0, err
    assert "wrote" in out and "fidelity on held-out calibration rows" in out and "worst" in out
    state = read_state(calibrated / "p99.hif4")
    assert state.recipe.percentile == 99.0 and state.recipe.alpha == 0.6 and len(state.layers) == 40
    assert len(json.loads((calibrated / "report.json").read_text())["layers"]) == 40


def test_build_refuses_bad_recipes_with_exit_2(capsys, monkeypatch, tiny_wan_dir, calibrated):
    stats = calibrated / "stats.safetensors"
    if not stats.is_file():
        pytest.skip("needs the statistics written by test_calibrate_then_build_with_report")
    common = ["build", "--base", str(tiny_wan_dir), "--stats", str(stats), "--out", str(calibrated / "x.hif4")]
    code, _, err = run(capsys, monkeypatch, *common, "--retain-block", "transformer:0", "--retain-block",
                       "transformer:1", "--retain-block", "transformer_2:0")
    assert code == 2 and "at most 2 whole blocks" in err
    code, _, err = run(capsys, monkeypatch, *common, "--statistic", "max", "--percentile", "99")
    assert code == 2 and "exclude each other" in err
    code, _, err = run(capsys, monkeypatch, *common, "--alpha", "1.5")
    assert code == 2 and "alpha 1.5" in err
    code, _, err = run(capsys, monkeypatch, *common, "--retain-block", "transformer:7")
    assert code == 2 and "has 2 blocks (0..1)" in err
    assert not (calibrated / "x.hif4").exists()


def test_build_with_damaged_statistics_exits_2_with_stats_error(capsys, monkeypatch, tiny_wan_dir, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    code, out, err = run(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats",
                         str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x.hif4"))
    assert code == 2 and out == "" and err.startswith("error:") and "bad.safetensors" in err


def test_calibrate_with_bad_prompts_exits_2(capsys, monkeypatch, tiny_wan_dir, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["only one prompt"]))
    code, _, err = run(capsys, monkeypatch, "calibrate", "--base", str(tiny_wan_dir), "--prompts",
                       str(tmp_path / "p.json"), "--out", str(tmp_path / "s.safetensors"), *TINY_OPTIONS)
    assert code == 2 and "holds 1 prompts but 2 were asked for" in err

"""The state commands as a user runs them: output, --json schemas, exit codes, no torch import."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hif4fmt.recipe import Recipe
from hif4fmt.state import read_state, write_state
from state_support import build_base, state_for_base

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hif4fmt", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base_dir = build_base(root / "wan")
    state = state_for_base(base_dir, Recipe(retained_blocks=("transformer_2:1",)),
                           hub_hints={"repo_id": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"})
    path_a = root / "a.hif4"
    write_state(path_a, state)
    # b: one mask changed by 25 % on one channel, alpha changed
    layers = list(state.layers)
    mask = layers[3].mask.copy()
    mask[7] *= np.float32(1.25)
    layers[3] = dataclasses.replace(layers[3], mask=mask)
    path_b = root / "b.hif4"
    write_state(path_b, dataclasses.replace(state, recipe=dataclasses.replace(state.recipe, alpha=0.6),
                                            layers=tuple(layers[:-1])))
    return {"root": root, "base": base_dir, "a": path_a, "b": path_b, "state": state, "changed": layers[3]}


def test_inspect_text_summarises_the_state(files):
    result = run("inspect", str(files["a"]))
    assert result.returncode == 0, result.stderr
    assert "hif4-state 1.0" in result.stdout and "retained blocks transformer_2:1" in result.stdout
    assert "transformer_2  10" in result.stdout and "transformer    20" in result.stdout


def test_inspect_json_has_counts_and_layers_on_request(files):
    result = json.loads(run("inspect", str(files["a"]), "--json").stdout)
    assert result["format_version"] == "1.0"
    assert result["base"]["fingerprint"] == files["state"].base.fingerprint
    assert result["components"]["transformer"]["quantized"] == 20
    assert result["components"]["transformer"]["excluded"] == 1
    assert result["components"]["transformer_2"] == {**result["components"]["transformer_2"],
                                                     "quantized": 10, "excluded": 11}
    assert "layers" not in result["components"]["transformer"]
    assert result["file_bytes"] == files["a"].stat().st_size
    detailed = json.loads(run("inspect", str(files["a"]), "--json", "--layers", "--check").stdout)
    rows = detailed["components"]["transformer"]["layers"]
    assert len(rows) == 20 and detailed["checked"] is True
    first = files["state"].layers[0]
    assert rows[0]["module"] == first.module and rows[0]["mask_min"] == float(first.mask.min())
    assert {e["reason"] for e in detailed["components"]["transformer_2"]["excluded_layers"]} == {
        "retained block", "boundary layer"}


def test_inspect_and_other_state_commands_never_import_torch(files):
    script = (
        "import runpy, sys\n"
        "sys.argv = ['hif4fmt'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('hif4fmt', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "sys.stderr.write('TORCH-LOADED' if 'torch' in sys.modules else 'TORCH-FREE')\n"
    )
    card_dir = files["root"] / "card_torch_check"
    for args in (["inspect", str(files["a"]), "--json", "--layers"], ["diff", str(files["a"]), str(files["b"])],
                 ["verify", str(files["a"]), "--base", str(files["base"])], ["fingerprint", str(files["base"])],
                 ["card", str(files["a"]), "--out", str(card_dir)]):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                                timeout=120)
        assert result.stderr.endswith("TORCH-FREE"), (args, result.stderr[-500:])


def test_diff_of_a_state_with_itself_exits_0(files):
    result = run("diff", str(files["a"]), str(files["a"]), "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["identical"] is True


def test_diff_reports_recipe_layers_and_mask_changes_and_exits_1(files):
    result = run("diff", str(files["a"]), str(files["b"]), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["identical"] is False
    assert report["recipe"] == {"alpha": {"a": 0.5, "b": 0.6}}
    removed = files["state"].layers[-1]
    assert report["components"][removed.component]["only_in_a"] == [removed.module]
    changed = files["changed"]
    entry = report["components"][changed.component]
    assert entry["masks_differ"] == 1
    assert entry["mask_differences"][0]["module"] == changed.module
    assert entry["max_rel_mask_diff"] == pytest.approx(0.25, rel=1e-6)
    text = run("diff", str(files["a"]), str(files["b"]))
    assert text.returncode == 1 and "recipe: alpha: 0.5 -> 0.6" in text.stdout


def test_verify_exit_codes_0_match_1_mismatch_2_invalid(files, tmp_path):
    ok = run("verify", str(files["a"]), "--base", str(files["base"]), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    mismatch = run("verify", str(files["a"]), "--base", str(files["base"] / "transformer"))
    assert mismatch.returncode == 1 and "MISMATCH" in mismatch.stdout and "transformer_2" in mismatch.stdout
    (tmp_path / "junk.hif4").write_bytes(b"not a state")
    invalid = run("verify", str(tmp_path / "junk.hif4"), "--base", str(files["base"]))
    assert invalid.returncode == 2
    assert invalid.stderr.count("\n") == 1 and invalid.stderr.startswith("error: ") and "junk.hif4" in invalid.stderr
    no_base = run("verify", str(files["a"]), "--base", str(tmp_path / "missing"))
    assert no_base.returncode == 2 and no_base.stderr.startswith("error: ")


def test_card_writes_state_and_model_card(files, tmp_path):
    out = tmp_path / "hub"
    result = run("card", str(files["a"]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "a.hif4").read_bytes() == files["a"].read_bytes()
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: Wan-AI/Wan2.2-I2V-A14B-Diffusers" in front and "license:" in front and "- hifloat4" in front
    assert "hif4fmt verify a.hif4 --base BASE_DIR" in card
    assert "wan-runtime generate --base BASE_DIR --state a.hif4" in card
    assert "| transformer_2 | 10 | 11 |" in card
    again = run("card", str(files["a"]), "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    assert run("card", str(files["a"]), "--out", str(out), "--force").returncode == 0
    assert (out / "README.md").read_text() == card  # deterministic


def test_fingerprint_json_matches_the_state_binding(files):
    result = run("fingerprint", str(files["base"]), "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    state = read_state(files["a"], load_tensors=False)
    assert data["fingerprint"] == state.base.fingerprint and data["algorithm"] == state.base.algorithm
    assert {n: c["digest"] for n, c in data["components"].items()} == state.base.components
    with_tensors = json.loads(run("fingerprint", str(files["base"]), "--json", "--tensors").stdout)
    assert len(with_tensors["components"]["transformer"]["tensors"]) == with_tensors["components"]["transformer"][
        "tensor_count"]


def test_errors_are_one_line_on_stderr_with_exit_2(tmp_path):
    for args in (["inspect", str(tmp_path / "missing.hif4")], ["fingerprint", str(tmp_path)],
                 ["diff", str(tmp_path / "x"), str(tmp_path / "y")]):
        result = run(*args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and result.stdout == ""

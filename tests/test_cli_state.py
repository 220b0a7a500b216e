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
    script = (  # a meta-path finder records every attempt to import torch, even one that would fail or be caught
        "import runpy, sys\n"
        "attempts = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n            attempts.append(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Spy())\n"
        "sys.argv = ['hif4fmt'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('hif4fmt', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "loaded = 'torch' in sys.modules or attempts\n"
        "sys.stderr.write(f'TORCH-LOADED {attempts}' if loaded else 'TORCH-FREE')\n"
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


def _card_commands(card: str) -> list[list[str]]:
    """Return every command line of the card's ```bash blocks, split as a shell would."""
    import shlex

    blocks = [block.split("```")[0] for block in card.split("```bash\n")[1:]]
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_card_commands_are_accepted_by_the_real_command_line_parsers(files, tmp_path):
    import click

    from hif4fmt.cli import cli as hif4fmt_cli

    out = tmp_path / "hub"
    assert run("card", str(files["a"]), "--out", str(out)).returncode == 0
    commands = _card_commands((out / "README.md").read_text())
    programs = sorted({tuple(c[:2]) for c in commands})
    assert programs == [("hf", "download"), ("hif4fmt", "inspect"), ("hif4fmt", "verify"), ("wan-runtime", "generate")]
    wan_runtime_cli = pytest.importorskip("wan_runtime.cli")
    for command in commands:
        if command[0] == "hif4fmt":
            parser = hif4fmt_cli.get_command(click.Context(hif4fmt_cli), command[1])
        elif command[0] == "wan-runtime":
            parser = wan_runtime_cli.cli.get_command(click.Context(wan_runtime_cli.cli), command[1])
        else:
            assert command[2] == "Wan-AI/Wan2.2-I2V-A14B-Diffusers" and command[3:] == ["--local-dir", "BASE_DIR"]
            continue
        context = parser.make_context(command[1], command[2:])  # raises click.UsageError on a bad option
        if command[:2] == ["wan-runtime", "generate"]:
            assert str(context.params["state_path"]) == "a.hif4" and str(context.params["base_dir"]) == "BASE_DIR"
            assert context.params["image_path"] is not None and context.params["device"] == "cuda"
            assert context.params["prompt"] and str(context.params["out_path"]).endswith(".mp4")
        if command[:2] == ["hif4fmt", "verify"]:
            assert str(context.params["state_path"]) == "a.hif4" and str(context.params["base_path"]) == "BASE_DIR"


def test_card_refuses_a_base_model_that_is_not_a_repo_id_and_ignores_such_a_hint(files, tmp_path):
    bad = run("card", str(files["a"]), "--out", str(tmp_path / "x"), "--base-model", "org/name; rm -rf ~")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
    state = dataclasses.replace(files["state"], base=dataclasses.replace(
        files["state"].base, hub_hints={"repo_id": "see our website"}),
        calibration={"protocol": {"frames": 81, "note": "a | b"}, "prompts": ["x", "y"]})
    write_state(tmp_path / "odd.hif4", state)
    assert run("card", str(tmp_path / "odd.hif4"), "--out", str(tmp_path / "card")).returncode == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert "base_model: Wan-AI/Wan2.2-I2V-A14B-Diffusers\n" in card and "see our website" in card
    assert "| protocol.frames | 81 |" in card and "| protocol.note | a \\| b |" in card
    assert '| prompts | ["x", "y"] |' in card


def test_console_script_and_python_m_give_the_same_output(files):
    script = Path(sys.executable).parent / "hif4fmt"
    if not script.is_file():
        pytest.skip("the hif4fmt console script is not installed next to this interpreter")
    for args in (["inspect", str(files["a"]), "--json", "--layers"], ["diff", str(files["a"]), str(files["b"])],
                 ["inspect", str(files["root"] / "missing.hif4")]):
        by_module = run(*args)
        by_script = subprocess.run([str(script), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert (by_script.returncode, by_script.stdout, by_script.stderr) == (
            by_module.returncode, by_module.stdout, by_module.stderr), args


def test_every_hostile_file_gives_one_error_line_and_exit_2_on_every_command(files, capsys, monkeypatch, tmp_path):
    from hif4fmt.cli import main

    hostile = sorted((ROOT / "tests" / "hostile").glob("*.hif4"))
    tensor_only = {"tensor_checksum.hif4", "nan_mask.hif4", "zero_mask.hif4", "negative_mask.hif4",
                   "infinite_mask.hif4"}  # found by reading masks: plain (header-only) inspect accepts them
    assert len(hostile) >= 30
    for path in hostile:
        header_only = [] if path.name in tensor_only else [["inspect", str(path)]]
        for args in header_only + [["inspect", str(path), "--check", "--json"], ["diff", str(files["a"]), str(path)],
                                   ["verify", str(path), "--base", str(files["base"])],
                                   ["card", str(path), "--out", str(tmp_path / path.stem)]]:
            monkeypatch.setattr(sys, "argv", ["hif4fmt", *args])
            with pytest.raises(SystemExit) as exited:
                main()
            captured = capsys.readouterr()
            assert exited.value.code == 2, (path.name, args, captured.err)
            assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (path.name, captured.err)
            assert "Traceback" not in captured.err and str(path) in captured.err
            assert captured.out == "" or args[0] == "diff"
    assert not any(tmp_path.iterdir())  # card wrote nothing for an invalid state


def test_verify_command_names_a_swap_and_a_changed_layer(files, tmp_path):
    import shutil

    swapped = tmp_path / "swapped"
    shutil.copytree(files["base"], swapped)
    (swapped / "transformer").rename(swapped / "x")
    (swapped / "transformer_2").rename(swapped / "transformer")
    (swapped / "x").rename(swapped / "transformer_2")
    result = run("verify", str(files["a"]), "--base", str(swapped))
    assert result.returncode == 1 and "transformer and transformer_2 are swapped" in result.stdout
    report = json.loads(run("verify", str(files["a"]), "--base", str(swapped), "--json").stdout)
    assert {c["status"] for c in report["components"].values()} == {"swapped"} and report["ok"] is False


def test_json_outputs_have_exactly_the_keys_documented_in_spec_section_9(files, tmp_path):
    inspect = json.loads(run("inspect", str(files["a"]), "--json", "--layers").stdout)
    assert set(inspect) == {"path", "format_version", "file_bytes", "header_bytes", "data_offset", "data_bytes",
                            "tensor_count", "size_ratio", "producer", "quantization", "recipe", "calibration", "base",
                            "checked", "extra_keys", "totals", "components"}
    assert set(inspect["totals"]) == {"quantized", "excluded", "retained_blocks"}
    component = inspect["components"]["transformer"]
    assert set(component) == {"quantized", "excluded", "digest", "mask_bytes", "mask_min", "mask_max", "mask_mean",
                              "rotated", "own_recipe", "layers", "excluded_layers"}
    assert set(component["layers"][0]) == {"module", "in_features", "out_features", "mask_tensor", "mask_dtype",
                                           "mask_offset", "mask_bytes", "mask_sha256", "mask_min", "mask_max",
                                           "mask_mean", "weight_fingerprint", "recipe", "rotation"}
    assert set(component["excluded_layers"][0]) == {"module", "reason"}
    assert set(inspect["base"]) == {"algorithm", "fingerprint", "components", "total_bytes", "hub_hints", "layout",
                                    "tensors_recorded"}
    diff = json.loads(run("diff", str(files["a"]), str(files["b"]), "--json").stdout)
    assert set(diff) == {"a", "b", "identical", "format_version", "recipe", "calibration", "base", "extra", "producer",
                         "components"}
    assert set(diff["components"]["transformer"]) == {
        "identical", "only_in_a", "only_in_b", "excluded_only_in_a", "excluded_only_in_b", "reason_changed",
        "shape_changed", "weight_fingerprint_changed", "masks_compared", "masks_differ", "max_rel_mask_diff",
        "mask_differences", "recipe_changed", "rotation_changed"}
    verify = json.loads(run("verify", str(files["a"]), "--base", str(files["base"]), "--json").stdout)
    assert set(verify) == {"ok", "message", "state", "base", "algorithm", "expected_fingerprint", "found_fingerprint",
                           "expected_layout", "found_layout",
                           "components"}
    assert set(verify["components"]["transformer"]) == {"name", "status", "expected_digest", "found_digest", "detail",
                                                        "differing_layers", "differing_count", "checked_layers",
                                                        "differing_tensors", "differing_tensor_count"}
    fingerprint = json.loads(run("fingerprint", str(files["base"]), "--json", "--tensors").stdout)
    assert set(fingerprint) == {"path", "algorithm", "fingerprint", "total_bytes", "hub_hints", "components"}
    assert set(fingerprint["components"]["transformer"]) == {"digest", "total_bytes", "tensor_count", "tensors"}
    card = json.loads(run("card", str(files["a"]), "--out", str(tmp_path / "c"), "--json").stdout)
    assert set(card) == {"out", "state", "card", "state_bytes", "state_sha256", "notes", "base_bytes", "base_model",
                         "base_model_source", "components"}
    assert card["base_model_source"] in ("option", "hub hint", "default") and "/" in card["base_model"]
    assert card["components"]["transformer"] == {"quantized": 20, "excluded": 1}


def test_card_says_where_base_model_came_from(files, tmp_path):
    from hif4fmt.card import DEFAULT_BASE_MODEL, choose_base_model
    from hif4fmt.state import read_state

    state = read_state(files["a"], load_tensors=False)
    assert choose_base_model(state, "org/other-base") == ("org/other-base", "option")
    stripped = dataclasses.replace(state, base=dataclasses.replace(state.base, hub_hints={}))
    assert choose_base_model(stripped, None) == (DEFAULT_BASE_MODEL, "default")

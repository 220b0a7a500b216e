"""``hif4fmt rank`` and ``build --retain-block auto`` on the tiny model: every block of both experts is
ranked by its end-to-end gain, auto keeps at most 2 blocks (explicit ones included) and reports what each
buys, a retained block's layers leave the state, and bad budgets or prompts are typed errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from hif4fmt.build import build_state  # noqa: E402
from hif4fmt.errors import CalibrationError, RecipeError  # noqa: E402
from hif4fmt.method.rank import RankSettings, call_timestep, spaced, step_weights  # noqa: E402
from hif4fmt.recipe import Recipe, RetainedBlock  # noqa: E402
from hif4fmt.state import read_state  # noqa: E402
from hif4fmt.targets import RETAINED_BLOCK_REASON  # noqa: E402
from search_support import tiny_stats  # noqa: E402

FAST = RankSettings(calls=2)
ALL_BLOCKS = {"transformer:0", "transformer:1", "transformer_2:0", "transformer_2:1"}
from cli_support import run_hif4fmt  # noqa: E402


_cli = run_hif4fmt  # tests/cli_support.py


@pytest.fixture(scope="module")
def ranking(tiny_wan_dir, tmp_path_factory):
    stats = tiny_stats(tiny_wan_dir, tmp_path_factory)
    return stats, tmp_path_factory.mktemp("rank")


def test_rank_lists_every_block_of_both_experts_best_first(tiny_wan_dir, ranking, capsys, monkeypatch):
    stats, _ = ranking
    code, out, _ = _cli(capsys, monkeypatch, "rank", "--base", str(tiny_wan_dir), "--stats", str(stats),
                        "--rank-calls", "2", "--device", "cpu", "--no-progress", "--json")
    assert code == 0
    result = json.loads(out)
    blocks = result["blocks"]
    assert {b["block"] for b in blocks} == ALL_BLOCKS and len(blocks) == 4
    baseline = result["error"]["all_quantized"]
    assert 0 < baseline < 1
    for block in blocks:
        assert block["gain"] == pytest.approx(baseline - block["error"], abs=1e-15)
    gains = [b["gain"] for b in blocks]
    assert gains == sorted(gains, reverse=True)
    assert {name: c["calls"] for name, c in result["components"].items()} == {"transformer": 2, "transformer_2": 2}
    assert result["prompts"] == 1 and result["recipe"]["percentile"] == 99.9


def test_retain_auto_keeps_the_best_two_and_excludes_their_layers(tiny_wan_dir, ranking):
    stats, folder = ranking
    summary = build_state(tiny_wan_dir, stats, folder / "auto.hif4", Recipe(), retain_auto=True, rank_settings=FAST)
    auto = summary["retain_auto"]
    ranked = [b for b in auto["ranking"]["blocks"] if b["gain"] > 0]
    chosen = [b["block"] for b in auto["chosen"]]
    assert chosen == [b["block"] for b in ranked[:2]] and 1 <= len(chosen) <= 2
    assert auto["error"]["with_retained"] < auto["error"]["all_quantized"]
    state = read_state(folder / "auto.hif4")
    assert [str(b) for b in state.recipe.retained_blocks] == sorted(chosen)
    retained = {(b.component, b.index) for b in state.recipe.retained_blocks}
    assert all((layer.component, int(layer.module.split(".")[1])) not in retained for layer in state.layers)
    reasons = [e for e in state.excluded if e.module.startswith("blocks.")
               and e.reason == RETAINED_BLOCK_REASON.format(index=e.module.split(".")[1])]
    assert len(reasons) == 10 * len(chosen)  # every target linear of each retained block
    assert len(state.layers) == 40 - 10 * len(chosen)


def test_retain_auto_beside_one_explicit_block_adds_at_most_one(tiny_wan_dir, ranking, capsys, monkeypatch):
    stats, folder = ranking
    code, out, _ = _cli(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats", str(stats),
                        "--out", str(folder / "one.hif4"), "--retain-block", "transformer_2:1", "--retain-block",
                        "auto", "--rank-calls", "2", "--device", "cpu", "--no-progress", "--json")
    assert code == 0
    result = json.loads(out)
    auto = result["retain_auto"]
    assert auto["explicit"] == ["transformer_2:1"] and len(auto["chosen"]) <= 1
    assert "transformer_2:1" not in {b["block"] for b in auto["ranking"]["blocks"]}  # not ranked: BF16 already
    assert len(result["recipe"]["retained_blocks"]) == 1 + len(auto["chosen"])


def test_retain_auto_with_two_explicit_blocks_is_refused_before_any_work(tiny_wan_dir, ranking, capsys, monkeypatch):
    stats, folder = ranking
    with pytest.raises(RecipeError, match="auto has nothing to choose"):
        build_state(tiny_wan_dir, stats, folder / "x.hif4",
                    Recipe(retained_blocks=(RetainedBlock("transformer", 0), RetainedBlock("transformer", 1))),
                    retain_auto=True)
    code, _, err = _cli(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats", str(stats), "--out",
                        str(folder / "x.hif4"), "--retain-block", "transformer:0", "--retain-block", "transformer:1",
                        "--retain-block", "auto", "--no-progress")
    assert code == 2 and "auto has nothing to choose" in err and "Traceback" not in err
    assert not (folder / "x.hif4").exists()


def test_prompts_other_than_the_calibrated_ones_raise_calibration_error(tiny_wan_dir, ranking, tmp_path):
    stats, _ = ranking
    (tmp_path / "other.json").write_text(json.dumps(["a dog", "a horse"]))
    with pytest.raises(CalibrationError, match="was calibrated on prompts with"):
        build_state(tiny_wan_dir, stats, tmp_path / "x.hif4", Recipe(), retain_auto=True,
                    rank_settings=RankSettings(prompts=tmp_path / "other.json"))
    with pytest.raises(CalibrationError, match=r"--rank-prompts 3: expected an integer in \[1, 2\]"):
        build_state(tiny_wan_dir, stats, tmp_path / "x.hif4", Recipe(), retain_auto=True,
                    rank_settings=RankSettings(num_prompts=3))
    assert not (tmp_path / "x.hif4").exists()


def test_spaced_takes_first_and_last_and_never_more_than_given():
    assert spaced(list(range(10)), 4) == [0, 3, 6, 9]
    assert spaced([1, 2], 4) == [1, 2] and spaced(list(range(5)), 1) == [0]


def test_step_weights_are_the_squared_sampler_step_times_captured_over_used_calls():
    schedule = ([1000.0, 750.0, 500.0], [1.0, 0.75, 0.5, 0.0])  # timesteps (S,), sigmas (S + 1,)
    # two used calls of six captured: each stands for three; steps 1 and 2 move sigma by 0.25 and 0.5
    assert step_weights([750.0, 500.0], schedule, 6) == [0.25 ** 2 * 3, 0.5 ** 2 * 3]
    assert step_weights([1000.0], schedule, 1) == [0.25 ** 2]


def test_step_weights_refuse_a_missing_schedule_or_an_unknown_timestep():
    with pytest.raises(CalibrationError, match="needs a scheduler with sigmas.*--rank-weight output"):
        step_weights([500.0], None, 2)
    with pytest.raises(CalibrationError, match="timestep 600 is not in the scheduler's schedule"):
        step_weights([600.0], ([1000.0, 500.0], [1.0, 0.5, 0.0]), 2)
    with pytest.raises(CalibrationError, match="2 timesteps and 2 sigmas"):
        step_weights([500.0], ([1000.0, 500.0], [1.0, 0.5]), 2)
    with pytest.raises(CalibrationError, match="not a flow-matching schedule"):
        step_weights([999.0], ([999.0, 500.0], [157.4, 20.0, 0.0]), 2)  # a DDPM-style sigma scale


def test_call_timestep_takes_the_largest_per_token_value_and_refuses_a_call_without_one():
    import torch

    assert call_timestep({"timestep": torch.tensor([[0.0, 937.5, 937.5]])}) == 937.5  # TI2V: per-token, 0 = image
    with pytest.raises(CalibrationError, match="carried no timestep"):
        call_timestep({"hidden_states": torch.zeros(1)})


def test_an_unknown_rank_weight_is_a_calibration_error():
    with pytest.raises(CalibrationError, match="--rank-weight 'steps': expected one of output, step"):
        RankSettings(weight="steps").validate(2)


def test_step_weighted_rank_weighs_each_expert_by_its_sampler_steps(tiny_wan_dir, ranking, capsys, monkeypatch):
    stats, _ = ranking
    runs = {}
    for weight in ("output", "step"):
        code, out, _ = _cli(capsys, monkeypatch, "rank", "--base", str(tiny_wan_dir), "--stats", str(stats),
                            "--rank-calls", "2", "--rank-weight", weight, "--device", "cpu", "--no-progress", "--json")
        assert code == 0
        runs[weight] = json.loads(out)
    assert runs["output"]["weight"] == "output" and runs["step"]["weight"] == "step"
    for name, component in runs["output"]["components"].items():
        assert component["weights"] == [1.0, 1.0]
        stepped = runs["step"]["components"][name]
        assert len(stepped["weights"]) == 2 and all(w > 0 for w in stepped["weights"])
        # the same calls counted with other weights: the weighted reference norm differs
        assert stepped["reference_sq"] != pytest.approx(component["reference_sq"])
    # the low-noise expert runs the larger sigma steps (boundary 0.9, flow shift): it weighs more per call
    high, low = (max(runs["step"]["components"][name]["weights"]) for name in ("transformer", "transformer_2"))
    assert low > high
    assert {b["block"] for b in runs["step"]["blocks"]} == ALL_BLOCKS
    assert runs["step"]["error"]["all_quantized"] != pytest.approx(runs["output"]["error"]["all_quantized"])


def test_build_refuses_rank_weight_without_retain_block_auto(tiny_wan_dir, ranking, capsys, monkeypatch):
    stats, folder = ranking
    code, _, err = _cli(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats", str(stats),
                        "--out", str(folder / "w.hif4"), "--rank-weight", "step", "--no-progress")
    assert code == 2 and "--rank-weight is for --retain-block auto" in err and "Traceback" not in err
    assert not (folder / "w.hif4").exists()


def test_retain_auto_step_weighted_keeps_low_noise_blocks_and_measures_them_together(tiny_wan_dir, ranking):
    stats, folder = ranking
    summary = build_state(tiny_wan_dir, stats, folder / "step.hif4", Recipe(), retain_auto=True,
                          rank_settings=RankSettings(calls=2, weight="step"))
    auto = summary["retain_auto"]
    assert auto["ranking"]["weight"] == "step"
    # the high-noise expert moves sigma from 1 to about 0.9 only: its calls weigh far less per call
    weights = {name: c["weights"] for name, c in auto["ranking"]["components"].items()}
    assert max(weights["transformer"]) < min(weights["transformer_2"][1:])
    chosen = [b["block"] for b in auto["chosen"]]
    assert sorted(chosen) == ["transformer_2:0", "transformer_2:1"]  # both in one expert: one combined pass
    assert auto["error"]["with_retained"] < min(b["error"] for b in auto["chosen"]) < auto["error"]["all_quantized"]
    assert [str(b) for b in read_state(folder / "step.hif4").recipe.retained_blocks] == sorted(chosen)

"""``build --search``: the per-layer recipe search picks the lowest-error candidate, on a selection part
of the held-out rows disjoint from the report part; the state records each layer's recipe and rotation
and reads back equal; the report's ``chosen`` variant; determinism; typed errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from hif4fmt.codec.rotation import rotate_torch
from hif4fmt.errors import RecipeError
from hif4fmt.masks import compute_mask, weight_channel_absmax
from hif4fmt.method.search import (
    Candidate,
    SearchGrid,
    candidate_errors,
    output_subset,
    rotate_units,
    search_layer,
    split_holdout,
)
from hif4fmt.recipe import Recipe
from hif4fmt.report import relative_output_error
from hif4fmt.state import ROTATION_HADAMARD64, LayerRecipe, read_state

SMALL_GRID = ["--search-percentiles", "99.9,max", "--search-alphas", "0.4,0.6"]
from cli_support import run_hif4fmt  # noqa: E402


def _outlier_layer(seed: int = 0, rows: int = 32, channels: int = 256, outputs: int = 96):
    """Return rows (R, C), weight (O, C), bias: Gaussian, with input channel 5 carrying 100x activations."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=generator)
    x[:, 5] *= 100.0
    w = torch.randn(outputs, channels, generator=generator) * 0.05
    return x, w, torch.zeros(outputs)


def test_search_picks_the_candidate_with_the_lowest_selection_error_on_a_constructed_layer():
    x, w, b = _outlier_layer()
    absmax = x.abs().max(0).values.double().numpy()
    grid = SearchGrid.parse("max", "0,0.5,1")
    result = search_layer(x, w, b, weight_channel_absmax(w.numpy()), {None: absmax}, grid, Recipe(statistic="max",
                                                                                                   percentile=None))
    # by hand, with the report's exact error: alpha 0 moves the outlier into the weights, alpha 1 leaves it
    # in the activations; 0.5 splits it and is the best of the three
    exact = {alpha: relative_output_error(x, w, b, compute_mask(weight_channel_absmax(w.numpy()), absmax, alpha, 1e-6))
             for alpha in (0.0, 0.5, 1.0)}
    assert min(exact, key=exact.get) == 0.5
    assert result.chosen == Candidate("max", None, 0.5, None) and result.chosen_by == "search"
    batched = dict(result.errors)
    for alpha, error in exact.items():
        assert batched[Candidate("max", None, alpha, None)] == pytest.approx(error, rel=1e-4)


def test_search_chooses_the_rotation_where_one_channel_dominates_its_unit():
    x, w, b = _outlier_layer(seed=1)
    absmax = x.abs().max(0).values.double().numpy()
    weights = weight_channel_absmax(w.numpy())
    grid = SearchGrid.parse("max", "1", rotation=True)  # alpha 1: m = w, the activation outlier stays
    result = search_layer(x, w, b, weights, {None: absmax}, grid, Recipe(statistic="max", percentile=None, alpha=1.0))
    mask = compute_mask(weights, absmax, 1.0, 1e-6)
    plain = relative_output_error(x, w, b, mask)
    rotated = relative_output_error(x, w, b, mask, rotation=ROTATION_HADAMARD64)
    assert rotated < 0.9 * plain  # measured 0.098 vs 0.118
    assert result.chosen == Candidate("max", None, 1.0, ROTATION_HADAMARD64)


def test_split_is_disjoint_deterministic_and_covers_every_row():
    for rows in (0, 1, 7, 16, 64):
        selection, report = split_holdout(rows)
        assert set(selection).isdisjoint(report) and sorted([*selection, *report]) == list(range(rows))
        assert list(selection) == list(range(0, rows, 2)) and list(report) == list(range(1, rows, 2))
        again = split_holdout(rows)
        assert np.array_equal(again[0], selection) and np.array_equal(again[1], report)


def test_rotate_units_gives_rotate_torch_bits_and_leaves_its_input():
    x = torch.randn(3, 4, 192)
    copy = x.clone()
    assert torch.equal(rotate_units(x), rotate_torch(x)) and torch.equal(x, copy)
    with pytest.raises(ValueError, match="whole number of 64"):
        rotate_units(torch.zeros(2, 100))


def test_candidate_errors_batch_equal_one_at_a_time_and_subset_of_outputs_is_even():
    x, w, b = _outlier_layer(seed=2)
    masks = np.random.default_rng(0).uniform(0.5, 2.0, (5, 256)).astype(np.float32)
    batched = candidate_errors(x, w, b, masks, rotated=True)
    single = [relative_output_error(x, w, b, m, rotation=ROTATION_HADAMARD64) for m in masks]
    assert batched == pytest.approx(single, rel=1e-4)
    assert len(output_subset(13824)) == 256 and output_subset(13824)[[0, -1]].tolist() == [0, 13823]
    assert output_subset(100).tolist() == list(range(100))


@pytest.mark.parametrize("percentiles, alphas, message", [
    ("99,abc", None, "'abc' is not a number"),
    ("101", None, r"percentile 101.0: expected a number in \(0, 100\]"),
    (None, "0.5,0.5", "listed twice"),
    (None, "1.5", r"alpha 1.5: expected a number in \[0.0, 1.0\]"),
])
def test_bad_search_grids_raise_recipe_error(percentiles, alphas, message):
    with pytest.raises(RecipeError, match=message):
        SearchGrid.parse(percentiles, alphas)


def test_grid_appends_the_global_recipe_once():
    grid = SearchGrid.parse("99", "0.4")
    assert grid.candidates(Recipe())[-1] == Candidate("percentile", 99.9, 0.5, None)
    assert len(SearchGrid.parse("99.9", "0.5").candidates(Recipe())) == 1


# --- build --search on the tiny model ---------------------------------------------------------------------

pytest.importorskip("diffusers")

from hif4fmt.build import build_state  # noqa: E402
from hif4fmt.calibration.stats_file import read_stats  # noqa: E402
from search_support import tiny_stats  # noqa: E402


@pytest.fixture(scope="module")
def searched(tiny_wan_dir, tmp_path_factory):
    stats = tiny_stats(tiny_wan_dir, tmp_path_factory)
    folder = tmp_path_factory.mktemp("searched")
    grid = SearchGrid.parse("99.9,max", "0.4,0.6", rotation=True)
    summary = build_state(tiny_wan_dir, stats, folder / "a.hif4", Recipe(), report_path=folder / "a.json", search=grid)
    return stats, folder, grid, summary


def test_state_records_each_layers_recipe_and_rotation_and_reads_back_equal(tiny_wan_dir, searched):
    stats_path, folder, grid, summary = searched
    state = read_state(folder / "a.hif4")
    report = json.loads((folder / "a.json").read_text())
    entries = {(e["component"], e["module"]): e for e in report["layers"]}
    assert state.recipe == Recipe() and len(state.layers) == 40 == summary["search"]["layers"]
    stats = read_stats(stats_path)
    for layer in state.layers:
        chosen = entries[layer.key]["chosen"]
        assert layer.recipe == LayerRecipe(chosen["statistic"], chosen["percentile"], chosen["alpha"])
        assert layer.rotation == chosen["rotation"] and chosen["rotation"] in (None, ROTATION_HADAMARD64)
        layer_stats = stats.load_layer(*layer.key)
        a = (layer_stats.absmax.double().numpy() if chosen["statistic"] == "max"
             else layer_stats.percentile(chosen["percentile"]).values.numpy())
        from hif4fmt.base import BaseCheckpoint

        with BaseCheckpoint.open(tiny_wan_dir) as base:
            weight = base.components[layer.component].read_tensor_numpy(f"{layer.module}.weight", np.float32)
        assert np.array_equal(layer.mask, compute_mask(weight_channel_absmax(weight), a, chosen["alpha"], 1e-6))
    again = read_state(folder / "a.hif4")
    assert again.layers == state.layers


def test_report_has_chosen_measured_on_the_report_part_only(tiny_wan_dir, searched):
    stats_path, folder, _, summary = searched
    report = json.loads((folder / "a.json").read_text())
    assert report["variants"] == ["percentile", "max", "none", "chosen"] and report["search"]["rotation"] is True
    chosen_values = [e["rel_error"]["chosen"] for e in report["layers"]]
    assert report["summary"]["chosen"]["mean"] == pytest.approx(sum(chosen_values) / 40, rel=1e-12)
    assert summary["report"]["summary"]["chosen"]["layers"] == 40
    # one layer recomputed on the odd-position rows with the state's mask and rotation
    state = read_state(folder / "a.hif4")
    layer = state.layers[3]
    entry = next(e for e in report["layers"] if (e["component"], e["module"]) == layer.key)
    assert (entry["rows"], entry["selection_rows"]) == (8, 8)
    from safetensors.torch import load_file

    weights = load_file(str(tiny_wan_dir / layer.component / "diffusion_pytorch_model.safetensors"))
    rows = read_stats(stats_path).load_layer(*layer.key).holdout[1::2]
    expected = relative_output_error(rows, weights[f"{layer.module}.weight"], weights[f"{layer.module}.bias"],
                                     layer.mask, rotation=layer.rotation)
    assert entry["rel_error"]["chosen"] == pytest.approx(expected, rel=1e-6)
    ratio = report["summary"]["chosen_vs_percentile"]["ratio_of_means"]
    assert ratio == pytest.approx(report["summary"]["chosen"]["mean"] / report["summary"]["percentile"]["mean"])


def test_build_search_twice_gives_byte_identical_states(tiny_wan_dir, searched, tmp_path):
    stats_path, folder, grid, _ = searched
    build_state(tiny_wan_dir, stats_path, tmp_path / "b.hif4", Recipe(), search=grid)
    assert (tmp_path / "b.hif4").read_bytes() == (folder / "a.hif4").read_bytes()


_cli = run_hif4fmt  # tests/cli_support.py


@pytest.mark.parametrize("extra, message", [
    (["--search", "--search-alphas", "0.5,x"], "--search-alphas '0.5,x': 'x' is not a number"),
    (["--search-rotation"], "--search-rotation needs --search"),
    (["--prompts", "p.json"], "--prompts is for --retain-block auto"),
])
def test_bad_search_options_exit_2_with_one_line(tiny_wan_dir, searched, tmp_path, capsys, monkeypatch, extra, message):
    stats_path = searched[0]
    code, _, err = _cli(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats", str(stats_path),
                        "--out", str(tmp_path / "x.hif4"), "--no-progress", *extra)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.hif4").exists()


def test_build_search_json_names_the_grid_and_the_choices(tiny_wan_dir, searched, tmp_path, capsys, monkeypatch):
    stats_path = searched[0]
    code, out, _ = _cli(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats", str(stats_path),
                        "--out", str(tmp_path / "c.hif4"), "--no-progress", "--json", "--search", *SMALL_GRID)
    assert code == 0
    result = json.loads(out)
    assert result["search"]["grid"]["percentiles"] == [99.9, "max"] and result["search"]["grid"]["alphas"] == [0.4, 0.6]
    assert sum(result["search"]["chosen"].values()) == 40 and result["search"]["rotated"] == 0

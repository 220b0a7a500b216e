"""Building a .hif4 state from the tiny base + its statistics: determinism, the mask formula, provenance,
guards, mismatched statistics, retained blocks and the fidelity report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from hif4fmt.build import build_state
from hif4fmt.calibration.protocol import CalibrationProtocol
from hif4fmt.calibration.runner import run_calibration
from hif4fmt.calibration.stats_file import read_stats, tensor_name
from hif4fmt.errors import BuildError, StatsFormatError
from hif4fmt.fingerprint import tensor_digest
from hif4fmt.masks import DEAD_CHANNEL_MASK, compute_mask, weight_channel_absmax
from hif4fmt.recipe import Recipe, RetainedBlock
from hif4fmt.report import relative_output_error
from hif4fmt.state import read_state
from hif4fmt.targets import BOUNDARY_REASON
from hif4fmt.verify import verify_state
from stats_support import rewrite_stats

TINY = CalibrationProtocol(num_prompts=2, height=32, width=32, frames=5, steps=3, max_sequence_length=32)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def stats_path(tiny_wan_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("build_stats")
    (folder / "prompts.json").write_text(json.dumps(["a cat walks on the beach", "a red car drives fast"]))
    out = folder / "tiny.safetensors"
    run_calibration(tiny_wan_dir, folder / "prompts.json", out, TINY, holdout_rows=16, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def built(tiny_wan_dir, stats_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("built")
    summary = build_state(tiny_wan_dir, stats_path, folder / "a.hif4", Recipe(), report_path=folder / "report.json")
    return summary, folder


def _weights(tiny_wan_dir, component: str) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_wan_dir / component / WEIGHTS))


def test_build_twice_gives_byte_identical_states(tiny_wan_dir, stats_path, built):
    _, folder = built
    build_state(tiny_wan_dir, stats_path, folder / "b.hif4", Recipe())
    assert (folder / "a.hif4").read_bytes() == (folder / "b.hif4").read_bytes()


def test_masks_equal_a_direct_computation_of_the_formula(tiny_wan_dir, stats_path, built):
    _, folder = built
    state = read_state(folder / "a.hif4")
    stats = read_stats(stats_path)
    assert len(state.layers) == 40
    for component in ("transformer", "transformer_2"):
        weights = _weights(tiny_wan_dir, component)
        for layer in state.layers_of(component):
            w = weights[f"{layer.module}.weight"].double().abs().amax(0).numpy()  # max over output rows
            a = stats.load_layer(component, layer.module).percentile(99.9).values.numpy()
            expected = (w ** 0.5 / (a + 1e-6) ** 0.5).astype(np.float32)
            assert layer.mask.tobytes() == expected.tobytes(), layer.module


def test_state_binds_each_layer_to_its_weight_digest_and_lists_kept_linears(tiny_wan_dir, built):
    summary, folder = built
    state = read_state(folder / "a.hif4")
    assert verify_state(folder / "a.hif4", tiny_wan_dir).ok
    for component in ("transformer", "transformer_2"):
        weights = _weights(tiny_wan_dir, component)
        for layer in state.layers_of(component):
            weight = weights[f"{layer.module}.weight"]
            raw = weight.view(torch.int16).numpy().tobytes()
            assert layer.weight_fingerprint == tensor_digest(f"{layer.module}.weight", "BF16", weight.shape, raw)
        excluded = state.excluded_of(component)
        assert len(excluded) == 6 and {e.reason for e in excluded} == {BOUNDARY_REASON}
    calibration = state.calibration
    assert calibration["protocol"]["steps"] == 3 and calibration["seed"] == 42
    assert calibration["prompts"]["count"] == 2 and calibration["sketch"]["bins"] == 258
    assert summary["components"] == {"transformer": {"quantized": 20, "kept": 6},
                                      "transformer_2": {"quantized": 20, "kept": 6}}


def test_statistic_max_uses_the_exact_max(tiny_wan_dir, stats_path, tmp_path):
    build_state(tiny_wan_dir, stats_path, tmp_path / "max.hif4", Recipe(statistic="max", percentile=None, alpha=0.7))
    state = read_state(tmp_path / "max.hif4")
    stats = read_stats(stats_path)
    layer = state.layer("transformer_2", "blocks.1.ffn.net.2")
    w = _weights(tiny_wan_dir, "transformer_2")["blocks.1.ffn.net.2.weight"].double().abs().amax(0).numpy()
    a = stats.load_layer("transformer_2", "blocks.1.ffn.net.2").absmax.double().numpy()
    assert layer.mask.tobytes() == (w ** 0.7 / (a + 1e-6) ** 0.3).astype(np.float32).tobytes()


def test_retained_block_layers_are_excluded_with_their_reason(tiny_wan_dir, stats_path, tmp_path):
    recipe = Recipe(retained_blocks=(RetainedBlock("transformer_2", 1),))
    build_state(tiny_wan_dir, stats_path, tmp_path / "r.hif4", recipe)
    state = read_state(tmp_path / "r.hif4")
    assert len(state.layers_of("transformer")) == 20 and len(state.layers_of("transformer_2")) == 10
    retained = [e for e in state.excluded_of("transformer_2") if e.module.startswith("blocks.1.")]
    assert len(retained) == 10 and {e.reason for e in retained} == {"retained block 1"}
    assert state.recipe.retained_blocks == (RetainedBlock("transformer_2", 1),)


def test_statistics_from_another_base_raise_stats_format_error(tiny_wan_dir, stats_path, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_wan_dir, other)
    weights = load_file(str(other / "transformer_2" / WEIGHTS))
    weights["blocks.0.attn1.to_q.weight"][0, 0] += 1
    save_file(weights, str(other / "transformer_2" / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(StatsFormatError, match="statistics were collected on base"):
        build_state(other, stats_path, tmp_path / "x.hif4", Recipe())
    assert not (tmp_path / "x.hif4").exists()


def test_statistics_missing_a_layer_raise_stats_format_error(tiny_wan_dir, stats_path, tmp_path):
    def drop_layer(header):
        del header["layers"]["transformer/blocks.1.attn2.to_v"]

    def drop_tensors(tensors):
        for name in [n for n in tensors if n.startswith("transformer/blocks.1.attn2.to_v.")]:
            del tensors[name]

    rewrite_stats(stats_path, tmp_path / "partial.safetensors", drop_layer, drop_tensors)
    with pytest.raises(StatsFormatError, match=r"no statistics for transformer/blocks\.1\.attn2\.to_v"):
        build_state(tiny_wan_dir, tmp_path / "partial.safetensors", tmp_path / "x.hif4", Recipe())


def test_non_finite_calibration_activations_raise_build_error_naming_the_channel(tiny_wan_dir, stats_path, tmp_path):
    module = "blocks.0.ffn.net.0.proj"
    info = read_stats(stats_path).header.layers[("transformer", module)]
    bins = read_stats(stats_path).header.grid.bins

    def widen(header):  # store the whole grid, so the overflow bin can hold the non-finite sample
        header["layers"][f"transformer/{module}"].update(bin_offset=0, stored_bins=bins)

    def poison(tensors):
        # as if channel 3 had seen one inf where it saw its largest |x|: a consistent, valid file
        stored = tensors[tensor_name("transformer", module, "counts")]
        counts = torch.zeros((stored.shape[0], bins), dtype=torch.int64)
        counts[:, info.bin_offset:info.bin_offset + info.stored_bins] = stored
        top = int(torch.nonzero(counts[3])[-1])
        counts[3, top] -= 1
        counts[3, -1] += 1
        tensors[tensor_name("transformer", module, "counts")] = counts
        tensors[tensor_name("transformer", module, "nonfinite")][3] = 1
        tensors[tensor_name("transformer", module, "absmax")][3] = float("inf")

    rewrite_stats(stats_path, tmp_path / "nan.safetensors", edit_header=widen, edit_tensors=poison)
    assert read_stats(tmp_path / "nan.safetensors").load_layer("transformer", module).nonfinite[3] == 1
    with pytest.raises(BuildError, match=rf"transformer/{module}: input channel 3 saw 1 non-finite"):
        build_state(tiny_wan_dir, tmp_path / "nan.safetensors", tmp_path / "x.hif4", Recipe())


def test_compute_mask_guards():
    w = np.array([0.0, 0.5, 2.0, 0.25])
    a = np.array([3.0, 0.0, 4.0, 1.0])
    mask = compute_mask(w, a, 0.5, 1e-6)
    assert mask.dtype == np.float32 and mask[0] == DEAD_CHANNEL_MASK  # dead channel: w = 0
    assert mask[1] == np.float32(0.5 ** 0.5 / 1e-6 ** 0.5)  # a = 0: eps keeps it finite
    assert mask[2] == np.float32(2.0 ** 0.5 / (4.0 + 1e-6) ** 0.5)
    assert compute_mask(w, a, 1.0, 1e-6)[3] == np.float32(0.25)  # alpha 1: m = w
    assert compute_mask(w, a, 0.0, 1e-6)[3] == np.float32(1 / (1 + 1e-6))  # alpha 0: m = 1 / (a + eps)
    with pytest.raises(BuildError, match="input channel 1 has activation statistic nan"):
        compute_mask(w, np.array([1.0, np.nan, 1.0, 1.0]), 0.5, 1e-6, "t/blocks.0.attn1.to_q")
    with pytest.raises(BuildError, match="input channel 2 has max \\|W\\| inf"):
        compute_mask(np.array([1.0, 1.0, np.inf, 1.0]), a, 0.5, 1e-6)
    with pytest.raises(BuildError, match="mask of input channel 1 is inf in float32"):
        compute_mask(w, a, 0.0, 1e-300)
    with pytest.raises(BuildError, match="same \\(in_features,\\) shape"):
        compute_mask(w, a[:2], 0.5, 1e-6)


def test_weight_channel_absmax_is_max_over_output_rows():
    weight = np.array([[1.0, -3.0, 0.0], [-2.0, 1.0, 0.0]], dtype=np.float32)
    assert weight_channel_absmax(weight).tolist() == [2.0, 3.0, 0.0]


def test_report_measures_every_layer_for_percentile_max_and_no_mask(tiny_wan_dir, stats_path, built):
    summary, folder = built
    report = json.loads((folder / "report.json").read_text())
    assert len(report["layers"]) == 40 and report["percentile"] == 99.9
    for entry in report["layers"]:
        assert entry["rows"] == 16
        assert set(entry["rel_error"]) == {"percentile", "max", "none", "chosen"}
        assert entry["rel_error"]["chosen"] == entry["rel_error"]["percentile"]  # the state's recipe, unsearched
        assert all(0 < value < 1 for value in entry["rel_error"].values())
    assert summary["report"]["summary"]["percentile"]["layers"] == 40
    assert (report["format"], report["format_version"], report["statistic"]) == ("hif4fmt-build-report", "1.1",
                                                                                 "percentile")
    versus = report["summary"]["percentile_vs_max"]
    lower = sum(1 for e in report["layers"] if e["rel_error"]["percentile"] < e["rel_error"]["max"])
    higher = sum(1 for e in report["layers"] if e["rel_error"]["percentile"] > e["rel_error"]["max"])
    assert (versus["layers"], versus["percentile_lower"], versus["max_lower"]) == (40, lower, higher)
    assert versus["equal"] == 40 - lower - higher
    ratios = [e["rel_error"]["percentile"] / e["rel_error"]["max"] for e in report["layers"]]
    assert versus["mean_ratio"] == pytest.approx(sum(ratios) / 40, rel=1e-12)
    # one layer recomputed by hand: HiF4(x * m) @ HiF4(W / m).T + b against x @ W.T + b
    from hif4fmt.hifloat4 import fake_quantize

    entry = next(e for e in report["layers"] if (e["component"], e["module"]) == ("transformer", "blocks.0.attn1.to_q"))
    weights = _weights(tiny_wan_dir, "transformer")
    w, b = weights["blocks.0.attn1.to_q.weight"].float(), weights["blocks.0.attn1.to_q.bias"].float()
    x = read_stats(stats_path).load_layer("transformer", "blocks.0.attn1.to_q").holdout.float()
    mask = torch.from_numpy(read_state(folder / "a.hif4").layer("transformer", "blocks.0.attn1.to_q").mask)
    y = x @ w.T + b
    yq = fake_quantize(x * mask) @ fake_quantize(w / mask).T + b
    expected = float(torch.linalg.vector_norm((yq - y).double()) / torch.linalg.vector_norm(y.double()))
    assert entry["rel_error"]["percentile"] == pytest.approx(expected, rel=1e-5)
    assert entry["rel_error"]["none"] == pytest.approx(relative_output_error(x, w, b, None), rel=1e-12)


def test_build_reads_base_weights_one_layer_at_a_time(tiny_wan_dir, stats_path, tmp_path, monkeypatch):
    import weakref

    import safetensors.torch

    from hif4fmt.base import ComponentCheckpoint

    def refuse_whole_file(*args, **kwargs):
        raise AssertionError("build must not load a whole safetensors file")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse_whole_file)
    monkeypatch.setattr(safetensors.torch, "load", refuse_whole_file)
    original = ComponentCheckpoint.read_tensor_numpy
    alive: list[weakref.ref] = []
    names: list[str] = []

    def read_one(self, name, dtype=np.float32):
        if name.endswith(".weight"):
            # every weight read before this one has been released: at most one layer's weight is in RAM
            assert [ref for ref in alive if ref() is not None] == [], f"{name}: an earlier weight is still held"
        array = original(self, name, dtype)
        if name.endswith(".weight"):
            alive.append(weakref.ref(array))
        names.append(f"{self.name}/{name}")
        return array

    monkeypatch.setattr(ComponentCheckpoint, "read_tensor_numpy", read_one)
    build_state(tiny_wan_dir, stats_path, tmp_path / "s.hif4", Recipe(), report_path=tmp_path / "r.json")
    weights = [name for name in names if name.endswith(".weight")]
    assert len(weights) == len(set(weights)) == 40  # each quantized weight read once, over both experts
    assert all(name.split("/")[1].startswith("blocks.") for name in names)  # kept linears are never read


def _swap_in_other_layer(source_module: str, target_module: str):
    """Return header/tensor edits that give ``target_module`` the (self-consistent) statistics of another layer."""
    def edit_header(header):
        entry = dict(header["layers"][f"transformer/{source_module}"], module=target_module)
        header["layers"][f"transformer/{target_module}"] = entry

    def edit_tensors(tensors):
        for field in ("counts", "absmax", "absmin", "nonfinite", "holdout", "holdout_ids"):
            tensors[tensor_name("transformer", target_module, field)] = \
                tensors[tensor_name("transformer", source_module, field)].clone()

    return edit_header, edit_tensors


@pytest.mark.parametrize("edits, message", [
    (_swap_in_other_layer("blocks.0.ffn.net.2", "blocks.0.attn1.to_q"),
     r"transformer/blocks\.0\.attn1\.to_q has statistics for \d+ -> \d+ features but the model has"),
    ((lambda h: h.update(base=None), None), "records no base fingerprint"),
])
def test_statistics_for_other_shapes_or_without_base_raise_stats_format_error(tiny_wan_dir, stats_path, tmp_path,
                                                                               edits, message):
    rewrite_stats(stats_path, tmp_path / "other.safetensors", *edits)
    read_stats(tmp_path / "other.safetensors")  # a valid statistics file, only not for this base
    with pytest.raises(StatsFormatError, match=message):
        build_state(tiny_wan_dir, tmp_path / "other.safetensors", tmp_path / "x.hif4", Recipe())
    assert not (tmp_path / "x.hif4").exists()

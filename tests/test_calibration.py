"""Calibration on the tiny Wan2.2 I2V pipeline: every layer, step, CFG branch and expert observed; the hook
statistics equal a direct recomputation from the captured activations; provenance is recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from hif4fmt.calibration.hooks import ActivationCollector
from hif4fmt.calibration.prompts import prompt_set_digest
from hif4fmt.calibration.protocol import CalibrationProtocol
from hif4fmt.calibration.runner import blank_image, load_pipeline, run_calibration
from hif4fmt.calibration.sketch import SketchGrid
from hif4fmt.calibration.stats_file import read_stats
from hif4fmt.errors import CalibrationError, OutputPathError
from hif4fmt.fingerprint import fingerprint_base
from hif4fmt.targets import plan_model

PROMPTS = ["a cat walks on the beach at sunset", "a red car drives fast on a city street"]
TINY = CalibrationProtocol(num_prompts=2, height=32, width=32, frames=5, steps=3, max_sequence_length=32)
LATENT_TOKENS = 2 * 2 * 2  # (5 - 1) / 4 + 1 latent frames x (32 / 8 / 2) ** 2 patches
TEXT_ROLES = ("attn2.to_k", "attn2.to_v")  # inputs are the text context (max_sequence_length tokens)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps([{"cap": text} for text in PROMPTS]))
    return path


@pytest.fixture(scope="module")
def calibrated(tiny_wan_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "tiny.safetensors"
    summary = run_calibration(tiny_wan_dir, prompts_file, out, TINY, holdout_rows=8, device="cpu", progress=False)
    return summary, out


def _steps_per_expert(tiny_wan_dir, steps: int) -> dict[str, int]:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_pretrained(tiny_wan_dir, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    boundary = json.loads((tiny_wan_dir / "model_index.json").read_text())["boundary_ratio"] * 1000
    high = sum(1 for t in scheduler.timesteps if t >= boundary)
    return {"transformer": high, "transformer_2": steps - high}


def test_every_target_layer_of_both_experts_is_observed_on_every_step_and_cfg_branch(calibrated, tiny_wan_dir):
    _, path = calibrated
    stats = read_stats(path)
    layers = stats.header.layers
    assert len(layers) == 40 and stats.header.components() == ["transformer", "transformer_2"]
    steps = _steps_per_expert(tiny_wan_dir, TINY.steps)
    assert steps["transformer"] >= 1 and steps["transformer_2"] >= 1
    for (component, module), info in layers.items():
        calls = TINY.num_prompts * steps[component] * 2  # records x steps of this expert x CFG branches
        assert info.calls == calls, (component, module)
        per_call = TINY.max_sequence_length if module.endswith(TEXT_ROLES) else LATENT_TOKENS
        assert info.tokens == calls * per_call, (component, module)
        assert info.holdout_rows == 8 and info.holdout_dtype == "bfloat16"
        loaded = stats.load_layer(component, module)
        assert torch.equal(loaded.counts.sum(1), torch.full((info.in_features,), info.tokens))
        assert bool((loaded.absmax > 0).any())


def test_stats_file_records_protocol_prompts_seed_and_base_fingerprint(calibrated, tiny_wan_dir):
    _, path = calibrated
    header = read_stats(path).header
    assert header.protocol == TINY
    assert header.protocol_dict["seed"] == 42
    assert header.prompts == {"count": 2, "sha256": prompt_set_digest(PROMPTS), "source": "prompts.json"}
    assert header.base["fingerprint"] == fingerprint_base(tiny_wan_dir).fingerprint
    assert header.grid == SketchGrid()
    assert header.holdout["rows_per_layer"] == 8


def test_hook_statistics_equal_a_direct_recomputation_from_captured_inputs(tiny_wan_dir):
    protocol = CalibrationProtocol(num_prompts=1, height=32, width=32, frames=5, steps=3, max_sequence_length=32)
    pipe = load_pipeline(tiny_wan_dir, protocol.dtype, torch.device("cpu"), "none")
    models = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    grid = SketchGrid()
    collector = ActivationCollector(models, plan_model(models), grid, holdout_rows=4)
    captured: dict[tuple[str, str], list[torch.Tensor]] = {}
    watched = [("transformer", "blocks.1.ffn.net.2"), ("transformer_2", "blocks.0.attn2.to_k")]
    for component, module in watched:
        target = dict(models[component].named_modules())[module]
        target.register_forward_pre_hook(
            lambda _, args, key=(component, module): captured.setdefault(key, []).append(args[0].detach().clone()))
    collector.begin_record(0)
    pipe(image=blank_image(protocol), prompt=PROMPTS[0], height=32, width=32, num_frames=5, num_inference_steps=3,
         guidance_scale=3.5, generator=torch.Generator().manual_seed(42), output_type="latent",
         max_sequence_length=32)
    collector.remove()
    lower, upper = grid.bin_edges()
    for key in watched:
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured[key]]).float().abs()
        sketch = collector.observations[key].sketch
        assert sketch.tokens == rows.shape[0]
        assert torch.equal(sketch.absmax, rows.amax(0)) and torch.equal(sketch.absmin, rows.amin(0))
        # independent binning: the bin whose [lower, upper) holds the value, found on float64 edges
        values = rows.double().numpy()
        bins = np.searchsorted(upper.numpy(), values, side="right")
        expected = np.stack([np.bincount(bins[:, c], minlength=grid.bins) for c in range(values.shape[1])])
        assert np.array_equal(sketch.counts.numpy(), expected)
        exact = torch.quantile(rows.double(), 0.999, dim=0)
        estimate = sketch.percentile(99.9).values
        assert bool(((estimate - exact).abs() <= grid.relative_error_bound * exact + grid.absolute_error_bound).all())
        holdout = collector.observations[key].holdout
        assert holdout.rows.shape == (4, rows.shape[1]) and holdout.rows.dtype == torch.bfloat16


def test_one_step_never_reaches_the_low_noise_expert_and_raises_calibration_error(tiny_wan_dir, prompts_file,
                                                                                   tmp_path):
    protocol = CalibrationProtocol(num_prompts=1, height=32, width=32, frames=5, steps=1, max_sequence_length=32)
    with pytest.raises(CalibrationError, match=r"transformer_2/blocks\.0\..* never ran .* use more --steps"):
        run_calibration(tiny_wan_dir, prompts_file, tmp_path / "s.safetensors", protocol, device="cpu",
                        progress=False)
    assert not (tmp_path / "s.safetensors").exists()


def test_resolution_not_a_multiple_of_the_patch_grid_raises_calibration_error(tiny_wan_dir, prompts_file, tmp_path):
    protocol = CalibrationProtocol(num_prompts=1, height=40, width=32, frames=5, steps=2, max_sequence_length=32)
    with pytest.raises(CalibrationError, match="--height 40: must be a multiple of 16"):
        run_calibration(tiny_wan_dir, prompts_file, tmp_path / "s.safetensors", protocol, device="cpu",
                        progress=False)


def test_missing_output_folder_is_refused_before_running(tiny_wan_dir, prompts_file, tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        run_calibration(tiny_wan_dir, prompts_file, tmp_path / "absent" / "s.safetensors", TINY, device="cpu",
                        progress=False)


def test_int32_counts_and_the_torch_sketch_path_write_byte_identical_files(calibrated, tiny_wan_dir, prompts_file,
                                                                            tmp_path, monkeypatch):
    _, reference = calibrated
    small = tmp_path / "int32.safetensors"
    run_calibration(tiny_wan_dir, prompts_file, small, TINY, holdout_rows=8, device="cpu", progress=False,
                    sketch_counts="int32")
    assert small.read_bytes() == reference.read_bytes()
    monkeypatch.setenv("HIF4FMT_SKETCH_KERNEL", "0")  # the torch path (the default run used the C kernel if built)
    plain = tmp_path / "torch.safetensors"
    run_calibration(tiny_wan_dir, prompts_file, plain, TINY, holdout_rows=8, device="cpu", progress=False)
    assert plain.read_bytes() == reference.read_bytes()


def test_unknown_sketch_counts_is_refused_before_running(tiny_wan_dir, prompts_file, tmp_path):
    with pytest.raises(CalibrationError, match="--sketch-counts 'int16': expected one of int64, int32"):
        run_calibration(tiny_wan_dir, prompts_file, tmp_path / "s.safetensors", TINY, device="cpu",
                        progress=False, sketch_counts="int16")

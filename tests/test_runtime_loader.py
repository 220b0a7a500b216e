"""load_pipeline: base + .hif4 state -> a diffusers pipeline whose listed linears are HiF4Linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from hif4fmt.errors import BaseMismatchError, RuntimeLoadError  # noqa: E402
from hif4fmt.recipe import Recipe  # noqa: E402
from hif4fmt.state import BaseBinding, QuantizedLayer, State, read_state, write_state  # noqa: E402
from tools.make_tiny_wan import make_tiny_wan  # noqa: E402
from wan_runtime import HiF4Linear, apply_state, load_pipeline, quantized_layers  # noqa: E402
from wan_runtime.generate import GenerationSettings, generate_frames  # noqa: E402
from wan_runtime.placeholder import placeholder_image  # noqa: E402

SETTINGS = GenerationSettings("a red car on a wet street", height=32, width=32, frames=5, steps=3, guidance=3.0,
                              seed=7, max_sequence_length=16)
BOUNDARY = ("condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
            "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
            "condition_embedder.text_embedder.linear_2", "proj_out")


def _render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return generate_frames(pipe, placeholder_image(SETTINGS.width, SETTINGS.height), SETTINGS)


@pytest.fixture(scope="module")
def w4a4_pipe(tiny_wan_dir, tiny_wan_state):
    return load_pipeline(tiny_wan_dir, tiny_wan_state)


def _one_layer_state(tiny_wan_dir, path, module: str, in_features: int, out_features: int):
    binding = BaseBinding("hif4fmt-sha256-tensors-v1", "00" * 32, {"transformer": "11" * 32}, 1)
    layer = QuantizedLayer("transformer", module, in_features, out_features, np.ones(in_features, np.float32), "22" * 32)
    write_state(path, State(Recipe(), {}, binding, (layer,), ()))
    return path


def test_state_layers_become_hif4linear_and_boundary_layers_stay(w4a4_pipe, tiny_wan_state):
    state = read_state(tiny_wan_state)
    found = quantized_layers(w4a4_pipe)
    for component in ("transformer", "transformer_2"):
        model = getattr(w4a4_pipe, component)
        names = sorted(name for name, module in model.named_modules() if isinstance(module, HiF4Linear))
        assert names == sorted(layer.module for layer in state.layers_of(component))
        assert len(found[component]) == 20
        for name in BOUNDARY:
            assert type(model.get_submodule(name)) is nn.Linear, name
    assert w4a4_pipe.config.boundary_ratio == 0.9
    assert w4a4_pipe.transformer.blocks[0].attn1.to_q.compute_dtype == torch.bfloat16
    assert w4a4_pipe.vae.dtype == torch.float32


def test_layer_masks_come_from_the_state(w4a4_pipe, tiny_wan_state):
    layer = read_state(tiny_wan_state).layer("transformer_2", "blocks.1.ffn.net.2")
    module = w4a4_pipe.transformer_2.get_submodule("blocks.1.ffn.net.2")
    assert torch.equal(module.mask, torch.from_numpy(layer.mask).to(torch.bfloat16))


def test_w4a4_frames_are_deterministic_for_a_seed(w4a4_pipe, tiny_wan_dir, tiny_wan_state):
    first = _render(w4a4_pipe)
    assert first.shape == (SETTINGS.frames, SETTINGS.height, SETTINGS.width, 3) and first.dtype == np.uint8
    assert np.array_equal(first, _render(w4a4_pipe))
    assert np.array_equal(first, _render(load_pipeline(tiny_wan_dir, tiny_wan_state)))  # a fresh load too


def test_w4a4_differs_from_bf16_but_stays_close(w4a4_pipe, tiny_wan_dir):
    from wan_runtime.frame_metrics import compare_videos

    bf16 = _render(load_pipeline(tiny_wan_dir, None))
    w4a4 = _render(w4a4_pipe)
    assert not np.array_equal(bf16, w4a4)
    assert compare_videos(bf16, w4a4)["mean_psnr_db"] > 25.0


def test_without_state_the_pipeline_is_plain(tiny_wan_dir):
    pipe = load_pipeline(tiny_wan_dir, None)
    assert all(layers == [] for layers in quantized_layers(pipe).values())
    assert pipe.transformer.dtype == torch.bfloat16


def test_apply_state_in_place_matches_load_pipeline(w4a4_pipe, tiny_wan_dir, tiny_wan_state):
    pipe = load_pipeline(tiny_wan_dir, None)
    summaries = apply_state(pipe, read_state(tiny_wan_state))
    assert [(s.component, s.layers) for s in summaries] == [("transformer", 20), ("transformer_2", 20)]
    assert all(s.packed_weight_bytes / s.bf16_weight_bytes == 0.28125 for s in summaries)
    assert np.array_equal(_render(pipe), _render(w4a4_pipe))
    with pytest.raises(RuntimeLoadError, match="already quantized"):
        apply_state(pipe, read_state(tiny_wan_state))


def test_quantized_expert_holds_about_0_3x_of_its_bf16_linear_bytes(w4a4_pipe, tiny_wan_dir):
    bf16 = load_pipeline(tiny_wan_dir, None)
    for component in ("transformer", "transformer_2"):
        w4a4_bytes = bf16_bytes = 0
        for name, module in getattr(w4a4_pipe, component).named_modules():
            if isinstance(module, HiF4Linear):
                w4a4_bytes += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
                original = getattr(bf16, component).get_submodule(name)
                bf16_bytes += sum(t.numel() * t.element_size() for t in original.parameters())
        assert 0.28 < w4a4_bytes / bf16_bytes < 0.32  # 0.28 weights + BF16 masks and biases


def test_wrong_base_is_refused_with_base_mismatch_error(tiny_wan_state, tmp_path):
    other = make_tiny_wan(tmp_path / "seed1", seed=1)
    with pytest.raises(BaseMismatchError, match="was built for base"):
        load_pipeline(other, tiny_wan_state)
    pipe = load_pipeline(other, tiny_wan_state, verify=False)  # explicit opt-out: same shapes, so it loads
    assert len(quantized_layers(pipe)["transformer"]) == 20


def test_layer_absent_from_model_raises_runtime_load_error(tiny_wan_dir, tmp_path):
    path = _one_layer_state(tiny_wan_dir, tmp_path / "absent.hif4", "blocks.7.attn1.to_q", 64, 64)
    with pytest.raises(RuntimeLoadError, match=r"layer transformer\.blocks\.7\.attn1\.to_q: listed in the state but absent"):
        load_pipeline(tiny_wan_dir, path, verify=False)


def test_layer_with_other_features_raises_runtime_load_error(tiny_wan_dir, tmp_path):
    path = _one_layer_state(tiny_wan_dir, tmp_path / "shape.hif4", "blocks.0.ffn.net.2", 64, 64)
    with pytest.raises(RuntimeLoadError, match=r"blocks\.0\.ffn\.net\.2: state has in/out features 64/64, the model has 128/64"):
        load_pipeline(tiny_wan_dir, path, verify=False)


def test_layer_that_is_not_linear_raises_runtime_load_error(tiny_wan_dir, tmp_path):
    path = _one_layer_state(tiny_wan_dir, tmp_path / "norm.hif4", "blocks.0.norm2", 64, 64)
    with pytest.raises(RuntimeLoadError, match=r"blocks\.0\.norm2: expected torch\.nn\.Linear, found FP32LayerNorm"):
        load_pipeline(tiny_wan_dir, path, verify=False)


def test_folder_without_model_index_raises_runtime_load_error(tmp_path, tiny_wan_state):
    with pytest.raises(RuntimeLoadError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path, tiny_wan_state)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
def test_cuda_device_without_cuda_raises_runtime_load_error_before_loading(tiny_wan_dir, tiny_wan_state):
    from wan_runtime import load_pipeline

    with pytest.raises(RuntimeLoadError, match="device 'cuda'"):
        load_pipeline(tiny_wan_dir, tiny_wan_state, device="cuda")


def test_unknown_device_string_raises_runtime_load_error(tiny_wan_dir):
    from wan_runtime.loader import check_device

    with pytest.raises(RuntimeLoadError, match="tpu9"):
        check_device("tpu9")
    assert check_device("cpu") == torch.device("cpu")


def test_batched_kernel_load_and_layer_by_layer_torch_load_pack_the_same_weights(w4a4_pipe, tiny_wan_dir,
                                                                                 tiny_wan_state, monkeypatch):
    monkeypatch.setenv("HIF4FMT_KERNEL", "0")  # every layer on its own, through the torch codec paths
    torch_pipe = load_pipeline(tiny_wan_dir, tiny_wan_state)
    for component in ("transformer", "transformer_2"):
        batched = {name: m for name, m in getattr(w4a4_pipe, component).named_modules() if isinstance(m, HiF4Linear)}
        single = {name: m for name, m in getattr(torch_pipe, component).named_modules() if isinstance(m, HiF4Linear)}
        assert sorted(batched) == sorted(single) and len(batched) == 20
        for name, layer in batched.items():
            assert torch.equal(layer.weight_codes, single[name].weight_codes), name
            assert torch.equal(layer.weight_meta, single[name].weight_meta), name
            assert torch.equal(layer.mask, single[name].mask), name


@pytest.mark.parametrize("kernel_switch", ["1", "0"])
def test_nan_in_a_base_weight_is_refused_naming_the_layer(tiny_wan_dir, tiny_wan_state, monkeypatch, kernel_switch):
    monkeypatch.setenv("HIF4FMT_KERNEL", kernel_switch)
    pipe = load_pipeline(tiny_wan_dir, None)
    state = read_state(tiny_wan_state)
    target = state.layers_of("transformer_2")[5].module
    with torch.no_grad():
        pipe.transformer_2.get_submodule(target).weight[3, 40] = float("nan")
    with pytest.raises(RuntimeLoadError, match=f"layer transformer_2.{target}: .*NaN at row 3, element 40"):
        apply_state(pipe, state)


def test_collector_is_paused_during_a_load_and_restored_after_it_also_on_errors(tiny_wan_dir, monkeypatch):
    import gc

    import wan_runtime.loader as loader
    from wan_runtime.loader import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    seen = []

    def failing_load(*args):
        seen.append(gc.isenabled())
        raise RuntimeLoadError("simulated")

    with monkeypatch.context() as patch:
        patch.setattr(loader, "_load_pipeline", failing_load)
        with pytest.raises(RuntimeLoadError, match="simulated"):
            load_pipeline(tiny_wan_dir, None)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        load_pipeline(tiny_wan_dir, None)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


@pytest.mark.parametrize("arithmetic", ["integer", "simulated"])
def test_each_arithmetic_renders_deterministic_frames_close_to_the_other(arithmetic, w4a4_pipe, tiny_wan_dir,
                                                                          tiny_wan_state):
    from wan_runtime.frame_metrics import compare_videos

    pipe = load_pipeline(tiny_wan_dir, tiny_wan_state, arithmetic=arithmetic)
    assert {layer.arithmetic for layers in quantized_layers(pipe).values() for layer in layers} == {arithmetic}
    first = _render(pipe)
    assert np.array_equal(first, _render(pipe))
    assert np.array_equal(first, _render(load_pipeline(tiny_wan_dir, tiny_wan_state, arithmetic=arithmetic)))
    other = load_pipeline(tiny_wan_dir, tiny_wan_state, arithmetic="simulated" if arithmetic == "integer" else "integer")
    psnr = compare_videos(first, _render(other))["mean_psnr_db"]  # None: identical uint8 frames
    assert psnr is None or psnr > 30.0  # the same W4A4 model, other rounding


def test_default_arithmetic_of_a_load_is_the_devices(w4a4_pipe):
    from wan_runtime.hif4_linear import default_arithmetic

    assert {layer.arithmetic for layers in quantized_layers(w4a4_pipe).values() for layer in layers} == {
        default_arithmetic("cpu")}


def test_unknown_arithmetic_is_refused_before_loading(tiny_wan_dir, tiny_wan_state):
    with pytest.raises(RuntimeLoadError, match="arithmetic 'int4'"):
        load_pipeline(tiny_wan_dir, tiny_wan_state, arithmetic="int4")

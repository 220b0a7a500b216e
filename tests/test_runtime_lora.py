"""LoRAs on the W4A4 model: merged into the verified BF16 experts (diffusers' loader), then packed; bad LoRAs refused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hif4fmt.errors import (LoraFormatError, LoraKeyError, LoraModelMismatchError, LoraScaleError,  # noqa: E402
                            LoraShapeError)
from tools.make_synthetic_lora import lora_update, merge_by_hand, merged_weight, write_synthetic_lora  # noqa: E402
from wan_runtime.cli import cli  # noqa: E402
from wan_runtime.loader import _load_expert, load_pipeline  # noqa: E402
from wan_runtime.lora import LoraSpec, PartialLoraWarning, lora_specs, merge_loras_, parse_lora_argument  # noqa: E402
from wan_runtime.video import read_video  # noqa: E402

SMALL = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--guidance", "2.0",
         "--max-sequence-length", "16", "--no-progress"]
UPDATE_NORM = 0.3  # ||delta|| / ||W|| of the test LoRAs: large enough to change the tiny model's video clearly


@pytest.fixture(scope="module")
def loras(tiny_wan_dir, tmp_path_factory):
    """Return {"original": high-noise LoRA in the original-Wan layout, "diffusers": low-noise one in the diffusers layout}."""
    folder = tmp_path_factory.mktemp("loras")
    return {"original": write_synthetic_lora(tiny_wan_dir, folder / "high.safetensors", "transformer",
                                             relative_norm=UPDATE_NORM, layout="original", seed=1),
            "diffusers": write_synthetic_lora(tiny_wan_dir, folder / "low.safetensors", "transformer_2",
                                              relative_norm=UPDATE_NORM, layout="diffusers", seed=2)}


def _expert(base, component="transformer"):
    return _load_expert(base, component, torch.bfloat16)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def _generate(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["generate", *SMALL, "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_merge_equals_a_bf16_merge_by_hand_in_both_layouts_kept_layers_included(tiny_wan_dir, tmp_path, layout):
    lora = write_synthetic_lora(tiny_wan_dir, tmp_path / "l.safetensors", relative_norm=UPDATE_NORM, layout=layout)
    model = _expert(tiny_wan_dir)
    before = _weights(model)
    storage = {name: module.weight.data_ptr() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    applied = merge_loras_(model, "transformer", [LoraSpec(lora, 0.7)])
    updates = lora_update(lora)
    assert all(model.get_submodule(n).weight.data_ptr() == p for n, p in storage.items())  # merged in place
    assert applied[0].layers == len(updates) == 22  # 20 block linears + proj_out + text embedder linear_1
    for name, delta in updates.items():
        merged = model.get_submodule(name).weight.detach()
        assert type(model.get_submodule(name)) is torch.nn.Linear  # the PEFT adapter layers are gone
        assert torch.equal(merged, merged_weight(before[name], delta, 0.7)), name
        exact = before[name].double() + 0.7 * delta  # and within BF16 rounding of the exact merge
        assert ((merged.double() - exact).abs() <= 2.0 ** -7 * (before[name].double().abs() + 0.7 * delta.abs())).all()
    assert not torch.equal(model.proj_out.weight, before["proj_out"])  # a kept (boundary) linear got its update too
    untouched = set(before) - set(updates)
    assert untouched and all(torch.equal(model.get_submodule(n).weight, before[n]) for n in untouched)


def test_w4a4_lora_video_equals_w4a4_video_of_base_merged_by_hand_and_differs_without(
        tiny_wan_dir, tiny_wan_state, loras, tmp_path):
    merged = merge_by_hand(tiny_wan_dir, tmp_path / "merged", {"transformer": [(loras["original"], 0.8)],
                                                               "transformer_2": [(loras["diffusers"], 1.0)]})
    summary = _generate("--base", str(tiny_wan_dir), "--state", str(tiny_wan_state), "--lora",
                        f"{loras['original']}:0.8", "--lora-2", str(loras["diffusers"]), "--out", str(tmp_path / "l.mp4"))
    _generate("--base", str(merged), "--state", str(tiny_wan_state), "--no-verify", "--out", str(tmp_path / "m.mp4"))
    _generate("--base", str(tiny_wan_dir), "--state", str(tiny_wan_state), "--out", str(tmp_path / "p.mp4"))
    with_lora, by_hand, plain = (read_video(tmp_path / f"{n}.mp4") for n in "lmp")
    assert (with_lora == by_hand).all()
    assert (with_lora != plain).mean() > 0.2
    assert summary["verified"] is True and summary["quantization"]["transformer"]["hif4_layers"] == 20
    assert summary["loras"] == [
        {"path": str(loras["original"]), "sha256": hashlib.sha256(loras["original"].read_bytes()).hexdigest(),
         "scale": 0.8, "expert": "transformer", "layers": 22},
        {"path": str(loras["diffusers"]), "sha256": hashlib.sha256(loras["diffusers"].read_bytes()).hexdigest(),
         "scale": 1.0, "expert": "transformer_2", "layers": 22}]


def test_compare_renders_bf16_lora_against_w4a4_lora(tiny_wan_dir, tiny_wan_state, loras, tmp_path):
    merged = merge_by_hand(tiny_wan_dir, tmp_path / "merged", {"transformer": [(loras["original"], 1.0)]})
    summary = _generate("--base", str(tiny_wan_dir), "--state", str(tiny_wan_state), "--compare",
                        "--lora", str(loras["original"]), "--out", str(tmp_path / "c.mp4"))
    _generate("--base", str(merged), "--out", str(tmp_path / "b.mp4"))  # plain BF16 of the hand-merged base
    assert (read_video(tmp_path / "c.bf16.mp4") == read_video(tmp_path / "b.mp4")).all()
    assert [lora["expert"] for lora in summary["loras"]] == ["transformer"]
    assert summary["compare"]["mean_psnr_db"] > 20.0


def test_load_pipeline_takes_paths_and_path_scale_pairs(tiny_wan_dir, loras):
    pipe = load_pipeline(tiny_wan_dir, None, loras=[(loras["original"], 0.5)], loras_2=[str(loras["diffusers"])])
    assert [(lora.expert, lora.scale) for lora in pipe.applied_loras] == [("transformer", 0.5), ("transformer_2", 1.0)]
    plain = _expert(tiny_wan_dir, "transformer")
    delta = lora_update(loras["original"])["blocks.1.ffn.net.2"]
    assert torch.equal(pipe.transformer.blocks[1].ffn.net[2].weight,
                       merged_weight(plain.blocks[1].ffn.net[2].weight, delta, 0.5))


def test_wrong_base_is_still_refused_with_a_lora(tiny_wan_state, loras, tmp_path):
    from tools.make_tiny_wan import make_tiny_wan

    other = make_tiny_wan(tmp_path / "other", seed=3)
    done = subprocess.run([sys.executable, "-m", "wan_runtime", "generate", *SMALL, "--base", str(other), "--state",
                           str(tiny_wan_state), "--lora", str(loras["original"]), "--out", str(tmp_path / "x.mp4")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "was built for base" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_cli_bad_lora_exits_2_naming_the_file_and_writes_nothing(tiny_wan_dir, tiny_wan_state, tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("not a LoRA")
    done = subprocess.run([sys.executable, "-m", "wan_runtime", "generate", *SMALL, "--base", str(tiny_wan_dir),
                           "--state", str(tiny_wan_state), "--lora", str(bad), "--out", str(tmp_path / "x.mp4")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: LoRA {bad}: not a safetensors file")
    assert not (tmp_path / "x.mp4").exists()


# --- bad input: one typed error naming the file and the key; the expert is left unchanged ------------------


def _write(path, tensors):
    save_file(tensors, path)
    return path


def _refused(tiny_wan_dir, specs, error, *texts):
    model = _expert(tiny_wan_dir)
    before = _weights(model)
    with pytest.raises(error) as caught:
        merge_loras_(model, "transformer", specs)
    for text in texts:
        assert text in str(caught.value)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in before.items())


def _pair(out_features, in_features, rank=4, value=0.01):
    return torch.full((rank, in_features), value, dtype=torch.bfloat16), torch.full((out_features, rank), value,
                                                                                    dtype=torch.bfloat16)


def test_not_a_safetensors_file_and_missing_file(tiny_wan_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _refused(tiny_wan_dir, [LoraSpec(junk)], LoraFormatError, str(junk), "not a safetensors file")
    _refused(tiny_wan_dir, [LoraSpec(tmp_path / "none.safetensors")], LoraFormatError, "no such file")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_lora_tensor(tiny_wan_dir, tmp_path, value):
    down, up = _pair(64, 64)
    up[3, 1] = value
    path = _write(tmp_path / "n.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
                                               "transformer.blocks.0.attn1.to_q.lora_B.weight": up})
    _refused(tiny_wan_dir, [LoraSpec(path)], LoraFormatError, str(path),
             "key transformer.blocks.0.attn1.to_q.lora_B.weight: NaN or inf")


def test_keys_that_match_no_layer(tiny_wan_dir, tmp_path):
    down, up = _pair(64, 64)
    path = _write(tmp_path / "k.safetensors", {"transformer.blocks.0.attn1.to_qq.lora_A.weight": down,
                                               "transformer.blocks.0.attn1.to_qq.lora_B.weight": up})
    _refused(tiny_wan_dir, [LoraSpec(path)], LoraKeyError, str(path), "transformer.blocks.0.attn1.to_qq.lora_A.weight",
             "names no linear layer of transformer")
    original = _write(tmp_path / "o.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                                                   "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
                                                   "diffusion_model.mystery.lora_down.weight": down.clone()})
    _refused(tiny_wan_dir, [LoraSpec(original)], LoraKeyError, str(original), "mystery.lora_down.weight")
    not_lora = _write(tmp_path / "w.safetensors", {"blocks.0.attn1.to_q.weight": up})
    _refused(tiny_wan_dir, [LoraSpec(not_lora)], LoraKeyError, "blocks.0.attn1.to_q.weight")


def test_shape_mismatch_names_the_key(tiny_wan_dir, tmp_path):
    down, up = _pair(64, 64)
    bad_down, bad_up = _pair(128, 64)  # to_k is 64 -> 64, not 64 -> 128
    path = _write(tmp_path / "s.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
                                               "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
                                               "transformer.blocks.0.attn1.to_k.lora_A.weight": bad_down,
                                               "transformer.blocks.0.attn1.to_k.lora_B.weight": bad_up})
    _refused(tiny_wan_dir, [LoraSpec(path)], LoraShapeError, str(path), "blocks.0.attn1.to_k.lora_A.weight",
             "(4, 64) / (128, 4)")


def test_a_lora_for_another_model_size(tiny_wan_dir, tmp_path):
    down, up = _pair(5120, 5120)  # Wan2.2 A14B's inner dim on the tiny model (inner 64)
    same_blocks = _write(tmp_path / "a.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                                                      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up})
    _refused(tiny_wan_dir, [LoraSpec(same_blocks)], LoraModelMismatchError, str(same_blocks), "another model size")
    down, up = _pair(64, 64)
    more_blocks = _write(tmp_path / "b.safetensors", {"transformer.blocks.39.attn1.to_q.lora_A.weight": down,
                                                      "transformer.blocks.39.attn1.to_q.lora_B.weight": up})
    _refused(tiny_wan_dir, [LoraSpec(more_blocks)], LoraModelMismatchError, "block 39", "has 2 blocks")


@pytest.mark.parametrize("text", ["lora.safetensors:nan", "lora.safetensors:inf", "lora.safetensors:-inf",
                                  "lora.safetensors:strong"])
def test_a_scale_that_is_not_a_finite_number(text):
    with pytest.raises(LoraScaleError, match=f"LoRA {text}: scale"):
        parse_lora_argument(text)


def test_scale_parsing_and_python_pairs(tmp_path):
    assert parse_lora_argument("a/b.safetensors:0.75") == LoraSpec(tmp_path.__class__("a/b.safetensors"), 0.75)
    assert parse_lora_argument("a/b.safetensors").scale == 1.0
    assert parse_lora_argument("C:/loras/x.safetensors").scale == 1.0  # a drive colon is not a scale
    odd = tmp_path / "style:v2.safetensors"  # an existing file whose name has a colon
    odd.write_bytes(b"")
    assert parse_lora_argument(str(odd)) == LoraSpec(odd, 1.0)
    for bad in [("x.safetensors", float("nan")), ("x.safetensors", "1.0x"), ("x.safetensors", True)]:
        with pytest.raises(LoraScaleError, match="x.safetensors"):
            lora_specs([bad])


def test_a_bad_second_lora_leaves_the_expert_unchanged(tiny_wan_dir, loras, tmp_path):
    junk = tmp_path / "j.safetensors"
    junk.write_text("{}")
    good = write_synthetic_lora(tiny_wan_dir, tmp_path / "g.safetensors")
    _refused(tiny_wan_dir, [LoraSpec(good), LoraSpec(junk)], LoraFormatError, str(junk))


def test_partial_match_is_applied_with_a_warning_counting_the_layers(tiny_wan_dir, tmp_path):
    down, up = _pair(64, 64)
    path = _write(tmp_path / "p.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
                                               "transformer.blocks.0.attn1.to_q.lora_B.weight": up})
    model = _expert(tiny_wan_dir)
    before = model.blocks[0].attn1.to_q.weight.detach().clone()
    with pytest.warns(PartialLoraWarning, match="touched 1 layers of transformer, 1 of its 20 block linear layers"):
        applied = merge_loras_(model, "transformer", [LoraSpec(path)])
    assert applied[0].layers == 1 and not torch.equal(model.blocks[0].attn1.to_q.weight, before)


def test_nonzero_norm_difference_is_refused_and_a_zero_one_ignored(tiny_wan_dir, tmp_path):
    down, up = _pair(64, 64)
    keys = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up}
    zero = _write(tmp_path / "z.safetensors", {**keys, "diffusion_model.blocks.0.norm3.diff": torch.zeros(64)})
    nonzero = _write(tmp_path / "n.safetensors", {**keys, "diffusion_model.blocks.0.norm3.diff": torch.ones(64)})
    _refused(tiny_wan_dir, [LoraSpec(nonzero)], LoraKeyError, "diffusion_model.blocks.0.norm3.diff", "does not apply")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialLoraWarning)
        assert merge_loras_(_expert(tiny_wan_dir), "transformer", [LoraSpec(zero)])[0].layers == 1


def test_bias_differences_diff_b_are_merged_into_the_bias(tiny_wan_dir, tmp_path):
    down, up = _pair(64, 64)
    path = _write(tmp_path / "b.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                                               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
                                               "diffusion_model.blocks.0.self_attn.q.diff_b":
                                                   torch.full((64,), 0.5, dtype=torch.bfloat16)})
    model = _expert(tiny_wan_dir)
    bias = model.blocks[0].attn1.to_q.bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialLoraWarning)
        merge_loras_(model, "transformer", [LoraSpec(path, 0.5)])
    change = model.blocks[0].attn1.to_q.bias.double() - bias.double()
    assert ((change - 0.25).abs() <= 2.0 ** -8 * (bias.double().abs() + 0.25)).all()


def test_cli_partial_lora_warns_in_one_line_and_lists_it_in_json(tiny_wan_dir, tmp_path):
    down, up = _pair(64, 64)
    path = _write(tmp_path / "p.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
                                               "transformer.blocks.0.attn1.to_q.lora_B.weight": up})
    result = CliRunner().invoke(cli, ["generate", *SMALL, "--json", "--base", str(tiny_wan_dir), "--lora", str(path),
                                      "--out", str(tmp_path / "p.mp4")], catch_exceptions=False)
    assert result.exit_code == 0
    assert f"warning: LoRA {path}: touched 1 layers of transformer" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["lora_warnings"] == [line.removeprefix("warning: ") for line in result.stderr.splitlines()
                                        if line.startswith("warning: ")]

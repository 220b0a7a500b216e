"""What merging a LoRA costs the state's masks: held-out layer error with state masks vs re-balanced vs recalibrated.

Why this benchmark exists: a .hif4 state's masks m_i = w_i**alpha / (a_i + eps)**(1 - alpha) were
balanced for the unmerged weights W. With a LoRA the runtime packs HiF4((W + delta) / m) with those same
masks (docs/runtime.md, "LoRAs"). This measures, on the medium model (or any base) with a synthetic
LoRA of realistic size (tools/make_synthetic_lora.py: rank 32-128, ||delta||_F = 5-30 % of ||W||_F per
block linear), the held-out relative output error of each high-noise block linear

    ||HiF4(x * m) @ HiF4(W' / m).T - x @ W'.T||_F / ||x @ W'.T||_F,   W' = W + delta,

with x the inputs that layer sees in the BF16+LoRA model on held-out prompts, for four masks:

    state        w_i of W,  a_i of the base model's calibration activations   (what the runtime uses)
    rebalanced   w_i of W', the same a_i                                      (what --rebalance would do)
    recalibrated w_i of W', a_i of the merged model's calibration activations (a fresh calibration)
    none         m = 1

a_i is the p99.9 of |x| per input channel (the recipe's default statistic; exact quantile of the
captured rows here, not the sketch), alpha and eps the recipe's defaults; mean over layers, and
ratios to the "state" error measured in the same run. Activations come from real pipeline runs
(hooks on the block linears of ``transformer``), calibration and held-out prompts disjoint.

    python benchmarks/lora_masks.py [--base DIR] [--configs 32:0.05,128:0.3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CALIBRATION_PROMPTS = ("a small dog runs across a green field in the morning light",
                       "a boat moves slowly over a calm blue lake under white clouds",
                       "snow falls on a quiet forest while the camera pans slowly")
HELD_OUT_PROMPTS = ("a red dragon flies over a mountain lake at sunset", "a golden car drives fast on a wet road")
RENDER = {"height": 128, "width": 128, "frames": 9, "steps": 4, "guidance": 3.5, "max_sequence_length": 32}
COMPONENT = "transformer"  # the LoRA goes into the high-noise expert; its block linears are measured
VARIANTS = ("state", "rebalanced", "recalibrated", "none")
MAX_ROWS = 2048  # rows kept per layer and capture (the first ones; statistics and errors use them)


def _capture(pipe, prompts) -> dict[str, torch.Tensor]:
    """Return {block linear: float32 (rows, in_features) inputs} of ``pipe.transformer`` over renders of ``prompts``."""
    from wan_runtime.generate import GenerationSettings, generate_frames
    from wan_runtime.placeholder import placeholder_image

    model = getattr(pipe, COMPONENT)
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
            def hook(_module, args, name=name):
                kept = rows.setdefault(name, [])
                have = sum(part.shape[0] for part in kept)
                if have < MAX_ROWS:
                    kept.append(args[0].detach().reshape(-1, args[0].shape[-1])[: MAX_ROWS - have].float())
            handles.append(module.register_forward_pre_hook(hook))
    pipe.set_progress_bar_config(disable=True)
    try:
        for seed, prompt in enumerate(prompts):
            settings = GenerationSettings(prompt, seed=seed, **RENDER)
            generate_frames(pipe, placeholder_image(RENDER["width"], RENDER["height"], 0), settings)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts)[:MAX_ROWS] for name, parts in rows.items()}


def _percentile(x: torch.Tensor, percentile: float) -> np.ndarray:
    return torch.quantile(x.abs(), percentile / 100.0, dim=0).double().numpy()


def _error(x: torch.Tensor, weight: torch.Tensor, mask: np.ndarray | None) -> float:
    from hif4fmt.hifloat4 import fake_quantize

    reference = x @ weight.T
    m = torch.ones(x.shape[1]) if mask is None else torch.from_numpy(mask).float()
    approx = fake_quantize(x * m) @ fake_quantize(weight / m).T
    return float(torch.linalg.norm(approx - reference) / torch.linalg.norm(reference))


def base_activations(base: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (BF16 block-linear weights as float32, calibration inputs) of the unmerged ``transformer``."""
    from wan_runtime.loader import load_pipeline

    plain = load_pipeline(base, None)
    weights = {name: module.weight.detach().float() for name, module in getattr(plain, COMPONENT).named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith("blocks.")}
    return weights, _capture(plain, CALIBRATION_PROMPTS)


def measure(base: Path, rank: int, relative_norm: float, work: Path, base_weights: dict, base_calibration: dict,
            seed: int = 0) -> dict:
    """Return {variant: mean held-out relative error} and the LoRA's settings for one synthetic LoRA."""
    from hif4fmt.masks import compute_mask, weight_channel_absmax
    from hif4fmt.recipe import Recipe
    from tools.make_synthetic_lora import write_synthetic_lora
    from wan_runtime.loader import load_pipeline

    recipe = Recipe()
    lora = write_synthetic_lora(base, work / f"lora_r{rank}_{relative_norm}.safetensors", COMPONENT, rank,
                                relative_norm, "original", seed, block_only=True)
    merged = load_pipeline(base, None, loras=[lora])
    merged_calibration = _capture(merged, CALIBRATION_PROMPTS)
    held_out = _capture(merged, HELD_OUT_PROMPTS)
    errors = {variant: [] for variant in VARIANTS}
    update = []
    for name, module in getattr(merged, COMPONENT).named_modules():
        if name not in base_weights:
            continue
        weight = module.weight.detach().float()
        update.append(float(torch.linalg.norm(weight - base_weights[name]) / torch.linalg.norm(base_weights[name])))
        a_base = _percentile(base_calibration[name], recipe.percentile)
        a_merged = _percentile(merged_calibration[name], recipe.percentile)
        masks = {
            "state": compute_mask(weight_channel_absmax(base_weights[name].numpy()), a_base, recipe.alpha, recipe.eps),
            "rebalanced": compute_mask(weight_channel_absmax(weight.numpy()), a_base, recipe.alpha, recipe.eps),
            "recalibrated": compute_mask(weight_channel_absmax(weight.numpy()), a_merged, recipe.alpha, recipe.eps),
            "none": None,
        }
        for variant, mask in masks.items():
            errors[variant].append(_error(held_out[name], weight, mask))
    means = {variant: float(np.mean(values)) for variant, values in errors.items()}
    return {"rank": rank, "relative_norm": relative_norm, "layers": len(update),
            "measured_update_norm": float(np.mean(update)), "mean_error": means,
            "ratio_to_state": {variant: means[variant] / means["state"] for variant in VARIANTS},
            "layers_where_rebalanced_is_better": int(sum(r < s for r, s in zip(errors["rebalanced"], errors["state"])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="pipeline folder (default: build the medium model)")
    parser.add_argument("--configs", default="32:0.05,128:0.3", help="rank:relative_norm,...")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = args.base
        if base is None:
            from tools.make_tiny_wan import make_tiny_wan

            base = make_tiny_wan(work / "medium", medium=True)
        results = []
        base_weights, base_calibration = base_activations(base)
        for item in args.configs.split(","):
            rank, norm = item.split(":")
            results.append(measure(base, int(rank), float(norm), work, base_weights, base_calibration))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress: one line per LoRA
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"held-out relative output error, mean over the {results[0]['layers']} block linears of {COMPONENT}")
    print(f"{'rank':>5} {'|dW|/|W|':>9} " + " ".join(f"{v:>13}" for v in VARIANTS) + "  rebalanced/state  recal/state")
    for r in results:
        print(f"{r['rank']:>5} {r['measured_update_norm']:>9.3f} "
              + " ".join(f"{r['mean_error'][v]:>13.5f}" for v in VARIANTS)
              + f"  {r['ratio_to_state']['rebalanced']:>16.4f}  {r['ratio_to_state']['recalibrated']:>11.4f}"
              + f"  (rebalanced better on {r['layers_where_rebalanced_is_better']}/{r['layers']} layers)")


if __name__ == "__main__":
    main()

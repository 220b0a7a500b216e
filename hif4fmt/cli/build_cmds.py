"""``hif4fmt plan | calibrate | build``: choose the layers, collect statistics, write the .hif4 state.

Why this module exists: these are the producer-side commands (they need torch and diffusers, unlike
the state commands). Each one parses its options, calls the library (``hif4fmt.targets``,
``hif4fmt.calibration.runner``, ``hif4fmt.build``), builds a plain dict and hands it to
``hif4fmt.cli.output.emit``. Option names are a contract other tools and the docs rely on; the
statistics format and mask rules are in spec/stats-v1.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hif4fmt.cli.output import emit, print_notes, table
from hif4fmt.cli.recipe_options import (
    RANK_OPTIONS,
    RECIPE_OPTIONS,
    SEARCH_OPTIONS,
    apply_options,
    make_rank_settings,
    make_recipe,
    make_search,
)

GIB = 1024 ** 3
MODEL_DEFAULT = "the model's own, see above"  # calibrate: option defaults that come from the base's layout


def _size(nbytes: int) -> str:
    """Return a byte count as GiB / MiB / KiB text."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _retained(values: tuple[str, ...]) -> tuple:
    from hif4fmt.recipe import RetainedBlock

    return tuple(RetainedBlock.parse(value) for value in values)


# --- plan ------------------------------------------------------------------------------------------


def _stored_checkpoint(model: Path) -> Any:
    """Return the BaseCheckpoint holding weights for ``model`` if there is one, else None."""
    from hif4fmt.base import BaseCheckpoint
    from hif4fmt.errors import BaseCheckpointError

    folder = model.parent if model.is_file() else model
    try:
        return BaseCheckpoint.open(folder)
    except BaseCheckpointError:
        return None


def _layer_bytes(checkpoint: Any, component: str, layer: Any) -> int | None:
    """Return the stored bytes of a linear's weight + bias, or None when the checkpoint lacks them."""
    if checkpoint is None or component not in checkpoint.components:
        return None
    stored = checkpoint.components[component]
    total = 0
    for suffix in ("weight", "bias"):
        name = f"{layer.module}.{suffix}"
        if stored.has_tensor(name):
            total += stored.tensor_info(name)[2]
        elif suffix == "weight":
            return None
    return total


def plan_result(model: Path, retained: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return the ``plan --json`` dict (spec/stats-v1.md 8.1): per component the linears quantized and kept."""
    from hif4fmt.targets import ASSUMED_BYTES_PER_PARAMETER, BLOCK_LINEAR_ROLES, meta_transformers, plan_model

    plans = plan_model(meta_transformers(model), _retained(retained))
    checkpoint = _stored_checkpoint(model)
    components: dict[str, Any] = {}
    totals = {"quantized": 0, "kept": 0, "quantized_bytes": 0, "kept_bytes": 0}
    for name, plan in plans.items():
        stored = [_layer_bytes(checkpoint, name, layer) for layer in plan.quantized] + \
                 [_layer_bytes(checkpoint, name, kept.layer) for kept in plan.kept]
        from_checkpoint = all(size is not None for size in stored)

        def nbytes(layer: Any) -> int:
            size = _layer_bytes(checkpoint, name, layer) if from_checkpoint else None
            return size if size is not None else layer.parameters * ASSUMED_BYTES_PER_PARAMETER

        roles: dict[str, int] = {}
        for layer in plan.quantized:
            roles[layer.role] = roles.get(layer.role, 0) + 1
        entry = {
            "blocks": plan.num_blocks,
            "quantized": plan.quantized_names(),
            "kept": plan.kept_names(),
            "kept_reasons": {kept.layer.module: kept.reason for kept in plan.kept},
            "quantized_count": len(plan.quantized),
            "kept_count": len(plan.kept),
            "quantized_parameters": sum(layer.parameters for layer in plan.quantized),
            "kept_parameters": sum(kept.layer.parameters for kept in plan.kept),
            "quantized_bytes": sum(nbytes(layer) for layer in plan.quantized),
            "kept_bytes": sum(nbytes(kept.layer) for kept in plan.kept),
            "bytes_source": "checkpoint" if from_checkpoint else f"assumed BF16 ({ASSUMED_BYTES_PER_PARAMETER} B/param)",
            "quantized_roles": {role: roles[role] for role in BLOCK_LINEAR_ROLES if role in roles},
            "high_precision_modules": plan.other_modules,
        }
        components[name] = entry
        for key in totals:
            totals[key] += entry[f"{key}_count"] if key in ("quantized", "kept") else entry[key]
    return {"model": str(model), "layout": _plan_layout(model), "retained_blocks": list(retained),
            "components": components, "totals": totals}


def _plan_layout(model: Path) -> dict[str, Any]:
    """Return ``hif4fmt.layouts.describe_layout`` of a plan's MODEL (its folder when MODEL is a file)."""
    from hif4fmt.layouts import describe_layout

    folder = model if model.is_dir() else model.parent  # a config.json: its transformer folder
    for candidate in (folder, folder.parent):  # the pipeline folder, or the one above a transformer folder
        if (candidate / "model_index.json").is_file():
            return describe_layout(candidate)
    return describe_layout(folder)


def _render_plan(result: dict[str, Any]) -> str:
    from hif4fmt.layouts import layout_label

    lines = [f"plan for {result['model']}: layout {layout_label(result['layout'])}"]
    for name, entry in result["components"].items():
        lines.append("")
        lines.append(f"{name}: {entry['blocks']} blocks, {entry['quantized_count']} linears quantized to HiF4 "
                     f"W4A4 ({_size(entry['quantized_bytes'])}), {entry['kept_count']} kept high precision "
                     f"({_size(entry['kept_bytes'])}); bytes {entry['bytes_source']}")
        lines.append(table([[role, count] for role, count in entry["quantized_roles"].items()],
                           ["quantized role (per block)", "linears"]))
        lines.append(table([[module, reason] for module, reason in entry["kept_reasons"].items()],
                           ["kept linear", "reason"]))
        others = ", ".join(f"{count} {kind}" for kind, count in entry["high_precision_modules"].items())
        lines.append(f"also untouched (high precision): {others or 'none'}")
    totals = result["totals"]
    lines.append("")
    lines.append(f"total: {totals['quantized']} quantized ({_size(totals['quantized_bytes'])}), "
                 f"{totals['kept']} kept ({_size(totals['kept_bytes'])})")
    return "\n".join(lines)


@click.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--retain-block", "retain_blocks", multiple=True, metavar="COMPONENT:INDEX",
              help="keep this whole block high precision (at most 2 across both experts)")
@click.option("--json", "as_json", is_flag=True, help="print JSON (components.<name>.quantized / .kept lists)")
def plan_cmd(model: Path, retain_blocks: tuple[str, ...], as_json: bool) -> None:
    """List which linears will be quantized and which kept, per component (no weights are loaded).

    MODEL is a diffusers folder, a transformer folder or a transformer config.json.
    """
    emit(plan_result(model, retain_blocks), as_json, _render_plan)


# --- calibrate ---------------------------------------------------------------------------------------


def _render_calibration(result: dict[str, Any]) -> str:
    rows = [[name, entry["layers"], entry["calls"], entry["tokens_per_layer_max"]]
            for name, entry in result["components"].items()]
    sketch = result.get("sketch", {})
    return "\n".join([
        f"wrote {result['out']} ({_size(result.get('stats_bytes', 0))}) from {result['records']} prompts on "
        f"{result['processes']} process(es) in {result['seconds']:.1f} s",
        f"model: {result['layout']} ({result['pipeline']})",
        table(rows, ["component", "layers", "calls per layer", "max tokens per layer"]),
        f"sketch: {sketch.get('bins')} bins per channel, percentile error <= "
        f"{sketch.get('relative_error_bound', 0):.4f} relative + {sketch.get('absolute_error_bound', 0):.3g} absolute",
    ])


@click.command("calibrate")
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="diffusers Wan folder (any layout of hif4fmt.layouts: Wan2.2 I2V/T2V A14B, TI2V-5B, Wan2.1 T2V/I2V)")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="JSON prompts: records with 'cap' (OpenS2V-5M style) or a list of strings")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="statistics file to write")
@click.option("--num-prompts", default=16, show_default=True, help="first N prompts of the file")
@click.option("--height", type=int, default=None, help=f"pixels [default: {MODEL_DEFAULT}]")
@click.option("--width", type=int, default=None, help=f"pixels [default: {MODEL_DEFAULT}]")
@click.option("--frames", type=int, default=None, help=f"video frames (4k + 1) [default: {MODEL_DEFAULT}]")
@click.option("--steps", type=int, default=None, help=f"denoising steps [default: {MODEL_DEFAULT}]")
@click.option("--guidance", type=float, default=None, help=f"CFG scale (high-noise expert) [default: {MODEL_DEFAULT}]")
@click.option("--guidance-2", type=float, default=None,
              help="CFG scale of the low-noise expert (two-expert models only) [default: the model's, else --guidance]")
@click.option("--seed", default=42, show_default=True, help="record i uses seed + i")
@click.option("--max-sequence-length", default=512, show_default=True, help="text tokens")
@click.option("--negative-prompt", default="", show_default=True, help="unconditional prompt")
@click.option("--image", "image", type=click.Path(path_type=Path), default=None,
              help="first frame (PNG/JPEG) for image-to-video and TI2V models [default: the blank image for "
                   "I2V, none for TI2V]; refused for text-to-video models")
@click.option("--image-fill", default=0, show_default=True, help="value of every pixel of the blank image")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="transformers and text encoder dtype (the VAE runs in float32)")
@click.option("--mantissa-bits", default=3, show_default=True, help="sketch: 2**k bins per octave")
@click.option("--exponent-min", default=-16, show_default=True, help="sketch: |x| < 2**min is underflow")
@click.option("--exponent-max", default=16, show_default=True, help="sketch: |x| >= 2**max is overflow")
@click.option("--holdout-rows", default=64, show_default=True, help="input rows kept per layer for the report")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--sketch-device", type=click.Choice(["cpu"]), default=None,
              help="keep the histograms in CPU memory [default: with the layer's weights]")
@click.option("--sketch-counts", type=click.Choice(["int64", "int32"]), default="int64", show_default=True,
              help="histogram counts in memory: int32 halves it (exact; promoted before it could wrap)")
@click.option("--offload", type=click.Choice(["none", "model"]), default="none", show_default=True,
              help="model: one pipeline component on the GPU at a time")
@click.option("--force", is_flag=True, help="replace an existing --out")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def calibrate_cmd(base: Path, prompts: Path, out: Path, num_prompts: int, height: int | None, width: int | None,
                  frames: int | None, steps: int | None, guidance: float | None, guidance_2: float | None, seed: int,
                  max_sequence_length: int, negative_prompt: str, image: Path | None, image_fill: int, dtype: str, mantissa_bits: int, exponent_min: int,
                  exponent_max: int, holdout_rows: int, device: str, sketch_device: str | None,
                  sketch_counts: str, offload: str, force: bool, no_progress: bool, as_json: bool) -> None:
    """Run the base's Wan pipeline over calibration prompts and write per-channel |x| statistics.

    The pipeline (WanPipeline or WanImageToVideoPipeline, one or two experts) and the defaults of
    --height/--width/--frames/--steps/--guidance come from the base's model_index.json and layout:
    Wan2.2-I2V-A14B the paper protocol (720x1280, 61 frames, 40 steps, guidance 3.5), the other models
    their release settings (docs/calibration.md, Models). The flow shift is the base's scheduler config.
    Under torchrun (--nproc-per-node N) the prompts are sharded and the statistics merged exactly.
    """
    from hif4fmt.calibration.runner import protocol_for_base, run_calibration
    from hif4fmt.calibration.sketch import SketchGrid

    protocol = protocol_for_base(base, image, num_prompts=num_prompts, height=height, width=width, frames=frames,
                                 steps=steps, guidance=guidance, guidance_2=guidance_2, seed=seed,
                                 max_sequence_length=max_sequence_length, negative_prompt=negative_prompt,
                                 image_fill=image_fill, dtype=dtype)
    grid = SketchGrid(mantissa_bits, exponent_min, exponent_max).validate()
    result = run_calibration(base, prompts, out, protocol, grid, holdout_rows=holdout_rows, device=device,
                             sketch_device=sketch_device, offload=offload, progress=not no_progress, force=force,
                             sketch_counts=sketch_counts, image=image)
    print_notes(result.get("notes", []))
    if "stats_bytes" in result:  # only the process that wrote the file reports
        emit(result, as_json, _render_calibration)


# --- build -------------------------------------------------------------------------------------------


def render_retain_auto(auto: dict[str, Any]) -> str:
    """Return the text of ``--retain-block auto``: what each retained block buys and the error with all."""
    error = auto["error"]
    if not auto["chosen"]:
        return (f"retain-block auto: no block lowers the transformer output error "
                f"{error['all_quantized']:.5f}; none retained")
    rows = [[b["block"], f"{b['error']:.5f}", f"{b['gain']:.5f}", f"{100 * b['relative_gain']:.1f}%"]
            for b in auto["chosen"]]
    others = f" (explicit {', '.join(auto['explicit'])} in BF16)" if auto["explicit"] else ""
    weighted = ("calls weighted by sampler step, " if auto["ranking"].get("weight", "output") == "step" else "")
    return "\n".join([f"retain-block auto: transformer output error vs BF16 ({weighted}"
                      f"{error['all_quantized']:.5f} with the "
                      f"other blocks W4A4{others}, {error['with_retained']:.5f} with "
                      f"{', '.join(b['block'] for b in auto['chosen'])} "
                      f"in BF16 (each block's own gain below)",
                      table(rows, ["block", "error alone", "gain", "gain %"])])


def _render_build(result: dict[str, Any]) -> str:
    recipe = result["recipe"]
    statistic = f"p{recipe['percentile']}" if recipe["statistic"] == "percentile" else "max"
    lines = [f"wrote {result['out']} ({_size(result['bytes'])}): statistic {statistic}, alpha {recipe['alpha']}, "
             f"eps {recipe['eps']}, encoder {recipe['encoder']}"
             + (f", retained blocks {', '.join(recipe['retained_blocks'])}" if recipe["retained_blocks"] else ""),
             table([[name, c["quantized"], c["kept"]] for name, c in result["components"].items()],
                   ["component", "quantized", "kept"])]
    if result["channels_outside_sketch_bound"]:
        lines.append(f"note: {result['channels_outside_sketch_bound']} channels had their percentile in the "
                     f"sketch's overflow bin (estimated by the exact max); widen --exponent-max when calibrating")
    if "search" in result:
        search = result["search"]
        chosen = ", ".join(f"{label} x{count}" for label, count in list(search["chosen"].items())[:5])
        lines.append(f"search: {search['layers']} layers over {len(search['grid']['percentiles'])} percentiles x "
                     f"{len(search['grid']['alphas'])} alphas{' x rotation' if search['grid']['rotation'] else ''}; "
                     f"{search['rotated']} rotated; most chosen: {chosen}")
    if "retain_auto" in result:
        lines.append(render_retain_auto(result["retain_auto"]))
    if "report_text" in result:
        lines += ["", result["report_text"], f"report: {result['report']['path']}"]
    return "\n".join(lines)


@click.command("build")
@click.option("--base", required=True, type=click.Path(path_type=Path), help="base checkpoint the stats came from")
@click.option("--stats", required=True, type=click.Path(path_type=Path), help="statistics file from calibrate")
@click.option("--out", required=True, type=click.Path(path_type=Path), help=".hif4 state to write")
@apply_options(RECIPE_OPTIONS, SEARCH_OPTIONS, RANK_OPTIONS)
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="also measure per-layer fidelity on the held-out rows and write this JSON")
@click.option("--force", is_flag=True, help="replace an existing --out / --report")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def build_cmd(base: Path, stats: Path, out: Path, percentile: float | None, statistic: str, alpha: float | None,
              eps: float | None, retain_blocks: tuple[str, ...], encoder: str, mask_dtype: str, search: bool,
              search_percentiles: str | None, search_alphas: str | None, search_rotation: bool,
              prompts: Path | None, rank_prompts: int | None, rank_calls: int | None, rank_weight: str | None,
              device: str, report_path: Path | None, force: bool, no_progress: bool, as_json: bool) -> None:
    """Compute the masks from base weights + statistics and write the .hif4 state."""
    from hif4fmt.build import build_state
    from hif4fmt.errors import RecipeError

    recipe, auto = make_recipe(percentile, statistic, alpha, eps, retain_blocks, encoder, mask_dtype)
    grid = make_search(search, search_percentiles, search_alphas, search_rotation)
    if not auto:
        given = [name for name, value in (("--prompts", prompts), ("--rank-prompts", rank_prompts),
                                          ("--rank-calls", rank_calls), ("--rank-weight", rank_weight))
                 if value is not None]
        if given:
            raise RecipeError(f"{given[0]} is for --retain-block auto; add it or drop {given[0]}")
    result = build_state(base, stats, out, recipe, report_path=report_path, progress=not no_progress, force=force,
                         search=grid, retain_auto=auto,
                         rank_settings=make_rank_settings(prompts, rank_prompts, rank_calls, device, rank_weight)
                         if auto else None)
    print_notes(result["notes"])
    if as_json:
        result.pop("report_text", None)
    emit(result, as_json, _render_build)

"""Build a .hif4 state from a base checkpoint and a calibration statistics file.

Why this module exists: ``build`` is where the recipe meets the data. For every quantized linear (the
rule in ``hif4fmt.targets``, minus retained blocks) it takes ``a_i`` from the statistics (p-th
percentile or exact max of |x|), ``w_i = max_o |W[o, i]|`` from the base safetensors one tensor at a
time (never the whole model in memory), computes the mask (``hif4fmt.masks``), binds each layer to its
base weight by digest, lists the linears kept high precision with their reason, and writes the state
(deterministic bytes) together with the optional report as one atomic set (``hif4fmt.atomic``). Optionally it measures each layer's
fidelity on the held-out calibration rows (``hif4fmt.report``), chooses each layer's recipe by search
(``hif4fmt.method.search``) and keeps the blocks that buy the most in BF16 (``hif4fmt.method.rank``).
Statistics made for another base or other layers are refused with ``StatsFormatError`` before any
work is done.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hif4fmt.atomic import atomic_set, check_outputs
from hif4fmt.errors import BuildError, StateWriteError, StatsFormatError
from hif4fmt.recipe import DEFAULT_PERCENTILE, Recipe

STATISTICS_FORMAT = "hif4fmt-stats"


def _activation_statistic(layer_stats: Any, statistic: str, percentile: float | None) -> tuple[np.ndarray, int]:
    """Return (a float64 (C,), channels whose percentile estimate is outside the sketch's bound)."""
    if statistic == "max":
        return layer_stats.absmax.double().numpy(), 0
    estimate = layer_stats.percentile(float(percentile))
    return estimate.values.numpy(), int((~estimate.bounded).sum())


def _check_finite_activations(layer_stats: Any, where: str) -> None:
    """Raise ``BuildError`` naming the first channel that saw inf/NaN activations during calibration."""
    bad = np.flatnonzero(layer_stats.nonfinite.numpy() > 0)
    if bad.size:
        channel = int(bad[0])
        raise BuildError(f"{where}: input channel {channel} saw {int(layer_stats.nonfinite[channel])} non-finite "
                         f"activations during calibration ({bad.size} channels affected); the masks would be "
                         f"meaningless; fix the model or protocol and recalibrate")


def _calibration_provenance(header: Any, tokens: dict[str, list[int]], outside_bound: int) -> dict[str, Any]:
    """Return the state's calibration map (spec/stats-v1.md section 7.1): protocol, prompts, sketch, tokens."""
    return {
        "statistics": {"format": STATISTICS_FORMAT, "format_version": header.format_version},
        "protocol": header.protocol_dict,
        "prompts": header.prompts,
        "seed": header.protocol.seed,
        "sketch": header.grid.to_dict(),
        "holdout": header.holdout,
        "calibrated_on": header.base["fingerprint"],
        "tokens_per_layer": {component: {"min": min(values), "max": max(values)}
                             for component, values in sorted(tokens.items()) if values},
        "channels_outside_sketch_bound": outside_bound,
    }


def _open_inputs(base_path: Path, stats_path: Path) -> tuple[Any, Any, Any]:
    """Return (statistics file, base checkpoint, base fingerprint), refusing statistics of another base."""
    from hif4fmt.base import BaseCheckpoint
    from hif4fmt.calibration.stats_file import read_stats
    from hif4fmt.fingerprint import fingerprint_base

    stats = read_stats(stats_path)
    header = stats.header
    base = BaseCheckpoint.open(base_path)
    fingerprint = fingerprint_base(base)
    if header.base is None:
        raise StatsFormatError(f"{stats_path}: records no base fingerprint, so it cannot be tied to {base_path}; "
                               f"recalibrate with `hif4fmt calibrate --base {base_path}`")
    if header.base.get("fingerprint") != fingerprint.fingerprint:
        raise StatsFormatError(f"{stats_path}: statistics were collected on base {header.base.get('fingerprint')}, "
                               f"but {base_path} is {fingerprint.fingerprint}; recalibrate on this base or pass "
                               f"the base they were made for")
    return stats, base, fingerprint


def _plan(base_path: Path, base: Any, retained: tuple) -> dict[str, Any]:
    """Return the component plans of the base's transformers with ``retained`` blocks kept."""
    from hif4fmt.targets import meta_transformers, plan_model

    models = meta_transformers(base_path)
    missing = sorted(set(base.components) - set(models))
    if missing:
        raise BuildError(f"{base_path}: component {missing[0]} has weights but no config.json")
    return plan_model({name: models[name] for name in base.components}, retained)


def _check_statistics_cover(header: Any, stats_path: Path, work: list[tuple[str, Any]]) -> None:
    """Raise ``StatsFormatError`` before any heavy work if a layer has no statistics or other features."""
    for component, layer in work:
        info = header.layers.get((component, layer.module))
        if info is None:
            raise StatsFormatError(f"{stats_path}: no statistics for {component}/{layer.module}; the file was "
                                   f"made for other layers; recalibrate with this base")
        if info.in_features != layer.in_features or info.out_features != layer.out_features:
            raise StatsFormatError(f"{stats_path}: {component}/{layer.module} has statistics for "
                                   f"{info.in_features} -> {info.out_features} features but the model has "
                                   f"{layer.in_features} -> {layer.out_features}; recalibrate with this base")


@dataclass
class LayerChoice:
    """What ``build`` decided for one quantized layer: its float32 (C,) mask, the searched candidate (None
    without ``--search``), how it was chosen, tokens seen, channels outside the sketch bound, report entry."""

    component: str
    layer: Any  # hif4fmt.targets.LinearLayer
    mask: np.ndarray
    candidate: Any
    chosen_by: str | None
    tokens: int
    outside_bound: int
    report: dict[str, Any] | None

    @property
    def rotation(self) -> str | None:
        return None if self.candidate is None else self.candidate.rotation


def choose_layers(base_path: Path, stats_path: Path, stats: Any, base: Any, plans: dict[str, Any], recipe: Recipe,
                  search: Any = None, report: bool = False, progress: bool = False) -> list[LayerChoice]:
    """Return one ``LayerChoice`` per quantized layer of ``plans``, in build order (spec 6.4 step 6).

    Without ``search`` the mask is the recipe's; with a ``hif4fmt.method.search.SearchGrid`` the layer's
    candidate with the lowest error on the selection part of its held-out rows. ``report`` also measures
    the fidelity entry (section 8.3; with ``search`` on the report part of the rows only).
    """
    from tqdm.auto import tqdm

    from hif4fmt.masks import compute_mask, weight_channel_absmax

    header = stats.header
    work = [(component, layer) for component, plan in plans.items() for layer in plan.quantized]
    _check_statistics_cover(header, stats_path, work)
    choices: list[LayerChoice] = []
    for component, layer in tqdm(work, desc="build", unit="layer", disable=not progress):
        where = f"{component}/{layer.module}"
        checkpoint = base.components[component]
        weight_name = f"{layer.module}.weight"
        _, shape, _ = checkpoint.tensor_info(weight_name)
        if shape != (layer.out_features, layer.in_features):
            raise BuildError(f"{base_path}: {component} tensor {weight_name} has shape {list(shape)} but its "
                             f"config gives [{layer.out_features}, {layer.in_features}]; the folder is inconsistent")
        layer_stats = stats.load_layer(component, layer.module)
        if layer_stats.info.tokens == 0:
            raise BuildError(f"{stats_path}: {where} was never run during calibration (0 tokens); recalibrate "
                             f"with more --steps")
        _check_finite_activations(layer_stats, where)
        weight = checkpoint.read_tensor_numpy(weight_name, np.float32)
        weight_absmax = weight_channel_absmax(weight)
        bias_name = f"{layer.module}.bias"
        needs_bias = (search is not None or report) and checkpoint.has_tensor(bias_name)
        bias = checkpoint.read_tensor_numpy(bias_name, np.float32) if needs_bias else None
        if search is None:
            activation, outside = _activation_statistic(layer_stats, recipe.statistic, recipe.percentile)
            mask = compute_mask(weight_absmax, activation, recipe.alpha, recipe.eps, where)
            choice = LayerChoice(component, layer, mask, None, None, layer_stats.info.tokens, outside, None)
        else:
            choice = _search_layer(layer_stats, weight, bias, weight_absmax, search, recipe, component, layer, where)
        if report:
            choice.report = _layer_report(layer_stats, weight, bias, layer.module, recipe, choice, weight_absmax,
                                          search is not None)
        choices.append(choice)
        del weight
    return choices


def _search_layer(layer_stats: Any, weight: np.ndarray, bias: np.ndarray | None, weight_absmax: np.ndarray,
                  search: Any, recipe: Recipe, component: str, layer: Any, where: str) -> LayerChoice:
    """Return the layer's choice from ``hif4fmt.method.search.search_layer`` on its selection rows."""
    import torch

    from hif4fmt.method.search import search_layer, split_holdout

    activation: dict[float | None, np.ndarray] = {}
    outside: dict[float | None, int] = {}
    for candidate in search.candidates(recipe):
        key = candidate.percentile if candidate.statistic == "percentile" else None
        if key not in activation:
            activation[key], outside[key] = _activation_statistic(
                layer_stats, "percentile" if key is not None else "max", key)
    selection, _ = split_holdout(layer_stats.holdout.shape[0])
    rows = layer_stats.holdout[torch.from_numpy(selection)]
    result = search_layer(rows, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
                          weight_absmax, activation, search, recipe, where)
    key = result.chosen.percentile if result.chosen.statistic == "percentile" else None
    return LayerChoice(component, layer, result.mask, result.chosen, result.chosen_by, layer_stats.info.tokens,
                       outside[key], None)


def _layer_recipe(choice: LayerChoice) -> Any:
    """Return the state's ``LayerRecipe`` of a searched layer (None without --search)."""
    from hif4fmt.state import LayerRecipe

    if choice.candidate is None:
        return None
    return LayerRecipe(choice.candidate.statistic, choice.candidate.percentile, choice.candidate.alpha)


def build_state(base_path: str | Path, stats_path: str | Path, out_path: str | Path, recipe: Recipe,
                report_path: str | Path | None = None, progress: bool = False, force: bool = False,
                search: Any = None, retain_auto: bool = False, rank_settings: Any = None) -> dict[str, Any]:
    """Write the .hif4 state for ``recipe`` to ``out_path`` (and the fidelity report); return a summary dict.

    The outputs are checked before any work (``hif4fmt.atomic.check_outputs``: not an input, not inside
    the base folder, folder writable, an existing file only with ``force``) and written as one set
    (``atomic_set``): the state and the report are both replaced or neither is, and the report names
    the state's sha256. The summary's ``notes`` list leftovers of interrupted writes that were cleared.
    ``search`` (a ``hif4fmt.method.search.SearchGrid``) chooses each layer's recipe and records it in the
    state (``QuantizedLayer.recipe`` / ``rotation``). ``retain_auto`` ranks the blocks
    (``hif4fmt.method.rank``, settings ``rank_settings``) and keeps the best ones in BF16 beside the
    recipe's explicit blocks, at most 2 in all; the summary's ``retain_auto`` says what each one buys.
    Raises ``OutputPathError`` for a refused output, ``StatsFormatError`` for statistics that are
    damaged or were made for another base or other layers, ``BuildError`` for non-finite statistics or
    weights, ``RecipeError`` for retained blocks the model does not have (or ``retain_auto`` with 2
    explicit blocks), ``BaseCheckpointError`` for an unreadable base, ``CalibrationError`` for prompts
    ``retain_auto`` cannot use, ``StateWriteError`` when the set cannot be written (naming what was not).
    """
    from hif4fmt.layouts import describe_layout
    from hif4fmt.report import MASK_VARIANTS, REPORT_FORMAT, REPORT_VERSION, render_report, report_bytes, summarize
    from hif4fmt.state import BaseBinding, ExcludedLayer, QuantizedLayer, State, encode_state

    recipe.validate()
    base_path, stats_path, out_path = Path(base_path), Path(stats_path), Path(out_path)
    outputs = {"--out": out_path} if report_path is None else {"--out": out_path, "--report": Path(report_path)}
    notes = check_outputs(outputs, inputs={"--stats": stats_path}, input_folders={"--base": base_path}, force=force)
    prompts = None
    if retain_auto:
        from hif4fmt.method.rank import RankSettings, check_auto_budget, resolve_prompts
        from hif4fmt.calibration.stats_file import read_stats

        check_auto_budget(recipe.retained_blocks)
        rank_settings = rank_settings or RankSettings()
        prompts = resolve_prompts(stats_path, read_stats(stats_path).header, rank_settings)
    stats, base, fingerprint = _open_inputs(base_path, stats_path)
    header = stats.header
    plans = _plan(base_path, base, recipe.retained_blocks)
    report_percentile = recipe.percentile if recipe.statistic == "percentile" else DEFAULT_PERCENTILE
    choices = choose_layers(base_path, stats_path, stats, base, plans, recipe, search, report_path is not None,
                            progress)
    auto_summary = None
    if retain_auto:
        from hif4fmt.method.rank import choose_auto_blocks, rank_blocks

        ranking = rank_blocks(base_path, header, prompts, plans, choices, recipe, rank_settings, progress)
        recipe, auto_summary = choose_auto_blocks(ranking, recipe)
        del ranking  # frees the pipeline the ranking ran
        plans = _plan(base_path, base, recipe.retained_blocks)
        kept = {(component, layer.module) for component, plan in plans.items() for layer in plan.quantized}
        choices = [choice for choice in choices if (choice.component, choice.layer.module) in kept]
    tokens: dict[str, list[int]] = {}
    for choice in choices:
        tokens.setdefault(choice.component, []).append(choice.tokens)
    outside_bound = sum(choice.outside_bound for choice in choices)
    layers = []
    for choice in choices:
        digest = fingerprint.components[choice.component].tensors[f"{choice.layer.module}.weight"]
        extra = {} if search is None else {"recipe": _layer_recipe(choice), "rotation": choice.rotation}
        layers.append(QuantizedLayer(choice.component, choice.layer.module, choice.layer.in_features,
                                     choice.layer.out_features, choice.mask, digest, **extra))
    excluded = [ExcludedLayer(component, kept.layer.module, kept.reason)
                for component, plan in plans.items() for kept in plan.kept]
    state = State(recipe=recipe, calibration=_calibration_provenance(header, tokens, outside_bound),
                  base=BaseBinding.from_fingerprint(fingerprint, base.hub_hints(), base=base,
                                                layout=describe_layout(base_path)),
                  layers=tuple(layers), excluded=tuple(excluded))
    data = encode_state(state)
    base.close()
    stats.close()
    summary: dict[str, Any] = {
        "out": str(out_path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "notes": notes, "recipe": recipe.to_dict(),
        "base_fingerprint": fingerprint.fingerprint,
        "components": {component: {"quantized": len(plan.quantized), "kept": len(plan.kept)}
                       for component, plan in plans.items()},
        "channels_outside_sketch_bound": outside_bound,
    }
    if search is not None:
        summary["search"] = _search_summary(search, choices)
    if auto_summary is not None:
        summary["retain_auto"] = auto_summary
    if report_path is not None:
        report_layers = [choice.report for choice in choices]
        report = {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, "statistic": recipe.statistic,
                  "percentile": report_percentile, "alpha": recipe.alpha, "eps": recipe.eps,
                  "encoder": recipe.encoder, "variants": list(MASK_VARIANTS),
                  "base_fingerprint": fingerprint.fingerprint, "holdout": header.holdout,
                  "search": None if search is None else search.to_dict(),
                  "state": {"path": out_path.name, "sha256": summary["sha256"], "bytes": len(data)},
                  "layers": report_layers, "summary": summarize(report_layers)}
        summary["report"] = {"path": str(report_path), "summary": report["summary"]}
        summary["report_text"] = render_report(report)
    targets = [out_path] + ([Path(report_path)] if report_path is not None else [])
    with atomic_set(targets, StateWriteError, what="the state" + (" and its report" if report_path else "")) as temps:
        temps[0].write_bytes(data)
        if report_path is not None:
            temps[1].write_bytes(report_bytes(report))
    return summary


def _search_summary(search: Any, choices: list[LayerChoice]) -> dict[str, Any]:
    """Return ``build --json``'s ``search`` entry: the grid and how many layers chose each candidate."""
    counts: dict[str, int] = {}
    for choice in choices:
        counts[choice.candidate.label()] = counts.get(choice.candidate.label(), 0) + 1
    return {"grid": search.to_dict(), "layers": len(choices),
            "rotated": sum(1 for choice in choices if choice.rotation is not None),
            "by_default": sum(1 for choice in choices if choice.chosen_by == "default"),
            "chosen": dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))}


def layer_masks(base_path: str | Path, stats_path: str | Path, recipe: Recipe, search: Any = None,
                progress: bool = False) -> tuple[Any, dict[str, Any], list[LayerChoice]]:
    """Return (statistics header, plans, per-layer choices) exactly as ``build`` would make them, writing
    nothing (``hif4fmt rank`` uses this so its W4A4 masks are the build's)."""
    recipe.validate()
    stats, base, _ = _open_inputs(Path(base_path), Path(stats_path))
    try:
        plans = _plan(Path(base_path), base, recipe.retained_blocks)
        choices = choose_layers(Path(base_path), Path(stats_path), stats, base, plans, recipe, search, False,
                                progress)
    finally:
        base.close()
        stats.close()
    return stats.header, plans, choices


def _layer_report(layer_stats: Any, weight: np.ndarray, bias: np.ndarray | None, module: str, recipe: Recipe,
                  choice: LayerChoice, weight_absmax: np.ndarray, searched: bool) -> dict[str, Any]:
    """Return one layer's report entry: rows used and relative output error per mask variant (spec 8.3).

    Without ``searched`` every held-out row is measured; with it only the report part (odd positions),
    the selection part having chosen the recipe; the entry then names the chosen candidate too.
    """
    import torch

    from hif4fmt.masks import compute_mask
    from hif4fmt.report import relative_output_error

    where = f"{layer_stats.info.component}/{module}"
    rows = layer_stats.holdout
    entry: dict[str, Any] = {"component": layer_stats.info.component, "module": module, "rel_error": {}}
    if searched:
        from hif4fmt.method.search import split_holdout

        selection, measured = split_holdout(rows.shape[0])
        rows = rows[torch.from_numpy(measured)]
        entry["selection_rows"] = int(selection.shape[0])
        entry["chosen"] = dict(choice.candidate.to_dict(), chosen_by=choice.chosen_by)
    entry["rows"] = int(rows.shape[0])
    if rows.shape[0] == 0:
        return entry
    report_percentile = recipe.percentile if recipe.statistic == "percentile" else DEFAULT_PERCENTILE
    global_mask = compute_mask(weight_absmax, _activation_statistic(layer_stats, recipe.statistic,
                                                                    recipe.percentile)[0],
                               recipe.alpha, recipe.eps, where) if searched else choice.mask
    if recipe.statistic == "percentile":
        percentile_mask = global_mask
    else:
        values = layer_stats.percentile(report_percentile).values.numpy()
        percentile_mask = compute_mask(weight_absmax, values, recipe.alpha, recipe.eps, where)
    max_mask = global_mask if recipe.statistic == "max" else compute_mask(
        weight_absmax, layer_stats.absmax.double().numpy(), recipe.alpha, recipe.eps, where)
    bias_tensor = None if bias is None else torch.from_numpy(bias)
    weight_tensor = torch.from_numpy(weight)
    for variant, variant_mask in (("percentile", percentile_mask), ("max", max_mask), ("none", None)):
        entry["rel_error"][variant] = relative_output_error(rows, weight_tensor, bias_tensor, variant_mask,
                                                            recipe.encoder)
    if searched:
        entry["rel_error"]["chosen"] = relative_output_error(rows, weight_tensor, bias_tensor, choice.mask,
                                                             recipe.encoder, choice.rotation)
    else:
        entry["rel_error"]["chosen"] = entry["rel_error"][recipe.statistic]
    return entry

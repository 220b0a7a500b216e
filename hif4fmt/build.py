"""Build a .hif4 state from a base checkpoint and a calibration statistics file.

Why this module exists: ``build`` is where the recipe meets the data. For every quantized linear (the
rule in ``hif4fmt.targets``, minus retained blocks) it takes ``a_i`` from the statistics (p-th
percentile or exact max of |x|), ``w_i = max_o |W[o, i]|`` from the base safetensors one tensor at a
time (never the whole model in memory), computes the mask (``hif4fmt.masks``), binds each layer to its
base weight by digest, lists the linears kept high precision with their reason, and writes the state
(deterministic bytes) together with the optional report as one atomic set (``hif4fmt.atomic``). Optionally it measures each layer's
fidelity on the held-out calibration rows (``hif4fmt.report``). Statistics made for another base or
other layers are refused with ``StatsFormatError`` before any work is done.
"""

from __future__ import annotations

import hashlib
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


def build_state(base_path: str | Path, stats_path: str | Path, out_path: str | Path, recipe: Recipe,
                report_path: str | Path | None = None, progress: bool = False, force: bool = False) -> dict[str, Any]:
    """Write the .hif4 state for ``recipe`` to ``out_path`` (and the fidelity report); return a summary dict.

    The outputs are checked before any work (``hif4fmt.atomic.check_outputs``: not an input, not inside
    the base folder, folder writable, an existing file only with ``force``) and written as one set
    (``atomic_set``): the state and the report are both replaced or neither is, and the report names
    the state's sha256. The summary's ``notes`` list leftovers of interrupted writes that were cleared.
    Raises ``OutputPathError`` for a refused output, ``StatsFormatError`` for statistics that are
    damaged or were made for another base or other layers, ``BuildError`` for non-finite statistics or
    weights, ``RecipeError`` for retained blocks the model does not have, ``BaseCheckpointError`` for
    an unreadable base, ``StateWriteError`` when the set cannot be written (naming what was not).
    """
    from tqdm.auto import tqdm

    from hif4fmt.base import BaseCheckpoint
    from hif4fmt.calibration.stats_file import read_stats
    from hif4fmt.fingerprint import fingerprint_base
    from hif4fmt.layouts import describe_layout
    from hif4fmt.masks import compute_mask, weight_channel_absmax
    from hif4fmt.report import MASK_VARIANTS, REPORT_FORMAT, REPORT_VERSION, render_report, report_bytes, summarize
    from hif4fmt.state import BaseBinding, ExcludedLayer, QuantizedLayer, State, encode_state
    from hif4fmt.targets import meta_transformers, plan_model

    recipe.validate()
    base_path, stats_path, out_path = Path(base_path), Path(stats_path), Path(out_path)
    outputs = {"--out": out_path} if report_path is None else {"--out": out_path, "--report": Path(report_path)}
    notes = check_outputs(outputs, inputs={"--stats": stats_path}, input_folders={"--base": base_path}, force=force)
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
    models = meta_transformers(base_path)
    missing = sorted(set(base.components) - set(models))
    if missing:
        raise BuildError(f"{base_path}: component {missing[0]} has weights but no config.json")
    plans = plan_model({name: models[name] for name in base.components}, recipe.retained_blocks)
    report_percentile = recipe.percentile if recipe.statistic == "percentile" else DEFAULT_PERCENTILE
    layers: list[QuantizedLayer] = []
    excluded: list[ExcludedLayer] = []
    report_layers: list[dict[str, Any]] = []
    tokens: dict[str, list[int]] = {}
    outside_bound = 0
    work = [(component, layer) for component, plan in plans.items() for layer in plan.quantized]
    for component, layer in work:  # fail before any heavy work if a layer has no statistics
        info = header.layers.get((component, layer.module))
        if info is None:
            raise StatsFormatError(f"{stats_path}: no statistics for {component}/{layer.module}; the file was "
                                   f"made for other layers; recalibrate with this base")
        if info.in_features != layer.in_features or info.out_features != layer.out_features:
            raise StatsFormatError(f"{stats_path}: {component}/{layer.module} has statistics for "
                                   f"{info.in_features} -> {info.out_features} features but the model has "
                                   f"{layer.in_features} -> {layer.out_features}; recalibrate with this base")
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
        tokens.setdefault(component, []).append(layer_stats.info.tokens)
        activation, outside = _activation_statistic(layer_stats, recipe.statistic, recipe.percentile)
        outside_bound += outside
        weight = checkpoint.read_tensor_numpy(weight_name, np.float32)
        weight_absmax = weight_channel_absmax(weight)
        mask = compute_mask(weight_absmax, activation, recipe.alpha, recipe.eps, where)
        digest = fingerprint.components[component].tensors[weight_name]
        layers.append(QuantizedLayer(component, layer.module, layer.in_features, layer.out_features, mask, digest))
        if report_path is not None:
            report_layers.append(_layer_report(layer_stats, weight, checkpoint, layer.module, recipe, mask,
                                               report_percentile, weight_absmax))
        del weight
    for component, plan in plans.items():
        excluded.extend(ExcludedLayer(component, kept.layer.module, kept.reason) for kept in plan.kept)
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
    if report_path is not None:
        report = {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, "statistic": recipe.statistic,
                  "percentile": report_percentile, "alpha": recipe.alpha, "eps": recipe.eps,
                  "encoder": recipe.encoder, "variants": list(MASK_VARIANTS),
                  "base_fingerprint": fingerprint.fingerprint, "holdout": header.holdout,
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


def _layer_report(layer_stats: Any, weight: np.ndarray, checkpoint: Any, module: str, recipe: Recipe,
                  mask: np.ndarray, report_percentile: float, weight_absmax: np.ndarray) -> dict[str, Any]:
    """Return one layer's report entry: rows used and relative output error per mask variant."""
    import torch

    from hif4fmt.masks import compute_mask
    from hif4fmt.report import relative_output_error

    where = f"{layer_stats.info.component}/{module}"
    rows = layer_stats.holdout
    entry: dict[str, Any] = {"component": layer_stats.info.component, "module": module,
                             "rows": int(rows.shape[0]), "rel_error": {}}
    if rows.shape[0] == 0:
        return entry
    if recipe.statistic == "percentile":
        percentile_mask = mask
    else:
        values = layer_stats.percentile(report_percentile).values.numpy()
        percentile_mask = compute_mask(weight_absmax, values, recipe.alpha, recipe.eps, where)
    max_mask = mask if recipe.statistic == "max" else compute_mask(
        weight_absmax, layer_stats.absmax.double().numpy(), recipe.alpha, recipe.eps, where)
    bias_name = f"{module}.bias"
    bias = (torch.from_numpy(checkpoint.read_tensor_numpy(bias_name, np.float32))
            if checkpoint.has_tensor(bias_name) else None)
    weight_tensor = torch.from_numpy(weight)
    for variant, variant_mask in (("percentile", percentile_mask), ("max", max_mask), ("none", None)):
        entry["rel_error"][variant] = relative_output_error(rows, weight_tensor, bias, variant_mask, recipe.encoder)
    return entry

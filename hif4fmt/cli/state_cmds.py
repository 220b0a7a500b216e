"""``hif4fmt inspect | diff | verify | card | fingerprint``: the torch-free state commands.

Why this module exists: these commands are what a user runs on a downloaded state before spending GPU
time, so they must start fast and never import torch. Each one parses its options, calls the library
(``hif4fmt.state``, ``hif4fmt.verify``, ``hif4fmt.card``, ``hif4fmt.fingerprint``), builds a plain dict
and hands it to ``hif4fmt.cli.output.emit``. The ``--json`` schemas are in spec/state-v1.md section 9.
Exit codes: 0 ok / identical / match, 1 differs / mismatch, 2 invalid input (typed errors).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from hif4fmt.card import flatten_mapping
from hif4fmt.cli.output import emit, print_notes, table
from hif4fmt.layouts import layout_label
from hif4fmt.state import State, quantization_descriptor, read_state

MAX_TEXT_ROWS = 10  # rows of per-layer differences shown in text output (JSON has them all)


def _clean(text: Any) -> str:
    """Return ``text`` with control characters replaced, safe to print to a terminal."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def _exit_differs() -> None:
    """Exit with code 1 (differs / mismatch) after the result has been printed.

    ``sys.exit`` rather than ``ctx.exit``: under ``standalone_mode=False`` (how ``run_cli`` runs the
    group) click returns ``ctx.exit``'s code from ``main`` instead of exiting, so it would be lost.
    """
    sys.exit(1)


# --- inspect ---------------------------------------------------------------------------------------


def _base_summary(state: State) -> dict[str, Any]:
    """Return header["base"] for inspect, with the per-tensor table (1.1) replaced by per-component counts."""
    base = state.base.to_dict()
    base.pop("tensors", None)
    base["tensors_recorded"] = {name: len(table) for name, table in sorted(state.base.tensors.items())}
    base.setdefault("layout", None)
    return base


def inspect_result(state: State, path: Path, with_layers: bool) -> dict[str, Any]:
    """Return the ``inspect --json`` dict (spec 9.1) of a state read header-only."""
    layout = state.layout
    components: dict[str, Any] = {}
    for name in state.components:
        layers = state.layers_of(name)
        excluded = state.excluded_of(name)
        entry: dict[str, Any] = {
            "quantized": len(layers),
            "excluded": len(excluded),
            "digest": state.base.components.get(name),
            "mask_bytes": sum(l.record.nbytes for l in layers if l.record is not None),
            "rotated": sum(l.rotation is not None for l in layers),
            "own_recipe": sum(l.recipe is not None for l in layers),
        }
        if layers:
            weights = sum(l.in_features for l in layers)
            entry["mask_min"] = min(l.mask_stats.min for l in layers)
            entry["mask_max"] = max(l.mask_stats.max for l in layers)
            entry["mask_mean"] = math.fsum(l.mask_stats.mean * l.in_features for l in layers) / weights
        if with_layers:
            entry["layers"] = [{
                "module": l.module, "in_features": l.in_features, "out_features": l.out_features,
                "mask_tensor": l.record.tensor, "mask_dtype": l.record.dtype, "mask_offset": l.record.begin,
                "mask_bytes": l.record.nbytes, "mask_sha256": l.record.sha256,
                "mask_min": l.mask_stats.min, "mask_max": l.mask_stats.max, "mask_mean": l.mask_stats.mean,
                "weight_fingerprint": l.weight_fingerprint,
                "recipe": None if l.recipe is None else l.recipe.to_dict(), "rotation": l.rotation,
            } for l in layers]
            entry["excluded_layers"] = [{"module": e.module, "reason": e.reason} for e in excluded]
        components[name] = entry
    base_bytes = state.base.total_bytes
    return {
        "path": str(path),
        "format_version": layout.format_version,
        "file_bytes": layout.file_bytes,
        "header_bytes": layout.header_bytes,
        "data_offset": layout.data_offset,
        "data_bytes": layout.data_bytes,
        "tensor_count": layout.tensor_count,
        "size_ratio": layout.file_bytes / base_bytes if base_bytes else None,
        "producer": state.producer,
        "quantization": quantization_descriptor(state.recipe, any(l.rotation is not None for l in state.layers)),
        "recipe": state.recipe.to_dict(),
        "calibration": state.calibration,
        "base": _base_summary(state),
        "components": components,
        "totals": {"quantized": len(state.layers), "excluded": len(state.excluded),
                   "retained_blocks": [str(b) for b in state.recipe.retained_blocks]},
        "extra_keys": sorted(state.extra),
    }


def _calibration_lines(calibration: dict[str, Any]) -> list[str]:
    """Return the calibration record as lines ``key = value``, the first one labelled."""
    pairs = flatten_mapping(calibration)
    if not pairs:
        return ["calibration none"]
    return [f"{'calibration' if index == 0 else '':<12}{_clean(f'{key} = {value}')}"
            for index, (key, value) in enumerate(pairs)]


def _layer_recipe_text(layer: dict[str, Any]) -> str:
    """Return a layer's own recipe as "p99.9 a0.5" / "max a0.5", or "state" when it uses the state's."""
    recipe = layer["recipe"]
    if recipe is None:
        return "state"
    statistic = "max" if recipe["statistic"] == "max" else f"p{recipe['percentile']:g}"
    return f"{statistic} a{recipe['alpha']:g}"


def _render_inspect(result: dict[str, Any]) -> str:
    recipe = result["recipe"]
    base = result["base"]
    ratio = result["size_ratio"]
    lines = [
        f"state       {_clean(result['path'])}",
        f"format      hif4-state {result['format_version']}  ({result['file_bytes']} bytes: header "
        f"{result['header_bytes']}, data {result['data_bytes']}, {result['tensor_count']} tensors)",
        f"producer    {_clean(' '.join(str(v) for _, v in sorted(result['producer'].items())))}",
        f"quantize    {result['quantization']['weight']['format']} W4A4, unit {result['quantization']['weight']['unit']}"
        f" along in_features, encoder {recipe['encoder']}, masks {recipe['mask_dtype']}",
        f"recipe      statistic {recipe['statistic']}"
        + (f" p{recipe['percentile']:g}" if recipe['percentile'] is not None else "")
        + f", alpha {recipe['alpha']:g}, eps {recipe['eps']:g}, retained blocks "
        + (", ".join(recipe["retained_blocks"]) or "none"),
        *_calibration_lines(result["calibration"]),
        f"base        {base['algorithm']} {base['fingerprint']}",
        f"            layout {_clean(layout_label(base['layout']))}" + (
            f"; digests of {sum(base['tensors_recorded'].values())} base tensors recorded"
            if base["tensors_recorded"] else "; per-tensor digests not recorded (format 1.0)"),
        f"            {base['total_bytes']} bytes of weights; state/base = "
        + (f"{ratio:.4%}" if ratio is not None else "n/a")
        + ("; hub hints (untrusted): " + _clean(", ".join(f"{k}={v}" for k, v in sorted(base["hub_hints"].items())))
           if base["hub_hints"] else ""),
        "check       every mask read: checksums, shapes and values valid" if result.get("checked")
        else "check       header only (add --check to read and validate every mask)",
        "",
    ]
    rows = [[name, c["quantized"], c["excluded"], c["mask_bytes"],
             f"{c['mask_min']:.4g}" if "mask_min" in c else "-", f"{c['mask_max']:.4g}" if "mask_max" in c else "-",
             f"{c['mask_mean']:.4g}" if "mask_mean" in c else "-", (c["digest"] or "unbound")[:16]]
            for name, c in result["components"].items()]
    lines.append(table(rows, ["component", "quantized", "excluded", "mask bytes", "mask min", "mask max",
                              "mask mean", "digest"]))
    for name, c in result["components"].items():
        if "layers" in c:
            lines += ["", f"{name}: quantized layers"]
            lines.append(table([[_clean(l["module"]), l["in_features"], l["out_features"], l["mask_dtype"],
                                 l["mask_offset"], f"{l['mask_min']:.4g}", f"{l['mask_max']:.4g}",
                                 f"{l['mask_mean']:.4g}", _layer_recipe_text(l), l["rotation"] or "-",
                                 l["weight_fingerprint"][:16]] for l in c["layers"]],
                               ["module", "in", "out", "dtype", "offset", "min", "max", "mean", "recipe",
                                "rotation", "weight digest"]))
            if c["excluded_layers"]:
                lines += ["", f"{name}: kept high precision"]
                lines.append(table([[_clean(e["module"]), _clean(e["reason"])] for e in c["excluded_layers"]],
                                   ["module", "reason"]))
    if result["extra_keys"]:
        lines += ["", "unknown header keys (kept): " + _clean(", ".join(result["extra_keys"]))]
    return "\n".join(lines)


@click.command("inspect")
@click.argument("state_path", metavar="STATE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print JSON (schema: spec/state-v1.md 9.1)")
@click.option("--layers", is_flag=True, help="list every quantized and excluded layer")
@click.option("--check", is_flag=True, help="also read the masks and verify their checksums and values")
def inspect_cmd(state_path: Path, as_json: bool, layers: bool, check: bool) -> None:
    """Summarise a .hif4 state from its header (no tensor reads unless --check)."""
    state = read_state(state_path, load_tensors=check)
    result = inspect_result(state, state_path, layers)
    result["checked"] = check
    emit(result, as_json, _render_inspect)


# --- diff ------------------------------------------------------------------------------------------


def _dict_diff(a: Any, b: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Return {dotted key: {"a": value, "b": value}} for every leaf that differs (None when absent)."""
    if isinstance(a, dict) and isinstance(b, dict):
        result: dict[str, dict[str, Any]] = {}
        for key in sorted(set(a) | set(b)):
            result.update(_dict_diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key))
        return result
    if a == b and type(a) is type(b):
        return {}
    return {prefix: {"a": a, "b": b}}


def max_relative_difference(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Return max_i |b_i - a_i| / a_i (float64) of two positive masks of one shape."""
    a = mask_a.astype(np.float64)
    return float(np.max(np.abs(mask_b.astype(np.float64) - a) / a))


def diff_result(state_a: State, state_b: State, path_a: Path, path_b: Path) -> dict[str, Any]:
    """Return the ``diff --json`` dict (spec 9.2); ``identical`` is False if any content differs."""
    components: dict[str, Any] = {}
    for name in sorted(set(state_a.components) | set(state_b.components)):
        layers_a = {l.module: l for l in state_a.layers_of(name)}
        layers_b = {l.module: l for l in state_b.layers_of(name)}
        excluded_a = {e.module: e.reason for e in state_a.excluded_of(name)}
        excluded_b = {e.module: e.reason for e in state_b.excluded_of(name)}
        shape_changed, weight_changed, mask_rows, recipe_changed, rotation_changed = [], [], [], [], []
        for module in sorted(set(layers_a) & set(layers_b)):
            a, b = layers_a[module], layers_b[module]
            if (a.out_features, a.in_features) != (b.out_features, b.in_features):
                shape_changed.append({"module": module, "a": [a.out_features, a.in_features],
                                      "b": [b.out_features, b.in_features]})
                continue
            if a.weight_fingerprint != b.weight_fingerprint:
                weight_changed.append(module)
            if a.recipe != b.recipe:
                recipe_changed.append({"module": module, "a": None if a.recipe is None else a.recipe.to_dict(),
                                       "b": None if b.recipe is None else b.recipe.to_dict()})
            if a.rotation != b.rotation:
                rotation_changed.append({"module": module, "a": a.rotation, "b": b.rotation})
            if a.mask.tobytes() != b.mask.tobytes():
                mask_rows.append({"module": module, "max_rel_diff": max_relative_difference(a.mask, b.mask)})
        mask_rows.sort(key=lambda row: (-row["max_rel_diff"], row["module"]))
        entry = {
            "only_in_a": sorted(set(layers_a) - set(layers_b)),
            "only_in_b": sorted(set(layers_b) - set(layers_a)),
            "excluded_only_in_a": sorted(set(excluded_a) - set(excluded_b)),
            "excluded_only_in_b": sorted(set(excluded_b) - set(excluded_a)),
            "reason_changed": [{"module": m, "a": excluded_a[m], "b": excluded_b[m]}
                               for m in sorted(set(excluded_a) & set(excluded_b)) if excluded_a[m] != excluded_b[m]],
            "shape_changed": shape_changed,
            "weight_fingerprint_changed": weight_changed,
            "masks_compared": len(set(layers_a) & set(layers_b)) - len(shape_changed),
            "masks_differ": len(mask_rows),
            "max_rel_mask_diff": max((row["max_rel_diff"] for row in mask_rows), default=0.0),
            "mask_differences": mask_rows,
            "recipe_changed": recipe_changed,
            "rotation_changed": rotation_changed,
        }
        entry["identical"] = not any(entry[key] for key in ("only_in_a", "only_in_b", "excluded_only_in_a",
                                                            "excluded_only_in_b", "reason_changed", "shape_changed",
                                                            "weight_fingerprint_changed", "masks_differ",
                                                            "recipe_changed", "rotation_changed"))
        components[name] = entry
    sections = {
        "format_version": _dict_diff(state_a.layout.format_version, state_b.layout.format_version, "format_version"),
        "recipe": _dict_diff(state_a.recipe.to_dict(), state_b.recipe.to_dict()),
        "calibration": _dict_diff(state_a.calibration, state_b.calibration),
        "base": _dict_diff(state_a.base.to_dict(), state_b.base.to_dict()),
        "extra": _dict_diff(state_a.extra, state_b.extra),
    }
    identical = not any(sections.values()) and all(c["identical"] for c in components.values())
    return {"a": str(path_a), "b": str(path_b), "identical": identical, **sections,
            "producer": _dict_diff(state_a.producer, state_b.producer), "components": components}


def _render_diff(result: dict[str, Any]) -> str:
    lines = [f"a: {_clean(result['a'])}", f"b: {_clean(result['b'])}",
             "identical content" if result["identical"] else "content differs", ""]
    for section in ("format_version", "recipe", "calibration", "base", "extra", "producer"):
        for key, values in result[section].items():
            note = "  (informative, not content)" if section == "producer" else ""
            lines.append(_clean(f"{section}: {key}: {values['a']!r} -> {values['b']!r}{note}"))
    for name, c in result["components"].items():
        parts = [f"{len(c['only_in_a'])} layers only in a", f"{len(c['only_in_b'])} only in b",
                 f"{c['masks_differ']} of {c['masks_compared']} masks differ (max rel {c['max_rel_mask_diff']:.3g})",
                 f"{len(c['weight_fingerprint_changed'])} weight digests differ",
                 f"{len(c['shape_changed'])} shapes differ"]
        if c["recipe_changed"] or c["rotation_changed"]:
            parts += [f"{len(c['recipe_changed'])} layer recipes differ", f"{len(c['rotation_changed'])} rotations differ"]
        lines.append(f"{name}: " + ", ".join(parts))
        for key in ("only_in_a", "only_in_b", "excluded_only_in_a", "excluded_only_in_b"):
            if c[key]:
                shown = ", ".join(c[key][:MAX_TEXT_ROWS]) + (" ..." if len(c[key]) > MAX_TEXT_ROWS else "")
                lines.append(_clean(f"  {key}: {shown}"))
        for row in c["mask_differences"][:MAX_TEXT_ROWS]:
            lines.append(_clean(f"  {row['module']}: max relative mask difference {row['max_rel_diff']:.3g}"))
        for row in c["rotation_changed"][:MAX_TEXT_ROWS]:
            lines.append(_clean(f"  {row['module']}: rotation {row['a'] or 'none'} -> {row['b'] or 'none'}"))
    return "\n".join(lines)


@click.command("diff")
@click.argument("path_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("path_b", metavar="B", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print JSON (schema: spec/state-v1.md 9.2)")
def diff_cmd(path_a: Path, path_b: Path, as_json: bool) -> None:
    """Compare two .hif4 states; exit 0 if their content is identical, 1 if it differs."""
    result = diff_result(read_state(path_a), read_state(path_b), path_a, path_b)
    emit(result, as_json, _render_diff)
    if not result["identical"]:
        _exit_differs()


# --- verify ----------------------------------------------------------------------------------------


def _render_verify(result: dict[str, Any]) -> str:
    from hif4fmt.verify import LayerDifference

    lines = [("OK: " if result["ok"] else "MISMATCH: ") + _clean(result["message"]), ""]
    rows = [[name, c["status"], (c["expected_digest"] or "-")[:16], (c["found_digest"] or "-")[:16],
             c["differing_count"] if c["status"] == "differs" else ""] for name, c in result["components"].items()]
    lines.append(table(rows, ["component", "status", "expected", "found", "layers differing"]))
    for name, c in result["components"].items():
        for layer in c["differing_layers"]:
            lines.append(_clean(f"  {name}/{LayerDifference(**layer).describe()}"))
        if c["status"] == "differs" and c["differing_count"] > len(c["differing_layers"]):
            lines.append(f"  ... and {c['differing_count'] - len(c['differing_layers'])} more layers (--json lists "
                         f"the first {len(c['differing_layers'])})")
    return "\n".join(lines)


@click.command("verify")
@click.argument("state_path", metavar="STATE", type=click.Path(path_type=Path))
@click.option("--base", "base_path", required=True, type=click.Path(path_type=Path),
              help="base checkpoint folder (diffusers model folder or a transformer folder)")
@click.option("--threads", type=click.IntRange(1, 64), default=None, help="hashing threads (default: CPU count)")
@click.option("--json", "as_json", is_flag=True, help="print JSON (schema: spec/state-v1.md 9.3)")
def verify_cmd(state_path: Path, base_path: Path, threads: int | None, as_json: bool) -> None:
    """Check a state against a base checkpoint: exit 0 match, 1 mismatch, 2 invalid input."""
    from hif4fmt.verify import verify_state

    report = verify_state(state_path, base_path, threads)
    emit(report.to_dict(), as_json, _render_verify)
    if not report.ok:
        _exit_differs()


# --- card ------------------------------------------------------------------------------------------


@click.command("card")
@click.argument("state_path", metavar="STATE", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="folder to write")
@click.option("--base-model", default=None, help="hub repo id for base_model (default: the state's hub hint)")
@click.option("--force", is_flag=True, help="replace the card folder --out (it may hold only a previous card)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def card_cmd(state_path: Path, out_dir: Path, base_model: str | None, force: bool, as_json: bool) -> None:
    """Write a hub-ready folder: the state file and a README.md model card."""
    from hif4fmt.card import write_card

    result = write_card(state_path, out_dir, base_model, force)
    print_notes(result["notes"])
    emit(result, as_json, _render_card)


def _render_card(result: dict[str, Any]) -> str:
    lines = [f"wrote {_clean(result['state'])}", f"wrote {_clean(result['card'])}",
             f"base_model {result['base_model']} ({result['base_model_source']})"]
    if result["base_model_source"] == "default":
        lines.append("note: the state records no hub repo of its base; the card names the project's default. "
                     "Pass --base-model ORG/NAME if the state was built from another checkpoint.")
    return "\n".join(lines)


# --- fingerprint -----------------------------------------------------------------------------------


def _render_fingerprint(result: dict[str, Any]) -> str:
    lines = [f"{result['algorithm']} {result['fingerprint']}  {_clean(result['path'])}",
             f"{result['total_bytes']} bytes of tensors", ""]
    rows = [[name, c["digest"], c["tensor_count"], c["total_bytes"]] for name, c in result["components"].items()]
    lines.append(table(rows, ["component", "digest", "tensors", "bytes"]))
    for name, c in result["components"].items():
        for tensor, digest in c.get("tensors", {}).items():
            lines.append(_clean(f"  {name}/{tensor}  {digest}"))
    return "\n".join(lines)


@click.command("fingerprint")
@click.argument("base_path", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--tensors", is_flag=True, help="also list every tensor's digest")
@click.option("--threads", type=click.IntRange(1, 64), default=None, help="hashing threads (default: CPU count)")
@click.option("--json", "as_json", is_flag=True, help="print JSON (schema: spec/state-v1.md 9.4)")
def fingerprint_cmd(base_path: Path, tensors: bool, threads: int | None, as_json: bool) -> None:
    """Fingerprint a base checkpoint (the value a state binds to)."""
    from hif4fmt.base import BaseCheckpoint
    from hif4fmt.fingerprint import fingerprint_checkpoint

    with BaseCheckpoint.open(base_path) as base:
        fingerprint = fingerprint_checkpoint(base, threads)
        hub_hints = base.hub_hints()
    result = {"path": str(base_path), **fingerprint.to_dict(include_tensors=tensors), "hub_hints": hub_hints}
    emit(result, as_json, _render_fingerprint)

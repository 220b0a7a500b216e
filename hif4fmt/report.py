"""Per-layer fidelity of the W4A4 layer against the original layer, on held-out calibration activations.

Why this module exists: before shipping a state one wants to see, layer by layer, what the masks buy:
the relative output error ||y_q - y|| / ||y|| (Frobenius norm over the held-out rows) of
``y_q = HiF4((x * m) R) @ HiF4((W / m) R).T + b`` against ``y = x @ W.T + b``, for the percentile mask,
the max mask, no mask (m = 1) as a baseline, and ``chosen``: the recipe written into the state (the
global one, or with ``build --search`` the layer's searched recipe and rotation R; R = I otherwise).
With ``--search`` every variant is measured on the report part of the rows only
(``hif4fmt.method.search``). ``x`` are the held-out input rows from the statistics file and ``W``, ``b``
the base weights, both BF16 values; both products are accumulated in float32, so
the reference is the BF16 layer without its output rounding. Codec: ``hif4fmt.hifloat4.fake_quantize``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hif4fmt.atomic import atomic_write
from hif4fmt.errors import BuildError

MASK_VARIANTS = ("percentile", "max", "none", "chosen")  # report columns: percentile mask, max mask, no mask,
                                                        # the state's own recipe (searched with --search)
WORST_LAYERS_SHOWN = 10  # rows of the text table (JSON has every layer)
REPORT_FORMAT = "hif4fmt-build-report"  # report["format"] (schema: spec/stats-v1.md section 8.3)
REPORT_VERSION = "1.1"  # report["format_version"]; keys are only ever added (1.1: chosen, search)


def relative_output_error(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          mask: np.ndarray | None, encoder: str = "toolkit",
                          rotation: str | None = None) -> float | None:
    """Return ||y_q - y||_F / ||y||_F for rows (R, C), weight (O, C), bias (O,) or None, mask (C,) or None.

    ``rotation`` None or ``hif4fmt.state.ROTATION_HADAMARD64``: R = blockdiag(H64 / 8) applied to both
    masked operands before HiF4 (``hif4fmt.codec.rotation.rotate_torch``). None when the reference
    output is all zero (the ratio is undefined).
    """
    from hif4fmt.codec.rotation import rotate_torch
    from hif4fmt.hifloat4 import fake_quantize

    x = rows.to(torch.float32)
    w = weight.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    reference = torch.nn.functional.linear(x, w, b)
    if mask is None:
        xs, ws = x, w
    else:
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        xs, ws = x * m, w / m
    if rotation is not None:
        xs, ws = rotate_torch(xs), rotate_torch(ws)
    xq, wq = fake_quantize(xs, encoder), fake_quantize(ws, encoder)
    quantized = torch.nn.functional.linear(xq, wq, b)
    denominator = torch.linalg.vector_norm(reference.double())
    numerator = torch.linalg.vector_norm((quantized - reference).double())
    if float(denominator) == 0.0:
        return None
    return float(numerator / denominator)


def compare_percentile_with_max(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Return how often the percentile mask beats the max mask: layers measured by both, layers where each
    variant's error is lower, ties, and the mean over layers of error(percentile) / error(max) (< 1: it helped)."""
    pairs = [(layer["rel_error"]["percentile"], layer["rel_error"]["max"]) for layer in layers
             if layer["rel_error"].get("percentile") is not None and layer["rel_error"].get("max") is not None]
    ratios = [p / m for p, m in pairs if m > 0]
    return {"layers": len(pairs),
            "percentile_lower": sum(1 for p, m in pairs if p < m),
            "max_lower": sum(1 for p, m in pairs if m < p),
            "equal": sum(1 for p, m in pairs if p == m),
            "mean_ratio": math.fsum(ratios) / len(ratios) if ratios else None}


def compare_chosen_with_percentile(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Return how the state's recipe compares with the global percentile recipe over layers measured by
    both: layers where each is lower, ties, the mean per-layer ratio error(chosen) / error(percentile),
    and ``ratio_of_means`` = mean error(chosen) / mean error(percentile) (the issue's goal: <= 0.8)."""
    pairs = [(layer["rel_error"]["chosen"], layer["rel_error"]["percentile"]) for layer in layers
             if layer["rel_error"].get("chosen") is not None and layer["rel_error"].get("percentile") is not None]
    ratios = [c / p for c, p in pairs if p > 0]
    mean_percentile = math.fsum(p for _, p in pairs) / len(pairs) if pairs else 0.0
    return {"layers": len(pairs),
            "chosen_lower": sum(1 for c, p in pairs if c < p),
            "percentile_lower": sum(1 for c, p in pairs if p < c),
            "equal": sum(1 for c, p in pairs if c == p),
            "mean_ratio": math.fsum(ratios) / len(ratios) if ratios else None,
            "ratio_of_means": (math.fsum(c for c, _ in pairs) / len(pairs) / mean_percentile
                               if mean_percentile > 0 else None)}


def summarize(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Return per mask variant: layers measured, mean, median and max relative error, and the worst layer;
    plus ``percentile_vs_max`` and ``chosen_vs_percentile`` (see the ``compare_*`` functions)."""
    summary: dict[str, Any] = {"percentile_vs_max": compare_percentile_with_max(layers),
                               "chosen_vs_percentile": compare_chosen_with_percentile(layers)}
    for variant in MASK_VARIANTS:
        measured = [(layer["rel_error"][variant], layer) for layer in layers
                    if layer["rel_error"].get(variant) is not None]
        if not measured:
            summary[variant] = {"layers": 0}
            continue
        values = [value for value, _ in measured]
        worst_value, worst = max(measured, key=lambda item: item[0])
        summary[variant] = {"layers": len(values), "mean": math.fsum(values) / len(values),
                            "median": statistics.median(values), "max": worst_value,
                            "worst_layer": f"{worst['component']}/{worst['module']}"}
    return summary


def render_report(report: dict[str, Any]) -> str:
    """Return the text form: summary per mask variant, then the layers with the largest percentile-mask error."""
    from hif4fmt.cli.output import table

    summary_rows = []
    for variant in MASK_VARIANTS:
        entry = report["summary"][variant]
        if entry["layers"]:
            summary_rows.append([variant, entry["layers"], f"{entry['mean']:.4f}", f"{entry['median']:.4f}",
                                 f"{entry['max']:.4f}", entry["worst_layer"]])
    search = report.get("search")
    rows = ("held-out calibration rows" if search is None
            else "the report part of the held-out calibration rows (odd positions)")
    lines = [f"fidelity on {rows} (relative output error ||y_q - y|| / ||y||, percentile {report['percentile']}, "
             f"alpha {report['alpha']}, encoder {report['encoder']}; chosen = the state's "
             f"{'searched per-layer recipes' if search else 'recipe'})",
             table(summary_rows, ["mask", "layers", "mean", "median", "max", "worst layer"])]
    versus = report["summary"].get("percentile_vs_max", {})
    if versus.get("layers"):
        ratio = versus["mean_ratio"]
        lines.append(f"percentile mask vs max mask: lower error on {versus['percentile_lower']} of {versus['layers']} "
                     f"layers, higher on {versus['max_lower']}, equal on {versus['equal']}; mean error ratio "
                     f"{'n/a' if ratio is None else f'{ratio:.4f}'} (below 1: the percentile mask has the lower error)")
    chosen = report["summary"].get("chosen_vs_percentile", {})
    if search is not None and chosen.get("layers"):
        ratio = chosen["ratio_of_means"]
        lines.append(f"searched recipe vs global percentile recipe: lower error on {chosen['chosen_lower']} of "
                     f"{chosen['layers']} layers, higher on {chosen['percentile_lower']}; mean error "
                     f"{'n/a' if ratio is None else f'{ratio:.4f}'} x the global recipe's")
    measured = [layer for layer in report["layers"] if layer["rel_error"].get("percentile") is not None]
    worst = sorted(measured, key=lambda layer: (-layer["rel_error"]["percentile"], layer["component"],
                                                layer["module"]))[:WORST_LAYERS_SHOWN]
    if worst:
        rows = [[f"{l['component']}/{l['module']}", l["rows"]] + [f"{l['rel_error'][v]:.4f}" for v in MASK_VARIANTS]
                for l in worst]
        lines += ["", f"worst {len(worst)} layers by percentile-mask error:",
                  table(rows, ["layer", "rows", *MASK_VARIANTS])]
    return "\n".join(lines)


def report_bytes(report: dict[str, Any]) -> bytes:
    """Return the report as canonical JSON bytes (sorted keys, 2-space indent, UTF-8, final newline)."""
    return (json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write the report as canonical JSON (``report_bytes``), atomically."""
    try:
        with atomic_write(path) as handle:
            handle.write(report_bytes(report))
    except OSError as exc:
        raise BuildError(f"{path}: cannot write the report: {exc}") from None

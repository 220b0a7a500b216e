"""Per-layer fidelity of the W4A4 layer against the original layer, on held-out calibration activations.

Why this module exists: before shipping a state one wants to see, layer by layer, what the masks buy:
the relative output error ||y_q - y|| / ||y|| (Frobenius norm over the held-out rows) of
``y_q = HiF4(x * m) @ HiF4(W / m).T + b`` against ``y = x @ W.T + b``, for the percentile mask, the
max mask and no mask (m = 1) as a baseline. ``x`` are the held-out input rows from the statistics
file and ``W``, ``b`` the base weights, both BF16 values; both products are accumulated in float32, so
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

MASK_VARIANTS = ("percentile", "max", "none")  # report columns: mask from the percentile, from the max, no mask
WORST_LAYERS_SHOWN = 10  # rows of the text table (JSON has every layer)
REPORT_FORMAT = "hif4fmt-build-report"  # report["format"] (schema: spec/stats-v1.md section 8.3)
REPORT_VERSION = "1.0"  # report["format_version"]; keys are only ever added


def relative_output_error(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          mask: np.ndarray | None, encoder: str = "toolkit") -> float | None:
    """Return ||y_q - y||_F / ||y||_F for rows (R, C), weight (O, C), bias (O,) or None, mask (C,) or None.

    None when the reference output is all zero (the ratio is undefined).
    """
    from hif4fmt.hifloat4 import fake_quantize

    x = rows.to(torch.float32)
    w = weight.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    reference = torch.nn.functional.linear(x, w, b)
    if mask is None:
        xq, wq = fake_quantize(x, encoder), fake_quantize(w, encoder)
    else:
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        xq, wq = fake_quantize(x * m, encoder), fake_quantize(w / m, encoder)
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


def summarize(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Return per mask variant: layers measured, mean, median and max relative error, and the worst layer;
    plus ``percentile_vs_max`` (see ``compare_percentile_with_max``)."""
    summary: dict[str, Any] = {"percentile_vs_max": compare_percentile_with_max(layers)}
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
    lines = [f"fidelity on held-out calibration rows (relative output error ||y_q - y|| / ||y||, "
             f"percentile {report['percentile']}, alpha {report['alpha']}, encoder {report['encoder']})",
             table(summary_rows, ["mask", "layers", "mean", "median", "max", "worst layer"])]
    versus = report["summary"].get("percentile_vs_max", {})
    if versus.get("layers"):
        ratio = versus["mean_ratio"]
        lines.append(f"percentile mask vs max mask: lower error on {versus['percentile_lower']} of {versus['layers']} "
                     f"layers, higher on {versus['max_lower']}, equal on {versus['equal']}; mean error ratio "
                     f"{'n/a' if ratio is None else f'{ratio:.4f}'} (below 1: the percentile mask has the lower error)")
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

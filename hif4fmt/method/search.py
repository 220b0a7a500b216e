"""Per-layer recipe search: the percentile p, alpha and optional rotation with the lowest layer output error.

Why this module exists: one global percentile and alpha (the paper's recipe) is a compromise over layers
whose activation tails differ by orders of magnitude. ``hif4fmt build --search`` tries, for every
quantized layer, each candidate of a small grid and keeps the one whose W4A4 output is closest to the
BF16 output on the layer's held-out calibration rows, using only the statistics file and the base
weights (no model run). The error is the fidelity report's (``hif4fmt.report``)

    e = ||y_q - y||_F / ||y||_F,   y = x W^T + b,   y_q = HiF4((x * m) R) HiF4((W / m) R)^T + b

with R = I, or R = blockdiag(H64 / 8) for the rotation candidate (``hif4fmt.codec.rotation``).

Held-out split (docs/calibration.md, spec/stats-v1.md 8.3): the layer's held-out rows are stored in
ascending splitmix64 key order (spec 4); rows at even positions (0, 2, 4, ...) form the *selection*
part the search minimises on, rows at odd positions the *report* part the fidelity report measures on,
so the reported error of the chosen recipe is not in-sample. Deterministic and disjoint by construction.

Cost: every candidate fake-quantizes the selection rows and at most ``SEARCH_MAX_OUTPUTS`` output rows
of the weight (evenly spaced; every row when the layer has fewer) and multiplies them; candidates are
stacked into batches of at most ``SEARCH_BATCH_ELEMENTS`` operand elements and computed by one HiF4 call
and one batched matmul per batch. Ties go to the earlier candidate in grid order, so the choice (and the
state) is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hif4fmt.codec.rotation import rotate_torch
from hif4fmt.errors import RecipeError
from hif4fmt.recipe import Recipe
from hif4fmt.state import ROTATION_HADAMARD64

DEFAULT_SEARCH_PERCENTILES = "99,99.9,99.99,max"  # --search-percentiles: "max" = the exact max of |x|
DEFAULT_SEARCH_ALPHAS = "0.3,0.4,0.5,0.6,0.7"      # --search-alphas
MAX_STATISTIC = "max"                               # grid word for statistic "max" (no percentile)
SEARCH_MAX_OUTPUTS = 256                            # output rows of W the selection error is measured on
SEARCH_BATCH_ELEMENTS = 1 << 25                     # operand elements (rows + outputs) x in_features per batch
SPLIT_RULE = "held-out rows in stored (ascending splitmix64 key) order: even positions select, odd positions report"


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: ``statistic`` ("percentile" or "max"), ``percentile`` (None for max),
    ``alpha`` and ``rotation`` (None or ``ROTATION_HADAMARD64``)."""

    statistic: str
    percentile: float | None
    alpha: float
    rotation: str | None = None

    def label(self) -> str:
        """Return a short text form, e.g. ``p99.9 a0.5`` or ``max a0.4 hadamard-64``."""
        statistic = "max" if self.statistic == "max" else f"p{self.percentile:g}"
        return f"{statistic} a{self.alpha:g}" + (f" {self.rotation}" if self.rotation else "")

    def to_dict(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "percentile": self.percentile, "alpha": self.alpha,
                "rotation": self.rotation}


def _parse_numbers(text: str, option: str, allow_max: bool) -> tuple[float | None, ...]:
    """Return the comma-separated numbers of ``text`` (None for the word ``max`` when allowed)."""
    values: list[float | None] = []
    for item in str(text).split(","):
        item = item.strip()
        if allow_max and item.lower() == MAX_STATISTIC:
            values.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise RecipeError(f"{option} {text!r}: {item!r} is not a number; give a comma-separated list such "
                              f"as {DEFAULT_SEARCH_PERCENTILES if allow_max else DEFAULT_SEARCH_ALPHAS}") from None
        values.append(value)
    if len(set(values)) != len(values):
        raise RecipeError(f"{option} {text!r}: a value is listed twice")
    return tuple(values)


@dataclass(frozen=True)
class SearchGrid:
    """The candidates ``build --search`` tries per layer: percentiles (None = max) x alphas [x rotation]."""

    percentiles: tuple[float | None, ...]
    alphas: tuple[float, ...]
    rotation: bool = False

    @classmethod
    def parse(cls, percentiles: str | None = None, alphas: str | None = None, rotation: bool = False) -> "SearchGrid":
        """Parse the comma-separated ``--search-percentiles`` / ``--search-alphas``; ``RecipeError`` if bad."""
        grid = cls(_parse_numbers(DEFAULT_SEARCH_PERCENTILES if percentiles is None else percentiles,
                                  "--search-percentiles", allow_max=True),
                   _parse_numbers(DEFAULT_SEARCH_ALPHAS if alphas is None else alphas, "--search-alphas",
                                  allow_max=False),
                   bool(rotation))
        grid.validate()
        return grid

    def validate(self) -> None:
        """Raise ``RecipeError`` for an empty list or a value a recipe would refuse."""
        if not self.percentiles or not self.alphas:
            raise RecipeError("search grid: --search-percentiles and --search-alphas need at least one value each")
        for candidate in self.candidates():
            _recipe_of(candidate, Recipe())  # validates p in (0, 100], alpha in [0, 1]

    def candidates(self, default: Recipe | None = None) -> tuple[Candidate, ...]:
        """Return the candidates in grid order: unrotated first, percentiles then alphas in the given order.

        ``default`` (the command's global recipe) is appended, unrotated, when the grid lacks it, so the
        chosen recipe is never worse than the global one on the selection rows.
        """
        rotations = (None, ROTATION_HADAMARD64) if self.rotation else (None,)
        found = [Candidate("max" if p is None else "percentile", None if p is None else float(p), float(a), r)
                 for r in rotations for p in self.percentiles for a in self.alphas]
        if default is not None:
            fallback = default_candidate(default)
            if fallback not in found:
                found.append(fallback)
        return tuple(found)

    def to_dict(self) -> dict[str, Any]:
        return {"percentiles": [MAX_STATISTIC if p is None else float(p) for p in self.percentiles],
                "alphas": [float(a) for a in self.alphas], "rotation": self.rotation, "split": SPLIT_RULE,
                "max_outputs": SEARCH_MAX_OUTPUTS}


def default_candidate(recipe: Recipe) -> Candidate:
    """Return the global recipe as an unrotated candidate."""
    return Candidate(recipe.statistic, None if recipe.percentile is None else float(recipe.percentile),
                     float(recipe.alpha), None)


def _recipe_of(candidate: Candidate, base: Recipe) -> Recipe:
    """Return ``base`` with the candidate's statistic, percentile and alpha (validated)."""
    return Recipe(statistic=candidate.statistic, percentile=candidate.percentile, alpha=candidate.alpha,
                  eps=base.eps, encoder=base.encoder, mask_dtype=base.mask_dtype)


def split_holdout(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (selection, report) int64 index arrays into a layer's ``rows`` held-out rows (``SPLIT_RULE``)."""
    positions = np.arange(int(rows), dtype=np.int64)
    return positions[0::2], positions[1::2]


def output_subset(out_features: int) -> np.ndarray:
    """Return the int64 output rows the selection error uses: all, or ``SEARCH_MAX_OUTPUTS`` evenly spaced."""
    if out_features <= SEARCH_MAX_OUTPUTS:
        return np.arange(out_features, dtype=np.int64)
    return np.unique(np.linspace(0, out_features - 1, SEARCH_MAX_OUTPUTS).round().astype(np.int64))


rotate_units = rotate_torch  # the codec's rotation (fixed butterfly order); name kept for callers


def candidate_errors(rows: Any, weight: Any, bias: Any, masks: np.ndarray, rotated: bool,
                     encoder: str = "toolkit") -> list[float | None]:
    """Return e = ||y_q - y||_F / ||y||_F for each mask: rows (R, C), weight (O, C), bias (O,) or None,
    masks float32 (G, C); ``rotated`` applies R = blockdiag(H64 / 8) to both masked operands.

    All G candidates are computed in batches (one HiF4 call and one batched matmul each); None for
    every candidate when y is all zero.
    """
    import torch

    from hif4fmt.hifloat4 import fake_quantize

    x = rows.to(torch.float32)
    w = weight.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    reference = torch.nn.functional.linear(x, w, b)
    denominator = float(torch.linalg.vector_norm(reference.double()))
    if denominator == 0.0:
        return [None] * len(masks)
    per_candidate = (x.shape[0] + w.shape[0]) * x.shape[1]
    chunk = max(1, SEARCH_BATCH_ELEMENTS // max(1, per_candidate))
    errors: list[float | None] = []
    for start in range(0, len(masks), chunk):
        m = torch.from_numpy(np.ascontiguousarray(masks[start:start + chunk], dtype=np.float32))
        xs, ws = x.unsqueeze(0) * m.unsqueeze(1), w.unsqueeze(0) / m.unsqueeze(1)
        if rotated:
            xs, ws = rotate_units(xs), rotate_units(ws)
        quantized = torch.matmul(fake_quantize(xs, encoder), fake_quantize(ws, encoder).transpose(1, 2))
        if b is not None:
            quantized = quantized + b
        numerators = torch.linalg.vector_norm((quantized - reference).double(), dim=(1, 2))
        errors.extend(float(n) / denominator for n in numerators)
    return errors


@dataclass(frozen=True)
class SearchResult:
    """The chosen candidate and its float32 (C,) mask; every candidate with its selection error (None:
    undefined), and how it was chosen ("search", or "default" when the selection part could not decide)."""

    chosen: Candidate
    mask: np.ndarray
    errors: tuple[tuple[Candidate, float | None], ...]
    chosen_by: str


def search_layer(rows: Any, weight: Any, bias: Any, weight_absmax: np.ndarray,
                 activation: dict[float | None, np.ndarray], grid: SearchGrid, recipe: Recipe,
                 where: str = "layer") -> SearchResult:
    """Return the candidate of ``grid`` (plus the global ``recipe``) with the lowest selection error.

    ``rows`` are the layer's *selection* rows (R, C), ``weight`` (O, C) and ``bias`` (O,) or None the base
    tensors, ``weight_absmax`` float64 (C,) = max_o |W[o, i]|, ``activation`` maps each percentile of the
    candidates (None for the max) to its float64 (C,) statistic a_i. Masks follow ``hif4fmt.masks``
    (same guards, ``BuildError`` naming ``where``). With no selection rows, or an all-zero output, the
    global recipe is kept (``chosen_by`` "default").
    """
    import torch

    from hif4fmt.masks import compute_mask

    candidates = grid.candidates(recipe)
    masks = {c: compute_mask(weight_absmax, activation[c.percentile if c.statistic == "percentile" else None],
                             c.alpha, recipe.eps, where) for c in candidates}
    fallback = default_candidate(recipe)
    if rows.shape[0] == 0:
        return SearchResult(fallback, masks[fallback], tuple((c, None) for c in candidates), "default")
    outputs = torch.from_numpy(output_subset(weight.shape[0]))
    weight_rows = weight.index_select(0, outputs)
    bias_rows = None if bias is None else bias.index_select(0, outputs)
    errors: dict[Candidate, float | None] = {}
    for rotated in (False, True):
        group = [c for c in candidates if (c.rotation is not None) == rotated]
        if group:
            values = candidate_errors(rows, weight_rows, bias_rows, np.stack([masks[c] for c in group]), rotated,
                                      recipe.encoder)
            errors.update(zip(group, values))
    measured = [(errors[c], index, c) for index, c in enumerate(candidates)
                if errors[c] is not None and math.isfinite(errors[c])]
    ordered = tuple((c, errors[c]) for c in candidates)
    if not measured:
        return SearchResult(fallback, masks[fallback], ordered, "default")
    _, _, best = min(measured, key=lambda item: (item[0], item[1]))
    return SearchResult(best, masks[best], ordered, "search")

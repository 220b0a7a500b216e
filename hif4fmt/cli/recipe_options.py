"""The recipe, search and rank-sampling options shared by ``hif4fmt build`` and ``hif4fmt rank``.

Why this module exists: ``rank`` must make its W4A4 masks from exactly the recipe ``build`` would use
(``--search`` included), so both commands take the same options, defined once here, and turn them into
the same ``Recipe`` / ``SearchGrid`` / ``RankSettings`` objects. Option names are a contract (README,
docs/calibration.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

RECIPE_OPTIONS = (
    click.option("--percentile", type=float, default=None, help="a_i = this percentile of |x| [default: 99.9]"),
    click.option("--statistic", type=click.Choice(["percentile", "max"]), default="percentile", show_default=True,
                 help="max: a_i = exact max |x| (the conservative variant)"),
    click.option("--alpha", type=float, default=None, help="migration strength in [0, 1] [default: 0.5]"),
    click.option("--eps", type=float, default=None, help="added to a_i [default: 1e-6]"),
    click.option("--retain-block", "retain_blocks", multiple=True, metavar="COMPONENT:INDEX|auto",
                 help="keep this whole block high precision (at most 2 across both experts); auto: the blocks "
                      "`hif4fmt rank` finds best, up to the limit"),
    click.option("--encoder", type=click.Choice(["toolkit", "ascend"]), default="toolkit", show_default=True),
    click.option("--mask-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
                 show_default=True),
)

SEARCH_OPTIONS = (
    click.option("--search", is_flag=True, help="choose percentile and alpha per layer on held-out rows"),
    click.option("--search-percentiles", default=None, metavar="LIST",
                 help="comma-separated percentiles ('max' = exact max) [default: 99,99.9,99.99,max]"),
    click.option("--search-alphas", default=None, metavar="LIST",
                 help="comma-separated alphas [default: 0.3,0.4,0.5,0.6,0.7]"),
    click.option("--search-rotation", is_flag=True,
                 help="also try each candidate with the 64-point Hadamard rotation (hadamard-64)"),
)

RANK_OPTIONS = (
    click.option("--prompts", type=click.Path(path_type=Path), default=None,
                 help="the calibration prompts file [default: the file named in --stats, beside it]"),
    click.option("--rank-prompts", type=int, default=None, help="first N calibration prompts run [default: 1]"),
    click.option("--rank-calls", type=int, default=None,
                 help="transformer calls used per expert, evenly spaced [default: 4]"),
    click.option("--rank-weight", type=click.Choice(["output", "step"]), default=None,
                 help="how calls count in the error: output = alike, step = by the sampler's step size "
                      "(sigma_i - sigma_i+1)^2, so errors count as they reach the latent [default: output]"),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="where the ranking runs the transformers"),
)


def apply_options(*groups: tuple) -> Callable[[Callable], Callable]:
    """Return a decorator applying every option of ``groups`` (in order) to a click command."""
    def decorate(function: Callable) -> Callable:
        for group in reversed(groups):
            for option in reversed(group):
                function = option(function)
        return function
    return decorate


def make_recipe(percentile: float | None, statistic: str, alpha: float | None, eps: float | None,
                retain_blocks: tuple[str, ...], encoder: str, mask_dtype: str) -> tuple[Any, bool]:
    """Return (the validated Recipe of the explicit options, whether ``--retain-block auto`` was given)."""
    from hif4fmt.errors import RecipeError
    from hif4fmt.method.rank import AUTO
    from hif4fmt.recipe import DEFAULT_ALPHA, DEFAULT_EPS, DEFAULT_PERCENTILE, Recipe, RetainedBlock

    if statistic == "max" and percentile is not None:
        raise RecipeError("--percentile and --statistic max exclude each other; max uses the exact max of |x|")
    auto = sum(1 for value in retain_blocks if value == AUTO)
    if auto > 1:
        raise RecipeError("--retain-block auto is given twice; give it once")
    explicit = tuple(RetainedBlock.parse(value) for value in retain_blocks if value != AUTO)
    recipe = Recipe(statistic=statistic,
                    percentile=None if statistic == "max" else
                    (DEFAULT_PERCENTILE if percentile is None else percentile),
                    alpha=DEFAULT_ALPHA if alpha is None else alpha, eps=DEFAULT_EPS if eps is None else eps,
                    retained_blocks=explicit, encoder=encoder, mask_dtype=mask_dtype)
    return recipe, bool(auto)


def make_search(search: bool, percentiles: str | None, alphas: str | None, rotation: bool) -> Any:
    """Return the ``SearchGrid`` of ``--search`` (None without it; the grid options then refused)."""
    from hif4fmt.errors import RecipeError
    from hif4fmt.method.search import SearchGrid

    if not search:
        given = [name for name, value in (("--search-percentiles", percentiles), ("--search-alphas", alphas),
                                          ("--search-rotation", rotation or None)) if value is not None]
        if given:
            raise RecipeError(f"{given[0]} needs --search")
        return None
    return SearchGrid.parse(percentiles, alphas, rotation)


def make_rank_settings(prompts: Path | None, rank_prompts: int | None, rank_calls: int | None, device: str,
                       rank_weight: str | None = None) -> Any:
    """Return the ``RankSettings`` of the rank-sampling options (defaults where not given)."""
    from hif4fmt.method.rank import DEFAULT_RANK_CALLS, DEFAULT_RANK_PROMPTS, DEFAULT_RANK_WEIGHT, RankSettings

    return RankSettings(prompts=prompts, num_prompts=DEFAULT_RANK_PROMPTS if rank_prompts is None else rank_prompts,
                        calls=DEFAULT_RANK_CALLS if rank_calls is None else rank_calls, device=device,
                        weight=DEFAULT_RANK_WEIGHT if rank_weight is None else rank_weight)

"""``hif4fmt rank``: order every block of both experts by what keeping it in BF16 buys end to end.

Why this module exists: the CLI side of ``hif4fmt.method.rank``: it parses the same recipe and search
options as ``build`` (``hif4fmt.cli.recipe_options``) so the ranking's W4A4 masks are the build's, makes
the masks without writing a state (``hif4fmt.build.layer_masks``), runs the ranking, and prints a table
or ``--json`` (spec/stats-v1.md 8.4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hif4fmt.cli.output import emit, table
from hif4fmt.cli.recipe_options import (
    RANK_OPTIONS,
    RECIPE_OPTIONS,
    SEARCH_OPTIONS,
    apply_options,
    make_rank_settings,
    make_recipe,
    make_search,
)


def _render_rank(result: dict[str, Any]) -> str:
    error = result["error"]["all_quantized"]
    rows = [[b["block"], f"{b['error']:.5f}", f"{b['gain']:.5f}", f"{100 * b['relative_gain']:.1f}%"]
            for b in result["blocks"] if b["error"] is not None]
    calls = ", ".join(f"{name} {c['calls']} of {c['captured_calls']}" for name, c in result["components"].items())
    weighted = "" if result.get("weight", "output") == "output" else ", calls weighted by sampler step size"
    lines = [f"transformer output error vs BF16 with every block W4A4: {error:.5f} ({result['prompts']} prompt(s); "
             f"calls used per expert: {calls}{weighted}; {result['seconds']:.1f} s)",
             table(rows, ["block", "error with it in BF16", "gain", "gain %"])]
    if result["retained_explicitly"]:
        lines.append(f"already retained (BF16 throughout, not ranked): {', '.join(result['retained_explicitly'])}")
    return "\n".join(lines)


@click.command("rank")
@click.option("--base", required=True, type=click.Path(path_type=Path), help="base pipeline folder")
@click.option("--stats", required=True, type=click.Path(path_type=Path), help="statistics file from calibrate")
@apply_options(RECIPE_OPTIONS, SEARCH_OPTIONS, RANK_OPTIONS)
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def rank_cmd(base: Path, stats: Path, percentile: float | None, statistic: str, alpha: float | None,
             eps: float | None, retain_blocks: tuple[str, ...], encoder: str, mask_dtype: str, search: bool,
             search_percentiles: str | None, search_alphas: str | None, search_rotation: bool,
             prompts: Path | None, rank_prompts: int | None, rank_calls: int | None, rank_weight: str | None,
             device: str, no_progress: bool, as_json: bool) -> None:
    """Rank every block of every expert by how much keeping it in BF16 lowers the W4A4 output error."""
    from hif4fmt.build import layer_masks
    from hif4fmt.calibration.stats_file import read_stats
    from hif4fmt.errors import RecipeError
    from hif4fmt.method.rank import public_ranking, rank_blocks, resolve_prompts

    recipe, auto = make_recipe(percentile, statistic, alpha, eps, retain_blocks, encoder, mask_dtype)
    if auto:
        raise RecipeError("--retain-block auto is for build; rank ranks the blocks auto would choose from")
    grid = make_search(search, search_percentiles, search_alphas, search_rotation)
    settings = make_rank_settings(prompts, rank_prompts, rank_calls, device, rank_weight)
    chosen_prompts = resolve_prompts(Path(stats), read_stats(stats).header, settings)
    header, plans, choices = layer_masks(base, stats, recipe, grid, progress=not no_progress)
    result = public_ranking(rank_blocks(base, header, chosen_prompts, plans, choices, recipe, settings,
                                        progress=not no_progress))
    result["recipe"] = recipe.to_dict()
    result["search"] = None if grid is None else grid.to_dict()
    emit(result, as_json, _render_rank)

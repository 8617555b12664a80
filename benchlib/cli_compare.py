"""``bench compare RUN_A RUN_B``: per cell, is run B faster or slower than run A, and did the
measured speedup of each pruned cell change (the library side is :mod:`benchlib.compare`).

Exit codes: 0 normally; 1 with ``--fail-on-regression`` when a cell is significantly slower in
B (or ran in A and failed in B); 2 on bad input (not a run folder, alpha out of range).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from benchlib.cli_common import handle_errors
from benchlib.compare import compare_runs, load_run
from benchlib.report.compare import render_comparison
from benchlib.results import write_json

__all__ = ["compare"]

EXIT_REGRESSION = 1


@click.command()
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option(
    "--alpha",
    type=float,
    default=0.01,
    show_default=True,
    help="Significance level, family-wise over the cells (Holm).",
)
@click.option(
    "--min-effect",
    type=float,
    help="Smallest relative change of a median that counts, e.g. 0.05 "
    "[default: 0.05 on CPU, 0.02 on GPU].",
)
@click.option(
    "--fail-on-regression",
    is_flag=True,
    help="Exit 1 when a cell is significantly slower in B, or failed only in B (for CI).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the comparison as JSON to this file.",
)
@handle_errors
def compare(
    run_a: Path,
    run_b: Path,
    alpha: float,
    min_effect: float | None,
    fail_on_regression: bool,
    json_path: Path | None,
) -> None:
    """Compare run folder RUN_B against RUN_A, cell by cell: a Mann-Whitney U test on the raw
    samples with a minimum effect size, and a warning per environment difference."""
    comparison = compare_runs(load_run(run_a), load_run(run_b), alpha=alpha, min_effect=min_effect)
    Console().print(render_comparison(comparison))
    if json_path is not None:
        write_json(json_path, comparison.to_dict())
        click.echo(f"wrote {json_path}")
    if fail_on_regression and comparison.regressions():
        click.get_current_context().exit(EXIT_REGRESSION)

"""``bench report RUN``: re-render any run folder on the console and (re)write its report.md
and PNG plots (the library side is :mod:`benchlib.report`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from benchlib.cli_common import handle_errors
from benchlib.report.console import cell_views, render_report
from benchlib.report.markdown import environment_facts, load_run, write_report
from benchlib.report.plots import matplotlib_missing

__all__ = ["report"]


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG plots.")
@click.option(
    "--accuracy",
    "accuracy_file",
    type=click.Path(path_type=Path),
    help='JSON object {"spec": top-1 %} of the run\'s variants: adds the accuracy plot.',
)
@handle_errors
def report(run_dir: Path, plots: bool, accuracy_file: Path | None) -> None:
    """Print the report of the run folder RUN and write report.md and plots into it.

    The console shows per model the variants x targets matrix of measured speedup T and
    realization eta with verdict marks, then per target the latency distribution,
    throughput, memory, build time and cold call, all derived from the raw samples.
    """
    console = Console()
    data = load_run(run_dir)  # a folder that is no run fails here, before anything is printed
    written = write_report(run_dir, plots=plots, accuracy_file=accuracy_file)
    environment = data.run.get("environment")
    views = cell_views(data.records, environment if isinstance(environment, Mapping) else None)
    console.print(render_report(views, environment_facts(data), width=console.width))
    missing = matplotlib_missing()
    if plots and missing is not None:
        console.print(f"[yellow]no plots[/yellow]: {escape(missing)}")
    for path in written:
        console.print(f"wrote {escape(str(path))}", soft_wrap=True)

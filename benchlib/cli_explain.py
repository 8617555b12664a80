"""``bench explain``: why a variant's FLOP reduction did not all become speed, layer by layer.

Reads a run folder written with ``bench run --profile-layers``; the lookup of the cell and the
choices offered on a wrong name are here, the analysis in ``benchlib.diagnosis`` and the
rendering in ``benchlib.report.layers``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from benchlib.analysis import Row, summarize_records
from benchlib.cli_common import handle_errors
from benchlib.diagnosis import Explanation, cell_findings, explain, profiled_baseline
from benchlib.errors import ConfigError, unknown_choice
from benchlib.report.layers import explain_view, plot_layers
from benchlib.results import RESULTS_FILE, RUN_FILE, CellKey, CellRecord, latest_records


@dataclass(frozen=True)
class Explained:
    """A cell of a run, its summary row, its explanation (None: the cell's target is not
    profiled) and the targets of the run that are."""

    row: Row
    explanation: Explanation | None
    notes: tuple[str, ...]
    profiled: tuple[str, ...]


def load_run(directory: Path) -> tuple[tuple[CellRecord, ...], dict[str, Any] | None]:
    """The latest record of each cell and the environment of a run folder; ConfigError when
    ``directory`` holds no results."""
    records = latest_records(directory / RESULTS_FILE)
    if not records:
        raise ConfigError(
            f"{str(directory)!r} is not a run folder with results (no {RESULTS_FILE})"
        )
    try:
        environment = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))["environment"]
    except (OSError, ValueError, KeyError, TypeError):
        environment = None
    return records, environment if isinstance(environment, dict) else None


_KEY_FIELDS: dict[str, Callable[[CellKey], Any]] = {
    "model": lambda k: k.model,
    "spec": lambda k: k.spec,
    "target": lambda k: k.target,
    "batch": lambda k: k.batch_size,
    "precision": lambda k: k.precision,
}


def _pick(
    kind: str, given: str | None, records: Sequence[CellRecord], field: Callable[[CellKey], Any]
) -> Any:
    """The value of ``field`` among ``records`` that ``given`` names (the first one in the run
    when ``given`` is None and the choice is optional); ConfigError listing the choices."""
    choices = list(dict.fromkeys(field(r.key) for r in records))
    if given is None:
        return choices[0]
    for choice in choices:
        if str(choice) == given or _canonical(kind, given) == str(choice):
            return choice
    raise unknown_choice(kind, given, [str(c) for c in choices])


def _canonical(kind: str, text: str) -> str | None:
    if kind != "spec":
        return None
    from benchlib.pruning import resolve

    try:
        return str(resolve(text)[0])
    except ConfigError:
        return None


def explain_cell(
    directory: Path,
    *,
    model: str,
    spec: str,
    target: str,
    batch_size: int | None = None,
    precision: str | None = None,
) -> Explained:
    """Find the cell in the run and explain it. ConfigError when the run has no layer
    profile at all, or a name is not in the run (the choices are listed)."""
    records, environment = load_run(directory)
    if not any(r.layer_profile is not None for r in records):
        raise ConfigError(
            f"run {str(directory)!r} has no layer profile; run it with bench run --profile-layers"
        )
    chosen = [r for r in records if not r.key.repeat]
    wanted: tuple[tuple[str, str | None, Callable[[CellKey], Any]], ...] = (
        ("model", model, _KEY_FIELDS["model"]),
        ("spec", spec, _KEY_FIELDS["spec"]),
        ("target", target, _KEY_FIELDS["target"]),
        ("batch size", None if batch_size is None else str(batch_size), _KEY_FIELDS["batch"]),
        ("precision", precision, _KEY_FIELDS["precision"]),
    )
    for kind, given, field in wanted:
        value = _pick(kind, given, chosen, field)
        chosen = [r for r in chosen if field(r.key) == value]
    record = chosen[0]
    rows = summarize_records(records, environment)
    row = next(r for r in rows if _same(r, record.key))
    base = profiled_baseline(records, record.key)
    profiled = tuple(dict.fromkeys(r.key.target for r in records if r.layer_profile is not None))
    notes = cell_findings(record, row)
    if record.layer_profile is None or base is None:  # base: a profiled dense cell
        return Explained(row, None, notes, profiled)
    return Explained(row, explain(record, base), notes, profiled)


def _same(row: Row, key: CellKey) -> bool:
    return (row.model, row.spec, row.target, row.batch_size, row.precision) == (
        key.model,
        key.spec,
        key.target,
        key.batch_size,
        key.precision,
    )


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", required=True, help="The model of the cell, as in the run.")
@click.option("--spec", required=True, help="The pruning spec of the variant, e.g. l1:0.5.")
@click.option("--target", required=True, help="The target of the cell, e.g. torch-eager.")
@click.option("--batch-size", type=int, help="The batch size (default: the run's first).")
@click.option("--precision", help="The precision (default: the run's first).")
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=15,
    show_default=True,
    help="How many layers the table shows, by lost time.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a PNG of each layer's share of time against its share of MACs.",
)
@handle_errors
def explain_command(
    run_dir: Path,
    model: str,
    spec: str,
    target: str,
    batch_size: int | None,
    precision: str | None,
    top: int,
    plot_path: Path | None,
) -> None:
    """Explain one cell of RUN (a run folder of bench run --profile-layers): per layer, its
    share of the FLOPs against its share of the time, its realization, and why."""
    found = explain_cell(
        run_dir, model=model, spec=spec, target=target, batch_size=batch_size, precision=precision
    )
    console = Console()
    console.print(
        explain_view(found.row, found.explanation, found.notes, top=top, profiled=found.profiled)
    )
    if plot_path is not None:
        if found.explanation is None:
            raise ConfigError(f"--plot needs a profiled cell; {target} has no layer profile here")
        console.print(f"Plot: {plot_layers(found.explanation, plot_path)}")

"""Rich renderables for the console: run summaries, the target list and the model zoo.

Renderers return rich objects and print nothing; the caller owns the Console. Tests render
them into ``Console(file=StringIO(), width=100, color_system=None)``. Tables are laid out long
(one line per variant and target) so that they stay readable at 80 columns whatever the
number of targets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from benchlib.analysis import ABOVE_THEORY, SLOWER_THAN_DENSE, Row
from benchlib.catalog import ZooEntry

LEGEND = (
    "F = dense MACs / nonzero MACs (theoretical speedup); F pruned: the same on the pruned "
    "layers only. Median: latency of one batch, with "
    "its bootstrap 95% CI. T = dense median / variant median on the same target and batch "
    "size (measured speedup). eta = (1 - 1/T) / (1 - 1/F): the share of the theoretical "
    "saving that became real. ! marks T > F (a cache or step effect); x marks a variant slower "
    "than its dense baseline; ~ marks a suspect "
    "measurement (CV over 10% on CPU, 2% on GPU, under 5 samples, far-out outliers, or the "
    "baseline drifting while its group ran: rerun on a quiet machine)."
)


def _unit(seconds: float) -> tuple[float, str]:
    return (1e6, "us") if seconds < 1e-3 else (1e3, "ms")


def _decimals(value: float) -> int:
    """Decimals that show ``value`` with three significant digits (none at 100 and above)."""
    return max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0


def fmt_latency(seconds: float | None) -> str:
    """Seconds as ms (us below 1 ms) with three significant digits; '-' when absent."""
    if seconds is None:
        return "-"
    scale, unit = _unit(seconds)
    return f"{seconds * scale:.{_decimals(seconds * scale)}f} {unit}"


def fmt_interval(low: float | None, high: float | None, like: float) -> str:
    """An interval in the unit ``like`` would be shown in: '30.5-31.2 ms'."""
    if low is None or high is None:
        return "-"
    scale, unit = _unit(like)
    digits = _decimals(like * scale)
    return f"{low * scale:.{digits}f}-{high * scale:.{digits}f} {unit}"


def fmt_ratio(value: float | None, suffix: str = "x") -> str:
    """A ratio with two decimals, '-' when undefined."""
    return "-" if value is None else f"{value:.2f}{suffix}"


def fmt_count(value: int | None) -> str:
    """An integer count with an SI prefix: 1.82 G, 11.7 M, 864 k."""
    if value is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return str(value)


def variants_table(title: str, rows: Sequence[Row]) -> Table:
    """One line per variant: what pruning removed, and the speedup it promises (F)."""
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("Variant", no_wrap=True)
    for header in ("MACs", "Params", "F", "F pruned"):
        table.add_column(header, justify="right", no_wrap=True)
    for spec in dict.fromkeys(r.spec for r in rows):
        row = next(r for r in rows if r.spec == spec)
        table.add_row(
            Text(spec),  # a Text, not markup: spec options are written in [brackets]
            f"{fmt_count(row.nonzero_macs)} / {fmt_count(row.macs)}",
            f"{fmt_count(row.nonzero_params)} / {fmt_count(row.params)}",
            fmt_ratio(row.speedup_theoretical),
            fmt_ratio(row.speedup_theoretical_pruned),
        )
    return table


def _median_cells(row: Row) -> tuple[Text, Text]:
    if row.status != "ok":
        return Text(row.status, style="red" if row.status == "failed" else "yellow"), Text("")
    interval = fmt_interval(row.ci_low_s, row.ci_high_s, like=row.median_s or 0.0)
    median = Text(fmt_latency(row.median_s))
    if row.verdict == "suspect":
        median.append(" ~", style="bold yellow")
    return median, Text(interval, style="dim")


def latency_table(rows: Sequence[Row]) -> Table:
    """Per batch size and target, each variant's latency, measured speedup and realization."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("bs", justify="right", no_wrap=True)
    table.add_column("Target", no_wrap=True)
    table.add_column("Variant", no_wrap=True)
    for header in ("Median", "95% CI", "T", "eta"):
        table.add_column(header, justify="right", no_wrap=True)
    groups = dict.fromkeys((r.batch_size, r.target) for r in rows)
    for index, (batch_size, target) in enumerate(groups):
        if index:
            table.add_section()
        for row in (r for r in rows if (r.batch_size, r.target) == (batch_size, target)):
            median, interval = _median_cells(row)
            eta = Text(fmt_ratio(row.realization, suffix=""))
            if ABOVE_THEORY in row.flags:
                eta.append(" !", style="bold yellow")
            speedup = Text(fmt_ratio(row.speedup_measured))
            if SLOWER_THAN_DENSE in row.flags:
                speedup.append(" x", style="bold red")
            table.add_row(
                str(batch_size),
                target,
                Text(row.spec),
                median,
                interval,
                speedup,
                eta,
            )
    return table


def failures(rows: Iterable[Row]) -> Table | None:
    """The cells that failed or were skipped, with their one-line reasons."""
    bad = [r for r in rows if r.status != "ok"]
    if not bad:
        return None
    table = Table(
        title="Cells without a result",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for header in ("Cell", "Status", "Reason"):
        table.add_column(header)
    for r in bad:
        table.add_row(
            Text(f"{r.model} {r.spec} {r.target} bs{r.batch_size} {r.precision}"),
            r.status,
            Text(r.reason),
        )
    return table


def render_summary(rows: Sequence[Row]) -> Group:
    """Everything ``bench run`` prints after the progress bar, model by model."""
    parts: list[RenderableType] = []
    for model, precision in dict.fromkeys((r.model, r.precision) for r in rows):
        mine = [r for r in rows if (r.model, r.precision) == (model, precision)]
        parts.append(variants_table(f"{model} - {precision} (per image: nonzero / all)", mine))
        parts.append(latency_table(mine))
    parts.append(Text(LEGEND, style="dim"))
    failed = failures(rows)
    if failed is not None:
        parts.append(failed)
    return Group(*parts)


@dataclass(frozen=True)
class TargetEntry:
    """One row of ``bench targets``."""

    name: str
    device: str
    precisions: str
    version: str | None
    reason: str | None
    """None when the target can run here, else what is missing."""
    sparse: bool = False
    """Whether the target exploits weight sparsity."""
    options: Mapping[str, str] = field(default_factory=dict)
    """Build option -> what it changes (``--targets NAME:OPTION``)."""


def targets_table(entries: Iterable[TargetEntry]) -> Group:
    """``bench targets``: per target its device kind, precisions, whether it exploits
    sparsity, its backend's version and whether it runs here; below the table, why the others
    cannot run, and the build options."""
    entries = list(entries)
    table = Table(
        title="Registered targets",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for header in ("Target", "Here", "Device", "Precisions", "Sparse"):
        table.add_column(header, no_wrap=True)
    table.add_column("Version", overflow="fold")
    for entry in entries:
        table.add_row(
            entry.name,
            Text("yes", style="green") if entry.reason is None else Text("no", style="yellow"),
            entry.device,
            entry.precisions,
            "yes" if entry.sparse else "",
            entry.version or "-",
        )
    notes: list[RenderableType] = [table]
    for entry in entries:
        if entry.reason is not None:
            notes.append(Text.assemble((entry.name, "bold"), f": {entry.reason}"))
    for entry in entries:
        for option, meaning in entry.options.items():
            notes.append(
                Text.assemble("option ", (f"{entry.name}:{option}", "bold"), f": {meaning}")
            )
    return Group(*notes)


def models_table(entries: Iterable[ZooEntry]) -> Table:
    """``bench models``: the zoo with input shape, params and GMACs per image."""
    table = Table(
        title="Model zoo (random weights; counts per image)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("Model")
    table.add_column("Source")
    table.add_column("Input", justify="right")
    table.add_column("Params (M)", justify="right")
    table.add_column("GMACs", justify="right")
    for entry in entries:
        table.add_row(
            entry.name,
            entry.source,
            "x".join(map(str, entry.input_shape)),
            f"{entry.params / 1e6:.2f}",
            f"{entry.macs / 1e9:.3f}",
        )
    return table

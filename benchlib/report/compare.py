"""Rich renderables of ``bench compare``: the environment warnings, per cell the medians of
both runs with the verdict, per pruned cell the measured speedup T of both runs, and the cells
that have no comparison (added, removed, failed).

Renderers return rich objects and print nothing; tests render them into
``Console(file=StringIO(), width=100, color_system=None)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from benchlib.compare import (
    ADDED,
    FAILED,
    FASTER,
    HIGHER,
    LOWER,
    NOT_SIGNIFICANT,
    REMOVED,
    RESAMPLES,
    SAME,
    SLOWER,
    CellChange,
    Comparison,
)
from benchlib.report.console import fmt_latency, fmt_ratio

VERDICT_STYLE = {
    SLOWER: "bold red",
    FASTER: "bold green",
    LOWER: "bold red",
    HIGHER: "bold green",
    SAME: "",
    NOT_SIGNIFICANT: "yellow",
    ADDED: "cyan",
    REMOVED: "cyan",
    FAILED: "red",
}
ORDER = (SLOWER, FASTER, NOT_SIGNIFICANT, SAME, FAILED, ADDED, REMOVED)


def fmt_p(value: float | None) -> str:
    """A p-value with two significant digits, '<0.0001' below that, '-' when absent."""
    if value is None:
        return "-"
    return "<0.0001" if value < 1e-4 else f"{value:.2g}"


def _verdict(verdict: str) -> Text:
    return Text(verdict, style=VERDICT_STYLE.get(verdict, ""))


def _table(title: str | None = None) -> Table:
    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def _grouped(
    table: Table, cells: Sequence[CellChange], row: Callable[[CellChange], list[str | Text]]
) -> None:
    """Rows under a bold 'target bsN' line per target and batch size, sections between."""
    groups = dict.fromkeys((c.key.target, c.key.batch_size) for c in cells)
    for index, (target, batch_size) in enumerate(groups):
        if index:
            table.add_section()
        table.add_row(Text(f"{target} bs{batch_size}", style="bold"))
        for cell in (c for c in cells if (c.key.target, c.key.batch_size) == (target, batch_size)):
            table.add_row(*row(cell))


def cells_table(title: str, cells: Sequence[CellChange]) -> Table:
    """Per target and batch size, each variant's median in A and B, ratio B/A with its 95%
    CI, the Holm-adjusted p-value and the verdict (fits 80 columns; on a narrower console
    the names fold, the numbers never do)."""
    table = _table(title)
    table.add_column("Variant", overflow="fold")
    for header in ("Median A", "Median B", "B/A", "95% CI", "p"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("Verdict", overflow="fold")

    def row(cell: CellChange) -> list[str | Text]:
        return [
            Text(f" {cell.key.spec}"),  # a Text, not markup: spec options are in [brackets]
            fmt_latency(cell.median_a_s),
            fmt_latency(cell.median_b_s),
            fmt_ratio(cell.ratio),
            _interval(cell.ci_low, cell.ci_high),
            fmt_p(cell.p_adjusted),
            _verdict(cell.verdict),
        ]

    _grouped(table, cells, row)
    return table


def speedup_table(cells: Sequence[CellChange]) -> Table | None:
    """Per pruned cell compared in both runs: T in A and B (each against its own run's dense
    baseline), the 95% CI of T_B / T_A, its Holm-adjusted bootstrap p, realization eta."""
    rows = [c for c in cells if c.speedup is not None]
    if not rows:
        return None
    table = _table("Measured speedup T = dense median / variant median, within each run")
    table.add_column("Variant", overflow="fold")
    for header in ("T A", "T B", "95% CI", "p", "eta A", "eta B"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("T", overflow="fold")

    def row(cell: CellChange) -> list[str | Text]:
        change = cell.speedup
        assert change is not None  # filtered above
        return [
            Text(f" {cell.key.spec}"),
            fmt_ratio(change.speedup_a),
            fmt_ratio(change.speedup_b),
            f"{change.ci_low:.2f}-{change.ci_high:.2f}",
            fmt_p(change.p_adjusted) if change.p_adjusted else f"<{1 / RESAMPLES:.4f}",
            fmt_ratio(change.realization_a, suffix=""),
            fmt_ratio(change.realization_b, suffix=""),
            _verdict(change.verdict),
        ]

    _grouped(table, rows, row)
    return table


def missing_table(cells: Sequence[CellChange]) -> Table | None:
    """The cells without a comparison: only in one run, or failed/skipped in one, and why."""
    bad = [c for c in cells if c.verdict in (ADDED, REMOVED, FAILED)]
    if not bad:
        return None
    table = _table("Cells without a comparison")
    for header in ("Cell", "Verdict", "Why"):
        table.add_column(header)
    why = {ADDED: "only in B", REMOVED: "only in A"}
    for cell in bad:
        table.add_row(
            Text(cell.key.label()), _verdict(cell.verdict), Text(why.get(cell.verdict, cell.note))
        )
    return table


def legend(comparison: Comparison) -> Text:
    effect = (
        f"{comparison.min_effect:.0%}"
        if comparison.min_effect is not None
        else "5% on CPU, 2% on GPU"
    )
    return Text(
        "Median: latency of one batch. B/A = median B / median A, with its bootstrap 95% CI "
        "(in the T table: of T_B / T_A). "
        "p: two-sided Mann-Whitney U on the raw samples, Holm-adjusted over the compared cells. "
        f"slower/faster: p < {comparison.alpha:g} and the median moved by at least {effect}; "
        "same: it moved less than that; not significant: it moved more, but the test cannot "
        "tell it from noise. T (measured speedup) and eta (realization) within each run, so "
        "a drift of the whole machine between the runs cancels in them; higher/lower: judged "
        "the same way on T_B / T_A, with a bootstrap p (Holm-adjusted over the pruned cells; "
        f"{RESAMPLES} resamples, so none below {1 / RESAMPLES:.4f}).",
        style="dim",
    )


def verdict_line(comparison: Comparison) -> Text:
    """'2 slower, 1 faster, ... ' over every cell of both runs."""
    counts = comparison.counts()
    parts = [f"{counts[v]} {v}" for v in ORDER if counts.get(v)]
    line = Text(f"{len(comparison.cells)} cells: " + ", ".join(parts))
    regressions = len(comparison.regressions())
    if regressions:
        line.append(f"; {regressions} regressed (slower, or failed only in B)", style="bold red")
    return line


def render_comparison(comparison: Comparison) -> Group:
    """Everything ``bench compare`` prints."""
    parts: list[RenderableType] = [
        Text(f"A: {comparison.run_a}\nB: {comparison.run_b}"),
    ]
    for difference in comparison.environment:
        parts.append(Text.assemble(("warning ", "bold yellow"), difference.line()))
    cells = comparison.cells
    for model, precision in dict.fromkeys((c.key.model, c.key.precision) for c in cells):
        mine = [c for c in cells if (c.key.model, c.key.precision) == (model, precision)]
        parts.append(cells_table(f"{model} - {precision}: B against A", mine))
        speedups = speedup_table(mine)
        if speedups is not None:
            parts.append(speedups)
    parts.append(legend(comparison))
    missing = missing_table(cells)
    if missing is not None:
        parts.append(missing)
    parts.append(verdict_line(comparison))
    return Group(*parts)

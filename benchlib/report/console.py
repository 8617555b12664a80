"""Rich renderables for the console: run summaries, run reports, the target list and the zoo.

Renderers return rich objects and print nothing; the caller owns the Console. Tests render
them into ``Console(file=StringIO(), width=100, color_system=None)``. ``render_summary`` is laid
out long (one line per variant and target) so that it stays readable at 80 columns whatever
the number of targets; ``render_report`` adds the variants x targets matrix and the detail
tables. The report's tables are built as ``Grid`` objects (plain cells with verdict marks) so
that the console and the Markdown report (``benchlib.report.markdown``) show the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from benchlib.analysis import ABOVE_THEORY, DENSE, SLOWER_THAN_DENSE, Row, baselines, group_of
from benchlib.analysis import summarize_records as _summarize_records
from benchlib.catalog import ZooEntry
from benchlib.harness.stats import Summary, summarize
from benchlib.results import CellRecord, Status

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


def variants_grid(title: str, rows: Sequence[Row]) -> Grid:
    """One line per variant: what pruning removed, and the speedup it promises (F)."""
    lines = []
    for spec in dict.fromkeys(r.spec for r in rows):
        row = next(r for r in rows if r.spec == spec)
        lines.append(
            (
                Text(spec),  # a Text, not markup: spec options are written in [brackets]
                Text(f"{fmt_count(row.nonzero_macs)} / {fmt_count(row.macs)}"),
                Text(f"{fmt_count(row.nonzero_params)} / {fmt_count(row.params)}"),
                Text(fmt_ratio(row.speedup_theoretical)),
                Text(fmt_ratio(row.speedup_theoretical_pruned)),
            )
        )
    headers = ("Variant", "MACs", "Params", "F", "F pruned")
    return Grid(title, headers, (False, True, True, True, True), tuple(lines))


def variants_table(title: str, rows: Sequence[Row]) -> Table:
    """``variants_grid`` as a rich table."""
    return grid_table(variants_grid(title, rows))


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
    grid = failures_grid(rows)
    return None if grid is None else grid_table(grid)


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


# --- the run report: matrix and detail tables ---------------------------------------------------

MATRIX_NOTE = (
    "Matrix: each variant's F, and per target and batch size its measured speedup T (first "
    "line) and realization eta (second line); the dense row holds the baseline's median "
    "latency of one batch. failed / skipped: no result (reasons below); '-': not measured."
)


@dataclass(frozen=True)
class CellView:
    """A summary row, the record it came from and the distribution of its raw samples.

    ``dist`` summarizes the samples the row was computed from (for the dense row, the pooled
    samples of its opening and closing measurement, as ``benchlib.analysis`` pools them); its
    own confidence interval is not used, the row's bootstrap CI is. None without samples.
    """

    row: Row
    record: CellRecord
    dist: Summary | None


def cell_views(
    records: Iterable[CellRecord], environment: Mapping[str, Any] | None = None
) -> list[CellView]:
    """One view per summary row of ``records`` (``benchlib.analysis.summarize_records``;
    ``environment``, the run's fingerprint, gives the rows their roofline share)."""
    records = list(records)
    bases = baselines(records)
    firsts = [r for r in records if not r.key.repeat]
    views = []
    for row, record in zip(_summarize_records(records, environment), firsts, strict=True):
        base = bases.get(group_of(record.key))
        samples = base.samples if row.spec == DENSE and base else record.samples_s
        ok = record.status is Status.OK and len(samples) > 0
        # resamples=1: the bootstrap CI is the row's; this pass only needs the quantiles
        views.append(CellView(row, record, summarize(samples, resamples=1) if ok else None))
    return views


def by_model(views: Iterable[CellView]) -> dict[str, list[CellView]]:
    """Views grouped by model, in the order the models first appear."""
    found: dict[str, list[CellView]] = {}
    for view in views:
        found.setdefault(view.row.model, []).append(view)
    return found


@dataclass(frozen=True)
class Grid:
    """A table as cells of text: the one layout the console and the Markdown report share.

    ``right`` says per column whether it is right-aligned (numbers); ``breaks`` holds the
    indices of the rows that open a new section; ``gap`` is the spaces between columns on the
    console. A cell may hold a newline (two lines on the console; Markdown joins them with
    ', ').
    """

    title: str
    headers: tuple[str, ...]
    right: tuple[bool, ...]
    rows: tuple[tuple[Text, ...], ...]
    breaks: frozenset[int] = frozenset()
    gap: int = 2


def grid_table(grid: Grid) -> Table:
    """The rich table of a grid (numeric columns never wrap)."""
    table = Table(
        title=grid.title or None,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, grid.gap - 1),  # plus the one space of the box between columns
        pad_edge=False,
        collapse_padding=True,
    )
    for header, right in zip(grid.headers, grid.right, strict=True):
        table.add_column(header, justify="right" if right else "left", no_wrap=right)
    for index, row in enumerate(grid.rows):
        if index in grid.breaks:
            table.add_section()
        table.add_row(*row)
    return table


def _mark(text: Text, mark: str, style: str) -> Text:
    text.append(f" {mark}", style=style)
    return text


def _status(row: Row) -> Text:
    return Text(row.status, style="red" if row.status == "failed" else "yellow")


def _matrix_cell(row: Row | None) -> Text:
    if row is None:
        return Text("-")
    if row.status != "ok":
        return _status(row)
    suspect = row.verdict == "suspect"
    if row.spec == DENSE:
        median = Text(fmt_latency(row.median_s))
        return _mark(median, "~", "bold yellow") if suspect else median
    cell = Text(fmt_ratio(row.speedup_measured))
    if SLOWER_THAN_DENSE in row.flags:
        _mark(cell, "x", "bold red")
    if suspect:
        _mark(cell, "~", "bold yellow")
    cell.append(f"\neta {fmt_ratio(row.realization, suffix='')}")
    return _mark(cell, "!", "bold yellow") if ABOVE_THEORY in row.flags else cell


def _width(text: Text | str) -> int:
    return max(len(line) for line in str(text).split("\n"))


def _chunks(columns: list[list[Text]], fixed: int, width: int | None) -> list[range]:
    """Consecutive ranges of ``columns`` (header and cells of each, one space apart) whose
    table, beside ``fixed`` characters of other columns, fits ``width`` (None: one range):
    as few ranges as fit, of even length where that fits too."""
    needs = [max(_width(cell) for cell in column) + 1 for column in columns]

    def split(size: int | None) -> list[range]:
        chunks: list[range] = []
        start, used = 0, fixed
        for index, need in enumerate(needs):
            full = used + need > width if width is not None else False
            if index > start and (full or index - start == size):
                chunks.append(range(start, index))
                start, used = index, fixed
            used += need
        return [*chunks, range(start, len(needs))]

    greedy = split(None)
    even = split(-(-len(needs) // len(greedy)))
    return even if len(even) == len(greedy) else greedy


def matrix_grids(views: Sequence[CellView], width: int | None = 100) -> list[Grid]:
    """The matrix of one model's views: variants (rows, with F) x target and batch size
    (columns, x precision when the model ran several); cells as in ``MATRIX_NOTE``. Split
    over grids of the same rows so that each fits ``width`` characters (None: never split)."""
    keys = list(dict.fromkeys((v.row.target, v.row.batch_size, v.row.precision) for v in views))
    several = len({precision for _, _, precision in keys}) > 1
    cells = {(v.row.spec, v.row.target, v.row.batch_size, v.row.precision): v.row for v in views}
    theory: dict[str, float | None] = {}
    for view in views:
        if theory.get(view.row.spec) is None:
            theory[view.row.spec] = view.row.speedup_theoretical
    heads = [Text(spec) for spec in theory], [Text(fmt_ratio(f)) for f in theory.values()]
    columns = [
        [Text(f"{t}\nbs {b}" + (f" {p}" if several else ""))]
        + [_matrix_cell(cells.get((spec, t, b, p))) for spec in theory]
        for t, b, p in keys
    ]
    fixed = max(_width(c) for c in [Text("Variant"), *heads[0]]) + len(" 1.00x")
    chunks = _chunks(columns, fixed, width)
    title = f"{views[0].row.model}: measured speedup T and realization eta"
    grids = []
    for number, chunk in enumerate(chunks, start=1):
        mine = [columns[i] for i in chunk]
        grids.append(
            Grid(
                title + (f" ({number}/{len(chunks)})" if len(chunks) > 1 else ""),
                ("Variant", "F", *(column[0].plain for column in mine)),
                (False, True, *(True for _ in mine)),
                tuple(zip(*heads, *(column[1:] for column in mine), strict=True)),
                gap=1,
            )
        )
    return grids


def _num(value: float, like: float | None = None) -> str:
    """Three significant digits of ``value`` (or as many decimals as ``like`` would get)."""
    return f"{value:.{_decimals(value if like is None else like)}f}"


def fmt_seconds(seconds: float | None) -> str:
    """A duration: like ``fmt_latency`` below 1 s, else seconds with three digits."""
    if seconds is None or seconds < 1.0:
        return fmt_latency(seconds)
    return f"{_num(seconds)} s"


def fmt_flops(value: float | None) -> str:
    """FLOP/s with an SI prefix and three significant digits: '138 G', '1.02 T'."""
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{_num(value / scale)} {prefix}"
    return _num(value)


def fmt_mib(size: object) -> str:
    """Bytes as MiB (three significant digits, whole MiB from 100 up); '-' when not a size."""
    if not isinstance(size, int) or isinstance(size, bool):
        return "-"
    return _num(size / 2**20) if size else "0"


def _breaks(views: Sequence[CellView]) -> frozenset[int]:
    return frozenset(
        i for i in range(1, len(views)) if views[i].row.batch_size != views[i - 1].row.batch_size
    )


def _latency_grid(title: str, views: Sequence[CellView]) -> Grid:
    medians = [v.dist.median for v in views if v.dist is not None]
    scale, unit = _unit(min(medians)) if medians else (1e3, "ms")
    rows = []
    for view in views:
        row, dist = view.row, view.dist
        head = (Text(str(row.batch_size)), Text(row.spec))
        if dist is None or row.ci_low_s is None or row.ci_high_s is None:
            rows.append((*head, _status(row), *(Text("-") for _ in range(7))))
            continue
        median = Text(_num(dist.median * scale))
        if row.verdict == "suspect":
            _mark(median, "~", "bold yellow")
        like = dist.median * scale
        interval = f"{_num(row.ci_low_s * scale, like)}-{_num(row.ci_high_s * scale, like)}"
        values = (dist.p90, dist.p99, None, dist.iqr, dist.mad)
        texts = [Text(interval) if v is None else Text(_num(v * scale, like)) for v in values]
        rows.append((*head, median, *texts, Text(f"{dist.cv:.1%}"), Text(str(dist.n))))
    return Grid(
        f"{title}: latency of one batch ({unit})",
        ("bs", "Variant", "Median", "p90", "p99", "95% CI", "IQR", "MAD", "CV", "n"),
        (True, False, *(True for _ in range(8))),
        tuple(rows),
        _breaks(views),
    )


_MEMORY = {
    "cpu": (("Peak RSS", "rss_peak_bytes"), ("RSS incr.", "rss_increase_bytes")),
    "cuda": (("Alloc peak", "cuda_allocated_peak_bytes"),),
}
"""Memory columns per device type: CPU RSS of the worker, GPU torch allocator peak."""


def _resources_grid(title: str, views: Sequence[CellView]) -> Grid:
    cuda = any(v.record.device.startswith("cuda") for v in views)
    memory = _MEMORY["cuda" if cuda else "cpu"]
    headers = ["bs", "Variant", "Items/s", *(name for name, _ in memory)]
    headers += ["Host e2e"] if cuda else []
    headers += ["Build", "Cold call", "FLOP/s", "Roofline"]
    rows = []
    for view in views:
        row, record = view.row, view.record
        rate = row.throughput_per_s
        cells = [Text(str(row.batch_size)), Text(row.spec)]
        cells.append(Text(_num(rate)) if rate is not None else _status(row))
        cells += [Text(fmt_mib(record.memory.get(key))) for _, key in memory]
        cells += [Text(fmt_latency(record.host_s))] if cuda else []
        cells += [Text(fmt_seconds(record.prepare_s)), Text(fmt_latency(record.cold_s))]
        cells.append(Text(fmt_flops(row.achieved_flops_per_s)))
        share = row.roofline_share
        cells.append(Text("n/a" if share is None else f"{share:.1%}"))
        rows.append(tuple(cells))
    peak = next((v.row.peak_device for v in views if v.row.peak_device), None)
    return Grid(
        f"{title}: throughput, memory (MiB), roofline"
        + (f" against the {peak} peak" if peak else " (n/a: device not in the peak table)"),
        tuple(headers),
        (True, False, *(True for _ in headers[2:])),
        tuple(rows),
        _breaks(views),
    )


def detail_grids(views: Sequence[CellView]) -> list[Grid]:
    """Per target and precision of one model's views, two grids: the latency distribution
    (median, p90, p99, bootstrap 95% CI of the median, IQR, MAD, CV, samples) and throughput,
    memory (CPU: worker peak RSS and its increase over the idle worker; GPU: torch's
    allocator peak), the host's end-to-end time per inference on GPU, build time, cold call,
    achieved FLOP/s (2 x MACs x batch / median, zeros included) and its share of the
    device's peak (n/a for a device the peak table does not know)."""
    groups: dict[tuple[str, str], list[CellView]] = {}
    for view in views:
        groups.setdefault((view.row.target, view.row.precision), []).append(view)
    grids = []
    for (target, precision), mine in groups.items():
        title = f"{mine[0].row.model} on {target} ({precision})"
        grids += [_latency_grid(title, mine), _resources_grid(title, mine)]
    return grids


def suspects_grid(views: Iterable[CellView]) -> Grid | None:
    """The cells measured but found suspect, each with the harness's reasons."""
    rows = tuple(
        (Text(_cell_label(v.row)), Text("; ".join(v.row.verdict_reasons)))
        for v in views
        if v.row.verdict == "suspect"
    )
    if not rows:
        return None
    return Grid("Suspect measurements (~)", ("Cell", "Reasons"), (False, False), rows)


def _cell_label(row: Row) -> str:
    return f"{row.model} {row.spec} {row.target} bs{row.batch_size} {row.precision}"


def failures_grid(rows: Iterable[Row]) -> Grid | None:
    """The cells that failed or were skipped, with their one-line reasons."""
    bad = tuple(
        (Text(_cell_label(r)), Text(r.status), Text(r.reason)) for r in rows if r.status != "ok"
    )
    if not bad:
        return None
    return Grid("Cells without a result", ("Cell", "Status", "Reason"), (False,) * 3, bad)


def render_report(
    views: Sequence[CellView], facts: Sequence[tuple[str, str]] = (), width: int = 100
) -> Group:
    """Everything ``bench report`` prints: the environment ``facts`` (label, value), then per
    model its variants, the matrix (split to fit ``width`` characters) and the detail tables
    per target, and what the sparse-kernel cells ran; the legend, the suspect cells with
    their reasons and the cells without a result."""
    from benchlib.report.kernels import kernels_grid  # it builds on this module's Grid

    parts: list[RenderableType] = [Text(f"{k}: {v}") for k, v in facts]
    for model, mine in by_model(views).items():
        rows = [v.row for v in mine]
        parts.append(variants_table(f"{model} (per image: nonzero / all)", rows))
        parts += [grid_table(g) for g in matrix_grids(mine, width) + detail_grids(mine)]
        if (ran := kernels_grid(mine)) is not None:
            parts.append(grid_table(ran))
    parts.append(Text(f"{LEGEND} {MATRIX_NOTE}", style="dim"))
    for extra in (suspects_grid(views), failures_grid(v.row for v in views)):
        if extra is not None:
            parts.append(grid_table(extra))
    return Group(*parts)

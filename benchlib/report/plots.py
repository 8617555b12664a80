"""PNG plots of a run: FLOPs reduction against measured speedup, latency against batch size,
accuracy against latency.

matplotlib is optional (the ``plots`` extra) and imported only inside the plotting functions,
with the Agg backend, so ``import benchlib`` stays light; ``matplotlib_missing`` says whether
plots can be drawn here. Every plotted number comes from the run's rows (measured medians and
the F of the FLOP counts); accuracy comes only from a file the user gives.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchlib.analysis import DENSE, Row
from benchlib.errors import ConfigError
from benchlib.report.console import CellView

MARKERS = "osD^vPX*"
"""One marker shape per batch size, in increasing order of batch size."""
DPI = 120


def matplotlib_missing() -> str | None:
    """None when plots can be drawn, else one line saying why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'benchlib[plots]')"
    return None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def slug(name: str) -> str:
    """A model name as a file-name part: 'tests.conftest:TinyNet' -> 'tests.conftest-TinyNet'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _tex(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib reads $...$ as math


def _merge(positions: Mapping[str, float], near: float, log: bool) -> list[tuple[float, str]]:
    """Axis labels (text -> position) merged where they lie nearer than ``near`` (a ratio on
    a log axis, a distance on a linear one), so that no two are drawn over each other."""
    merged: list[tuple[float, str]] = []
    for value, text in sorted((v, t) for t, v in positions.items()):
        gap = value / merged[-1][0] if merged and log else value - merged[-1][0] if merged else 0
        if merged and gap < near:
            merged[-1] = (merged[-1][0], f"{merged[-1][1]}, {text}")
        else:
            merged.append((value, text))
    return merged


def _style(rows: Sequence[Row]) -> tuple[list[tuple[str, str]], list[int], Any]:
    """The (target, precision) series, the batch sizes and the colour map of a plot."""
    series = list(dict.fromkeys((r.target, r.precision) for r in rows))
    sizes = sorted({r.batch_size for r in rows})
    return series, sizes, _pyplot().get_cmap("tab10")


def _legend_handles(series: Sequence[tuple[str, str]], sizes: Sequence[int], cmap: Any) -> Any:
    from matplotlib.lines import Line2D

    several = len({p for _, p in series}) > 1
    handles = [
        Line2D([], [], color=cmap(i % 10), marker="o", linestyle="", label=t + f" {p}" * several)
        for i, (t, p) in enumerate(series)
    ]
    handles += [
        Line2D(
            [], [], color="0.35", marker=MARKERS[j % len(MARKERS)], linestyle="", label=f"bs {b}"
        )
        for j, b in enumerate(sizes)
    ]
    handles.append(
        Line2D([], [], color="0.35", marker="o", markerfacecolor="none", linestyle="",
               label="hollow: suspect (~)")
    )  # fmt: skip
    return handles


def _scatter(axes: Any, rows: Sequence[Row], xy: Any, series: Any, sizes: Any, cmap: Any) -> None:
    """One marker per row: colour by target, shape by batch size, hollow when suspect."""
    for row in rows:
        colour = cmap(series.index((row.target, row.precision)) % 10)
        axes.scatter(
            *xy(row),
            marker=MARKERS[sizes.index(row.batch_size) % len(MARKERS)],
            s=48,
            facecolors="none" if row.verdict == "suspect" else colour,
            edgecolors=colour,
            linewidths=1.3,
            zorder=3,
        )


def _plain_log(axis: Any, suffix: str = "") -> None:
    """Log-axis ticks at 1, 2, 5 per decade written as plain numbers (30, not 3 x 10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}{suffix}"))
    axis.set_minor_formatter(NullFormatter())


def _finish(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    _pyplot().close(figure)
    return path


def speedup_plot(views: Sequence[CellView], path: Path) -> Path:
    """One model's theoretical speedup F (x axis) against measured speedup T (y axis),
    log-log, with the ideal line T = F and the line T = 1; the specs are named along the top
    axis at their F. Writes the PNG ``path`` and returns it."""
    pyplot = _pyplot()
    from matplotlib.ticker import NullFormatter

    rows = [
        v.row
        for v in views
        if v.row.spec != DENSE and v.row.speedup_measured and v.row.speedup_theoretical
    ]
    figure, axes = pyplot.subplots(figsize=(8.5, 6.0), layout="constrained")
    series, sizes, cmap = _style(rows)
    values = [x for r in rows for x in (r.speedup_theoretical or 1.0, r.speedup_measured or 1.0)]
    low, high = min([1.0, *values]) / 1.25, max([1.0, *values]) * 1.25
    axes.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high))
    axes.axhspan(low, 1.0, color="tab:red", alpha=0.06, zorder=0, label="slower than dense")
    axes.plot([low, high], [low, high], color="0.2", linewidth=1.2, label="ideal: T = F")
    axes.axhline(1.0, color="0.45", linestyle="--", linewidth=1.0, label="T = 1: no gain")
    _scatter(
        axes,
        rows,
        lambda r: (r.speedup_theoretical, r.speedup_measured),
        series,
        sizes,
        cmap,
    )
    labels = _merge({r.spec: r.speedup_theoretical or 1.0 for r in rows}, 1.04, log=True)
    for f, _ in labels:
        axes.axvline(f, color="0.88", linewidth=0.8, zorder=1)
    _plain_log(axes.xaxis, "x")
    _plain_log(axes.yaxis, "x")
    axes.set_xlabel("theoretical speedup F = dense MACs / nonzero MACs (x)")
    axes.set_ylabel("measured speedup T = dense median / variant median latency (x)")
    top = axes.secondary_xaxis("top")
    top.set_xticks([f for f, _ in labels], [_tex(text) for _, text in labels], fontsize=8)
    top.tick_params(axis="x", labelrotation=35)
    for label in top.get_xticklabels():
        label.set_horizontalalignment("left")
    top.xaxis.set_minor_formatter(NullFormatter())
    model = views[0].row.model if views else "?"
    axes.set_title(f"{_tex(model)}: how much of the FLOPs reduction became speed", loc="left")
    handles = _legend_handles(series, sizes, cmap)
    handles += axes.get_legend_handles_labels()[0]
    axes.legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.9)
    axes.grid(True, which="major", alpha=0.25)
    return _finish(figure, path)


def batch_plot(views: Sequence[CellView], path: Path) -> Path:
    """One model's median latency per batch (ms, top row) and throughput (items/s, bottom
    row) against batch size, one panel per target and precision, one line per variant; both
    axes log. Writes the PNG ``path`` and returns it."""
    pyplot = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows = [v.row for v in views if v.row.median_s is not None]
    panels = list(dict.fromkeys((r.target, r.precision) for r in rows))
    specs = list(dict.fromkeys(r.spec for r in rows))
    sizes = sorted({r.batch_size for r in rows})
    figure, axes = pyplot.subplots(
        2,
        len(panels),
        figsize=(3.6 * len(panels) + 2.2, 6.8),
        sharex=True,
        sharey="row",
        squeeze=False,
        layout="constrained",
    )
    cmap = pyplot.get_cmap("tab10")
    several = len({p for _, p in panels}) > 1
    for col, (target, precision) in enumerate(panels):
        for k, spec in enumerate(specs):
            mine = sorted(
                (r for r in rows if (r.target, r.precision, r.spec) == (target, precision, spec)),
                key=lambda r: r.batch_size,
            )
            bs = [r.batch_size for r in mine]
            style = {
                "color": cmap(k % 10),
                "marker": MARKERS[k % len(MARKERS)],
                "label": _tex(spec),
            }
            axes[0][col].plot(bs, [1e3 * (r.median_s or 0.0) for r in mine], **style)
            axes[1][col].plot(bs, [r.throughput_per_s for r in mine], **style)
        axes[0][col].set_title(target + f" ({precision})" * several)
        axes[1][col].set_xlabel("batch size")
        for ax in (axes[0][col], axes[1][col]):
            ax.set(xscale="log", yscale="log")
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_locator(NullLocator())
            _plain_log(ax.yaxis)
            ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel("median latency per batch (ms)")
    axes[1][0].set_ylabel("throughput (items/s)")
    model = views[0].row.model if views else "?"
    figure.suptitle(f"{_tex(model)}: latency and throughput against batch size")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8, title="variant")
    return _finish(figure, path)


def read_accuracy(path: Path, specs: Sequence[str]) -> dict[str, float]:
    """A JSON object ``{"spec": top-1 accuracy in percent}`` (0 to 100) for specs of the run.

    Raises ConfigError for an unreadable file, a value that is not a number in [0, 100] or a
    spec the run does not hold (naming the valid specs)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--accuracy {str(path)!r} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"--accuracy {str(path)!r} must hold a JSON object {{spec: top-1 %}}, "
            'e.g. {"dense": 69.8, "l1:0.5": 61.2}'
        )
    found = {}
    for spec, value in data.items():
        if spec not in specs:
            raise ConfigError(
                f"--accuracy names spec {spec!r}, which the run does not hold; "
                f"choose from: {', '.join(specs)}"
            )
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not 0.0 <= value <= 100.0:
            raise ConfigError(
                f"--accuracy value {value!r} of {spec!r} is not a top-1 accuracy in percent "
                "(a number from 0 to 100)"
            )
        found[spec] = float(value)
    return found


def accuracy_plot(views: Sequence[CellView], accuracy: Mapping[str, float], path: Path) -> Path:
    """One model's median latency per batch (ms, log, x axis) against the top-1 accuracy
    given for each spec (%, y axis), colour by target, shape by batch size; the specs are
    named on the right axis at their accuracy. Writes the PNG ``path`` and returns it."""
    pyplot = _pyplot()
    from matplotlib.ticker import NullFormatter

    rows = [v.row for v in views if v.row.median_s is not None and v.row.spec in accuracy]
    figure, axes = pyplot.subplots(figsize=(8.5, 5.5), layout="constrained")
    series, sizes, cmap = _style(rows)
    _scatter(
        axes, rows, lambda r: (1e3 * (r.median_s or 0.0), accuracy[r.spec]), series, sizes, cmap
    )
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("median latency per batch (ms)")
    axes.set_ylabel("top-1 accuracy (%, as given)")
    values = sorted({accuracy[r.spec] for r in rows})
    span = (values[-1] - values[0]) if len(values) > 1 else 1.0
    axes.set_ylim(values[0] - 0.08 * span - 0.1, values[-1] + 0.08 * span + 0.1)
    right = axes.secondary_yaxis("right")
    labels = _merge({r.spec: accuracy[r.spec] for r in rows}, 0.035 * span, log=False)
    right.set_yticks([v for v, _ in labels], [_tex(t) for _, t in labels], fontsize=8)
    model = views[0].row.model if views else "?"
    axes.set_title(f"{_tex(model)}: accuracy against latency", loc="left")
    axes.legend(handles=_legend_handles(series, sizes, cmap), loc="best", fontsize=8)
    axes.grid(True, which="major", alpha=0.25)
    return _finish(figure, path)


def write_plots(
    views: Sequence[CellView], directory: Path, accuracy: Mapping[str, float] | None = None
) -> list[Path]:
    """The plots of one model's views into ``directory``: ``speedup-MODEL.png`` when a variant
    has a measured speedup, ``batch-MODEL.png`` when the run has more than one batch size,
    ``accuracy-MODEL.png`` when ``accuracy`` names a measured spec. Returns the paths written.
    The caller checks ``matplotlib_missing`` first."""
    if not views:
        return []
    name = slug(views[0].row.model)
    written = []
    if any(v.row.spec != DENSE and v.row.speedup_measured for v in views):
        written.append(speedup_plot(views, directory / f"speedup-{name}.png"))
    if len({v.row.batch_size for v in views if v.row.median_s is not None}) > 1:
        written.append(batch_plot(views, directory / f"batch-{name}.png"))
    if accuracy and any(v.row.spec in accuracy and v.row.median_s for v in views):
        written.append(accuracy_plot(views, accuracy, directory / f"accuracy-{name}.png"))
    return written

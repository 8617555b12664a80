"""``bench explain``: a variant's gap layer by layer, as rich renderables and a PNG plot.

Renderers return rich objects and print nothing. Times are shown in ms (us below 1 ms) per
inference (one batch), MACs and time as shares of the variant's totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from benchlib.analysis import Row
from benchlib.diagnosis import Explanation, LayerFinding
from benchlib.errors import ConfigError
from benchlib.report.console import Grid
from benchlib.report.plots import slug

LAYER_LEGEND = (
    "Per layer: F = dense MACs / variant nonzero MACs, T = dense time / variant time, eta = "
    "(1 - 1/T) / (1 - 1/F); MACs and time as shares of the variant's totals; lost = variant "
    "time - the time its FLOP count promises (dense time x nonzero MACs / dense MACs; layers "
    "without MACs are expected to shrink like the whole model). Ranked by lost time."
)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.2f} ms"


def _ratio(value: float | None, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def _flops(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.1f} GFLOP/s"


def header(row: Row, explanation: Explanation | None) -> Text:
    """The cell in one block: F, T, eta, how well the profiled layers add up, the roofline."""
    text = Text()
    text.append(
        f"{row.model} {row.spec} on {row.target}, batch {row.batch_size}, {row.precision}\n",
        style="bold",
    )
    text.append(
        f"F = {_ratio(row.speedup_theoretical)} (dense MACs / nonzero MACs), "
        f"T = {_ratio(row.speedup_measured)} measured, eta = {_ratio(row.realization, '')}; "
        f"median {_ms(row.median_s)}\n"
    )
    share = "n/a" if row.roofline_share is None else f"{row.roofline_share:.1%}"
    peak = f" of the {row.peak_device} peak" if row.peak_device else " (device not in the table)"
    text.append(f"achieved {_flops(row.achieved_flops_per_s)}; roofline share {share}{peak}\n")
    if explanation is not None:
        text.append(
            f"profiled layers ({explanation.clock}) add up to {coverage_text(explanation)}\n"
        )
        expected = sum(f.expected_s for f in explanation.layers)
        lost = explanation.variant_total_s - expected
        promised = explanation.dense_total_s / expected if expected > 0 else None
        text.append(
            f"if every layer kept its FLOPs promise: {_ms(expected)} (T {_ratio(promised)}); "
            f"lost {_ms(lost)}"
        )
        held = explanation.held_back
        if held:
            names = ", ".join(f"{f.name} ({_ms(f.lost_s)})" for f in held)
            text.append(f", most in: {names}")
    return text


def coverage_text(explanation: Explanation) -> str:
    """How well the profiled layers add up to the end-to-end latency, in one clause: against
    the unprofiled inferences interleaved with the profiled ones (when the profile has them) and
    against the cell's median, for the variant and its dense baseline."""
    e = explanation
    total = _ms(e.variant_total_s)
    if e.variant_unprofiled_s:
        dense = f"{_ms(e.dense_total_s)} against {_ms(e.dense_unprofiled_s)}"
        return (
            f"{total} = {_ratio(e.coverage, '')} x the {_ms(e.variant_unprofiled_s)} of "
            f"unprofiled inferences interleaved with the profiled ones (dense: {dense}); "
            f"{_ratio(e.median_coverage, '')} x the cell's median"
        )
    dense = f"{_ms(e.dense_total_s)} against {_ms(e.dense_median_s)}"
    return f"{total} = {_ratio(e.coverage, '')} x the measured median (dense: {dense})"


def layer_table(explanation: Explanation, top: int = 15) -> Table:
    """The ``top`` layers by lost time, with F_l, times, T_l, eta_l, shares and tags."""
    ranked = sorted(explanation.layers, key=lambda f: -f.lost_s)[:top]
    table = Table(
        title=f"Layers by lost time (top {len(ranked)} of {len(explanation.layers)})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("Layer", no_wrap=True)
    for name in ("F", "dense", "variant", "T", "eta", "MACs", "time", "lost"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("Why", overflow="fold", ratio=1, min_width=24)
    for f in ranked:
        table.add_row(*_cells(f))
    return table


def layer_grid(explanation: Explanation, top: int = 8) -> Grid:
    """The ``top`` layers by lost time as a ``Grid`` (the report.md table)."""
    ranked = sorted(explanation.layers, key=lambda f: -f.lost_s)[:top]
    headers = ("Layer", "F", "dense", "variant", "T", "eta", "MACs", "time", "lost", "Why")
    key = explanation.key
    return Grid(
        title=(
            f"{key.spec} on {key.target}, batch {key.batch_size}, {key.precision}: "
            f"layers by lost time (top {len(ranked)} of {len(explanation.layers)})"
        ),
        headers=headers,
        right=(False, *([True] * 8), False),
        rows=tuple(_cells(f) for f in ranked),
    )


def layers_plot_name(explanation: Explanation) -> str:
    """The file name of a cell's per-layer plot in its run folder."""
    key = explanation.key
    return (
        slug(f"layers-{key.model}-{key.spec}-{key.target}-bs{key.batch_size}-{key.precision}")
        + ".png"
    )


def _cells(f: LayerFinding) -> tuple[Text, ...]:
    lost = Text(_ms(f.lost_s), style="bold" if f.lost_s > 0 else "dim")
    return (
        Text(f.name),
        Text(_ratio(f.flops_ratio)),
        Text(_ms(f.dense_s)),
        Text(_ms(f.variant_s)),
        Text(_ratio(f.speedup)),
        Text(_ratio(f.realization, "")),
        Text(f"{f.mac_share:.1%}"),
        Text(f"{f.time_share:.1%}"),
        lost,
        Text("; ".join(f.tags), style="yellow"),
    )


def explain_view(
    row: Row,
    explanation: Explanation | None,
    notes: Sequence[str] = (),
    *,
    top: int = 15,
    profiled: Sequence[str] = (),
) -> Group:
    """Everything ``bench explain`` prints: the header, the diagnosis (cell-level findings
    and ``notes``), the layer table. Without an explanation (a target that is not profiled),
    the cell-level part and which targets of the run have profiles."""
    parts: list[RenderableType] = [header(row, explanation)]
    findings = [*(explanation.findings if explanation else ()), *notes]
    if findings:
        parts.append(Text("Diagnosis:", style="bold"))
        parts.extend(Text(f"- {line}") for line in findings)
    if explanation is None:
        where = ", ".join(profiled) if profiled else "none"
        parts.append(
            Text(
                f"no per-layer profile for {row.target} (layers are profiled on targets that "
                f"run the module as written; profiled in this run: {where})",
                style="dim",
            )
        )
        return Group(*parts)
    parts.append(layer_table(explanation, top))
    parts.append(Text(LAYER_LEGEND, style="dim"))
    return Group(*parts)


def plot_layers(explanation: Explanation, path: Path, *, label: int = 5) -> Path:
    """Write a PNG: each layer's share of MACs (x) against its share of time (y), dense and
    variant, the diagonal where time follows FLOPs, the ``label`` layers that lost most named.

    Raises ConfigError when ``path`` cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_macs = sum(f.dense_macs for f in explanation.layers) or 1
    dense_time = explanation.dense_total_s or 1.0
    figure, axes = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    try:
        axes.scatter(
            [100 * f.dense_macs / dense_macs for f in explanation.layers],
            [100 * f.dense_s / dense_time for f in explanation.layers],
            marker="o",
            facecolors="none",
            edgecolors="tab:blue",
            label="dense",
        )
        axes.scatter(
            [100 * f.mac_share for f in explanation.layers],
            [100 * f.time_share for f in explanation.layers],
            marker="x",
            color="tab:red",
            label=explanation.key.spec,
        )
        top = max(
            [100 * f.time_share for f in explanation.layers]
            + [100 * f.mac_share for f in explanation.layers]
            + [1.0]
        )
        axes.plot([0, top], [0, top], color="grey", linestyle="--", label="time share = MACs share")
        for f in explanation.held_back[:label]:
            axes.annotate(
                f.name,
                (100 * f.mac_share, 100 * f.time_share),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
        key = explanation.key
        axes.set_title(f"{key.model} {key.spec}, {key.target} bs{key.batch_size} {key.precision}")
        axes.set_xlabel("share of the model's MACs (%)")
        axes.set_ylabel(f"share of the model's time (%, {explanation.clock})")
        # below the axes: inside, it hides memory-bound layers (upper left) or unpruned ones
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3, fontsize=8)
        figure.tight_layout()
        try:
            figure.savefig(path, format="png")
        except OSError as exc:
            raise ConfigError(f"cannot write the plot to {str(path)!r}: {exc}") from exc
    finally:
        plt.close(figure)
    return path

"""``report.md``: a run folder's report as Markdown, with its PNG plots beside it.

The same tables as the console report (``benchlib.report.console`` builds them as ``Grid``
objects), plus the environment fingerprint, the legend and links to the plots. Everything is
derived from the run folder's ``run.json`` and ``results.jsonl``: statistics from the raw
samples, never from ``summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.diagnosis import Explanation, explain_run
from benchlib.errors import ConfigError
from benchlib.report.console import (
    LEGEND,
    MATRIX_NOTE,
    CellView,
    Grid,
    by_model,
    cell_views,
    detail_grids,
    failures_grid,
    matrix_grids,
    suspects_grid,
    variants_grid,
)
from benchlib.report.kernels import kernels_grid
from benchlib.report.layers import (
    LAYER_LEGEND,
    coverage_text,
    layer_grid,
    layers_plot_name,
    plot_layers,
)
from benchlib.report.plots import matplotlib_missing, read_accuracy, write_plots
from benchlib.results import RESULTS_FILE, RUN_FILE, CellRecord, latest_records

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class RunData:
    """A run folder as read: ``run.json`` as a mapping and the latest record of each cell."""

    directory: Path
    run: Mapping[str, Any]
    records: tuple[CellRecord, ...]


def load_run(directory: Path) -> RunData:
    """Read a run folder. A folder with run.json and no results.jsonl yet is a run that has
    no finished cell. Raises ConfigError naming what is missing or unreadable."""
    if not directory.is_dir():
        raise ConfigError(
            f"{str(directory)!r} is not a folder; give a run folder (it holds {RUN_FILE} "
            f"and {RESULTS_FILE}, as bench run writes them)"
        )
    missing = [name for name in (RUN_FILE, RESULTS_FILE) if not (directory / name).is_file()]
    if RUN_FILE in missing:
        raise ConfigError(
            f"{str(directory)!r} is not a run folder: missing {' and '.join(missing)} "
            f"(a run folder holds {RUN_FILE} and {RESULTS_FILE})"
        )
    try:
        run = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(directory / RUN_FILE)!r} is not valid JSON: {exc}") from exc
    if not isinstance(run, Mapping):
        raise ConfigError(f"{str(directory / RUN_FILE)!r} does not hold a JSON object")
    return RunData(directory, run, latest_records(directory / RESULTS_FILE))


def _environment(data: RunData) -> Mapping[str, Any] | None:
    environment = data.run.get("environment")
    return environment if isinstance(environment, Mapping) else None


def _get(data: Any, *path: str) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def environment_facts(data: RunData) -> list[tuple[str, str]]:
    """(label, value) lines of the run's suite and environment fingerprint."""
    run, env = data.run, _get(data.run, "environment") or {}
    facts = [("Run", f"{data.directory.name} (suite {_get(run, 'suite', 'name') or '?'})")]
    cpu = _get(env, "cpu") or {}
    facts.append(
        (
            "CPU",
            f"{cpu.get('model', '?')}, {cpu.get('logical_cores', '?')} logical cores, "
            f"{cpu.get('threads', '?')} threads, governor {cpu.get('governor') or 'n/a'}",
        )
    )
    nvml = next((r.gpu_before for r in data.records if r.gpu_before), None)
    gpus = ", ".join(_get(env, "gpus") or []) or "none"
    if nvml:
        gpus += (
            f" (driver {nvml.get('driver', '?')}, max SM clock {nvml.get('max_sm_clock_mhz', '?')}"
            f" MHz, power limit {nvml.get('power_limit_w', '?')} W)"
        )
    facts.append(("GPU", gpus))
    versions = _get(env, "versions") or {}
    facts.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    facts.append(("Platform", f"{env.get('platform', '?')}; git {env.get('git_sha') or '?'}"))
    timing = _get(run, "suite", "timing") or {}
    if timing:
        facts.append(
            (
                "Timing",
                f"warm-up {timing.get('warmup_runs')} runs and {timing.get('warmup_s')} s; "
                f"at least {timing.get('min_samples')} samples and {timing.get('min_time_s')} s "
                f"per cell, at most {timing.get('max_samples')} samples or "
                f"{timing.get('max_time_s')} s",
            )
        )
    statuses = [r.status.value for r in data.records if not r.key.repeat]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    again = len(data.records) - len(statuses)
    facts.append(
        (
            "Cells",
            f"{len(statuses)} ({counts or 'none yet'}) and {again} repeated dense measurements "
            f"of {run.get('planned_cells', '?')} planned; started {run.get('started_at', '?')}",
        )
    )
    return facts


def _cell(text: str) -> str:
    for char in "\\|*`":  # spec options hold globs (ignore=layer4.*) that Markdown would read
        text = text.replace(char, "\\" + char)
    return text.replace("\n", ", ")


def grid_markdown(grid: Grid) -> str:
    """A grid as a Markdown pipe table, its title in bold above it."""
    lines = [f"**{_cell(grid.title)}**", ""] if grid.title else []
    lines.append("| " + " | ".join(_cell(h).replace(", ", " ") for h in grid.headers) + " |")
    lines.append("|" + "|".join("---:" if right else "---" for right in grid.right) + "|")
    lines += ["| " + " | ".join(_cell(c.plain) for c in row) + " |" for row in grid.rows]
    return "\n".join(lines) + "\n"


def _model_section(
    model: str,
    views: Sequence[CellView],
    plots: Sequence[Path],
    explained: Sequence[Explanation] = (),
) -> list[str]:
    layer_plots = {layers_plot_name(e) for e in explained}
    parts = [f"## {model}\n"]
    parts.append(
        grid_markdown(variants_grid("Variants (per image: nonzero / all)", [v.row for v in views]))
    )
    parts += [grid_markdown(grid) for grid in matrix_grids(views, width=None)]
    parts += [f"![{path.stem}]({path.name})\n" for path in plots if path.name not in layer_plots]
    parts += [grid_markdown(grid) for grid in detail_grids(views)]
    if (ran := kernels_grid(views)) is not None:
        parts.append(grid_markdown(ran))
    if explained:
        parts += _layers_section(explained, {p.name for p in plots} & layer_plots)
    return parts


def _layers_section(explained: Sequence[Explanation], plotted: set[str]) -> list[str]:
    """Why not more, per profiled variant cell: the findings, the layers that lost the most
    time against their FLOP count, and the per-layer plot (``bench explain`` has it all)."""
    parts = ["### Why not more: per-layer profile\n"]
    for explanation in explained:
        key = explanation.key
        parts.append(
            f"**{_cell(key.spec)}** on {key.target}, batch {key.batch_size}: the profiled "
            f"layers ({explanation.clock}) add up to {coverage_text(explanation)}.\n"
        )
        parts += [f"- {_cell(line)}" for line in explanation.findings]
        if explanation.findings:
            parts.append("")
        parts.append(grid_markdown(layer_grid(explanation)))
        name = layers_plot_name(explanation)
        if name in plotted:
            parts.append(f"![{Path(name).stem}]({name})\n")
    parts.append(f"{LAYER_LEGEND}\n")
    return parts


def render_markdown(
    data: RunData,
    plots: Mapping[str, Sequence[Path]] | None = None,
    note: str | None = None,
    views: Sequence[CellView] | None = None,
    explained: Sequence[Explanation] = (),
) -> str:
    """The report of ``data`` as Markdown: environment, per model the variants, the matrix,
    the embedded ``plots`` (model -> PNG paths beside report.md), the detail tables per
    target and what the sparse-kernel cells ran (``benchlib.report.kernels``); then the
    suspect cells, the cells without a result and the legend. ``note`` is one line added
    under the environment (e.g. why there are no plots); ``views`` are
    ``cell_views(data.records)`` when the caller has them already; ``explained`` the
    per-layer explanations of profiled cells (``benchlib.diagnosis.explain_run``), shown per
    model after its detail tables."""
    views = cell_views(data.records, _environment(data)) if views is None else views
    parts = [f"# Benchmark report: {data.directory.name}\n"]
    description = _get(data.run, "suite", "description")
    if description:
        parts.append(f"{description}\n")
    parts.append(grid_markdown(_facts_grid(environment_facts(data))))
    if note:
        parts.append(f"{note}\n")
    for model, mine in by_model(views).items():
        own = [e for e in explained if e.key.model == model]
        parts += _model_section(model, mine, (plots or {}).get(model, ()), own)
    for extra in (suspects_grid(views), failures_grid(v.row for v in views)):
        if extra is not None:
            parts.append(grid_markdown(extra))
    parts.append(f"## Legend\n\n{LEGEND} {MATRIX_NOTE}\n")
    return "\n".join(parts)


def _facts_grid(facts: Sequence[tuple[str, str]]) -> Grid:
    from rich.text import Text

    rows = tuple((Text(label), Text(value)) for label, value in facts)
    return Grid("Environment", ("Item", "Value"), (False, False), rows)


def write_report(
    run_dir: Path, *, plots: bool = True, accuracy_file: Path | None = None
) -> list[Path]:
    """(Re)write ``report.md`` and the PNG plots into the run folder ``run_dir`` from its
    ``run.json`` and ``results.jsonl``; return the paths written, report.md first.

    ``accuracy_file`` is a JSON object {spec: top-1 %} for the accuracy plot. Without
    matplotlib (or with ``plots=False``) no PNG is written and report.md says why. Raises
    ConfigError for a folder that is not a run or a bad accuracy file."""
    data = load_run(run_dir)
    views = cell_views(data.records, _environment(data))
    specs = list(dict.fromkeys(v.row.spec for v in views))
    accuracy = read_accuracy(accuracy_file, specs) if accuracy_file is not None else None
    missing = matplotlib_missing() if plots else "not requested"
    explained = explain_run(data.records)
    written: dict[str, list[Path]] = {}
    if missing is None:
        for model, mine in by_model(views).items():
            written[model] = write_plots(mine, run_dir, accuracy)
        for explanation in explained:
            path = plot_layers(explanation, run_dir / layers_plot_name(explanation))
            written.setdefault(explanation.key.model, []).append(path)
    note = f"No plots: {missing}." if missing else None
    report = run_dir / REPORT_FILE
    text = render_markdown(data, written, note, views, explained)
    report.write_text(text, encoding="utf-8")
    return [report, *(path for paths in written.values() for path in paths)]

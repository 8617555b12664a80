"""The ``bench`` command: parse, call the library, render, map errors to exit codes.

Exit codes: 0 success; 1 a benchmark error (export, pruning, worker); 2 bad input (an unknown
name, a value out of range, a missing or corrupt file, a target that cannot run here);
130 interrupted (finished cells are kept in the run folder).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchlib.archive import archive_metadata, save_pruned
from benchlib.catalog import describe_zoo
from benchlib.cli_common import INPUT_SIZE, OUT_ROOT, TRUST, WEIGHTS, handle_errors, si_count
from benchlib.cli_compare import compare
from benchlib.cli_explain import explain_command
from benchlib.cli_lottery import lmc, lottery
from benchlib.cli_report import report
from benchlib.errors import ConfigError, TargetUnavailable
from benchlib.flops import FlopReport
from benchlib.harness.runner import plan, resume_run, run_suite
from benchlib.loading import load_model
from benchlib.pruning import PruneSpec, Variant, parse_spec, prune, resolve, split_specs
from benchlib.pruning.scoring import DATA_CRITERIA
from benchlib.report.console import TargetEntry, models_table, render_summary, targets_table
from benchlib.report.markdown import write_report
from benchlib.results import CellKey, CellRecord, Status
from benchlib.suite import Suite, load_suite
from benchlib.target import Configurable, TargetRegistry, target_version

EXIT_INTERRUPTED = 130


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _batch_sizes(text: str | None) -> tuple[int, ...] | None:
    parts = _split(text)
    if parts is None:
        return None
    sizes = []
    for part in parts:
        try:
            sizes.append(int(part))
        except ValueError:
            raise ConfigError(f"batch size {part!r} is not a positive integer") from None
    return tuple(sizes)


class _ProgressObserver:
    """Draws the run's progress bar, started only once the run has passed validation (so
    that a bad-input error is the only thing printed); one line per failed cell."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task("starting", total=None)
        self._started = False

    def planned(self, total_cells: int) -> None:
        self._progress.update(self._task, total=total_cells)
        self._progress.start()
        self._started = True

    def started(self, key: CellKey) -> None:
        self._progress.update(self._task, description=escape(key.label()))

    def finished(self, record: CellRecord) -> None:
        if record.status is Status.FAILED:
            self._progress.console.print(
                f"[red]failed[/red] {escape(record.key.label())}: {escape(record.reason)}"
            )
        self._progress.advance(self._task)

    def close(self) -> None:
        if self._started:  # stopping a bar that never started still prints a newline
            self._progress.stop()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="benchlib")
def bench(verbose: bool) -> None:
    """Benchmark pruned neural networks: FLOPs against measured latency, per target."""


@bench.command()
@click.option(
    "--suite",
    "suite_name",
    default="quick",
    show_default=True,
    help="A suite name (benchmarks/suites/NAME.toml) or a path to a TOML file.",
)
@click.option("--models", help="Comma-separated zoo names, model files or module:function.")
@click.option("--prune", "specs", help="Comma-separated pruning specs, e.g. dense,magnitude:0.9.")
@click.option("--targets", help="Comma-separated target names or the selectors cpu, gpu.")
@click.option("--batch-sizes", help="Comma-separated batch sizes, e.g. 1,8.")
@click.option("--precision", "precisions", help="Comma-separated precisions: fp32, fp16, bf16.")
@click.option("--threads", type=int, help="CPU threads (default: the cores available).")
@INPUT_SIZE
@WEIGHTS
@TRUST
@click.option("--cell-timeout", type=float, help="Time limit of one cell's worker, in seconds.")
@click.option(
    "--profile-layers",
    is_flag=True,
    help="Also time each layer of eager cells with torch.profiler (see bench explain).",
)
@OUT_ROOT
@click.option(
    "--resume",
    type=click.Path(file_okay=False, path_type=Path),
    help="Finish the run in this run folder: skip its finished cells, run the rest.",
)
@click.option("--retry-failed", is_flag=True, help="With --resume: run failed cells again.")
@click.option(
    "--isolation/--no-isolation",
    default=True,
    show_default=True,
    help="One fresh worker process per cell; --no-isolation runs cells in this process.",
)
@handle_errors
def run(
    suite_name: str,
    out_root: Path,
    resume: Path | None,
    retry_failed: bool,
    isolation: bool,
    **options: Any,
) -> None:
    """Run a suite (default: quick) and print FLOPs against measured latency."""
    console = Console()
    registry = TargetRegistry.from_entry_points()
    given = {k: v for k, v in options.items() if v not in (None, False)}
    if resume is not None and (given or suite_name != "quick"):
        extra = next(iter(given), "suite").replace("_", "-")
        raise ConfigError(f"--resume takes the suite from {resume}; drop --{extra}")
    observer = _ProgressObserver(console)
    try:
        if resume is not None:
            result = resume_run(
                resume,
                registry=registry,
                observer=observer,
                retry_failed=retry_failed,
                isolate=isolation,
            )
        else:
            planned = plan(_suite(suite_name, **options), registry)
            result = run_suite(
                planned, registry=registry, out_root=out_root, observer=observer, isolate=isolation
            )
    finally:
        observer.close()
    for line in _skipped_lines(result.selection.skipped):
        console.print(f"[yellow]skipped[/yellow] {escape(line)}")
    console.print(render_summary(result.rows))
    for line in _synthetic_lines(result.records):
        console.print(f"[bold yellow]warning[/bold yellow] {escape(line)}", soft_wrap=True)
    for path in write_report(result.directory):
        console.print(f"wrote {escape(str(path))}", soft_wrap=True)
    console.print(f"Run folder: {result.directory}")
    if result.interrupted:
        console.print(
            f"[yellow]interrupted[/yellow]: finished cells are kept; "
            f"bench run --resume {result.directory} finishes the run"
        )
        sys.exit(EXIT_INTERRUPTED)


def _suite(
    suite_name: str,
    *,
    models: str | None,
    specs: str | None,
    targets: str | None,
    batch_sizes: str | None,
    precisions: str | None,
    threads: int | None,
    input_size: int | None,
    weights: Path | None,
    trust: bool,
    cell_timeout: float | None,
    profile_layers: bool,
) -> Suite:
    """The named suite with the command line's overrides applied (and validated)."""
    overrides: dict[str, Any] = {
        "models": _split(models),
        "specs": tuple(split_specs(specs)) if specs is not None else None,
        "targets": _split(targets),
        "batch_sizes": _batch_sizes(batch_sizes),
        "precisions": _split(precisions),
        "threads": threads,
        "input_size": input_size,
        "weights": str(weights) if weights is not None else None,
        "cell_timeout_s": cell_timeout,
        "trust": trust or None,
        "profile_layers": profile_layers or None,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    suite = load_suite(suite_name)
    if changes:  # the suite's own description no longer says what this run measures
        given = ", ".join(f"{name}={_shown(value)}" for name, value in changes.items())
        changes["description"] = f"the {suite.name} suite with {given} from the command line"
    return dataclasses.replace(suite, **changes)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _skipped_lines(skipped: Mapping[str, str]) -> list[str]:
    """One line per distinct reason: 'torch-eager-cuda, torchscript-cuda: no CUDA device'."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    return [f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()]


def _synthetic_lines(records: Sequence[CellRecord]) -> list[str]:
    """One line per measured variant whose channels were ranked on synthetic (random)
    images: a spec of a data-driven method without ``data=`` or with ``data=synthetic``, or a
    model file that ``bench prune`` wrote from such a spec."""
    lines: list[str] = []
    for spec in dict.fromkeys(r.key.spec for r in records if r.status is Status.OK):
        if _synthetic_spec(spec):
            lines.append(
                f"{spec}: pruned with SYNTHETIC calibration data (random images, not a "
                "dataset); give it data=digits or data=FOLDER"
            )
    for model in dict.fromkeys(r.key.model for r in records):
        meta = archive_metadata(model) if Path(model).is_file() else None
        if meta is not None and meta.get("synthetic") is True:
            lines.append(
                f"{model}: pruned by {meta.get('spec', '?')} with SYNTHETIC calibration data "
                "(random images, not a dataset)"
            )
    return lines


def _synthetic_spec(text: str) -> bool:
    try:
        spec = parse_spec(text)
    except ConfigError:
        return False
    return spec.method in DATA_CRITERIA and spec.options.get("data", "synthetic") == "synthetic"


@bench.command(name="prune")
@click.argument("model_ref", metavar="MODEL")
@click.option(
    "--spec", required=True, help="The pruning spec, e.g. l1:0.5 or fpgm:0.4[round_to=8]."
)
@click.option(
    "--data",
    help="Calibration data of hrank/taylor: digits, synthetic, or an ImageFolder/CIFAR folder.",
)
@INPUT_SIZE
@WEIGHTS
@TRUST
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The TorchScript archive to write; the recipe goes beside it as NAME.recipe.json.",
)
@handle_errors
def prune_command(
    model_ref: str,
    spec: str,
    data: str | None,
    input_size: int | None,
    weights: Path | None,
    trust: bool,
    out_path: Path,
) -> None:
    """Prune MODEL (a zoo name, a model file or module:function) by --spec and save it.

    Writes a TorchScript archive (traced, checked against eager) that `bench run --models
    FILE` benchmarks, and the recipe that replays the pruning on the dense weights.
    """
    console = Console(highlight=False, soft_wrap=True)  # one line per line, greppable
    if out_path.is_dir():  # checked by save_pruned too, but only after the pruning
        raise ConfigError(f"--out {str(out_path)!r} is a folder; give a file name, e.g. model.pt")
    parsed, _ = resolve(spec)  # the spec is checked before the model is built
    if data is not None:
        parsed, _ = resolve(_with_data(parsed, data))
    model = load_model(model_ref, input_size=input_size, weights=weights, trust=trust)
    with console.status(f"pruning {escape(model.name)} by {escape(str(parsed))}"):
        variant = prune(model, parsed)
        archive, recipe = save_pruned(variant, out_path)
    dense = variant.dense_flops or variant.flops  # None for the dense spec: nothing changed
    for line in _prune_lines(variant, dense, archive, recipe):
        console.print(escape(line))
    if variant.recipe.details.get("synthetic") is True:
        console.print(
            "[bold yellow]WARNING[/bold yellow]: SYNTHETIC calibration data: "
            f"{escape(variant.spec.method)} ranked the channels on random images, not a "
            "dataset; pass --data digits or --data FOLDER"
        )


def _with_data(spec: PruneSpec, data: str) -> PruneSpec:
    """``spec`` with its ``data=`` option set from ``--data``."""
    if spec.method not in DATA_CRITERIA:
        raise ConfigError(
            f"--data applies only to the methods that rank on data "
            f"({', '.join(sorted(DATA_CRITERIA))}); spec {str(spec)!r} uses {spec.method!r}"
        )
    given = spec.options.get("data")
    if given is not None and given != data:
        raise ConfigError(
            f"spec {str(spec)!r} sets data={given} and --data says {data!r}; give only one"
        )
    if not data or any(c in data for c in ",[]"):
        raise ConfigError(
            f"--data {data!r} cannot go into a spec (empty, or holds ',', '[' or ']'); "
            "use digits, synthetic or a folder path without those characters"
        )
    return dataclasses.replace(spec, options={**spec.options, "data": data})


def _prune_lines(variant: Variant, dense: FlopReport, archive: Path, recipe: Path) -> list[str]:
    """The summary of ``bench prune``: what changed, the counts before and after, the files."""
    after = variant.flops
    details = variant.recipe.details
    lines = [f"pruned {variant.model.name} by {variant.spec}"]
    kept, sizes = details.get("kept"), details.get("sizes")
    if isinstance(kept, Mapping) and isinstance(sizes, Mapping):
        cut = sum(1 for key, idx in kept.items() if len(idx) < int(sizes.get(key, 0)))
        lines.append(
            f"  channel groups cut: {cut} of {len(kept)} ({details.get('allocation', '?')} "
            f"allocation); layers changed: {len(variant.recipe.layers)}"
        )
    else:
        lines.append(f"  layers changed: {len(variant.recipe.layers)}")
    lines.append(f"  MACs per image:  {_change(dense.macs, after.macs)}")
    lines.append(f"  params:          {_change(dense.params, after.params)}")
    if after.nonzero_macs != after.macs:  # zeros in the weights: masks were baked in
        lines.append(f"  nonzero MACs:    {_change(dense.nonzero_macs, after.nonzero_macs)}")
        lines.append(f"  nonzero params:  {_change(dense.nonzero_params, after.nonzero_params)}")
    if "data" in details:
        images = details.get("calibration_images")
        lines.append(
            f"  calibration data: {details['data']}" + (f", {images} images" if images else "")
        )
    shape = "x".join(str(d) for d in variant.model.input_shape)
    lines.append(f"  wrote {archive} (TorchScript, input {shape})")
    lines.append(f"  wrote {recipe} (recipe)")
    lines.append(f"  benchmark it: bench run --models {archive} --prune dense")
    return lines


def _change(before: int, after: int) -> str:
    """``40.6 M -> 10.3 M (-74.6%)``."""
    change = 100.0 * (after - before) / before if before else 0.0
    return f"{si_count(before)} -> {si_count(after)} ({change:+.1f}%)"


@bench.command()
@handle_errors
def targets() -> None:
    """List every registered target, its device kind, and why it cannot run here."""
    registry = TargetRegistry.from_entry_points()
    rows: list[TargetEntry] = []
    for name in registry.names():
        try:
            target = registry.get(name)
        except TargetUnavailable as exc:
            rows.append(TargetEntry(name, "?", "?", None, exc.reason))
            continue
        rows.append(
            TargetEntry(
                name=name,
                device=target.device_kind.value,
                precisions=", ".join(sorted(p.value for p in target.precisions)),
                version=target_version(target),
                reason=target.unavailable_reason(),
                sparse=target.exploits_sparsity,
                options=dict(target.options) if isinstance(target, Configurable) else {},
            )
        )
    Console().print(targets_table(rows))


@bench.command()
@handle_errors
def models() -> None:
    """List the model zoo with input size, parameters and GMACs per image."""
    console = Console()
    with console.status("counting every zoo model on the meta device"):
        entries = describe_zoo()
    console.print(models_table(entries))


bench.add_command(lottery)
bench.add_command(lmc)
bench.add_command(report)
bench.add_command(compare)
bench.add_command(explain_command, name="explain")


def main() -> None:
    """Console-script entry point."""
    bench(prog_name="bench")

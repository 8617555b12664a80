"""The runner: a suite in, a run folder out, one cell at a time, nothing finished ever lost.

Order of work: validate everything the user typed (targets, models, specs) before the run
folder exists; write ``run.json``; build each model once with its dense baseline and variants;
run every cell (a baseline and its variants back to back) and append its record to
``results.jsonl`` at once; write ``summary.json``.
A failing cell is recorded and the run goes on; Ctrl-C stops after writing the summary of
what finished, and the result says it was interrupted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from benchlib.analysis import Row, summarize_records
from benchlib.errors import BenchError, ConfigError
from benchlib.harness.cell import run_cell
from benchlib.harness.environment import apply_threads, fingerprint
from benchlib.harness.timing import Clock
from benchlib.loading import load_model
from benchlib.models import Model
from benchlib.pruning import Variant, prune
from benchlib.results import (
    RESULTS_FILE,
    RUN_FILE,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    CellKey,
    CellRecord,
    Status,
    append_record,
    write_json,
)
from benchlib.suite import Suite
from benchlib.target import Selection, TargetRegistry


class Observer(Protocol):
    """Receives progress; the CLI draws a progress bar from it. All methods return quickly."""

    def planned(self, total_cells: int) -> None: ...
    def started(self, key: CellKey) -> None: ...
    def finished(self, record: CellRecord) -> None: ...


class _Silent:
    def planned(self, total_cells: int) -> None:
        return None

    def started(self, key: CellKey) -> None:
        return None

    def finished(self, record: CellRecord) -> None:
        return None


@dataclass(frozen=True)
class RunResult:
    """Where a run was written and what it holds: the records and their summary rows."""

    directory: Path
    records: tuple[CellRecord, ...]
    rows: tuple[Row, ...]
    selection: Selection
    interrupted: bool


def new_run_dir(root: Path, suite_name: str, now: dt.datetime) -> Path:
    """Create ``root/<YYYYmmdd-HHMMSS>-<suite>``, suffixed ``-2``, ``-3``... if taken.

    Raises ConfigError when ``root`` cannot hold it (not a folder, no permission).
    """
    stem = f"{now:%Y%m%d-%H%M%S}-{suite_name}"
    for n in range(1, 1000):
        candidate = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"cannot create a run folder under --out {str(root)!r}: {exc}"
            ) from exc
        return candidate
    raise ConfigError(f"too many runs named {stem!r} under {str(root)!r}")


@dataclass(frozen=True)
class Plan:
    """A validated suite: targets selected, models loaded. Nothing has been written yet."""

    suite: Suite
    selection: Selection
    models: tuple[Model, ...]

    @property
    def total_cells(self) -> int:
        suite = self.suite
        return (
            len(self.models)
            * len(suite.variant_specs)
            * len(self.selection.targets)
            * len(suite.batch_sizes)
            * len(suite.precisions)
        )


def plan(suite: Suite, registry: TargetRegistry) -> Plan:
    """Check everything the user typed (targets, models; specs were checked by Suite).

    Raises ConfigError, ModelLoadError or TargetUnavailable before any file is written.
    """
    selection = registry.select(suite.targets)
    models = tuple(
        load_model(ref, input_size=suite.input_size, weights=suite.weights, trust=suite.trust)
        for ref in suite.models
    )
    return Plan(suite, selection, models)


def run_suite(
    suite: Suite | Plan,
    *,
    registry: TargetRegistry,
    out_root: Path = Path("reports"),
    observer: Observer | None = None,
    clock: Clock = time.perf_counter_ns,
) -> RunResult:
    """Run every cell of ``suite`` (or of an already made ``plan``) into a new run folder.

    Bad input raises (ConfigError and friends) before the run folder exists. Afterwards no
    cell can end the run: failures are records. Ctrl-C stops it with ``interrupted=True``.
    """
    observer = observer or _Silent()
    planned = suite if isinstance(suite, Plan) else plan(suite, registry)
    directory = new_run_dir(out_root, planned.suite.name, dt.datetime.now())
    previous_threads = torch.get_num_threads()
    try:
        return _run(planned, directory, registry, observer, clock)
    finally:  # the caller's process is left as it was
        torch.set_num_threads(previous_threads)


def _run(
    planned: Plan, directory: Path, registry: TargetRegistry, observer: Observer, clock: Clock
) -> RunResult:
    suite, selection = planned.suite, planned.selection
    threads = apply_threads(suite.threads)
    write_json(
        directory / RUN_FILE,
        {
            "schema_version": SCHEMA_VERSION,
            "suite": {**asdict(suite), "timing": asdict(suite.timing)},
            "targets": list(selection.targets),
            "skipped_targets": dict(selection.skipped),
            "planned_cells": planned.total_cells,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "environment": fingerprint(threads),
        },
    )
    observer.planned(planned.total_cells)
    records: list[CellRecord] = []
    interrupted = False
    try:
        for model in planned.models:
            for record in _model_records(
                suite, model, selection, registry, threads, observer, clock
            ):
                append_record(directory / RESULTS_FILE, record)
                records.append(record)
                observer.finished(record)
    except KeyboardInterrupt:
        interrupted = True
    rows = tuple(summarize_records(records))
    write_json(directory / SUMMARY_FILE, [row.to_dict() for row in rows])
    return RunResult(directory, tuple(records), rows, selection, interrupted)


def _model_records(
    suite: Suite,
    model: Model,
    selection: Selection,
    registry: TargetRegistry,
    threads: int,
    observer: Observer,
    clock: Clock,
) -> Iterator[CellRecord]:
    """Every cell of one model. All variants are built first, then for each target, batch
    size and precision the dense baseline and its variants run back to back, so that drift
    of the machine (heat, background load) does not fall between the two sides of a speedup.
    A variant whose pruning fails has all its cells failed; the others go on."""
    variants: dict[str, Variant | CellRecord] = {}
    for spec in suite.variant_specs:
        try:
            variants[spec] = prune(model, spec)
        except Exception as exc:  # a pruner that crashes fails its cells, not the run
            crashed = not isinstance(exc, BenchError)
            variants[spec] = CellRecord(
                key=CellKey(model=model.name, spec=spec, target="", batch_size=0, precision=""),
                status=Status.FAILED,
                reason=f"{'crashed: ' if crashed else ''}{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc() if crashed else "",
                threads=threads,
            )
    for target in selection.targets:
        for batch_size in suite.batch_sizes:
            for precision in suite.precisions:
                for spec, built in variants.items():
                    key = CellKey(
                        model=model.name,
                        spec=spec,
                        target=target,
                        batch_size=batch_size,
                        precision=precision,
                    )
                    observer.started(key)
                    if isinstance(built, CellRecord):
                        yield dataclasses.replace(built, key=key)
                        continue
                    yield run_cell(
                        built,
                        registry.get(target),
                        key,
                        timing=suite.timing,
                        threads=threads,
                        clock=clock,
                    )

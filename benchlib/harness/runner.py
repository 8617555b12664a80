"""The runner: a suite in, a run folder out, one cell at a time, nothing finished ever lost.

Order of work: validate everything the user typed (targets, models, specs) before the run
folder exists; write ``run.json``; build each model once with its dense baseline and variants;
run every cell (a baseline and its variants back to back) and append its record to
``results.jsonl`` at once; write ``summary.json``.
A failing cell is recorded and the run goes on; Ctrl-C stops after writing the summary of
what finished, and the result says it was interrupted. ``resume_run`` finishes such a run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from benchlib.analysis import DENSE, Row, summarize_records
from benchlib.errors import BenchError, ConfigError
from benchlib.harness.cell import run_cell
from benchlib.harness.environment import apply_threads, fingerprint
from benchlib.harness.timing import Clock
from benchlib.harness.worker import CellJob, run_in_worker
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
    latest_records,
    read_records,
    repair_tail,
    write_json,
)
from benchlib.suite import Suite, suite_from_dict
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
            sum(len(measurement_order(suite, model.name)) for model in self.models)
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
    isolate: bool = True,
    clock: Clock = time.perf_counter_ns,
) -> RunResult:
    """Run every cell of ``suite`` (or of an already made ``plan``) into a new run folder.

    Bad input raises (ConfigError and friends) before the run folder exists. Afterwards no
    cell can end the run: failures are records. Ctrl-C stops it with ``interrupted=True``.
    ``isolate`` runs each cell in a freshly spawned worker (DESIGN section 6; ``clock`` is then
    the worker's own); ``isolate=False`` runs cells in this process, for tests and debugging.
    """
    planned = suite if isinstance(suite, Plan) else plan(suite, registry)
    directory = new_run_dir(out_root, planned.suite.name, dt.datetime.now())
    session = _Session(planned, registry, observer or _Silent(), isolate, clock, frozenset())
    return session.run(directory, new=True)


def resume_run(
    directory: Path,
    *,
    registry: TargetRegistry,
    observer: Observer | None = None,
    retry_failed: bool = False,
    isolate: bool = True,
    clock: Clock = time.perf_counter_ns,
) -> RunResult:
    """Finish an interrupted or killed run in place: cells already in ``results.jsonl`` are
    skipped (failed ones are run again when ``retry_failed``), the rest are appended.

    A torn last line (a run killed mid-write) is cut off first. Raises ConfigError when
    ``directory`` is not a run folder.
    """
    try:
        run = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
        suite = suite_from_dict(run["suite"], default_name=directory.name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot resume {str(directory)!r}: not a run folder ({exc})") from exc
    repair_tail(directory / RESULTS_FILE)
    done = frozenset(
        r.key
        for r in read_records(directory / RESULTS_FILE)
        if not (retry_failed and r.status is Status.FAILED)
    )
    session = _Session(plan(suite, registry), registry, observer or _Silent(), isolate, clock, done)
    return session.run(directory, new=False)


@dataclass(frozen=True)
class _Session:
    """One pass over a plan's cells, skipping ``done``."""

    planned: Plan
    registry: TargetRegistry
    observer: Observer
    isolate: bool
    clock: Clock
    done: frozenset[CellKey]

    def run(self, directory: Path, *, new: bool) -> RunResult:
        previous_threads = torch.get_num_threads()
        try:
            threads = apply_threads(self.planned.suite.threads)
            if new:
                self._write_run_file(directory, threads)
            return self._cells(directory, threads)
        finally:  # the caller's process is left as it was
            torch.set_num_threads(previous_threads)

    def _write_run_file(self, directory: Path, threads: int) -> None:
        suite, selection = self.planned.suite, self.planned.selection
        write_json(
            directory / RUN_FILE,
            {
                "schema_version": SCHEMA_VERSION,
                "suite": {**asdict(suite), "timing": asdict(suite.timing)},
                "targets": list(selection.targets),
                "skipped_targets": dict(selection.skipped),
                "planned_cells": self.planned.total_cells,
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "environment": fingerprint(threads),
            },
        )

    def _cells(self, directory: Path, threads: int) -> RunResult:
        self.observer.planned(self.planned.total_cells - len(self.done))
        interrupted = False
        try:
            for model in self.planned.models:
                for record in self._model_records(model, threads):
                    append_record(directory / RESULTS_FILE, record)
                    self.observer.finished(record)
        except KeyboardInterrupt:
            interrupted = True
        records = latest_records(directory / RESULTS_FILE)
        rows = tuple(summarize_records(records, environment=_environment(directory)))
        write_json(directory / SUMMARY_FILE, [row.to_dict() for row in rows])
        return RunResult(directory, records, rows, self.planned.selection, interrupted)

    def _model_records(self, model: Model, threads: int) -> Iterator[CellRecord]:
        """Every cell of one model not yet done. For each target, batch size and precision the
        dense baseline and its variants run back to back, so that drift of the machine (heat,
        background load) does not fall between the two sides of a speedup. Variants are
        pruned once, when first needed; one whose pruning fails fails all its cells."""
        suite = self.planned.suite
        variants: dict[str, Variant | CellRecord] = {}
        for target in self.planned.selection.targets:
            for batch_size in suite.batch_sizes:
                for precision in suite.precisions:
                    for spec, repeat in measurement_order(suite, model.name):
                        key = CellKey(
                            model=model.name,
                            spec=spec,
                            target=target,
                            batch_size=batch_size,
                            precision=precision,
                            repeat=repeat,
                        )
                        if key in self.done:
                            continue
                        if spec not in variants:
                            variants[spec] = _build(model, spec, threads)
                        self.observer.started(key)
                        yield self._measure(variants[spec], key, threads)

    def _measure(self, built: Variant | CellRecord, key: CellKey, threads: int) -> CellRecord:
        if isinstance(built, CellRecord):
            return dataclasses.replace(built, key=key)
        suite = self.planned.suite
        if not self.isolate:
            return run_cell(
                built,
                self.registry.get(key.target),
                key,
                timing=suite.timing,
                threads=threads,
                clock=self.clock,
                profile_layers=suite.profile_layers,
            )
        job = CellJob(
            key=key,
            model_ref=built.model.name,
            input_size=suite.input_size,
            weights=suite.weights,
            trust=suite.trust,
            recipe=built.recipe.to_dict(),
            targets=self.registry.references,
            timing=suite.timing,
            threads=suite.threads,
            time_limit_s=suite.cell_timeout_s,
            profile_layers=suite.profile_layers,
        )
        return run_in_worker(job)


def _environment(directory: Path) -> dict[str, Any] | None:
    """The environment fingerprint in the run folder's run.json (None when unreadable)."""
    try:
        environment = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))["environment"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return environment if isinstance(environment, dict) else None


def measurement_order(suite: Suite, model: str | None = None) -> list[tuple[str, int]]:
    """(spec, repeat) in the order a group of ``model`` is measured: dense, the variants, and
    dense again when there are variants (an A-B-A design: the second dense run shows the
    drift)."""
    specs = [(spec, 0) for spec in suite.specs_for(model)]
    return [*specs, (DENSE, 1)] if len(specs) > 1 else specs


def _build(model: Model, spec: str, threads: int) -> Variant | CellRecord:
    """The variant, or the failed record (key filled in later) when pruning fails."""
    try:
        return prune(model, spec)
    except Exception as exc:  # a pruner that crashes fails its cells, not the run
        crashed = not isinstance(exc, BenchError)
        return CellRecord(
            key=CellKey(model=model.name, spec=spec, target="", batch_size=0, precision=""),
            status=Status.FAILED,
            reason=f"{'crashed: ' if crashed else ''}{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc() if crashed else "",
            threads=threads,
        )

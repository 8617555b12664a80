"""One freshly spawned worker process per cell: a crash, hang or OOM fails the cell, not the run.

The parent sends a ``CellJob`` (pickled by ``multiprocessing`` at spawn) and blocks on the
pipe with a timeout (``Connection.poll``, no busy-waiting). The worker applies the process-wide
settings first (threads), rebuilds the variant from the model reference and the recipe, runs
the cell and sends its record back as JSON. Anything else is a failed record made by the
parent: the worker's traceback when Python caught the error, the signal when the process died
(segfault, abort, the OOM killer's SIGKILL), or the time limit when it hung.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchlib.harness.timing import TimingConfig
from benchlib.results import CellKey, CellRecord, Status
from benchlib.target import Target

JOIN_GRACE_S = 10.0
"""How long a worker that has answered may take to exit before it is killed."""


@dataclass(frozen=True, kw_only=True)
class CellJob:
    """Everything a worker needs to rebuild and measure one cell."""

    key: CellKey
    model_ref: str
    input_size: int | None
    weights: str | None
    trust: bool
    recipe: Mapping[str, Any]
    targets: Mapping[str, str | type[Target]]
    timing: TimingConfig
    threads: int | None
    time_limit_s: float
    profile_layers: bool = False


def run_in_worker(job: CellJob) -> CellRecord:
    """Run ``job`` in a new spawned process; always returns a record (never raises for the
    cell's own failures). KeyboardInterrupt in the parent kills the worker and propagates."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(sender, job), daemon=True)
    start = time.perf_counter()
    process.start()
    sender.close()  # the parent keeps only its end, so a dead worker reads as EOF
    try:
        payload = _receive(receiver, job.time_limit_s)
    except BaseException:
        process.kill()
        process.join()
        raise
    finally:
        receiver.close()
    if payload is _TIMED_OUT:
        process.kill()
        process.join()
        return _failed(
            job, f"hung: no result within the cell time limit of {job.time_limit_s:g} s", start
        )
    process.join(JOIN_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()
    if payload is None:
        return _failed(job, f"worker died: {_describe_exit(process.exitcode)}", start)
    data = json.loads(str(payload))
    if "worker_error" in data:
        return _failed(job, data["worker_error"], start, data.get("traceback", ""))
    return CellRecord.from_dict(data)


_TIMED_OUT = object()


def _receive(receiver: Connection, timeout_s: float) -> object:
    """The worker's message, None when it exited without one, _TIMED_OUT when it hung."""
    if not receiver.poll(timeout_s):
        return _TIMED_OUT
    try:
        return receiver.recv()
    except EOFError:
        return None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code} without a result"


def _failed(job: CellJob, reason: str, start: float, trace: str = "") -> CellRecord:
    return CellRecord(
        key=job.key,
        status=Status.FAILED,
        reason=reason,
        traceback=trace,
        duration_s=time.perf_counter() - start,
    )


def _worker_main(sender: Connection, job: CellJob) -> None:
    """Entry point of the spawned process."""
    try:
        sender.send(json.dumps(_work(job).to_dict()))
    except BaseException as exc:  # report everything, even SystemExit, to the parent
        message = {
            "worker_error": f"worker error: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        sender.send(json.dumps(message))
    finally:
        sender.close()


def _work(job: CellJob) -> CellRecord:
    # Threads first: before this process builds a model or runs an op.
    from benchlib.harness.environment import apply_threads

    threads = apply_threads(job.threads)
    from benchlib.harness.cell import run_cell
    from benchlib.harness.memory import current_rss_bytes
    from benchlib.loading import load_model
    from benchlib.pruning import Recipe, replay
    from benchlib.target import TargetRegistry

    idle_rss = current_rss_bytes()
    model = load_model(
        job.model_ref, input_size=job.input_size, weights=job.weights, trust=job.trust
    )
    variant = replay(model, Recipe.from_dict(job.recipe))
    target = TargetRegistry(job.targets).get(job.key.target)
    return run_cell(
        variant,
        target,
        job.key,
        timing=job.timing,
        threads=threads,
        idle_rss_bytes=idle_rss,
        profile_layers=job.profile_layers,
    )

"""Isolation: every cell in its own worker; crashes, hangs and OOM are failed cells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchlib.harness.runner import resume_run, run_suite
from benchlib.results import RESULTS_FILE, Status, read_records
from benchlib.suite import Suite
from benchlib.target import TargetRegistry
from tests.fakes import (
    AbortingTarget,
    EagerCopyTarget,
    HangingTarget,
    MemoryHogTarget,
)
from tests.fakes import tiny_suite as shared_tiny_suite


def tiny_suite(**changes: object) -> Suite:
    """The shared tiny suite, dense only, one batch size."""
    return shared_tiny_suite(**{"specs": ("dense",), "batch_sizes": (1,), **changes})


def test_abort_hang_and_oom_are_failed_cells_and_the_run_goes_on(tmp_path: Path) -> None:
    registry = TargetRegistry(
        {
            "fake-abort": AbortingTarget,
            "fake-eager": EagerCopyTarget,
            "fake-hang": HangingTarget,
            "fake-oom": MemoryHogTarget,
        }
    )
    suite = tiny_suite(cell_timeout_s=20.0)
    result = run_suite(suite, registry=registry, out_root=tmp_path)
    by_target = {r.key.target: r for r in result.records}
    assert set(by_target) == {"fake-abort", "fake-eager", "fake-hang", "fake-oom"}
    assert by_target["fake-eager"].status is Status.OK
    assert len(by_target["fake-eager"].samples_s) >= 3
    assert by_target["fake-eager"].memory["rss_peak_bytes"] > 0
    assert by_target["fake-abort"].reason == "worker died: killed by SIGABRT"
    assert by_target["fake-hang"].reason == ("hung: no result within the cell time limit of 20 s")
    assert by_target["fake-oom"].reason == "crashed: MemoryError: "
    assert "MemoryError" in by_target["fake-oom"].traceback
    stored = list(read_records(result.directory / RESULTS_FILE))
    assert len(stored) == 4


KILLED_RUN = """
import sys
from pathlib import Path
from benchlib.harness.runner import run_suite
from benchlib.target import TargetRegistry
from tests.fakes import KillOnThirdPrepare
from tests.test_worker import tiny_suite
run_suite(tiny_suite(specs=("dense", "magnitude:0.5"), batch_sizes=(1, 2)),
          registry=TargetRegistry({"fake-eager": KillOnThirdPrepare}),
          out_root=Path(sys.argv[1]), isolate=False)
"""


def test_a_run_killed_with_sigkill_resumes_with_every_cell_once(tmp_path: Path) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -9, killed.stderr
    (run_dir,) = tmp_path.iterdir()
    assert len(list(read_records(run_dir / RESULTS_FILE))) == 2
    with (run_dir / RESULTS_FILE).open("a") as handle:
        handle.write('{"key": {"model": "torn')  # the kill could also tear the last line

    result = resume_run(
        run_dir, registry=TargetRegistry({"fake-eager": EagerCopyTarget}), isolate=False
    )
    assert not result.interrupted
    stored = list(read_records(run_dir / RESULTS_FILE))
    keys = [(r.key.spec, r.key.batch_size, r.key.repeat) for r in stored]
    assert sorted(keys) == sorted(
        (spec, bs, repeat)
        for bs in (1, 2)
        for spec, repeat in (("dense", 0), ("magnitude:0.5", 0), ("dense", 1))
    )
    assert len(set(keys)) == len(keys) == 6
    assert all(r.status is Status.OK for r in stored)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary) == 4

"""The runner end to end with fake targets: every cell recorded, failures kept, Ctrl-C safe.

Cells run inline here (``isolate=False``): what is tested is the runner's bookkeeping; the
worker processes have their own tests in test_worker.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchlib.harness.runner import run_suite
from benchlib.results import (
    RESULTS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    CellKey,
    CellRecord,
    Status,
    read_records,
)
from benchlib.target import TargetRegistry
from tests.fakes import CrashingTarget, EagerCopyTarget, FakeGpuTarget, WrongOutputTarget
from tests.fakes import tiny_suite as suite

REGISTRY = TargetRegistry({"fake-eager": EagerCopyTarget, "fake-gpu": FakeGpuTarget})


def test_every_cell_is_recorded_with_its_dense_baseline(tmp_path: Path) -> None:
    result = run_suite(suite(), registry=REGISTRY, out_root=tmp_path, isolate=False)
    records = list(read_records(result.directory / RESULTS_FILE))
    # baseline, variant and baseline again back to back, batch size by batch size
    assert [(r.key.spec, r.key.batch_size, r.key.repeat) for r in records] == [
        ("dense", 1, 0),
        ("magnitude:0.5", 1, 0),
        ("dense", 1, 1),
        ("dense", 2, 0),
        ("magnitude:0.5", 2, 0),
        ("dense", 2, 1),
    ]
    assert all(r.status is Status.OK and len(r.samples_s) >= 3 for r in records)
    assert records == list(result.records)
    run = json.loads((result.directory / RUN_FILE).read_text())
    assert run["targets"] == ["fake-eager"] and run["planned_cells"] == 6
    assert run["environment"]["cpu"]["threads"] >= 1
    summary = json.loads((result.directory / SUMMARY_FILE).read_text())
    assert len(summary) == 4  # the closing baseline folds into the dense row
    pruned = [row for row in summary if row["spec"] == "magnitude:0.5"]
    assert all(row["speedup_theoretical"] > 1.0 for row in pruned)
    assert all(row["speedup_measured"] is not None for row in pruned)
    required = {
        "model",
        "spec",
        "target",
        "batch_size",
        "precision",
        "status",
        "macs",
        "nonzero_macs",
        "params",
        "nonzero_params",
        "median_s",
        "speedup_theoretical",
        "speedup_measured",
        "realization",
    }
    assert all(required <= set(row) for row in summary)


def test_failing_cells_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    registry = TargetRegistry(
        {
            "fake-eager": EagerCopyTarget,
            "fake-crash": CrashingTarget,
            "fake-wrong": WrongOutputTarget,
        }
    )
    result = run_suite(suite(batch_sizes=(1,)), registry=registry, out_root=tmp_path, isolate=False)
    by_target = {(r.key.target, r.key.spec): r for r in result.records}
    crash = by_target[("fake-crash", "dense")]
    assert crash.status is Status.FAILED
    assert crash.reason == "crashed: RuntimeError: boom"
    assert "RuntimeError: boom" in crash.traceback
    wrong = by_target[("fake-wrong", "dense")]
    assert wrong.status is Status.FAILED
    assert wrong.reason.startswith("VerificationError: outputs differ from eager fp32 by 0.1")
    assert by_target[("fake-eager", "magnitude:0.5")].status is Status.OK
    assert len(result.records) == 9  # 3 targets x (dense, variant, dense again)


def test_unsupported_precision_is_a_skipped_cell(tmp_path: Path) -> None:
    result = run_suite(
        suite(batch_sizes=(1,), precisions=("bf16",)),
        registry=REGISTRY,
        out_root=tmp_path,
        isolate=False,
    )
    assert {r.status for r in result.records} == {Status.SKIPPED}
    assert result.records[0].reason == "fake-eager does not run bf16 (it runs: fp32)"


class InterruptAfter:
    def __init__(self, n: int) -> None:
        self.n = n

    def planned(self, total_cells: int) -> None: ...

    def started(self, key: CellKey) -> None: ...

    def finished(self, record: CellRecord) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


def test_interrupt_keeps_every_finished_cell(tmp_path: Path) -> None:
    result = run_suite(
        suite(), registry=REGISTRY, out_root=tmp_path, observer=InterruptAfter(2), isolate=False
    )
    assert result.interrupted
    assert len(list(read_records(result.directory / RESULTS_FILE))) == 2
    assert len(json.loads((result.directory / SUMMARY_FILE).read_text())) == 2


def test_bad_input_writes_no_run_folder(tmp_path: Path) -> None:
    from benchlib.errors import ConfigError

    with pytest.raises(ConfigError):
        run_suite(
            suite(models=("no-such-model",)), registry=REGISTRY, out_root=tmp_path, isolate=False
        )
    assert not any(tmp_path.iterdir())


def test_a_pruning_failure_fails_only_that_variant(tmp_path: Path) -> None:
    result = run_suite(
        suite(models=("tests.fakes:NoWeights",), batch_sizes=(1,)),
        registry=REGISTRY,
        out_root=tmp_path,
        isolate=False,
    )
    dense, pruned, _ = result.records
    assert dense.status is Status.OK
    assert pruned.status is Status.FAILED
    assert pruned.reason == "PruningError: the model has no conv or linear layer to prune"


class InterruptOnThirdRun(EagerCopyTarget):
    """Ctrl-C arrives inside the third cell's inference."""

    def __init__(self) -> None:
        self.prepared = 0

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        self.prepared += 1
        if self.prepared == 3:

            def interrupted() -> None:
                raise KeyboardInterrupt

            return interrupted
        return super().runner(model, inputs)


def test_interrupt_inside_a_cell_keeps_the_cells_before_it(tmp_path: Path) -> None:
    registry = TargetRegistry({"fake-eager": InterruptOnThirdRun})
    result = run_suite(suite(), registry=registry, out_root=tmp_path, isolate=False)
    assert result.interrupted
    stored = list(read_records(result.directory / RESULTS_FILE))
    assert [(r.key.spec, r.key.batch_size) for r in stored] == [
        ("dense", 1),
        ("magnitude:0.5", 1),
    ]

"""The memory pass: RSS peaks of the pass alone, CUDA allocator peaks, JSON-ready reports."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from benchlib.errors import ConfigError
from benchlib.harness import memory
from benchlib.harness.memory import (
    RUSAGE_METHOD,
    VMHWM_METHOD,
    MemoryReport,
    current_rss_bytes,
    memory_pass,
    peak_rss_bytes,
    reset_peak_rss,
)

MB = 1024 * 1024
CPU = torch.device("cpu")
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self (Linux only)")


def _touch(megabytes: int) -> int:
    """Allocate and fill a temporary of ``megabytes`` (every page resident), then free it."""
    block = np.ones(megabytes * MB, dtype=np.uint8)
    return int(block[-1])


def _needs_clear_refs() -> None:
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs cannot be written here: the peak cannot be reset")


@linux_only
def test_current_and_peak_rss_are_positive_byte_counts() -> None:
    rss, peak = current_rss_bytes(), peak_rss_bytes()
    assert isinstance(rss, int) and rss > 0
    assert isinstance(peak, int) and peak >= rss


@linux_only
def test_reset_brings_the_peak_back_down_after_a_freed_temporary() -> None:
    _needs_clear_refs()
    _touch(200)
    before_reset = peak_rss_bytes()
    assert reset_peak_rss()
    after_reset = peak_rss_bytes()
    assert before_reset is not None and after_reset is not None
    assert before_reset - after_reset >= 150 * MB


@linux_only
def test_pass_sees_a_temporary_that_is_freed_before_it_ends() -> None:
    _needs_clear_refs()
    rss_before = current_rss_bytes()
    assert rss_before is not None
    report = memory_pass(lambda: _touch(200), lambda: None, CPU, calls=1, rss_idle_bytes=rss_before)
    assert report.method == VMHWM_METHOD
    assert report.rss_peak_bytes is not None
    assert report.rss_peak_bytes - rss_before >= 150 * MB
    assert report.rss_increase_bytes == report.rss_peak_bytes - rss_before
    now = current_rss_bytes()
    assert now is not None and now < report.rss_peak_bytes - 150 * MB  # it was freed


@linux_only
def test_a_peak_from_before_the_pass_does_not_count() -> None:
    _needs_clear_refs()
    _touch(300)
    report = memory_pass(lambda: None, lambda: None, CPU, calls=1)
    assert report.rss_peak_bytes is not None
    current = current_rss_bytes()
    assert current is not None and report.rss_peak_bytes < current + 100 * MB


def test_run_is_called_calls_times_each_followed_by_synchronize() -> None:
    events: list[str] = []
    memory_pass(lambda: events.append("run"), lambda: events.append("sync"), CPU, calls=3)
    assert events == ["sync", "run", "sync", "run", "sync", "run", "sync"]


@pytest.mark.parametrize("calls", [0, -1])
def test_a_pass_without_calls_is_a_config_error(calls: int) -> None:
    with pytest.raises(ConfigError, match="at least one call"):
        memory_pass(lambda: None, lambda: None, CPU, calls=calls)


@pytest.mark.skipif(sys.platform == "win32", reason="the resource module is POSIX only")
def test_without_clear_refs_the_lifetime_peak_is_used_and_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "reset_peak_rss", lambda: False)
    report = memory_pass(lambda: None, lambda: None, CPU, rss_idle_bytes=1000)
    assert report.method == RUSAGE_METHOD
    assert report.rss_peak_bytes is not None and report.rss_peak_bytes > 0
    assert report.rss_increase_bytes == report.rss_peak_bytes - 1000


def test_cpu_pass_leaves_the_cuda_fields_none_and_idle_none_gives_no_increase() -> None:
    report = memory_pass(lambda: None, lambda: None, CPU)
    assert report.rss_idle_bytes is None and report.rss_increase_bytes is None
    assert report.cuda_allocated_peak_bytes is None
    assert report.cuda_reserved_peak_bytes is None
    assert report.nvml_process_bytes is None


def test_to_dict_is_json_serializable_and_keeps_every_field() -> None:
    report = MemoryReport(
        rss_idle_bytes=100,
        rss_peak_bytes=300,
        rss_increase_bytes=200,
        cuda_allocated_peak_bytes=None,
        cuda_reserved_peak_bytes=None,
        nvml_process_bytes=None,
        method=VMHWM_METHOD,
    )
    assert json.loads(json.dumps(report.to_dict())) == {
        "rss_idle_bytes": 100,
        "rss_peak_bytes": 300,
        "rss_increase_bytes": 200,
        "cuda_allocated_peak_bytes": None,
        "cuda_reserved_peak_bytes": None,
        "nvml_process_bytes": None,
        "method": VMHWM_METHOD,
    }
    real = memory_pass(lambda: None, lambda: None, CPU)
    assert json.loads(json.dumps(real.to_dict())) == real.to_dict()


@pytest.mark.gpu
def test_cuda_pass_reports_the_allocator_peak_of_a_freed_temporary() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    held = torch.ones(16 * MB // 4, device=device)  # 16 MB alive through the pass

    def run() -> float:
        temporary = torch.ones(64 * MB // 4, device=device)  # 64 MB, freed on return
        return float(temporary.sum().item())

    report = memory_pass(run, lambda: torch.cuda.synchronize(device), device, calls=2)
    assert report.cuda_allocated_peak_bytes is not None
    assert report.cuda_reserved_peak_bytes is not None
    assert report.cuda_allocated_peak_bytes >= 80 * MB
    assert report.cuda_reserved_peak_bytes >= report.cuda_allocated_peak_bytes
    assert report.nvml_process_bytes is None or report.nvml_process_bytes > 0
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()
    del held

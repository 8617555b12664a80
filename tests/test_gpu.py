"""NVML sampling against a fake pynvml, the verdict reasons, and the real GPU where there is one."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from benchlib.errors import ConfigError
from benchlib.harness import gpu
from benchlib.harness.gpu import GpuSample, gpu_verdict_reasons, sample


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """A pynvml stand-in: one H100 (index 0), counting nvmlInit / nvmlShutdown."""

    NVMLError = FakeNvmlError

    def __init__(self, *, init_fails: bool = False, processes: list[Any] | None = None) -> None:
        self.init_fails = init_fails
        self.processes = processes if processes is not None else []
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise FakeNvmlError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index != 0:
            raise FakeNvmlError("Invalid Argument")
        return "handle0"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        return {1: 1980, 2: 2619}[clock]

    def nvmlDeviceGetMaxClockInfo(self, handle: str, clock: int) -> int:
        return 1980

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 41

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 71_250  # mW

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        return 700_000  # mW

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        return 0x1 | 0x4 | 0x20 | 0x100  # idle, sw power cap, sw thermal, display

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return self.processes


class OldDriverNvml(FakeNvml):
    """No ClocksEventReasons binding; power and process queries fail as on an old driver."""

    nvmlDeviceGetCurrentClocksEventReasons = None  # type: ignore[assignment]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: str) -> int:
        return 0x40  # hw thermal slowdown

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        raise FakeNvmlError("Not Supported")

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        raise FakeNvmlError("Function Not Found")


def _install(monkeypatch: pytest.MonkeyPatch, fake: object) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def _proc(pid: int, used: int | None = 512 * 1024 * 1024) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


CLEAN = GpuSample(
    name="NVIDIA H100 80GB HBM3",
    driver="550.54.15",
    sm_clock_mhz=1980,
    mem_clock_mhz=2619,
    max_sm_clock_mhz=1980,
    temperature_c=41,
    power_w=71.25,
    power_limit_w=700.0,
    throttle_reasons=(),
    other_processes=0,
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_sample_without_a_gpu_is_none_and_does_not_raise() -> None:
    assert sample() is None
    assert sample(3) is None
    assert gpu.process_memory_bytes(0) is None
    assert gpu.nvml_index(torch.device("cuda", 0)) is None


def test_without_pynvml_everything_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, None)  # `import pynvml` raises ImportError
    assert sample() is None
    assert gpu.process_memory_bytes() is None


def test_a_failed_init_gives_none_and_is_not_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(init_fails=True)
    _install(monkeypatch, fake)
    assert sample() is None
    assert fake.shutdowns == 0


def test_sample_decodes_the_device_and_balances_init_and_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(processes=[_proc(os.getpid()), _proc(os.getpid() + 1)])
    _install(monkeypatch, fake)
    got = sample(0)
    assert got == replace(
        CLEAN, throttle_reasons=("sw_power_cap", "sw_thermal_slowdown"), other_processes=1
    )
    assert sample(1) is None  # no such device
    assert (fake.inits, fake.shutdowns) == (2, 2)


def test_old_driver_leaves_missing_fields_none(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = OldDriverNvml()
    _install(monkeypatch, fake)
    got = sample()
    assert got is not None
    assert got.name == "NVIDIA H100 80GB HBM3"
    assert got.power_w is None and got.other_processes is None
    assert got.throttle_reasons == ("hw_thermal_slowdown",)
    assert (fake.inits, fake.shutdowns) == (1, 1)


def test_process_memory_is_this_process_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNvml(processes=[_proc(1), _proc(os.getpid(), 123_456_789)]))
    assert gpu.process_memory_bytes(0) == 123_456_789
    _install(monkeypatch, FakeNvml(processes=[_proc(1)]))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert gpu.process_memory_bytes(0) is None  # no CUDA context here: entry 1 is another


def test_in_a_pid_namespace_one_entry_is_presumed_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML reports host PIDs inside a container: with a CUDA context here, one entry is us.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    _install(monkeypatch, FakeNvml(processes=[_proc(99_999_999, 1000)]))
    assert gpu.process_memory_bytes(0) == 1000
    got = sample()
    assert got is not None and got.other_processes == 0


def test_verdict_is_empty_for_a_clean_pair_and_for_no_samples() -> None:
    assert gpu_verdict_reasons(None, None) == ()
    assert gpu_verdict_reasons(CLEAN, CLEAN) == ()
    assert gpu_verdict_reasons(CLEAN, None) == ()
    steady = replace(CLEAN, sm_clock_mhz=1800)  # 1800 >= 0.9 * 1980 = 1782
    assert gpu_verdict_reasons(CLEAN, steady) == ()


def test_verdict_names_throttling_before_and_after() -> None:
    hot = replace(CLEAN, throttle_reasons=("sw_thermal_slowdown",))
    capped = replace(CLEAN, throttle_reasons=("sw_power_cap", "hw_slowdown"))
    assert gpu_verdict_reasons(hot, capped) == (
        "GPU clocks throttled before timing: sw_thermal_slowdown",
        "GPU clocks throttled after timing: sw_power_cap, hw_slowdown",
    )
    assert gpu_verdict_reasons(None, hot) == (
        "GPU clocks throttled after timing: sw_thermal_slowdown",
    )


def test_verdict_names_other_processes_once_with_the_larger_count() -> None:
    assert gpu_verdict_reasons(replace(CLEAN, other_processes=1), CLEAN) == (
        "1 other process on the GPU",
    )
    assert gpu_verdict_reasons(
        replace(CLEAN, other_processes=2), replace(CLEAN, other_processes=3)
    ) == ("3 other processes on the GPU",)
    assert gpu_verdict_reasons(replace(CLEAN, other_processes=None), None) == ()


def test_verdict_names_an_sm_clock_drop_below_ninety_percent() -> None:
    slow = replace(CLEAN, sm_clock_mhz=1500)
    assert gpu_verdict_reasons(CLEAN, slow) == (
        "SM clock fell from 1980 MHz to 1500 MHz during timing",
    )
    assert gpu_verdict_reasons(slow, CLEAN) == ()  # a rise is no reason
    assert gpu_verdict_reasons(CLEAN, replace(slow, sm_clock_mhz=None)) == ()


def test_verdict_lists_every_reason_in_order() -> None:
    before = replace(CLEAN, other_processes=1)
    after = replace(CLEAN, sm_clock_mhz=900, throttle_reasons=("hw_thermal_slowdown",))
    assert gpu_verdict_reasons(before, after) == (
        "GPU clocks throttled after timing: hw_thermal_slowdown",
        "1 other process on the GPU",
        "SM clock fell from 1980 MHz to 900 MHz during timing",
    )


def test_to_dict_is_json_serializable_and_from_dict_reads_it_back() -> None:
    hot = replace(CLEAN, throttle_reasons=("sw_thermal_slowdown",), power_w=None)
    data = json.loads(json.dumps(hot.to_dict()))
    assert data["throttle_reasons"] == ["sw_thermal_slowdown"]
    assert data["power_w"] is None
    assert GpuSample.from_dict(data) == hot
    assert GpuSample.from_dict({"power_w": 300}) == GpuSample(
        name="unknown",
        driver="unknown",
        sm_clock_mhz=None,
        mem_clock_mhz=None,
        max_sm_clock_mhz=None,
        temperature_c=None,
        power_w=300.0,
        power_limit_w=None,
        throttle_reasons=(),
        other_processes=None,
    )


@pytest.mark.parametrize(
    "bad",
    [{"sm_clock_mhz": "1980"}, {"throttle_reasons": "sw_power_cap"}, {"other_processes": True}],
)
def test_from_dict_rejects_wrong_types(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="malformed GPU sample"):
        GpuSample.from_dict({**CLEAN.to_dict(), **bad})


@pytest.mark.gpu
def test_sample_of_the_real_gpu_has_a_name() -> None:
    got = sample(0)
    if got is None:
        pytest.skip("NVML is not usable here (no pynvml or no NVML library)")
    assert isinstance(got, GpuSample) and got.name not in ("", "unknown")
    assert json.loads(json.dumps(got.to_dict())) == got.to_dict()
    index = gpu.nvml_index(torch.device("cuda", 0))
    assert index is None or isinstance(index, int)

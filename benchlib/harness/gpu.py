"""GPU facts from NVML, and the reasons that make a GPU measurement suspect (DESIGN section 6).

Everything here is optional: without the ``pynvml`` package (``nvidia-ml-py``), the NVML
library or a GPU, every function returns None. ``pynvml`` is imported inside the functions,
never at module import. Each call opens NVML and closes it again (``nvmlInit`` /
``nvmlShutdown``, balanced even when a query fails). A query that fails, or that an old
driver lacks, leaves its field None instead of raising.

NVML device indices follow PCI order and ignore ``CUDA_VISIBLE_DEVICES``; ``nvml_index``
maps a ``torch.device`` to one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchlib.errors import ConfigError

# NVML's clocks-event ("throttle") reason bits that mean the clocks were held down. The others
# (gpu_idle 0x1, applications_clocks_setting 0x2, sync_boost 0x10, display_clock_setting
# 0x100) are not throttling and are left out of GpuSample.throttle_reasons.
_THROTTLING: tuple[tuple[int, str], ...] = (
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
)
CLOCK_DROP_RATIO = 0.9
_NVML_CLOCK_SM = 1
_NVML_CLOCK_MEM = 2
_NVML_TEMPERATURE_GPU = 0


@dataclass(frozen=True, kw_only=True)
class GpuSample:
    """One reading of a GPU's state; None where NVML could not tell.

    Attributes:
        name, driver: the device's name and the driver version ("unknown" if unreadable).
        sm_clock_mhz, mem_clock_mhz: current SM and memory clocks, MHz.
        max_sm_clock_mhz: the SM clock's maximum, MHz.
        temperature_c: GPU core temperature, degrees Celsius.
        power_w, power_limit_w: power draw and enforced power limit, watts.
        throttle_reasons: the active clock-throttling reasons, in NVML's bit order, among
            sw_power_cap, hw_slowdown, sw_thermal_slowdown, hw_thermal_slowdown,
            hw_power_brake_slowdown. Empty when none is active or NVML cannot tell.
        other_processes: compute processes on the device other than this one.
    """

    name: str
    driver: str
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    max_sm_clock_mhz: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    throttle_reasons: tuple[str, ...]
    other_processes: int | None

    def to_dict(self) -> dict[str, str | int | float | list[str] | None]:
        """The sample as a JSON-serializable dict (``throttle_reasons`` as a list)."""
        data = asdict(self)
        data["throttle_reasons"] = list(self.throttle_reasons)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuSample:
        """The sample that ``to_dict`` wrote; a missing field reads as unknown.

        Raises:
            ConfigError: a field holds a value of the wrong type.
        """

        def pick(key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
            value = data.get(key, default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise ConfigError(f"malformed GPU sample: {key}={value!r}")
            return value

        reasons = pick("throttle_reasons", (list, tuple), ()) or ()
        if not all(isinstance(r, str) for r in reasons):
            raise ConfigError(f"malformed GPU sample: throttle_reasons={reasons!r}")
        power, limit = pick("power_w", (int, float)), pick("power_limit_w", (int, float))
        return cls(
            name=pick("name", (str,), "unknown") or "unknown",
            driver=pick("driver", (str,), "unknown") or "unknown",
            sm_clock_mhz=pick("sm_clock_mhz", (int,)),
            mem_clock_mhz=pick("mem_clock_mhz", (int,)),
            max_sm_clock_mhz=pick("max_sm_clock_mhz", (int,)),
            temperature_c=pick("temperature_c", (int,)),
            power_w=None if power is None else float(power),
            power_limit_w=None if limit is None else float(limit),
            throttle_reasons=tuple(reasons),
            other_processes=pick("other_processes", (int,)),
        )


@contextmanager
def _nvml() -> Iterator[Any]:
    """Yield the initialised ``pynvml`` module, or None; shut NVML down after a good init."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        started = False
    else:
        started = True
    try:
        yield pynvml if started else None
    finally:
        if started:
            with suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()


def _call(nv: Any, function: str, *args: Any) -> Any:
    """``nv.<function>(*args)``, or None when the binding lacks it or NVML reports an error."""
    fn = getattr(nv, function, None)
    if fn is None:
        return None
    try:
        return fn(*args)
    except nv.NVMLError:
        return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "unknown" if value is None else str(value)


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _watts(milliwatts: Any) -> float | None:
    number = _number(milliwatts)
    return None if number is None else number / 1000.0


def _split_own(processes: Sequence[Any]) -> tuple[Any, int]:
    """(this process's entry or None, how many entries are other processes)."""
    pid = os.getpid()
    mine = [p for p in processes if getattr(p, "pid", None) == pid]
    if mine:
        return mine[0], len(processes) - 1
    if processes and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        # In a PID namespace (a container) NVML reports host PIDs, so this process's entry
        # carries another number. It holds a CUDA context, so one entry is presumed to be it.
        return (processes[0] if len(processes) == 1 else None), len(processes) - 1
    return None, len(processes)


def sample(index: int = 0) -> GpuSample | None:
    """Read the state of NVML device ``index``; None without pynvml, NVML or that device."""
    with _nvml() as nv:
        if nv is None:
            return None
        handle = _call(nv, "nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            return None
        reasons = _call(nv, "nvmlDeviceGetCurrentClocksEventReasons", handle)
        if reasons is None:  # drivers before 535 only have the old name
            reasons = _call(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        mask = _number(reasons) or 0
        processes = _call(nv, "nvmlDeviceGetComputeRunningProcesses", handle)
        return GpuSample(
            name=_text(_call(nv, "nvmlDeviceGetName", handle)),
            driver=_text(_call(nv, "nvmlSystemGetDriverVersion")),
            sm_clock_mhz=_number(_call(nv, "nvmlDeviceGetClockInfo", handle, _NVML_CLOCK_SM)),
            mem_clock_mhz=_number(_call(nv, "nvmlDeviceGetClockInfo", handle, _NVML_CLOCK_MEM)),
            max_sm_clock_mhz=_number(
                _call(nv, "nvmlDeviceGetMaxClockInfo", handle, _NVML_CLOCK_SM)
            ),
            temperature_c=_number(
                _call(nv, "nvmlDeviceGetTemperature", handle, _NVML_TEMPERATURE_GPU)
            ),
            power_w=_watts(_call(nv, "nvmlDeviceGetPowerUsage", handle)),
            power_limit_w=_watts(_call(nv, "nvmlDeviceGetEnforcedPowerLimit", handle)),
            throttle_reasons=tuple(name for bit, name in _THROTTLING if mask & bit),
            other_processes=None if processes is None else _split_own(processes)[1],
        )


def process_memory_bytes(index: int = 0) -> int | None:
    """GPU memory this process uses on NVML device ``index`` now, bytes (None if unknown)."""
    with _nvml() as nv:
        handle = None if nv is None else _call(nv, "nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            return None
        processes = _call(nv, "nvmlDeviceGetComputeRunningProcesses", handle)
        own = None if processes is None else _split_own(processes)[0]
        return None if own is None else _number(getattr(own, "usedGpuMemory", None))


def nvml_index(device: torch.device) -> int | None:
    """The NVML index of a CUDA ``device``, matched by UUID; None when it cannot be found."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except (RuntimeError, AttributeError):
        return None
    wanted = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    with _nvml() as nv:
        handle = None if nv is None else _call(nv, "nvmlDeviceGetHandleByUUID", wanted)
        return None if handle is None else _number(_call(nv, "nvmlDeviceGetIndex", handle))


def gpu_verdict_reasons(before: GpuSample | None, after: GpuSample | None) -> tuple[str, ...]:
    """Why a GPU measurement between ``before`` and ``after`` is suspect; empty when clean.

    In this order: throttling seen before, throttling seen after, other compute processes on
    the device (the larger count of the two), and an SM clock after below 90% of before.
    A missing sample or field is no reason.
    """
    reasons: list[str] = []
    for when, seen in (("before", before), ("after", after)):
        if seen is not None and seen.throttle_reasons:
            reasons.append(
                f"GPU clocks throttled {when} timing: {', '.join(seen.throttle_reasons)}"
            )
    counts = [s.other_processes for s in (before, after) if s is not None]
    others = max((c for c in counts if c is not None), default=0)
    if others:
        reasons.append(f"{others} other process{'es' if others > 1 else ''} on the GPU")
    if before is not None and after is not None:
        start, end = before.sm_clock_mhz, after.sm_clock_mhz
        if start is not None and end is not None and end < CLOCK_DROP_RATIO * start:
            reasons.append(f"SM clock fell from {start} MHz to {end} MHz during timing")
    return tuple(reasons)

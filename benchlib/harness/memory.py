"""Memory of one cell, measured in a pass of its own, apart from timing (DESIGN section 5).

CPU: the worker's peak resident set size (RSS) during the pass and its increase over the idle
worker. On Linux the kernel's high-water mark ``VmHWM`` is reset to the current RSS by writing
``5`` to ``/proc/self/clear_refs`` first, so the peak is that of the pass alone, even when a
temporary was freed before the pass ended. Where that cannot be done the peak falls back to
``getrusage``'s ``ru_maxrss``, the peak over the whole life of the process, and ``method``
says so. GPU: torch's caching-allocator peaks over the pass and NVML's view of this process.

All sizes are in bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchlib.errors import ConfigError
from benchlib.harness import gpu

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
VMHWM_METHOD = "VmHWM after clear_refs"
RUSAGE_METHOD = "ru_maxrss: peak over the process's life, could not be reset"


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """What one memory pass saw. Sizes in bytes; None where this machine cannot tell.

    Attributes:
        rss_idle_bytes: the worker's RSS before the model was built (given by the caller).
        rss_peak_bytes: peak RSS during the pass (see ``method``).
        rss_increase_bytes: ``rss_peak_bytes - rss_idle_bytes``.
        cuda_allocated_peak_bytes: ``torch.cuda.max_memory_allocated`` over the pass.
        cuda_reserved_peak_bytes: ``torch.cuda.max_memory_reserved`` over the pass.
        nvml_process_bytes: this process's GPU memory per NVML at the end of the pass (NVML has
            no peak); it includes the CUDA context, which torch's counters do not.
        method: how ``rss_peak_bytes`` was obtained.
    """

    rss_idle_bytes: int | None
    rss_peak_bytes: int | None
    rss_increase_bytes: int | None
    cuda_allocated_peak_bytes: int | None
    cuda_reserved_peak_bytes: int | None
    nvml_process_bytes: int | None
    method: str

    def to_dict(self) -> dict[str, int | str | None]:
        """The report as a JSON-serializable dict (the field names are the keys)."""
        return asdict(self)


def _status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status (e.g. ``VmRSS``) in bytes; None where unreadable."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            fields = value.split()
            if len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
                return int(fields[0]) * 1024
    return None


def current_rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``), in bytes; None off Linux."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """This process's peak RSS since start or the last ``reset_peak_rss`` (``VmHWM``), bytes."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _lifetime_peak_rss_bytes() -> int | None:
    """``ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS); None without ``resource``."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak <= 0:
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def memory_pass(
    run: Callable[[], object],
    synchronize: Callable[[], None],
    device: torch.device,
    *,
    calls: int = 3,
    rss_idle_bytes: int | None = None,
) -> MemoryReport:
    """Reset the peaks, call ``run()`` then ``synchronize()`` ``calls`` times, read the peaks.

    ``synchronize`` is also called once before the peaks are reset, so that work queued
    earlier does not count. On a CUDA ``device`` torch's peak statistics of that device are
    reset and read; NVML is asked for this process's memory on it. Outputs of ``run`` are
    dropped at once. Exceptions from ``run`` or ``synchronize`` propagate.

    Raises:
        ConfigError: ``calls`` is below 1.
    """
    if calls < 1:
        raise ConfigError(f"a memory pass needs at least one call, got calls={calls}")
    cuda = device.type == "cuda"
    synchronize()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    hwm = reset_peak_rss() and peak_rss_bytes() is not None
    for _ in range(calls):
        run()
        synchronize()
    if cuda:
        torch.cuda.synchronize(device)
    peak = peak_rss_bytes() if hwm else _lifetime_peak_rss_bytes()
    method = VMHWM_METHOD if hwm else RUSAGE_METHOD if peak is not None else "unavailable"
    increase = None if peak is None or rss_idle_bytes is None else peak - rss_idle_bytes
    nvml_bytes = None
    if cuda:
        index = gpu.nvml_index(device)
        nvml_bytes = None if index is None else gpu.process_memory_bytes(index)
    return MemoryReport(
        rss_idle_bytes=rss_idle_bytes,
        rss_peak_bytes=peak,
        rss_increase_bytes=increase,
        cuda_allocated_peak_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        cuda_reserved_peak_bytes=torch.cuda.max_memory_reserved(device) if cuda else None,
        nvml_process_bytes=nvml_bytes,
        method=method,
    )

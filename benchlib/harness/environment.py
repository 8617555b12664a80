"""The environment fingerprint of a run, and the process-wide settings applied before timing.

``apply_threads`` is the one place that changes process-wide state; the CLI and (later) the
worker entry call it before any model runs. ``fingerprint`` only reads.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchlib.errors import ConfigError

_VERSIONED = (
    "torch",
    "torchvision",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "nvidia-ml-py",
    "benchlib",
)


def default_threads() -> int:
    """Physical cores available to this process (logical CPUs when that cannot be told)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return logical or os.cpu_count() or 1


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (default: ``default_threads()``); return it."""
    count = default_threads() if threads is None else threads
    if count < 1:
        raise ConfigError(f"--threads must be a positive integer, got {count}")
    torch.set_num_threads(count)
    return count


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor()."""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_sha(directory: Path) -> str | None:
    """The commit checked out in ``directory`` (with ``-dirty`` when it has changes)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None when absent)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _gpu_facts(index: int) -> dict[str, Any]:
    """Name and capability from torch, with NVML's driver, clocks, temperature and power."""
    from benchlib.harness import gpu

    device = torch.device("cuda", index)
    major, minor = torch.cuda.get_device_capability(device)
    facts: dict[str, Any] = {
        "name": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "torch_cuda": torch.version.cuda,
    }
    nvml = gpu.nvml_index(device)
    sampled = gpu.sample(nvml) if nvml is not None else None
    if sampled is not None:
        facts["nvml"] = sampled.to_dict()
    return facts


def fingerprint(threads: int) -> dict[str, Any]:
    """What machine and software a run measured on (DESIGN section 6)."""
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "threads": threads,
            "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        },
        "gpus": gpus,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": versions(),
        "git_sha": git_sha(Path(__file__).resolve().parents[2]),
    }

"""Roofline: achieved FLOP/s against the device's peak, from a table of vendor figures.

``benchlib/data/device_peaks.json`` holds, per device, its dense peak FLOP/s per precision
and its memory bandwidth (bytes/s), each row with its source document. Rows are matched to the
device name the run's environment fingerprint recorded (``torch.cuda.get_device_name`` for a
GPU, the CPU's model name otherwise) by case-insensitive regular expressions, first match in
table order. A device the table does not know has no peak: its shares are None ("n/a").

The peak of a cell's precision: fp16 and bf16 use the tensor-core figure; fp32 uses the TF32
tensor-core figure where the device has one, because PyTorch lets cuDNN run fp32 convolutions
in TF32 by default (``torch.backends.cudnn.allow_tf32``), else the fp32 figure. So a share is
never inflated by a peak lower than what the kernels may use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from benchlib.errors import ConfigError

PEAKS_RESOURCE = "data/device_peaks.json"


@dataclass(frozen=True, kw_only=True)
class DevicePeak:
    """One row of the table: peak FLOP/s by precision key (fp32, tf32, fp16, bf16), DRAM
    bandwidth in bytes/s, and where the figures come from."""

    name: str
    patterns: tuple[str, ...]
    flops_per_s: Mapping[str, float]
    memory_bytes_per_s: float
    source: str

    def matches(self, device_name: str) -> bool:
        return any(re.search(p, device_name, re.IGNORECASE) for p in self.patterns)

    def peak_flops(self, precision: str) -> float | None:
        """Peak FLOP/s of a cell in ``precision`` (fp32 takes TF32 where there is one), None
        when the device has no figure for it (bf16 on a T4)."""
        if precision == "fp32":
            return self.flops_per_s.get("tf32", self.flops_per_s.get("fp32"))
        return self.flops_per_s.get(precision)

    def ridge(self, precision: str) -> float | None:
        """Arithmetic intensity (FLOP/byte) where the roofline turns from memory to compute."""
        peak = self.peak_flops(precision)
        return peak / self.memory_bytes_per_s if peak is not None else None

    def attainable(self, precision: str, intensity: float) -> float | None:
        """Roofline bound in FLOP/s at ``intensity`` FLOP/byte: min(peak, intensity x BW)."""
        peak = self.peak_flops(precision)
        return min(peak, intensity * self.memory_bytes_per_s) if peak is not None else None


def load_peaks(path: Path | None = None) -> tuple[DevicePeak, ...]:
    """The table shipped with benchlib, or the one at ``path``. Raises ConfigError when it
    cannot be read or a row lacks a field (every row must name its source)."""
    try:
        if path is None:
            text = resources.files("benchlib").joinpath(PEAKS_RESOURCE).read_text("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        rows = tuple(_row(raw) for raw in data["devices"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"cannot read the device peak table {str(path or PEAKS_RESOURCE)!r}: {exc!r}"
        ) from exc
    return rows


def _row(raw: Mapping[str, Any]) -> DevicePeak:
    if not str(raw["source"]).strip():
        raise ValueError(f"row {raw['name']!r} has no source")
    flops = {str(k): float(v) for k, v in dict(raw["flops_per_s"]).items()}
    unknown = set(flops) - {"fp32", "tf32", "fp16", "bf16"}
    if unknown:
        raise ValueError(f"row {raw['name']!r}: unknown precision {sorted(unknown)[0]!r}")
    for pattern in raw["patterns"]:
        re.compile(pattern)
    return DevicePeak(
        name=str(raw["name"]),
        patterns=tuple(raw["patterns"]),
        flops_per_s=flops,
        memory_bytes_per_s=float(raw["memory_bytes_per_s"]),
        source=str(raw["source"]),
    )


def find_peak(device_name: str | None, peaks: Sequence[DevicePeak]) -> DevicePeak | None:
    """The first row matching ``device_name``; None for an unknown or missing name."""
    if not device_name:
        return None
    return next((row for row in peaks if row.matches(device_name)), None)


def device_name(environment: Mapping[str, Any] | None, device: str) -> str | None:
    """The name the fingerprint recorded for a cell's ``device`` ("cpu", "cuda", "cuda:1")."""
    if not environment:
        return None
    kind, _, index = device.partition(":")
    if kind == "cuda":
        gpus = environment.get("gpus") or []
        number = int(index) if index.isdigit() else 0
        return str(gpus[number]) if number < len(gpus) else None
    cpu = environment.get("cpu")
    model = cpu.get("model") if isinstance(cpu, Mapping) else None
    return str(model) if model else None


def achieved_flops_per_s(macs: int | None, batch_size: int, median_s: float | None) -> float | None:
    """2 x MACs per image x batch size / seconds per batch: FLOP/s the cell achieved."""
    if macs is None or median_s is None or median_s <= 0:
        return None
    return 2.0 * macs * batch_size / median_s


def roofline_share(achieved: float | None, peak: DevicePeak | None, precision: str) -> float | None:
    """``achieved`` FLOP/s as a share of the device's peak for ``precision``; None when either
    is unknown."""
    top = peak.peak_flops(precision) if peak is not None else None
    if achieved is None or top is None:
        return None
    return achieved / top

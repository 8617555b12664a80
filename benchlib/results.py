"""Cell records and run files: versioned JSON that keeps the raw samples.

A run folder holds ``run.json`` (suite and environment, written before the first cell),
``results.jsonl`` (one ``CellRecord`` per line, appended and flushed as each cell finishes) and
``summary.json`` (derived rows, see ``benchlib.analysis``). Statistics are derived from the raw
samples whenever needed, never stored in place of them.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.errors import ConfigError

SCHEMA_VERSION = 1
"""History: 1 - first version (prepare_s, clock, host_s, memory, gpu_before, gpu_after,
layer_profile and the key's repeat were added with defaults, so every version-1 file still
loads)."""

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


class Status(str, enum.Enum):
    """How a cell ended."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, kw_only=True)
class CellKey:
    """The identity of a cell: (variant, target, batch size, precision) of one model.

    ``repeat`` tells apart measurements of the same cell: the dense baseline is measured
    again (``repeat=1``) after its variants, to see how far the machine drifted meanwhile.
    """

    model: str
    spec: str
    target: str
    batch_size: int
    precision: str
    repeat: int = 0

    def label(self) -> str:
        again = " (again)" if self.repeat else ""
        return f"{self.model} {self.spec}{again} {self.target} bs{self.batch_size} {self.precision}"


@dataclass(frozen=True, kw_only=True)
class CellRecord:
    """One finished cell: its raw samples (seconds per inference) or why it has none.

    ``flops`` holds per-image counts of the variant: macs, nonzero_macs, params,
    nonzero_params, and pruned_macs (the dense MACs of the layers the spec touched) /
    pruned_nonzero_macs (the nonzero MACs those layers keep in the variant).
    ``prepare_s`` is the target's build time (export, trace, compile), ``cold_s`` the first
    call; neither is in the samples. ``clock`` says what timed the samples ("host", "cuda
    events"); ``host_s`` is the host's end-to-end seconds per inference on CUDA. ``memory``
    comes from a pass apart from timing (``benchlib.harness.memory``); ``gpu_before`` and
    ``gpu_after`` are NVML samples. ``layer_profile`` is the per-layer time of an eager cell
    run with ``profile_layers`` (``benchlib.layer_profile.LayerProfile.to_dict``), else None.
    """

    key: CellKey
    status: Status
    reason: str = ""
    traceback: str = ""
    device: str = ""
    samples_s: tuple[float, ...] = ()
    loops: int = 0
    cold_s: float | None = None
    prepare_s: float | None = None
    warmup_runs: int = 0
    max_error: float | None = None
    threads: int | None = None
    recipe_sha256: str = ""
    flops: Mapping[str, int] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    clock: str = "host"
    host_s: float | None = None
    memory: Mapping[str, Any] = field(default_factory=dict)
    gpu_before: Mapping[str, Any] | None = None
    gpu_after: Mapping[str, Any] | None = None
    layer_profile: Mapping[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["samples_s"] = list(self.samples_s)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellRecord:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"cell record schema_version {version!r} is not supported; "
                f"choose from: {SCHEMA_VERSION}"
            )
        fields = dict(data)
        try:
            fields["key"] = CellKey(**fields["key"])
            fields["status"] = Status(fields["status"])
            fields["samples_s"] = tuple(fields.get("samples_s", ()))
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed cell record: {exc}") from exc


def append_record(path: Path, record: CellRecord) -> None:
    """Append one record to a JSONL file and force it to disk before returning."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: Path) -> Iterator[CellRecord]:
    """Records of a results.jsonl; a torn last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                return
            raise ConfigError(f"{path}:{number} is not valid JSON: {exc}") from exc
        yield CellRecord.from_dict(data)


def repair_tail(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so that appends start on a new line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def latest_records(path: Path) -> tuple[CellRecord, ...]:
    """The records of a results.jsonl, the last one of each cell when a cell was retried."""
    latest: dict[CellKey, CellRecord] = {}
    for record in read_records(path):
        latest.pop(record.key, None)
        latest[record.key] = record
    return tuple(latest.values())


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)

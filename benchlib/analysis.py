"""Speedups and realization: what share of the FLOP reduction became real time.

Definitions (DESIGN section 5), for a variant cell against the dense cell of the same model,
target, batch size and precision:

* theoretical speedup F = dense MACs / variant nonzero MACs
* measured speedup    T = dense median latency / variant median latency
* realization       eta = (1 - 1/T) / (1 - 1/F): 1 = all the saving became real, 0 = none,
  negative = slower. Undefined when F = 1. T > F is flagged: a cache or step effect.

``F_pruned`` restricts F to the layers the spec touched (the first conv and the classifier of
a magnitude variant stay dense, so the whole-model F is lower than 1/(1-amount)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from benchlib.harness.gpu import GpuSample, gpu_verdict_reasons
from benchlib.harness.stats import summarize, verdict
from benchlib.results import CellRecord, Status

DENSE = "dense"


@dataclass(frozen=True, kw_only=True)
class Row:
    """One cell of the summary: counts per image, latency in seconds, speedups as ratios."""

    model: str
    spec: str
    target: str
    batch_size: int
    precision: str
    status: str
    reason: str
    macs: int | None
    nonzero_macs: int | None
    params: int | None
    nonzero_params: int | None
    median_s: float | None
    ci_low_s: float | None
    ci_high_s: float | None
    cv: float | None
    samples: int
    throughput_per_s: float | None
    speedup_theoretical: float | None
    speedup_theoretical_pruned: float | None
    speedup_measured: float | None
    realization: float | None
    flags: tuple[str, ...]
    verdict: str
    verdict_reasons: tuple[str, ...]
    loops: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flags"] = list(self.flags)
        data["verdict_reasons"] = list(self.verdict_reasons)
        return data


def realization(theoretical: float, measured: float) -> float | None:
    """(1 - 1/T) / (1 - 1/F); None when F is 1 (nothing to realize)."""
    if theoretical == 1.0:
        return None
    return (1.0 - 1.0 / measured) / (1.0 - 1.0 / theoretical)


def _ratio(num: int | float | None, den: int | float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def gpu_reasons(record: CellRecord) -> tuple[str, ...]:
    """Why NVML's samples around a cell make it suspect (throttling, other processes)."""
    before, after = record.gpu_before, record.gpu_after
    return gpu_verdict_reasons(
        GpuSample.from_dict(before) if before else None,
        GpuSample.from_dict(after) if after else None,
    )


def summarize_records(records: Iterable[CellRecord]) -> list[Row]:
    """Rows for every record, speedups taken against the matching dense record."""
    records = list(records)
    medians = {
        r.key: summarize(r.samples_s) for r in records if r.status is Status.OK and r.samples_s
    }
    dense = {
        (r.key.model, r.key.target, r.key.batch_size, r.key.precision): r
        for r in records
        if r.key.spec == DENSE
    }
    rows = []
    for record in records:
        key, counts = record.key, record.flops
        stats = medians.get(key)
        base = dense.get((key.model, key.target, key.batch_size, key.precision))
        base_stats = medians.get(base.key) if base is not None else None
        theoretical = _ratio(base.flops.get("macs") if base else None, counts.get("nonzero_macs"))
        measured = _ratio(
            base_stats.median if base_stats else None, stats.median if stats else None
        )
        judged = (
            verdict(record.samples_s, record.device.split(":")[0], gpu_reasons(record))
            if stats
            else ("", ())
        )
        flags = []
        if theoretical is not None and measured is not None and measured > theoretical * 1.0001:
            flags.append("T>F: cache or step effect")
        rows.append(
            Row(
                model=key.model,
                spec=key.spec,
                target=key.target,
                batch_size=key.batch_size,
                precision=key.precision,
                status=record.status.value,
                reason=record.reason,
                macs=counts.get("macs"),
                nonzero_macs=counts.get("nonzero_macs"),
                params=counts.get("params"),
                nonzero_params=counts.get("nonzero_params"),
                median_s=stats.median if stats else None,
                ci_low_s=stats.ci_low if stats else None,
                ci_high_s=stats.ci_high if stats else None,
                cv=stats.cv if stats else None,
                samples=stats.n if stats else 0,
                throughput_per_s=key.batch_size / stats.median if stats else None,
                speedup_theoretical=theoretical,
                speedup_theoretical_pruned=_ratio(
                    counts.get("pruned_macs") or None, counts.get("pruned_nonzero_macs")
                ),
                speedup_measured=measured,
                realization=(
                    realization(theoretical, measured)
                    if theoretical is not None and measured is not None and key.spec != DENSE
                    else None
                ),
                flags=tuple(flags),
                verdict=judged[0],
                verdict_reasons=judged[1],
                loops=record.loops,
            )
        )
    return rows

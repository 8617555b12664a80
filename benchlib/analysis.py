"""Speedups and realization: what share of the FLOP reduction became real time.

Definitions (DESIGN section 5), for a variant cell against the dense cell of the same model,
target, batch size and precision:

* theoretical speedup F = dense MACs / variant nonzero MACs
* measured speedup    T = dense median latency / variant median latency
* realization       eta = (1 - 1/T) / (1 - 1/F): 1 = all the saving became real, 0 = none,
  negative = slower. Undefined when F = 1. T > F is flagged: a cache or step effect.

``F_pruned`` restricts F to the layers the spec touched (the first conv and the classifier of
a magnitude variant stay dense, so the whole-model F is lower than 1/(1-amount)).

Roofline (``benchlib.roofline``): achieved FLOP/s = 2 x MACs per image (the variant's dense
shapes: what dense kernels execute, zeros included) x batch size / median seconds per batch,
and its share of the device's peak for the cell's precision, when the run's environment names
a device the peak table knows (else None, printed "n/a").
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from benchlib.harness.gpu import GpuSample, gpu_verdict_reasons
from benchlib.harness.stats import Summary, summarize, verdict
from benchlib.results import CellKey, CellRecord, Status
from benchlib.roofline import (
    DevicePeak,
    achieved_flops_per_s,
    device_name,
    find_peak,
    load_peaks,
    roofline_share,
)

DENSE = "dense"


ABOVE_THEORY = "T>F: cache or step effect"
"""Flag of a row whose measured speedup beats the theoretical one."""
SLOWER_THAN_DENSE = "slower than dense"
"""Flag of a pruned row that runs slower than its dense baseline (T < 1)."""


@dataclass(frozen=True, kw_only=True)
class Row:
    """One cell of the summary: counts per image, latency in seconds, speedups as ratios,
    ``achieved_flops_per_s`` in FLOP/s (of the MACs executed: ``executed_macs``) and
    ``roofline_share`` a fraction of the device's peak
    (None: unknown device, printed "n/a"); ``peak_device`` names the peak table's row used."""

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
    achieved_flops_per_s: float | None = None
    roofline_share: float | None = None
    peak_device: str | None = None

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


DRIFT_LIMIT = {"cpu": 0.05, "cuda": 0.02}
"""Largest relative move of the dense baseline between the start and the end of its group."""

Group = tuple[str, str, int, str]


@dataclass(frozen=True)
class Baseline:
    """The dense cells of one group (model, target, batch size, precision): the one measured
    before the variants and, when there are variants, the one measured after them."""

    first: CellRecord
    samples: tuple[float, ...]
    median: float | None
    drift: float | None

    def reasons(self) -> tuple[str, ...]:
        limit = DRIFT_LIMIT.get(self.first.device.split(":")[0], DRIFT_LIMIT["cpu"])
        if self.drift is None or self.drift <= limit:
            return ()
        return (f"dense baseline moved {self.drift:.0%} while this group ran (machine drift)",)


def group_of(key: CellKey) -> Group:
    return (key.model, key.target, key.batch_size, key.precision)


def baselines(records: Iterable[CellRecord]) -> dict[Group, Baseline]:
    """Per group, the dense samples pooled from its opening and closing measurement, and the
    relative difference of their medians (the drift of the machine over the group)."""
    dense: dict[Group, list[CellRecord]] = {}
    for record in records:
        if record.key.spec == DENSE:
            dense.setdefault(group_of(record.key), []).append(record)
    found = {}
    for group, runs in dense.items():
        runs.sort(key=lambda r: r.key.repeat)
        measured = [r for r in runs if r.status is Status.OK and r.samples_s]
        medians = [statistics.median(r.samples_s) for r in measured]
        drift = max(medians) / min(medians) - 1.0 if len(medians) > 1 else None
        pooled = tuple(x for r in measured for x in r.samples_s)
        median = statistics.median(pooled) if pooled else None
        found[group] = Baseline(first=runs[0], samples=pooled, median=median, drift=drift)
    return found


def executed_macs(record: CellRecord, row: Row) -> int | None:
    """MACs per image the cell's kernels executed, for its achieved FLOP/s: dense kernels
    multiply every weight, zeros included (``row.macs``); a target that ran sparse kernels
    (``info["sparse_kernel_used"]``, cpu-sparse and cuda-sparse24) is credited its nonzero
    MACs, the work it did, so that its FLOP/s is never above what the hardware can do. (Its
    layers that stayed dense executed their zeros too; they are counted at their nonzero MACs,
    a lower bound.)"""
    if record.info.get("sparse_kernel_used") and row.nonzero_macs is not None:
        return row.nonzero_macs
    return row.macs


def summarize_records(
    records: Iterable[CellRecord],
    environment: Mapping[str, Any] | None = None,
    *,
    peaks: tuple[DevicePeak, ...] | None = None,
) -> list[Row]:
    """One row per cell (the closing dense measurement folds into the dense row), speedups
    taken against the group's dense baseline: its opening and closing samples pooled, so that
    a linear drift of the machine cancels; a larger drift makes the whole group suspect.

    ``environment`` is the run's fingerprint (run.json): with it, rows on a device in the peak
    table (``peaks``, default the shipped one) get their roofline share."""
    records = list(records)
    bases = baselines(records)
    table = peaks if peaks is not None else (load_peaks() if environment else ())
    rows = []
    for record in records:
        key = record.key
        if key.repeat:
            continue
        base = bases.get(group_of(key))
        samples = base.samples if key.spec == DENSE and base else record.samples_s
        stats = summarize(samples) if record.status is Status.OK and samples else None
        row = _row(record, stats, base)
        peak = find_peak(device_name(environment, record.device), table)
        achieved = achieved_flops_per_s(executed_macs(record, row), row.batch_size, row.median_s)
        rows.append(
            dataclasses.replace(
                row,
                achieved_flops_per_s=achieved,
                roofline_share=roofline_share(achieved, peak, row.precision),
                peak_device=peak.name if peak is not None else None,
            )
        )
    return rows


def _row(record: CellRecord, stats: Summary | None, base: Baseline | None) -> Row:
    key, counts = record.key, record.flops
    theoretical = _ratio(base.first.flops.get("macs") if base else None, counts.get("nonzero_macs"))
    measured = _ratio(base.median if base else None, stats.median if stats else None)
    extra = gpu_reasons(record) + (base.reasons() if base else ())
    judged = verdict(record.samples_s, record.device.split(":")[0], extra) if stats else ("", ())
    flags = []
    if theoretical is not None and measured is not None and measured > theoretical * 1.0001:
        flags.append(ABOVE_THEORY)
    if measured is not None and measured < 1.0 and key.spec != DENSE:
        flags.append(SLOWER_THAN_DENSE)
    return Row(
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

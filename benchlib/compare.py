"""Comparing two runs cell by cell: did a cell get faster or slower, and did its speedup change.

Cells are matched by their ``CellKey`` (model, spec, target, batch size, precision); the dense
cell's closing repeat is pooled with it, as :func:`benchlib.analysis.baselines` does. For each
cell measured in both runs:

* **test**: two-sided Mann-Whitney U on the raw samples (normal approximation with tie and
  continuity correction, as ``scipy.stats.mannwhitneyu(method="asymptotic")``); the p-values of
  all compared cells are adjusted together by Holm's step-down method (Holm 1979), which holds
  the family-wise error rate at ``alpha`` without Bonferroni's loss of power.
* **effect**: ratio = median B / median A, with a seeded percentile-bootstrap 95% CI.
* **verdict**: ``slower`` / ``faster`` only when the adjusted p is below ``alpha`` and the
  median moved by at least the minimum effect (|ratio - 1| >= 5% on CPU, 2% on GPU, from the
  cell's device, unless given); ``same`` when it moved less; ``not significant`` when it moved
  more but the test cannot tell the change from noise.

The measured speedup T of each pruned cell (against its own run's dense baseline) is compared
the same way, with a bootstrap p-value of T_B / T_A = 1 and its own Holm family.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchlib.analysis import DENSE, Baseline, Group, baselines, group_of, realization
from benchlib.errors import ConfigError
from benchlib.results import RESULTS_FILE, RUN_FILE, CellKey, CellRecord, Status, latest_records

MIN_EFFECT = {"cpu": 0.05, "cuda": 0.02}
"""Default smallest relative change of a median that counts, per device type."""
CONFIDENCE = 0.95
COMPARISON_SCHEMA_VERSION = 1
"""Version of ``Comparison.to_dict`` (``bench compare --json``)."""
RESAMPLES = 2000

SLOWER, FASTER, SAME, NOT_SIGNIFICANT = "slower", "faster", "same", "not significant"
HIGHER, LOWER = "higher", "lower"
ADDED, REMOVED, FAILED = "added", "removed", "failed"


@dataclass(frozen=True)
class StoredRun:
    """A run folder as read back: its path, ``run.json`` and the latest record of each cell."""

    path: Path
    info: Mapping[str, Any]
    records: tuple[CellRecord, ...]

    @property
    def environment(self) -> Mapping[str, Any]:
        env = self.info.get("environment")
        return env if isinstance(env, Mapping) else {}


def load_run(path: Path) -> StoredRun:
    """Read a run folder. Raises ConfigError naming what is missing or unreadable."""
    if not path.is_dir():
        raise ConfigError(f"run folder {str(path)!r} does not exist or is not a folder")
    missing = [name for name in (RUN_FILE, RESULTS_FILE) if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"{str(path)!r} is not a run folder: missing {', '.join(missing)}")
    try:
        info = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path / RUN_FILE)!r} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise ConfigError(f"{str(path / RUN_FILE)!r} does not hold a JSON object")
    return StoredRun(path=path, info=info, records=latest_records(path / RESULTS_FILE))


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(U of ``a``, two-sided p) of the Mann-Whitney U test, normal approximation with tie
    and continuity correction. p is 1 when every value is tied. Raises ConfigError on an
    empty sample."""
    n1, n2 = len(a), len(b)
    if not n1 or not n2:
        raise ConfigError(f"Mann-Whitney U needs samples on both sides; got {n1} and {n2}")
    ordered = sorted([(x, 0) for x in a] + [(x, 1) for x in b])
    n = n1 + n2
    rank_sum_a, ties, start = 0.0, 0.0, 0
    while start < n:
        end = start
        while end + 1 < n and ordered[end + 1][0] == ordered[start][0]:
            end += 1
        count = end - start + 1
        ties += count**3 - count
        rank = (start + end) / 2.0 + 1.0  # the average rank of the tied run
        rank_sum_a += rank * sum(1 for _, side in ordered[start : end + 1] if side == 0)
        start = end + 1
    u_a = rank_sum_a - n1 * (n1 + 1) / 2.0
    mean = n1 * n2 / 2.0
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0.0:
        return u_a, 1.0
    z = (max(u_a, n1 * n2 - u_a) - mean - 0.5) / math.sqrt(variance)
    return u_a, min(1.0, math.erfc(z / math.sqrt(2.0)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the i-th smallest of m is multiplied by
    (m - i + 1), made monotone, and capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for position, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - position) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _medians(rng: np.random.Generator, samples: Sequence[float]) -> np.ndarray:
    values = np.asarray(samples, dtype=np.float64)
    picks = rng.integers(0, values.size, size=(RESAMPLES, values.size))
    return np.median(values[picks], axis=1)


def _interval(ratios: np.ndarray) -> tuple[float, float]:
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)


def judge(
    ratio: float, p_adjusted: float, alpha: float, min_effect: float, up: str, down: str
) -> str:
    """``up``/``down`` when p_adjusted < alpha and |ratio - 1| >= min_effect; ``same`` when the
    change is below the minimum effect; ``not significant`` otherwise."""
    if abs(ratio - 1.0) < min_effect:
        return SAME
    if p_adjusted >= alpha:
        return NOT_SIGNIFICANT
    return up if ratio > 1.0 else down


@dataclass(frozen=True, kw_only=True)
class SpeedupChange:
    """The measured speedup T (dense median / variant median, within each run) in A and B:
    ``ratio`` = T_B / T_A with its bootstrap CI and p-value; realization eta per run."""

    speedup_a: float
    speedup_b: float
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    p_adjusted: float = 1.0
    realization_a: float | None = None
    realization_b: float | None = None
    verdict: str = ""


@dataclass(frozen=True, kw_only=True)
class CellChange:
    """One cell in both runs (or one): medians in seconds per batch, ratio = B / A."""

    key: CellKey
    verdict: str
    note: str = ""
    device: str = ""
    n_a: int = 0
    n_b: int = 0
    median_a_s: float | None = None
    median_b_s: float | None = None
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    min_effect: float | None = None
    speedup: SpeedupChange | None = None


@dataclass(frozen=True, kw_only=True)
class EnvDifference:
    """One fingerprint field that differs between the runs (values as stored, None = absent)."""

    field: str
    a: Any
    b: Any

    def line(self) -> str:
        """One warning line; a 40-digit commit is cut to 12 digits (as ``git log`` shows)."""

        def show(value: Any) -> str:
            if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", value):
                value = value[:12] + value[40:]
            return "absent" if value is None else repr(value)

        return f"{self.field} differs: A {show(self.a)}, B {show(self.b)}"


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Run B against run A; ``min_effect`` None means the per-device default."""

    run_a: str
    run_b: str
    alpha: float
    min_effect: float | None
    cells: tuple[CellChange, ...]
    environment: tuple[EnvDifference, ...] = field(default=())

    def regressions(self) -> tuple[CellChange, ...]:
        """Cells significantly slower in B, and cells that ran in A but failed in B."""
        return tuple(
            c for c in self.cells if c.verdict == SLOWER or c.note.startswith("failed in B")
        )

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for cell in self.cells:
            found[cell.verdict] = found.get(cell.verdict, 0) + 1
        return found

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            schema_version=COMPARISON_SCHEMA_VERSION,
            correction="holm",
            test="mann-whitney-u",
            confidence=CONFIDENCE,
            resamples=RESAMPLES,
            counts=self.counts(),
            regression=bool(self.regressions()),
        )
        return data


def _samples(record: CellRecord, bases: Mapping[Group, Baseline]) -> tuple[float, ...]:
    if record.status is not Status.OK:
        return ()
    base = bases.get(group_of(record.key)) if record.key.spec == DENSE else None
    return base.samples if base is not None else record.samples_s


def compare_runs(
    a: StoredRun,
    b: StoredRun,
    *,
    alpha: float = 0.01,
    min_effect: float | None = None,
    seed: int = 0,
) -> Comparison:
    """Every cell of A and B judged as the module docstring says; bootstraps use a PCG64
    generator seeded with ``seed`` per cell, so the same runs give the same report. Raises
    ConfigError when alpha is not in (0, 1) or min_effect not in [0, 1)."""
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), e.g. 0.01; got {alpha}")
    if min_effect is not None and not 0.0 <= min_effect < 1.0:
        raise ConfigError(f"min effect must be in [0, 1), e.g. 0.05 for 5%; got {min_effect}")
    index_a, index_b = _index(a), _index(b)
    bases = (baselines(a.records), baselines(b.records))
    cells: list[CellChange] = []
    for key in dict.fromkeys([*index_a, *index_b]):
        ra, rb = index_a.get(key), index_b.get(key)
        if ra is None or rb is None:
            cells.append(CellChange(key=key, verdict=ADDED if ra is None else REMOVED))
            continue
        sa, sb = _samples(ra, bases[0]), _samples(rb, bases[1])
        if not sa or not sb:
            notes = [
                f"{r.status.value} in {n}" + (f": {r.reason}" if r.reason else "")
                for n, r, s in (("A", ra, sa), ("B", rb, sb))
                if not s
            ]
            cells.append(CellChange(key=key, verdict=FAILED, note="; ".join(notes)))
            continue
        rng = np.random.Generator(np.random.PCG64(seed))
        low, high = _interval(_medians(rng, sb) / _medians(rng, sa))
        device = rb.device.split(":")[0]
        cells.append(
            CellChange(
                key=key,
                verdict="",
                device=rb.device,
                n_a=len(sa),
                n_b=len(sb),
                median_a_s=statistics.median(sa),
                median_b_s=statistics.median(sb),
                ratio=statistics.median(sb) / statistics.median(sa),
                ci_low=low,
                ci_high=high,
                p_value=mann_whitney_u(sa, sb)[1],
                min_effect=min_effect if min_effect is not None else MIN_EFFECT.get(device, 0.05),
                speedup=_speedup((ra, rb), bases, rng),
            )
        )
    return Comparison(
        run_a=str(a.path),
        run_b=str(b.path),
        alpha=alpha,
        min_effect=min_effect,
        cells=_judged(cells, alpha),
        environment=environment_differences(a, b),
    )


def _index(run: StoredRun) -> dict[CellKey, CellRecord]:
    return {r.key: r for r in run.records if not r.key.repeat}


def _speedup(
    records: tuple[CellRecord, CellRecord],
    bases: tuple[Mapping[Group, Baseline], Mapping[Group, Baseline]],
    rng: np.random.Generator,
) -> SpeedupChange | None:
    """T in both runs (against the pooled dense baseline, as in the run's summary) and the
    bootstrap distribution of T_B / T_A; None for a dense cell or a run without its baseline."""
    group = group_of(records[0].key)
    dense = [base.get(group) for base in bases]
    if records[0].key.spec == DENSE or any(d is None or not d.samples for d in dense):
        return None
    (da, db), (va, vb) = (d.samples for d in dense if d), (r.samples_s for r in records)
    t_a = statistics.median(da) / statistics.median(va)
    t_b = statistics.median(db) / statistics.median(vb)
    boot = (_medians(rng, db) / _medians(rng, vb)) / (_medians(rng, da) / _medians(rng, va))
    low, high = _interval(boot)
    eta = []
    for base, record, measured in zip(dense, records, (t_a, t_b), strict=True):
        macs, nonzero = (
            base.first.flops.get("macs") if base else None,
            record.flops.get("nonzero_macs"),
        )
        eta.append(realization(macs / nonzero, measured) if macs and nonzero else None)
    return SpeedupChange(
        speedup_a=t_a,
        speedup_b=t_b,
        ratio=t_b / t_a,
        ci_low=low,
        ci_high=high,
        p_value=min(1.0, 2.0 * min(float(np.mean(boot <= 1.0)), float(np.mean(boot >= 1.0)))),
        realization_a=eta[0],
        realization_b=eta[1],
    )


def _judged(cells: list[CellChange], alpha: float) -> tuple[CellChange, ...]:
    """Holm over the tested cells, then the verdicts; one family for the cells' medians and
    one for the speedups."""
    tested = [i for i, c in enumerate(cells) if c.p_value is not None]
    adjusted = dict(zip(tested, holm([cells[i].p_value or 0.0 for i in tested]), strict=True))
    with_t = {i: s for i in tested if (s := cells[i].speedup) is not None}
    adjusted_t = dict(zip(with_t, holm([s.p_value for s in with_t.values()]), strict=True))
    out = []
    for index, cell in enumerate(cells):
        if index in adjusted and cell.ratio is not None and cell.min_effect is not None:
            p, effect, speedup = adjusted[index], cell.min_effect, with_t.get(index)
            if speedup is not None:
                p_t = adjusted_t[index]
                verdict_t = judge(speedup.ratio, p_t, alpha, effect, HIGHER, LOWER)
                speedup = replace(speedup, p_adjusted=p_t, verdict=verdict_t)
            verdict = judge(cell.ratio, p, alpha, effect, SLOWER, FASTER)
            cell = replace(cell, p_adjusted=p, verdict=verdict, speedup=speedup)
        out.append(cell)
    return tuple(out)


FINGERPRINT = (
    ("cpu.model", "CPU model"),
    ("cpu.logical_cores", "logical cores"),
    ("cpu.threads", "threads"),
    ("cpu.governor", "CPU governor"),
    ("gpus", "GPUs"),
    ("platform", "platform"),
    ("git_sha", "git SHA"),
)
"""Fingerprint fields whose difference can move a measurement (dotted paths into the run's
environment) and their names in a warning; every package version is compared as well. The
hostname is left out: a VM's name says nothing about its hardware."""


def _lookup(env: Mapping[str, Any], path: str) -> Any:
    value: Any = env
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _drivers(run: StoredRun) -> list[str] | None:
    found = {
        str(sample["driver"])
        for r in run.records
        for sample in (r.gpu_before, r.gpu_after)
        if sample and sample.get("driver")
    }
    return sorted(found) or None


def environment_differences(a: StoredRun, b: StoredRun) -> tuple[EnvDifference, ...]:
    """The fingerprint fields that differ, in a fixed order: machine, package versions, GPU
    driver (from the cells' NVML samples), code."""
    env_a, env_b = a.environment, b.environment
    pairs = [(label, _lookup(env_a, path), _lookup(env_b, path)) for path, label in FINGERPRINT]
    versions_a, versions_b = _lookup(env_a, "versions") or {}, _lookup(env_b, "versions") or {}
    for name in sorted(set(versions_a) | set(versions_b)):
        pairs.insert(-1, (f"{name} version", versions_a.get(name), versions_b.get(name)))
    pairs.insert(-1, ("GPU driver", _drivers(a), _drivers(b)))
    return tuple(EnvDifference(field=f, a=x, b=y) for f, x, y in pairs if x != y)

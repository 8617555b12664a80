"""Statistics of raw latency samples: pure functions, no timing of their own.

Conventions: percentiles interpolate linearly between order statistics (numpy's default
``linear`` method, type 7 of Hyndman and Fan); ``std`` is the sample standard deviation
(ddof=1); ``mad`` is the unscaled median absolute deviation from the median; ``cv`` is
std / mean. The confidence interval of the median is a percentile bootstrap (Efron 1979) with a
fixed seed, so the same samples always give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from benchlib.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Descriptive statistics of one cell's samples, all in seconds except n and cv."""

    n: int
    median: float
    mean: float
    std: float
    min: float
    max: float
    p90: float
    p99: float
    q1: float
    q3: float
    iqr: float
    mad: float
    cv: float
    ci_low: float
    ci_high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), linear interpolation between order statistics."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def bootstrap_median_ci(
    samples: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median.

    Draws ``resamples`` resamples with replacement from a PCG64 generator seeded with ``seed``
    and returns the (1-c)/2 and (1+c)/2 percentiles of their medians. One sample gives a
    zero-width interval at that sample.
    """
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.Generator(np.random.PCG64(seed))
    picks = rng.integers(0, values.size, size=(resamples, values.size))
    medians = np.median(values[picks], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.percentile(medians, [100.0 * tail, 100.0 * (1.0 - tail)])
    return float(low), float(high)


def summarize(
    samples: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Summary:
    """Summarize raw per-inference samples (seconds). Raises ConfigError when there are none."""
    if len(samples) == 0:
        raise ConfigError("cannot summarize an empty list of samples")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(samples, dtype=np.float64)
    median = float(np.median(values))
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    q1, q3, p90, p99 = (float(v) for v in np.percentile(values, [25.0, 75.0, 90.0, 99.0]))
    ci_low, ci_high = bootstrap_median_ci(
        samples, confidence=confidence, resamples=resamples, seed=seed
    )
    return Summary(
        n=int(values.size),
        median=median,
        mean=mean,
        std=std,
        min=float(values.min()),
        max=float(values.max()),
        p90=p90,
        p99=p99,
        q1=q1,
        q3=q3,
        iqr=q3 - q1,
        mad=float(np.median(np.abs(values - median))),
        cv=std / mean if mean > 0 else 0.0,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
    )


CV_LIMIT = {"cpu": 0.10, "cuda": 0.02}
"""Largest coefficient of variation of a stable measurement, per device type (DESIGN 6)."""
MIN_STABLE_SAMPLES = 5
OUTLIER_SHARE_LIMIT = 0.10
FAR_OUT = 3.0
"""Tukey's outer fences: values beyond Q1 - 3 IQR or Q3 + 3 IQR are 'far out'. The inner
fences (1.5 IQR) catch the ordinary right tail of CPU latency (5-15% of samples on a quiet
machine), which leaves the median untouched; far-out values mean interference."""


def tukey_outliers(samples: Sequence[float], fence: float = FAR_OUT) -> int:
    """How many samples lie outside [Q1 - fence x IQR, Q3 + fence x IQR]."""
    values = np.asarray(samples, dtype=np.float64)
    q1, q3 = np.percentile(values, [25.0, 75.0])
    low, high = q1 - fence * (q3 - q1), q3 + fence * (q3 - q1)
    return int(((values < low) | (values > high)).sum())


def verdict(
    samples: Sequence[float], device_type: str, extra: Sequence[str] = ()
) -> tuple[str, tuple[str, ...]]:
    """``("valid", ())`` or ``("suspect", reasons)``: CV over the device's limit, fewer than
    five samples, far-out Tukey outliers in more than 10% of the samples (and more than one),
    plus ``extra`` reasons found elsewhere (GPU
    throttling, other processes on the GPU)."""
    summary = summarize(samples, resamples=1)
    reasons = []
    limit = CV_LIMIT.get(device_type, CV_LIMIT["cpu"])
    if summary.cv > limit:
        reasons.append(f"CV {summary.cv:.1%} over {limit:.0%}")
    if summary.n < MIN_STABLE_SAMPLES:
        reasons.append(f"only {summary.n} samples")
    outliers = tukey_outliers(samples)
    if outliers > max(1.0, OUTLIER_SHARE_LIMIT * summary.n):  # one stray sample is allowed
        reasons.append(f"{outliers} of {summary.n} samples are far-out outliers (Tukey)")
    reasons.extend(extra)
    return ("suspect" if reasons else "valid"), tuple(reasons)

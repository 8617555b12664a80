"""The timing loop with a fake clock: exact sample values, counts and calibration."""

from __future__ import annotations

import gc

import pytest
import torch

from benchlib.errors import ConfigError
from benchlib.harness.stats import summarize
from benchlib.harness.timing import TimingConfig, measure
from benchlib.target import Prepared
from tests.fakes import FakeClock, timed_prepared


def test_samples_are_per_inference_seconds_and_cold_call_is_apart() -> None:
    clock = FakeClock()
    # first call 0.5 s (lazy init), then every call 0.01 s
    prepared = timed_prepared(clock, lambda n: 0.5 if n == 0 else 0.01)
    cfg = TimingConfig(warmup_runs=2, warmup_s=0.0, min_samples=5, min_time_s=0.0, min_sample_s=0.0)
    t = measure(prepared, cfg, clock)
    assert t.cold_s == pytest.approx(0.5)
    assert t.warmup_runs == 2
    assert t.loops == 1
    assert t.samples_s == pytest.approx((0.01,) * 5)


def test_stop_rule_needs_both_min_samples_and_min_time() -> None:
    clock = FakeClock()
    prepared = timed_prepared(clock, lambda n: 0.1)
    cfg = TimingConfig(warmup_runs=0, warmup_s=0.0, min_samples=3, min_time_s=1.0, min_sample_s=0.0)
    t = measure(prepared, cfg, clock)
    assert len(t.samples_s) == 10  # 3 samples take 0.3 s; time needs 10 of 0.1 s


def test_warmup_runs_until_count_and_time() -> None:
    clock = FakeClock()
    prepared = timed_prepared(clock, lambda n: 0.05)
    cfg = TimingConfig(warmup_runs=1, warmup_s=0.2, min_samples=1, min_time_s=0.0, min_sample_s=0.0)
    assert measure(prepared, cfg, clock).warmup_runs == 4


def test_fast_calls_are_batched_into_loops_above_min_sample_time() -> None:
    clock = FakeClock()
    prepared = timed_prepared(clock, lambda n: 1e-5)
    cfg = TimingConfig(
        warmup_runs=5, warmup_s=0.0, min_samples=4, min_time_s=0.0, min_sample_s=1e-3
    )
    t = measure(prepared, cfg, clock)
    assert t.loops == 100
    assert t.samples_s == pytest.approx((1e-5,) * 4)


def test_max_time_caps_very_slow_calls() -> None:
    clock = FakeClock()
    prepared = timed_prepared(clock, lambda n: 10.0)
    cfg = TimingConfig(
        warmup_runs=0,
        warmup_s=0.0,
        min_samples=10,
        min_time_s=0.0,
        max_time_s=25.0,
        min_sample_s=0.0,
    )
    assert len(measure(prepared, cfg, clock).samples_s) == 3


@pytest.mark.parametrize("field", ["warmup_runs", "min_samples", "min_time_s"])
def test_bad_timing_config_is_rejected(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TimingConfig(**{field: -1})


def test_fake_clock_samples_give_hand_computed_statistics() -> None:
    clock = FakeClock()
    # cold call 1 s, then calls of 1, 2, ..., 10 ms
    prepared = timed_prepared(clock, lambda n: 1.0 if n == 0 else n * 1e-3)
    cfg = TimingConfig(
        warmup_runs=0, warmup_s=0.0, min_samples=10, min_time_s=0.0, min_sample_s=0.0
    )
    t = measure(prepared, cfg, clock)
    assert t.cold_s == pytest.approx(1.0)
    assert t.samples_s == pytest.approx(tuple(n * 1e-3 for n in range(1, 11)))
    s = summarize(t.samples_s)
    assert (s.median, s.p90, s.iqr, s.mad) == pytest.approx((5.5e-3, 9.1e-3, 4.5e-3, 2.5e-3))
    assert t.total_s == pytest.approx(1.0 + 0.055)


def test_a_cold_call_made_by_the_caller_is_not_repeated() -> None:
    clock = FakeClock()
    calls: list[int] = []
    prepared = timed_prepared(clock, lambda n: calls.append(n) or 0.01)
    cfg = TimingConfig(warmup_runs=2, warmup_s=0.0, min_samples=3, min_time_s=0.0, min_sample_s=0.0)
    t = measure(prepared, cfg, clock, cold_s=0.7)
    assert t.cold_s == 0.7
    assert len(calls) == 2 + 3


def test_garbage_collector_is_restored() -> None:
    clock = FakeClock()
    prepared = timed_prepared(clock, lambda n: 0.01)
    measure(prepared, TimingConfig(min_samples=2, min_time_s=0.0, warmup_s=0.0), clock)
    assert gc.isenabled()


@pytest.mark.parametrize(
    ("field", "value"),
    [("warmup_s", -1.0), ("max_samples", 1), ("max_time_s", 0.5), ("min_sample_s", -1e-3)],
)
def test_more_bad_timing_configs(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        TimingConfig(**{field: value})


def test_input_sets_rotate_one_per_sample() -> None:
    clock = FakeClock()
    bound: list[float] = []
    base = timed_prepared(clock, lambda n: 0.01)

    def rebind(inputs: tuple[torch.Tensor, ...]) -> None:
        bound.append(float(inputs[0]))

    prepared = Prepared(run=base.run, synchronize=base.synchronize, rebind=rebind)
    pool = [(torch.tensor(float(k)),) for k in range(3)]
    cfg = TimingConfig(
        warmup_runs=0,
        warmup_s=0.0,
        min_samples=5,
        min_time_s=0.0,
        min_sample_s=0.0,
        rotate_inputs=3,
    )
    measure(prepared, cfg, clock, input_pool=pool)
    assert bound == [0.0, 1.0, 2.0, 0.0, 1.0]

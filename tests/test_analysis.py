"""Speedup, realization and flags from records, against hand-computed values."""

from __future__ import annotations

import pytest

from benchlib.analysis import realization, summarize_records
from benchlib.results import CellKey, CellRecord, Status


def record(spec: str, median: float, nonzero_macs: int, target: str = "t") -> CellRecord:
    return CellRecord(
        key=CellKey(model="m", spec=spec, target=target, batch_size=1, precision="fp32"),
        status=Status.OK,
        samples_s=(median,) * 5,
        flops={
            "macs": 1000,
            "nonzero_macs": nonzero_macs,
            "params": 10,
            "nonzero_params": 5,
            "pruned_macs": 800 if spec != "dense" else 0,
            "pruned_nonzero_macs": 80 if spec != "dense" else 0,
        },
    )


def test_realization_definition() -> None:
    assert realization(2.0, 2.0) == 1.0
    assert realization(2.0, 1.0) == 0.0
    assert realization(4.0, 2.0) == pytest.approx(0.5 / 0.75)
    assert realization(2.0, 0.5) == -2.0
    assert realization(1.0, 1.2) is None


def test_rows_against_the_dense_baseline_of_the_same_target() -> None:
    rows = summarize_records(
        [
            record("dense", 0.010, 1000),
            record("magnitude:0.9", 0.008, 280),
            record("dense", 0.020, 1000, target="u"),
            record("magnitude:0.9", 0.010, 280, target="u"),
        ]
    )
    pruned_t = rows[1]
    assert pruned_t.speedup_theoretical == pytest.approx(1000 / 280)
    assert pruned_t.speedup_theoretical_pruned == pytest.approx(10.0)
    assert pruned_t.speedup_measured == pytest.approx(1.25)
    assert pruned_t.realization == pytest.approx((1 - 1 / 1.25) / (1 - 280 / 1000))
    assert pruned_t.throughput_per_s == pytest.approx(125.0)
    assert rows[3].speedup_measured == pytest.approx(2.0)
    assert rows[0].speedup_measured == 1.0 and rows[0].realization is None
    assert rows[0].speedup_theoretical_pruned is None


def test_speedup_above_theoretical_is_flagged() -> None:
    rows = summarize_records([record("dense", 0.010, 1000), record("magnitude:0.5", 0.004, 500)])
    assert rows[1].flags == ("T>F: cache or step effect",)


def test_a_variant_slower_than_dense_is_flagged() -> None:
    rows = summarize_records(
        [
            record("dense", 0.010, 1000, target="cpu-sparse"),
            record("l1:0.5", 0.012, 500, "cpu-sparse"),
        ]
    )
    assert rows[1].flags == ("slower than dense",)
    assert rows[1].realization is not None and rows[1].realization < 0
    assert rows[0].flags == ()


def test_failed_baseline_leaves_speedups_empty() -> None:
    failed = CellRecord(
        key=CellKey(model="m", spec="dense", target="t", batch_size=1, precision="fp32"),
        status=Status.FAILED,
        reason="x",
    )
    rows = summarize_records([failed, record("magnitude:0.5", 0.004, 500)])
    assert rows[1].speedup_measured is None and rows[1].realization is None
    assert rows[0].median_s is None and rows[0].samples == 0


def test_closing_baseline_is_pooled_and_drift_makes_the_group_suspect() -> None:
    def dense(median: float, repeat: int) -> CellRecord:
        base = record("dense", median, 1000)
        return CellRecord(
            **{**base.__dict__, "key": CellKey(**{**base.key.__dict__, "repeat": repeat})}
        )

    steady = summarize_records(
        [dense(0.010, 0), record("magnitude:0.9", 0.010, 280), dense(0.0102, 1)]
    )
    assert len(steady) == 2
    assert steady[0].samples == 10 and steady[0].verdict == "valid"
    assert steady[1].speedup_measured == pytest.approx(1.01)  # pooled median 0.0101
    drifted = summarize_records(
        [dense(0.010, 0), record("magnitude:0.9", 0.010, 280), dense(0.012, 1)]
    )
    assert all(row.verdict == "suspect" for row in drifted)
    assert drifted[1].verdict_reasons == (
        "dense baseline moved 20% while this group ran (machine drift)",
    )

"""bench compare's library side: the tests and corrections against known answers, and two
stored runs with a known difference against golden text and JSON.

The stored runs under tests/data/compare/ are written by ``write_runs`` below (seeded
synthetic samples); ``BENCHLIB_UPDATE_GOLDEN=1`` rewrites them and the golden files.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console, RenderableType

from benchlib.compare import (
    ADDED,
    FAILED,
    FASTER,
    HIGHER,
    LOWER,
    NOT_SIGNIFICANT,
    REMOVED,
    SAME,
    SLOWER,
    Comparison,
    compare_runs,
    holm,
    judge,
    load_run,
    mann_whitney_u,
)
from benchlib.errors import ConfigError
from benchlib.report.compare import render_comparison
from benchlib.results import RESULTS_FILE, RUN_FILE, CellKey, CellRecord, Status, read_records
from benchlib.results import write_json as write_run_json

DATA = Path(__file__).parent / "data" / "compare"
UPDATE = bool(os.environ.get("BENCHLIB_UPDATE_GOLDEN"))

DENSE_MACS = 100_000_000
# (spec, repeat, median A s, median B s, samples, sigma, nonzero MACs); None = not in that run
CELLS = (
    ("dense", 0, 0.0100, 0.0101, 40, 0.03, DENSE_MACS),  # a 1% change: noise
    ("magnitude:0.5", 0, 0.0096, 0.01152, 40, 0.03, 50_000_000),  # a 20% regression
    ("l1:0.5", 0, 0.0040, 0.0036, 40, 0.03, 25_000_000),  # 10% faster
    ("slim:0.5", 0, 0.0050, 0.0054, 5, 0.08, 30_000_000),  # 8%, too few samples to tell
    ("nm:2:4", 0, 0.0098, 0.0, 40, 0.03, 50_000_000),  # runs in A, fails in B
    ("random:0.5", 0, 0.0055, None, 40, 0.03, 25_000_000),  # only in A
    ("fpgm:0.5", 0, None, 0.0039, 40, 0.03, 25_000_000),  # only in B
    ("dense", 1, 0.0101, 0.0100, 40, 0.03, DENSE_MACS),  # the closing dense repeat
)
ENVIRONMENT: dict[str, Any] = {
    "cpu": {"governor": None, "logical_cores": 2, "model": "AMD EPYC", "threads": 2},
    "git_sha": "1111111111111111111111111111111111111111",
    "gpus": [],
    "hostname": "vm",
    "platform": "Linux-6.18-x86_64-with-glibc2.36",
    "versions": {"numpy": "2.4.6", "python": "3.11.7", "torch": "2.14.1"},
}
ENVIRONMENT_B = {
    **ENVIRONMENT,
    "cpu": {**ENVIRONMENT["cpu"], "model": "Intel(R) Xeon(R) Processor"},
    "git_sha": "2222222222222222222222222222222222222222-dirty",
    "hostname": "other-vm",  # not a difference that matters
    "versions": {**ENVIRONMENT["versions"], "torch": "2.15.0"},
}


def _record(
    spec: str, repeat: int, median: float | None, n: int, sigma: float, nonzero: int, seed: int
) -> CellRecord:
    key = CellKey(
        model="tiny", spec=spec, target="torch-eager", batch_size=1, precision="fp32", repeat=repeat
    )
    flops = {
        "macs": DENSE_MACS,
        "nonzero_macs": nonzero,
        "params": 1_000_000,
        "nonzero_params": 1_000_000 * nonzero // DENSE_MACS,
        "pruned_macs": 0 if spec == "dense" else 90_000_000,
        "pruned_nonzero_macs": 0 if spec == "dense" else nonzero - 10_000_000,
    }
    if not median:
        return CellRecord(
            key=key,
            status=Status.FAILED,
            reason="ExportError: 2:4 sparsity needs a GPU",
            device="cpu",
            flops=flops,
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    samples = median * np.exp(rng.normal(0.0, sigma, size=n))
    return CellRecord(
        key=key,
        status=Status.OK,
        device="cpu",
        samples_s=tuple(round(float(s), 9) for s in samples),  # whole ns, as perf_counter_ns
        loops=1,
        threads=2,
        flops=flops,
    )


def _minimal(record: CellRecord) -> dict[str, Any]:
    """The record's JSON without the fields left at their defaults, so that the stored runs
    keep loading when later schema-1 fields are added (each with a default)."""
    defaults = CellRecord(key=record.key, status=record.status).to_dict()
    data = record.to_dict()
    keep = {"key", "status", "schema_version"}
    return {k: v for k, v in data.items() if k in keep or v != defaults[k]}


def write_runs(root: Path) -> tuple[Path, Path]:
    """Two run folders, a/ and b/, with the known differences of CELLS."""
    folders = []
    for side, environment in ((0, ENVIRONMENT), (1, ENVIRONMENT_B)):
        folder = root / "ab"[side]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULTS_FILE).unlink(missing_ok=True)
        info = {
            "schema_version": 1,
            "suite": {"name": "compare-fixture"},
            "targets": ["torch-eager"],
            "skipped_targets": {},
            "planned_cells": 7,
            "started_at": f"2026-12-0{side + 1}T10:00:00+00:00",
            "environment": environment,
        }
        write_run_json(folder / RUN_FILE, info)
        for index, (spec, repeat, med_a, med_b, n, sigma, nonzero) in enumerate(CELLS):
            median = (med_a, med_b)[side]
            if median is not None:
                record = _record(spec, repeat, median, n, sigma, nonzero, 100 * side + index)
                with (folder / RESULTS_FILE).open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(_minimal(record), sort_keys=True) + "\n")
        folders.append(folder)
    return folders[0], folders[1]


def render(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(renderable)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def stored() -> tuple[Path, Path]:
    if UPDATE:
        write_runs(DATA)
    return DATA / "a", DATA / "b"


def test_stored_runs_are_what_the_generator_writes(
    stored: tuple[Path, Path], tmp_path: Path
) -> None:
    for folder, kept in zip(write_runs(tmp_path), stored, strict=True):
        assert json.loads((folder / RUN_FILE).read_text()) == json.loads(
            (kept / RUN_FILE).read_text()
        )
        assert list(read_records(folder / RESULTS_FILE)) == list(read_records(kept / RESULTS_FILE))


def _golden_comparison(stored: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Comparison:
    monkeypatch.chdir(DATA.parents[2])  # paths in the report relative to the repository
    rel_a, rel_b = (p.relative_to(DATA.parents[2]) for p in stored)
    return compare_runs(load_run(rel_a), load_run(rel_b))


def test_rendering_matches_golden(
    stored: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    comparison = _golden_comparison(stored, monkeypatch)
    text = render(render_comparison(comparison))
    golden = DATA / "compare.txt"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text()


def test_json_matches_golden(stored: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    comparison = _golden_comparison(stored, monkeypatch)
    data = json.loads(json.dumps(comparison.to_dict()))
    golden = DATA / "compare.json"
    if UPDATE:
        golden.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    assert data == json.loads(golden.read_text())


def test_the_known_differences_are_found(stored: tuple[Path, Path]) -> None:
    comparison = compare_runs(load_run(stored[0]), load_run(stored[1]))
    verdicts = {c.key.spec: c.verdict for c in comparison.cells}
    assert verdicts == {
        "dense": SAME,
        "magnitude:0.5": SLOWER,
        "l1:0.5": FASTER,
        "slim:0.5": NOT_SIGNIFICANT,
        "nm:2:4": FAILED,
        "random:0.5": REMOVED,
        "fpgm:0.5": ADDED,
    }
    cells = {c.key.spec: c for c in comparison.cells}
    slower = cells["magnitude:0.5"]
    assert slower.ratio is not None and slower.ci_low is not None and slower.ci_high is not None
    assert slower.ci_low < 1.2 < slower.ci_high and slower.ci_low > 1.05
    assert cells["dense"].n_a == 80  # the closing repeat pooled with the dense cell
    assert cells["nm:2:4"].note == "failed in B: ExportError: 2:4 sparsity needs a GPU"
    speedup = cells["magnitude:0.5"].speedup
    assert speedup is not None and speedup.verdict == LOWER
    assert math.isclose(speedup.speedup_a, 0.01005 / 0.0096, rel_tol=0.03)
    assert (s := cells["l1:0.5"].speedup) is not None and s.verdict == HIGHER
    assert cells["dense"].speedup is None
    assert {r.key.spec for r in comparison.regressions()} == {"magnitude:0.5", "nm:2:4"}
    assert [d.field for d in comparison.environment] == ["CPU model", "torch version", "git SHA"]


def test_a_run_against_itself_is_all_same(stored: tuple[Path, Path]) -> None:
    run = load_run(stored[0])
    comparison = compare_runs(run, run)
    assert {c.verdict for c in comparison.cells if c.verdict != FAILED} == {SAME}
    assert comparison.environment == () and comparison.regressions() == ()


def test_min_effect_and_alpha_decide(stored: tuple[Path, Path]) -> None:
    a, b = load_run(stored[0]), load_run(stored[1])
    loose = {c.key.spec: c.verdict for c in compare_runs(a, b, min_effect=0.25).cells}
    assert loose["magnitude:0.5"] == SAME  # 20% is below a 25% minimum effect
    strict = {c.key.spec: c.verdict for c in compare_runs(a, b, alpha=1e-30).cells}
    assert strict["magnitude:0.5"] == NOT_SIGNIFICANT


@pytest.mark.parametrize(("alpha", "effect"), [(0.0, None), (1.0, None), (0.01, 1.5)])
def test_bad_settings_say_what_is_valid(
    stored: tuple[Path, Path], alpha: float, effect: float | None
) -> None:
    run = load_run(stored[0])
    with pytest.raises(ConfigError, match="must be in"):
        compare_runs(run, run, alpha=alpha, min_effect=effect)


def test_not_a_run_folder_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "nothing")
    (tmp_path / RUN_FILE).write_text("{}")
    with pytest.raises(ConfigError, match=r"missing results\.jsonl"):
        load_run(tmp_path)
    (tmp_path / RESULTS_FILE).write_text("")
    (tmp_path / RUN_FILE).write_text("[")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run(tmp_path)


def test_mann_whitney_by_hand() -> None:
    # a = (1, 2), b = (3, 4): U_a = 0; mean 2, variance 2*2*5/12 = 5/3, no ties
    u, p = mann_whitney_u([1.0, 2.0], [3.0, 4.0])
    assert u == 0.0
    assert math.isclose(p, math.erfc((2.0 - 0.5) / math.sqrt(5.0 / 3.0) / math.sqrt(2.0)))
    assert mann_whitney_u([1.0, 1.0], [1.0, 1.0]) == (2.0, 1.0)  # all tied: no evidence
    with pytest.raises(ConfigError, match="both sides"):
        mann_whitney_u([], [1.0])


def test_mann_whitney_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats", reason="scipy is not installed")
    rng = np.random.Generator(np.random.PCG64(7))
    for n1, n2, shift in ((5, 7, 0.0), (40, 40, 0.3), (30, 12, 1.0)):
        a = np.round(rng.normal(0.0, 1.0, n1), 1)  # rounded: ties
        b = np.round(rng.normal(shift, 1.0, n2), 1)
        u, p = mann_whitney_u(a.tolist(), b.tolist())
        expected = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic")
        assert math.isclose(u, float(expected.statistic))
        assert math.isclose(p, float(expected.pvalue), rel_tol=1e-9)


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (made monotone)
    adjusted = holm([0.04, 0.01, 0.02])
    assert [round(p, 12) for p in adjusted] == [0.04, 0.03, 0.04]
    assert holm([0.6, 0.9]) == [1.0, 1.0]
    assert holm([]) == []


def test_judge_needs_both_significance_and_effect() -> None:
    assert judge(1.20, 0.001, 0.01, 0.05, SLOWER, FASTER) == SLOWER
    assert judge(0.80, 0.001, 0.01, 0.05, SLOWER, FASTER) == FASTER
    assert judge(1.02, 0.001, 0.01, 0.05, SLOWER, FASTER) == SAME
    assert judge(1.20, 0.02, 0.01, 0.05, SLOWER, FASTER) == NOT_SIGNIFICANT


def test_gpu_cells_take_the_gpu_minimum_effect(tmp_path: Path) -> None:
    a, b = write_runs(tmp_path)
    for folder in (a, b):
        path = folder / RESULTS_FILE
        path.write_text(path.read_text().replace('"device": "cpu"', '"device": "cuda:0"'))
    comparison = compare_runs(load_run(a), load_run(b))
    assert {c.min_effect for c in comparison.cells if c.min_effect is not None} == {0.02}

"""report.md against a golden file, and write_report on a run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchlib.errors import ConfigError
from benchlib.report import markdown
from benchlib.report.markdown import load_run, render_markdown, write_report
from benchlib.results import RESULTS_FILE, RUN_FILE, CellRecord, append_record
from tests.test_report_console import GPU, report_records

GOLDEN = Path(__file__).parent / "data" / "report.md"
RUN = {
    "schema_version": 1,
    "planned_cells": 20,
    "started_at": "2026-12-01T11:21:30+00:00",
    "suite": {
        "name": "quick",
        "description": "ResNet-18 at 224x224: dense, magnitude:0.9 and l1:0.5",
        "timing": {
            "warmup_runs": 3,
            "warmup_s": 0.2,
            "min_samples": 10,
            "min_time_s": 1.0,
            "max_samples": 10000,
            "max_time_s": 60.0,
        },
    },
    "environment": {
        "cpu": {"model": "AMD EPYC", "logical_cores": 2, "threads": 2, "governor": None},
        "gpus": ["NVIDIA H100"],
        "platform": "Linux-6.18-x86_64",
        "git_sha": "c394390",
        "versions": {"python": "3.11.7", "torch": "2.14.1", "tensorrt": None},
    },
}


def make_run(directory: Path, records: list[CellRecord] | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / RUN_FILE).write_text(json.dumps(RUN))
    for record in report_records() if records is None else records:
        if record.key.target.endswith("cuda") and record.samples_s:
            record = CellRecord(**{**record.__dict__, "gpu_before": GPU})
        append_record(directory / RESULTS_FILE, record)
    return directory


def test_markdown_matches_golden(tmp_path: Path) -> None:
    data = load_run(make_run(tmp_path / "20261201-112130-quick"))
    plots = {"resnet18": [Path("speedup-resnet18.png"), Path("batch-resnet18.png")]}
    text = render_markdown(data, plots)
    if os.environ.get("BENCHLIB_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_markdown_holds_environment_matrix_details_legend_and_failures(tmp_path: Path) -> None:
    text = render_markdown(load_run(make_run(tmp_path / "run")))
    assert "| CPU | AMD EPYC, 2 logical cores, 2 threads, governor n/a |" in text
    assert (
        "| GPU | NVIDIA H100 (driver 580.1, max SM clock 1980 MHz, power limit 700.0 W) |" in text
    )
    assert "| Versions | python 3.11.7, torch 2.14.1 |" in text  # tensorrt absent: left out
    assert "| Cells | 15 (14 ok, 1 failed) and 5 repeated dense measurements of 20 planned;" in text
    assert "| l1:0.5 | 3.76x |" in text  # the matrix, one line per variant
    assert "eta 1.04 !" in text
    assert "**resnet18 on torch-eager (fp32): latency of one batch (ms)**" in text
    assert (
        "| resnet18 l1:0.5 torch-eager-cuda bs1 fp32 | failed | ExportError: could not trace |"
        in text
    )
    assert "## Legend" in text and "eta = (1 - 1/T) / (1 - 1/F)" in text


def test_write_report_writes_report_and_plots_it_links(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps({"dense": 69.8, "l1:0.5": 61.0}))
    written = write_report(run, accuracy_file=accuracy)
    assert [p.name for p in written] == [
        "report.md",
        "speedup-resnet18.png",
        "batch-resnet18.png",
        "accuracy-resnet18.png",
    ]
    text = (run / "report.md").read_text()
    for png in written[1:]:
        assert f"]({png.name})" in text and png.stat().st_size > 10_000


def test_without_plots_or_matplotlib_report_md_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run")
    assert write_report(run, plots=False) == [run / "report.md"]
    assert "No plots: not requested." in (run / "report.md").read_text()
    monkeypatch.setattr(markdown, "matplotlib_missing", lambda: "matplotlib is not installed")
    assert write_report(run) == [run / "report.md"]
    assert "No plots: matplotlib is not installed." in (run / "report.md").read_text()
    assert not list(run.glob("*.png"))


def test_a_folder_that_is_no_run_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing run\.json and results\.jsonl"):
        load_run(tmp_path)
    (tmp_path / RESULTS_FILE).write_text("")
    with pytest.raises(ConfigError, match=r"not a run folder: missing run\.json \("):
        load_run(tmp_path)
    (tmp_path / RUN_FILE).write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_run(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_run(tmp_path / RUN_FILE)


def test_a_run_without_cells_yet_still_reports(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", records=[])  # killed before its first cell finished
    assert not (run / RESULTS_FILE).exists()
    assert write_report(run) == [run / "report.md"]
    assert "| Cells | 0 (none yet) and 0 repeated" in (run / "report.md").read_text()

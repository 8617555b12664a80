"""``bench report RUN``: the console report, report.md and plots, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from benchlib.cli_report import report
from tests.test_report_markdown import make_run


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "100"}).invoke(report, list(args))
    return result.exit_code, result.output


def test_report_prints_the_matrix_and_writes_report_md_and_plots(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    code, output = invoke(str(run))
    assert code == 0, output
    assert "resnet18: measured speedup T and realization eta" in output
    assert "resnet18 on torchscript (fp32): latency of one batch (ms)" in output
    assert "CPU: AMD EPYC, 2 logical cores, 2 threads" in output
    assert f"wrote {run / 'report.md'}" in output
    assert f"wrote {run / 'speedup-resnet18.png'}" in output
    assert (run / "batch-resnet18.png").stat().st_size > 10_000


def test_no_plots_and_accuracy(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    code, output = invoke(str(run), "--no-plots")
    assert code == 0, output
    assert not list(run.glob("*.png")) and (run / "report.md").exists()
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps({"dense": 69.8, "l1:0.5": 61.0}))
    code, output = invoke(str(run), "--accuracy", str(accuracy))
    assert code == 0, output
    assert (run / "accuracy-resnet18.png").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, output = invoke(str(tmp_path))
    assert code == 2
    assert output.strip().splitlines() == [
        f"error: {str(tmp_path)!r} is not a run folder: missing run.json and results.jsonl "
        "(a run folder holds run.json and results.jsonl)"
    ]
    run = make_run(tmp_path / "run")
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps({"fpgm:0.5": 60.0}))
    code, output = invoke(str(run), "--accuracy", str(accuracy))
    assert code == 2
    (line,) = output.strip().splitlines()
    assert "'fpgm:0.5'" in line and "choose from: dense, magnitude:0.9, l1:0.5" in line

"""Console renderings against golden text (fixed width, no colour)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from rich.console import Console, RenderableType

from benchlib.analysis import summarize_records
from benchlib.catalog import ZooEntry
from benchlib.report.console import (
    TargetEntry,
    fmt_count,
    fmt_latency,
    models_table,
    render_summary,
    targets_table,
)
from benchlib.results import CellKey, CellRecord, Status

GOLDEN = Path(__file__).parent / "data" / "console_summary.txt"


def render(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(renderable)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def cell(
    spec: str,
    target: str,
    median: float,
    nonzero: int,
    status: Status = Status.OK,
    reason: str = "",
) -> CellRecord:
    return CellRecord(
        key=CellKey(model="resnet18", spec=spec, target=target, batch_size=1, precision="fp32"),
        status=status,
        reason=reason,
        samples_s=(median * 0.99, median, median * 1.01) * 3 if status is Status.OK else (),
        flops={
            "macs": 1_814_000_000,
            "nonzero_macs": nonzero,
            "params": 11_689_512,
            "nonzero_params": 11_689_512 * nonzero // 1_814_000_000,
            "pruned_macs": 0 if spec == "dense" else 1_690_000_000,
            "pruned_nonzero_macs": 0 if spec == "dense" else nonzero - 124_000_000,
        },
    )


RECORDS = [
    cell("dense", "torch-eager", 0.0316, 1_814_000_000),
    cell("magnitude:0.9", "torch-eager", 0.0319, 582_000_000),
    cell("dense", "torchscript", 0.0257, 1_814_000_000),
    cell(
        "magnitude:0.9",
        "torchscript",
        0.0,
        582_000_000,
        Status.FAILED,
        "ExportError: could not trace",
    ),
]


def test_summary_matches_golden() -> None:
    text = render(render_summary(summarize_records(RECORDS)))
    if os.environ.get("BENCHLIB_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_summary_shows_the_gap_and_the_failure_reason() -> None:
    text = render(render_summary(summarize_records(RECORDS)))
    assert "3.12x" in text  # F = 1814 / 582
    assert "0.99x" in text  # T = 31.6 / 31.9
    assert "ExportError: could not trace" in text


def test_formatting_helpers() -> None:
    assert fmt_latency(0.0316) == "31.6 ms"
    assert fmt_latency(0.000173) == "173 us"
    assert fmt_latency(None) == "-"
    assert fmt_count(1_814_000_000) == "1.81 G"
    assert fmt_count(864) == "864"


def test_targets_and_models_tables() -> None:
    text = render(
        targets_table(
            [
                TargetEntry("torch-eager", "cpu", "bf16, fp32", "torch 2.14.1", None),
                TargetEntry(
                    "torch-compile",
                    "cpu",
                    "fp32",
                    "torch 2.14.1",
                    None,
                    options={"max-autotune": "benchmarks kernels while compiling"},
                ),
                TargetEntry("cpu-sparse", "cpu", "fp32", "torch 2.14.1", None, sparse=True),
                TargetEntry("torch-eager-cuda", "cuda", "fp32", None, "no CUDA device"),
            ]
        )
    )
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["cpu-sparse"][1:] == ["yes", "cpu", "fp32", "yes", "torch", "2.14.1"]
    assert rows["torch-eager-cuda"][1:] == ["no", "cuda", "fp32", "-"]
    assert "torch-eager-cuda: no CUDA device" in text
    assert "option torch-compile:max-autotune: benchmarks kernels while compiling" in text
    text = render(
        models_table(
            [
                ZooEntry(
                    name="resnet50",
                    source="torchvision",
                    input_shape=(3, 224, 224),
                    params=25_557_032,
                    macs=4_089_184_256,
                )
            ]
        )
    )
    assert "resnet50" in text and "25.56" in text and "4.089" in text and "3x224x224" in text

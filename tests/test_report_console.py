"""Console renderings against golden text (fixed width, no colour)."""

from __future__ import annotations

import io
import os
import statistics
from pathlib import Path

import numpy
from rich.console import Console, RenderableType

from benchlib.analysis import summarize_records
from benchlib.catalog import ZooEntry
from benchlib.report.console import (
    TargetEntry,
    cell_views,
    detail_grids,
    fmt_count,
    fmt_latency,
    grid_table,
    matrix_grids,
    models_table,
    render_report,
    render_summary,
    suspects_grid,
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


# --- the run report: matrix and detail tables ---------------------------------------------------

REPORT_GOLDEN = Path(__file__).parent / "data" / "report_console.txt"
DENSE_MACS = 1_814_000_000
GPU = {"driver": "580.1", "max_sm_clock_mhz": 1980, "name": "NVIDIA H100", "power_limit_w": 700.0}


def spread(median: float, rel: float, n: int = 10) -> tuple[float, ...]:
    """``n`` samples evenly spread over median * (1 +- rel): exact quantiles, known CV."""
    return tuple(median * (1.0 - rel + 2.0 * rel * i / (n - 1)) for i in range(n))


def run_cell(
    spec: str,
    target: str,
    batch_size: int,
    median: float,
    *,
    nonzero: int = DENSE_MACS,
    rel: float = 0.01,
    repeat: int = 0,
    status: Status = Status.OK,
    reason: str = "",
) -> CellRecord:
    """A record of the report fixture: cpu targets carry RSS, cuda ones allocator peaks."""
    cuda = target.endswith("cuda")
    memory = (
        {"cuda_allocated_peak_bytes": 92_843_520, "cuda_reserved_peak_bytes": 109_051_904}
        if cuda
        else {"rss_peak_bytes": 1_093_337_088 * batch_size, "rss_increase_bytes": 196_276_224}
    )
    ok = status is Status.OK
    return CellRecord(
        key=CellKey(
            model="resnet18",
            spec=spec,
            target=target,
            batch_size=batch_size,
            precision="fp32",
            repeat=repeat,
        ),
        status=status,
        reason=reason,
        device="cuda" if cuda else "cpu",
        samples_s=spread(median, rel) if ok else (),
        loops=1,
        cold_s=3.0 * median if ok else None,
        prepare_s=(1.25 if target == "torchscript" else 0.0175) if ok else None,
        host_s=1.1 * median if cuda and ok else None,
        memory=memory if ok else {},
        flops={
            "macs": DENSE_MACS if spec != "l1:0.5" else nonzero,
            "nonzero_macs": nonzero,
            "params": 11_689_512,
            "nonzero_params": 11_689_512 * nonzero // DENSE_MACS,
            "pruned_macs": 0 if spec == "dense" else 1_690_000_000,
            "pruned_nonzero_macs": 0 if spec == "dense" else nonzero - 124_000_000,
        },
    )


def report_records() -> list[CellRecord]:
    """Two CPU targets at batch sizes 1 and 8 and one GPU target at 1; magnitude:0.9 slower
    than dense and suspect (CV 17.5%) on torch-eager bs 1, l1:0.5 above F (4.2x against 3.75x)
    on torchscript, l1:0.5 failed on the GPU; every group with its closing dense cell."""
    records = []
    for target, base in (("torch-eager", 0.0262), ("torchscript", 0.0173)):
        for batch_size in (1, 8):
            dense = base * batch_size
            t_l1 = 4.2 if target == "torchscript" else 2.5
            records += [
                run_cell("dense", target, batch_size, dense),
                run_cell(
                    "magnitude:0.9",
                    target,
                    batch_size,
                    dense * 1.05,
                    nonzero=581_000_000,
                    rel=0.26 if (target, batch_size) == ("torch-eager", 1) else 0.01,
                ),
                run_cell("l1:0.5", target, batch_size, dense / t_l1, nonzero=483_000_000),
                run_cell("dense", target, batch_size, dense * 1.01, repeat=1),
            ]
    cuda = "torch-eager-cuda"
    records += [
        run_cell("dense", cuda, 1, 0.00133, rel=0.002),
        run_cell("magnitude:0.9", cuda, 1, 0.00098, nonzero=581_000_000, rel=0.002),
        run_cell(
            "l1:0.5",
            cuda,
            1,
            0.0,
            nonzero=483_000_000,
            status=Status.FAILED,
            reason="ExportError: could not trace",
        ),
        run_cell("dense", cuda, 1, 0.00133, rel=0.002, repeat=1),
    ]
    return records


def test_report_matches_golden() -> None:
    facts = [("CPU", "AMD EPYC, 2 threads"), ("Versions", "torch 2.14.1")]
    text = render(render_report(cell_views(report_records()), facts))
    if os.environ.get("BENCHLIB_UPDATE_GOLDEN"):
        REPORT_GOLDEN.write_text(text)
    assert text == REPORT_GOLDEN.read_text()


def test_matrix_cells_carry_t_eta_and_the_verdict_marks() -> None:
    views = cell_views(report_records())
    (grid,) = matrix_grids(views, width=200)
    assert grid.headers[:3] == ("Variant", "F", "torch-eager\nbs 1")
    rows = {row[0].plain: [cell.plain for cell in row] for row in grid.rows}
    assert rows["dense"][1] == "1.00x"
    pooled = statistics.median(spread(0.0262, 0.01) + spread(0.0262 * 1.01, 0.01))
    assert rows["dense"][2] == fmt_latency(pooled)
    assert rows["magnitude:0.9"][1] == "3.12x"
    speedup = pooled / statistics.median(spread(0.0262 * 1.05, 0.26))
    eta = (1 - 1 / speedup) / (1 - 581_000_000 / DENSE_MACS)
    # slower than dense (x) and CV 17.5% (suspect ~)
    assert rows["magnitude:0.9"][2] == f"{speedup:.2f}x x ~\neta {eta:.2f}"
    assert speedup < 1 and eta < 0
    assert rows["l1:0.5"][4].endswith(" !")  # torchscript bs 1: T = 4.2 > F = 3.76
    assert rows["l1:0.5"][6] == "failed"  # torch-eager-cuda bs 1


def test_matrix_splits_to_fit_the_width_and_keeps_every_column() -> None:
    views = cell_views(report_records())
    grids = matrix_grids(views, width=60)
    assert len(grids) > 1
    assert all(g.headers[:2] == ("Variant", "F") for g in grids)
    columns = [h for g in grids for h in g.headers[2:]]
    assert len(columns) == 5 and len(set(columns)) == 5
    for grid in grids:
        assert max(len(line) for line in render(grid_table(grid)).splitlines()) <= 60
    assert len(matrix_grids(views, width=None)) == 1


def test_detail_statistics_come_from_the_raw_samples() -> None:
    views = cell_views(report_records())
    latency, resources = detail_grids(views)[:2]
    assert latency.title.endswith("latency of one batch (ms)")
    row = [c.plain for c in latency.rows[1]]  # torch-eager bs 1 magnitude:0.9
    samples = spread(0.0262 * 1.05, 0.26)
    assert row[:2] == ["1", "magnitude:0.9"]
    assert row[2] == f"{1e3 * statistics.median(samples):.1f} ~"
    assert row[3] == f"{1e3 * float(numpy.percentile(samples, 90)):.1f}"
    assert row[8] == f"{statistics.stdev(samples) / statistics.mean(samples):.1%}"
    assert row[9] == "10"
    # the dense row pools its opening and closing measurement: 20 samples
    assert [c.plain for c in latency.rows[0]][9] == "20"
    dense_median = statistics.median(spread(0.0262, 0.01) + spread(0.0262 * 1.01, 0.01))
    assert resources.headers == (
        "bs", "Variant", "Items/s", "Peak RSS", "RSS incr.", "Build", "Cold call", "FLOP/s",
        "Roofline",
    )  # fmt: skip
    dense = [c.plain for c in resources.rows[0]]
    flops = 2 * DENSE_MACS / dense_median
    # MiB, MiB, build, cold call (3 x the first median), FLOP/s; no environment: no roofline
    assert dense[3:] == ["1043", "187", "17.5 ms", "78.6 ms", f"{flops / 1e9:.0f} G", "n/a"]
    assert resources.title.endswith("roofline (n/a: device not in the peak table)")


def test_gpu_details_show_allocator_peaks_and_host_time() -> None:
    views = [v for v in cell_views(report_records()) if v.row.target == "torch-eager-cuda"]
    latency, resources = detail_grids(views)
    assert latency.title.endswith("(us)")  # every median under 1 ms
    assert [c.plain for c in latency.rows[0]][2] == "1330"
    assert resources.headers[3:5] == ("Alloc peak", "Host e2e")
    assert [c.plain for c in resources.rows[0]][3:5] == ["88.5", "1.46 ms"]
    assert [c.plain for c in resources.rows[2]][2:] == ["failed", "-", "-", "-", "-", "-", "n/a"]


def test_suspect_cells_are_listed_with_their_reasons() -> None:
    grid = suspects_grid(cell_views(report_records()))
    assert grid is not None
    (row,) = grid.rows
    assert row[0].plain == "resnet18 magnitude:0.9 torch-eager bs1 fp32"
    assert row[1].plain == "CV 17.5% over 10%"

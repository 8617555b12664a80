"""The "what ran sparse" grid of the console and Markdown reports."""

from __future__ import annotations

from typing import Any

from benchlib.report.console import cell_views, render_report
from benchlib.report.kernels import fusion_text, kernels_grid, kernels_text
from benchlib.report.markdown import grid_markdown
from benchlib.results import CellRecord
from tests.test_report_console import render, run_cell

CPU_SPARSE_INFO: dict[str, Any] = {
    "engine": "benchlib native kernels (avx2; sparse CSR), torch 2.14.1",
    "native": {"available": True, "isa": "avx2", "build_s": 0.0},
    "fusion": {"batchnorm_folded": 20, "residual_fused": 3, "relu_fused": 11, "max_pools": 1},
    "sparse_layers": 19,
    "dense_layers": 2,
    "weight_bytes_stored": 11_010_048,
    "weight_bytes_dense": 46_766_080,
    "kernels": ["native-bsr-4x1", "native-csr"],
}


def with_info(record: CellRecord, info: dict[str, Any]) -> CellRecord:
    return CellRecord(**{**record.__dict__, "info": info})


def sparse_cells() -> list[CellRecord]:
    dense = run_cell("dense", "cpu-sparse", 1, 0.0136)
    fallback = {
        **CPU_SPARSE_INFO,
        "native": {"available": False, "reason": "no C++ compiler found"},
        "kernels": ["torch-csr"],
        "fusion": {"skipped": "not traceable by torch.fx: TraceError: loop"},
    }
    all_dense = {**CPU_SPARSE_INFO, "sparse_layers": 0, "dense_layers": 21, "kernels": []}
    planned = {**CPU_SPARSE_INFO, "weight_bytes_plans": 23_488_102}  # the plans' own copies
    return [
        with_info(dense, all_dense),
        with_info(run_cell("magnitude:0.9", "cpu-sparse", 1, 0.0065), planned),
        with_info(run_cell("l1:0.5", "cpu-sparse", 1, 0.0052), fallback),
        run_cell("dense", "torch-eager", 1, 0.0175),  # a dense target: no row
        with_info(
            run_cell("nm:2:4", "cuda-sparse24", 1, 0.001),
            {
                "engine": "torch 2.14.1 semi-structured (cuSPARSELt)",
                "converted_layers": ["fc1", "fc2"],
                "dense_layers": {"head": "not 2:4"},
                "weight_bytes_compressed": 5_767_168,
                "weight_bytes_dense": 9_437_184,
            },
        ),
    ]


def test_grid_has_a_row_per_sparse_target_cell_with_counts_kernels_weights_fusions() -> None:
    grid = kernels_grid(cell_views(sparse_cells()))
    assert grid is not None and grid.title == "resnet18: what ran sparse"
    rows = [[cell.plain for cell in row] for row in grid.rows]
    assert rows == [
        ["dense", "1", "cpu-sparse", "0 / 21", "none (every layer dense)", "10.5 / 44.6",
         "20 BN folded, 3 adds fused, 11 ReLU fused, 1 native max pool"],
        ["magnitude:0.9", "1", "cpu-sparse", "19 / 21", "native-bsr-4x1, native-csr (avx2)",
         "10.5 / 44.6\n+22.4 plans",
         "20 BN folded, 3 adds fused, 11 ReLU fused, 1 native max pool"],
        ["l1:0.5", "1", "cpu-sparse", "19 / 21",
         "torch-csr; native kernels unavailable: no C++ compiler found", "10.5 / 44.6",
         "not traced: not traceable by torch.fx: TraceError: loop"],
        ["nm:2:4", "1", "cuda-sparse24", "2 / 3", "torch 2.14.1 semi-structured (cuSPARSELt)",
         "5.50 / 9.00", "-"],
    ]  # fmt: skip


def test_no_grid_without_layer_counts() -> None:
    assert kernels_grid(cell_views([run_cell("dense", "torch-eager", 1, 0.0175)])) is None


def test_texts_fall_back_when_info_is_missing_or_malformed() -> None:
    assert kernels_text({}) == "none (every layer dense)"
    assert kernels_text({"kernels": "native-csr", "engine": "onnxruntime"}) == "onnxruntime"
    assert fusion_text({}) == "-"
    assert fusion_text({"fusion": {"relu_fused": True, "batchnorm_folded": 0}}) == "none"


def test_console_report_prints_the_grid() -> None:
    text = render(render_report(cell_views(sparse_cells())))
    assert "resnet18: what ran sparse" in text
    assert "native-bsr-4x1," in text and "19 / 21" in text
    assert "+22.4 plans" in text


def test_markdown_puts_the_plans_on_the_weights_line() -> None:
    grid = kernels_grid(cell_views(sparse_cells()))
    assert grid is not None
    assert "| 10.5 / 44.6, +22.4 plans |" in grid_markdown(grid)

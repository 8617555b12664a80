"""Roofline: the peak table, device lookup from a run's fingerprint, shares in summary rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchlib.analysis import summarize_records
from benchlib.errors import ConfigError
from benchlib.results import CellKey, CellRecord, Status
from benchlib.roofline import (
    achieved_flops_per_s,
    device_name,
    find_peak,
    load_peaks,
    roofline_share,
)

REFERENCE = Path(__file__).parents[1] / "reports" / "reference"
PEAKS = load_peaks()


def test_every_row_names_its_source_and_has_figures() -> None:
    assert len(PEAKS) >= 9
    for row in PEAKS:
        assert "https://" in row.source, row.name
        assert row.flops_per_s["fp32"] > 1e12 and row.memory_bytes_per_s > 1e11


@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
        ("NVIDIA H200", "NVIDIA H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe"),
        ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("Tesla T4", "NVIDIA T4"),
        ("Tesla V100-SXM2-16GB", "NVIDIA V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "NVIDIA V100 PCIe"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
    ],
)
def test_device_names_find_their_row(name: str, row: str) -> None:
    found = find_peak(name, PEAKS)
    assert found is not None and found.name == row


def test_unknown_devices_and_missing_precisions_have_no_peak() -> None:
    assert find_peak("AMD EPYC", PEAKS) is None
    assert find_peak("NVIDIA L40S", PEAKS) is None  # not the L4
    assert find_peak(None, PEAKS) is None
    t4 = find_peak("Tesla T4", PEAKS)
    assert t4 is not None and t4.peak_flops("bf16") is None
    assert roofline_share(1e12, t4, "bf16") is None
    assert roofline_share(1e12, None, "fp32") is None


def test_fp32_takes_the_tf32_peak_and_the_ridge_and_roof_follow() -> None:
    h100 = find_peak("NVIDIA H100 80GB HBM3", PEAKS)
    assert h100 is not None
    assert h100.peak_flops("fp32") == 494.5e12 and h100.peak_flops("fp16") == 989.5e12
    assert h100.ridge("fp16") == pytest.approx(989.5e12 / 3.35e12)
    assert h100.attainable("fp16", 10.0) == pytest.approx(33.5e12)
    assert h100.attainable("fp16", 1e4) == 989.5e12


def test_device_name_from_the_reference_runs_fingerprints() -> None:
    gpu = json.loads((REFERENCE / "quick-gpu-h100" / "run.json").read_text())["environment"]
    cpu = json.loads((REFERENCE / "quick-cpu" / "run.json").read_text())["environment"]
    assert device_name(gpu, "cuda") == "NVIDIA H100 80GB HBM3"
    assert device_name(gpu, "cuda:0") == "NVIDIA H100 80GB HBM3"
    assert device_name(gpu, "cuda:3") is None
    assert device_name(cpu, "cpu") == "AMD EPYC"
    assert device_name(None, "cpu") is None


def record(device: str) -> CellRecord:
    return CellRecord(
        key=CellKey(model="m", spec="dense", target="t", batch_size=4, precision="fp16"),
        status=Status.OK,
        device=device,
        samples_s=(0.002, 0.002, 0.002),
        flops={"macs": 1_000_000_000, "nonzero_macs": 1_000_000_000},
    )


def test_summary_rows_carry_achieved_flops_and_the_roofline_share() -> None:
    environment = {"cpu": {"model": "AMD EPYC"}, "gpus": ["NVIDIA H100 80GB HBM3"]}
    (gpu,) = summarize_records([record("cuda")], environment)
    achieved = 2 * 1e9 * 4 / 0.002
    assert gpu.achieved_flops_per_s == pytest.approx(achieved)
    assert gpu.roofline_share == pytest.approx(achieved / 989.5e12)
    assert gpu.peak_device == "NVIDIA H100 SXM"
    (cpu,) = summarize_records([record("cpu")], environment)
    assert cpu.achieved_flops_per_s == pytest.approx(achieved)
    assert cpu.roofline_share is None and cpu.peak_device is None
    (bare,) = summarize_records([record("cuda")])  # no environment: n/a
    assert bare.roofline_share is None
    assert achieved_flops_per_s(None, 1, 0.1) is None


def test_a_sparse_kernel_is_credited_the_macs_it_executed() -> None:
    masked = dataclasses.replace(
        record("cpu"), flops={"macs": 1_000_000_000, "nonzero_macs": 100_000_000}
    )
    (dense_kernels,) = summarize_records([masked])  # zeros multiplied: all MACs executed
    assert dense_kernels.achieved_flops_per_s == pytest.approx(2 * 1e9 * 4 / 0.002)
    skipped = dataclasses.replace(masked, info={"sparse_kernel_used": True})
    (sparse_kernels,) = summarize_records([skipped])
    assert sparse_kernels.achieved_flops_per_s == pytest.approx(2 * 1e8 * 4 / 0.002)


def test_a_bad_table_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "peaks.json"
    row = {
        "name": "X",
        "patterns": ["X"],
        "flops_per_s": {"fp32": 1.0},
        "memory_bytes_per_s": 1.0,
        "source": "",
    }
    path.write_text(json.dumps({"devices": [row]}))
    with pytest.raises(ConfigError, match="has no source"):
        load_peaks(path)
    path.write_text(json.dumps({"devices": [row | {"source": "s", "flops_per_s": {"fp8": 1}}]}))
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        load_peaks(path)
    with pytest.raises(ConfigError, match="cannot read the device peak table"):
        load_peaks(tmp_path / "missing.json")

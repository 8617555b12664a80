"""PNG plots of a run (matplotlib, Agg): written, non-empty, only where they have data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib import image

from benchlib.errors import ConfigError
from benchlib.report.console import cell_views
from benchlib.report.plots import read_accuracy, slug, write_plots
from tests.test_report_console import report_records

SPECS = ["dense", "magnitude:0.9", "l1:0.5"]


def assert_png(path: Path, min_width: int = 600) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[1] >= min_width
    assert pixels.std() > 0.05  # not a blank canvas


def test_speedup_batch_and_accuracy_plots_are_written(tmp_path: Path) -> None:
    views = cell_views(report_records())
    accuracy = {"dense": 69.8, "magnitude:0.9": 55.2, "l1:0.5": 61.0}
    written = write_plots(views, tmp_path, accuracy)
    assert [p.name for p in written] == [
        "speedup-resnet18.png",
        "batch-resnet18.png",
        "accuracy-resnet18.png",
    ]
    for path in written:
        assert_png(path)


def test_batch_plot_needs_two_batch_sizes_and_accuracy_plot_a_mapping(tmp_path: Path) -> None:
    views = [v for v in cell_views(report_records()) if v.row.batch_size == 1]
    assert [p.name for p in write_plots(views, tmp_path)] == ["speedup-resnet18.png"]
    only_dense = [v for v in views if v.row.spec == "dense"]
    assert write_plots(only_dense, tmp_path / "none") == []


def test_read_accuracy_checks_specs_and_values(tmp_path: Path) -> None:
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"dense": 69.8, "l1:0.5": 61}))
    assert read_accuracy(path, SPECS) == {"dense": 69.8, "l1:0.5": 61.0}
    path.write_text(json.dumps({"fpgm:0.5": 60.0}))
    with pytest.raises(
        ConfigError, match=r"'fpgm:0\.5'.*choose from: dense, magnitude:0\.9, l1:0\.5"
    ):
        read_accuracy(path, SPECS)
    for bad in ("[1, 2]", '{"dense": 120}', '{"dense": "high"}', "{"):
        path.write_text(bad)
        with pytest.raises(ConfigError, match="--accuracy"):
            read_accuracy(path, SPECS)


def test_slug_makes_file_names_of_model_references() -> None:
    assert slug("tests.conftest:TinyNet") == "tests.conftest-TinyNet"
    assert slug("/runs/model v2.pt") == "runs-model-v2.pt"

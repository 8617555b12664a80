"""Suites from TOML, validation and the built-in quick suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchlib.errors import ConfigError
from benchlib.suite import Suite, load_suite, suite_names
from benchlib.target import TargetRegistry


def test_quick_suite_is_the_documented_default() -> None:
    quick = load_suite("quick")
    assert quick.models == ("resnet18",)
    assert quick.specs == (
        "dense",
        "magnitude:0.5",
        "magnitude:0.9",
        "magnitude-layer:0.9",
        "l1:0.5",
        "fpgm:0.5",
        "nm:2:4",
    )
    assert quick.targets == ("torch-eager", "onnxruntime", "cpu-sparse")
    assert quick.batch_sizes == (1, 8)


def test_dense_baseline_is_added_first() -> None:
    suite = Suite(name="s", models=("m",), specs=("magnitude:0.5", "dense"))
    assert suite.variant_specs == ("dense", "magnitude:0.5")


def test_suite_from_a_path_with_timing(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('models = ["resnet20"]\nbatch_sizes = [4]\n[timing]\nmin_samples = 7\n')
    suite = load_suite(str(path))
    assert (suite.name, suite.models, suite.batch_sizes) == ("mine", ("resnet20",), (4,))
    assert suite.timing.min_samples == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('models = ["a"]\nbatch_size = [1]\n', "unknown suite key 'batch_size'; choose from: "),
        ('models = ["a"]\n[timing]\nwarmup = 1\n', "unknown timing key 'warmup'; choose from: "),
        ('models = ["a"]\nbatch_sizes = [0]\n', "batch size 0 must be a positive integer"),
        ("models = []\n", "models must be a non-empty list of names"),
        ('models = "resnet20"\n', "models must be a non-empty list of names"),
        ('models = ["a", "a"]\n', "models names 'a' twice"),
        ('models = ["a"]\nspecs = [1]\n', "specs holds 1, which is not a name"),
        ('models = ["a"]\nprecisions = []\n', "precisions must be a non-empty list"),
        ('models = ["a"]\nthreads = 2.5\n', "threads 2.5 must be a positive integer"),
        ('models = ["a"]\ntiming = 3\n', r"\[timing\] must be a table"),
        ('models = ["a"]\n[timing]\nmin_samples = "x"\n', "bad suite 'bad'"),
        ('models = ["a"\n', "cannot read suite"),
    ],
)
def test_bad_suite_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_suite(str(path))


def test_unknown_suite_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown suite 'quik'; choose from: .*quick"):
        load_suite("quik")


@pytest.mark.parametrize("name", suite_names())
def test_every_shipped_suite_loads_and_names_registered_targets(name: str) -> None:
    suite = load_suite(name)
    registry = TargetRegistry.from_entry_points()
    for word in suite.targets:
        if word not in ("cpu", "gpu"):
            registry.get(word)  # ConfigError for a name that is not registered

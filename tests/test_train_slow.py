"""Acceptance of issue 4: a CIFAR-style net trains to >= 95% on digits within 3 minutes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sklearn", reason="the digits source needs scikit-learn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_digits.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_resnet20_reaches_95_percent_on_digits_within_3_minutes() -> None:
    run = load_script().run_digits(seed=0)  # the benchmark's hyperparameters
    assert not run.evaluation.synthetic
    assert run.evaluation.count == 359
    assert run.evaluation.top1 >= 0.95
    assert run.wall_s <= 180.0

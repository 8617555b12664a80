"""Acceptance of issue 4 (lottery tickets on digits): IMP with weight rewinding at 3 levels
stays within 1 point of dense, and a supermask over a frozen random net reaches 60%."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sklearn", reason="the digits source needs scikit-learn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lottery_digits.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lottery_digits", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_imp_rewinding_at_three_levels_stays_within_a_point_of_dense() -> None:
    imp = load_script().imp_digits(seed=0)
    assert abs(imp["density"] - 0.512) < 0.001
    assert imp["ticket"] >= imp["dense"] - 0.01
    assert 0.0 < imp["control"] <= 1.0  # reported beside it


@pytest.mark.slow
def test_supermask_over_frozen_random_weights_reaches_60_percent() -> None:
    assert load_script().supermask_digits(seed=0)["top1"] >= 0.60

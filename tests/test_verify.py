"""The correctness gate."""

from __future__ import annotations

import pytest
import torch

from benchlib.errors import VerificationError
from benchlib.harness.verify import relative_error, verify
from benchlib.target import Precision


def test_relative_error_is_scaled_by_the_largest_reference_magnitude() -> None:
    expected = torch.tensor([10.0, -20.0, 0.0])
    actual = torch.tensor([10.0, -20.0, 0.2])
    assert relative_error(actual, expected) == pytest.approx(0.01)


def test_nested_outputs_are_compared_tensor_by_tensor() -> None:
    a = {"logits": torch.ones(2), "aux": (torch.zeros(3),)}
    assert relative_error(a, {"logits": torch.ones(2), "aux": (torch.zeros(3),)}) == 0.0


def test_tolerance_per_precision() -> None:
    expected = torch.ones(4)
    off = expected * 1.01
    with pytest.raises(VerificationError, match=r"by 0.01 .* over the fp32 tolerance 0.001"):
        verify(off, expected, Precision.FP32)
    assert verify(off, expected, Precision.FP16) == pytest.approx(0.01)


def test_shape_mismatch_and_nan_fail() -> None:
    with pytest.raises(VerificationError, match="shape"):
        verify(torch.ones(3), torch.ones(4), Precision.FP32)
    with pytest.raises(VerificationError):
        verify(torch.tensor([float("nan")]), torch.ones(1), Precision.BF16)

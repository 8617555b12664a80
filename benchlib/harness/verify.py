"""The correctness gate: a target's outputs against eager fp32, before anything is timed.

The error of a cell is the largest absolute difference over all output tensors divided by the
largest absolute value of the reference outputs (a relative error that does not blow up on
near-zero logits). A wrong fast model is a failed cell, never a result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from benchlib.errors import VerificationError
from benchlib.target import Precision

TOLERANCE: Mapping[Precision, float] = {
    Precision.FP32: 1e-3,
    Precision.FP16: 2e-2,
    Precision.BF16: 5e-2,
}
"""Largest accepted error (relative to the reference's largest magnitude), per precision."""


def output_tensors(outputs: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a model output: a tensor or nested tuples, lists and dicts of them."""
    if isinstance(outputs, torch.Tensor):
        yield outputs
    elif isinstance(outputs, Mapping):
        for value in outputs.values():
            yield from output_tensors(value)
    elif isinstance(outputs, (tuple, list)):
        for value in outputs:
            yield from output_tensors(value)


def relative_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| over all output tensors (fp32, on the CPU).

    Raises VerificationError when the outputs differ in structure or shape.
    """
    got = [t.detach().float().cpu() for t in output_tensors(actual)]
    want = [t.detach().float().cpu() for t in output_tensors(expected)]
    if len(got) != len(want):
        raise VerificationError(f"target returned {len(got)} output tensors, eager {len(want)}")
    worst_diff, scale = 0.0, 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            raise VerificationError(
                f"output shape {tuple(g.shape)} differs from eager {tuple(w.shape)}"
            )
        if w.numel() == 0:
            continue
        diff = float((g - w).abs().max())
        if not math.isfinite(diff):  # NaN or inf in either output never passes
            return math.inf
        worst_diff = max(worst_diff, diff)
        scale = max(scale, float(w.abs().max()))
    return worst_diff / scale if scale > 0 else worst_diff


def verify(actual: Any, expected: Any, precision: Precision) -> float:
    """Return the relative error; raise VerificationError when it exceeds the tolerance."""
    error = relative_error(actual, expected)
    tolerance = TOLERANCE[precision]
    if not error <= tolerance:
        raise VerificationError(
            f"outputs differ from eager fp32 by {error:.3g} (relative), "
            f"over the {precision.value} tolerance {tolerance:g}"
        )
    return error

"""Pieces the built-in targets share: device placement, casting and synchronization."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from benchlib.target import Precision


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA device can be used, else why not (one line)."""
    if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def place(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    device: torch.device,
    precision: Precision,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A copy of ``model`` in eval mode and ``inputs``, both on ``device`` in ``precision``.

    The caller's model is left untouched. Floating-point inputs are cast; others are moved only.
    """
    placed = copy.deepcopy(model)
    nn.Module.train(placed, False)  # not .eval(): torch.export graphs refuse it
    placed = placed.to(device=device, dtype=precision.dtype)
    moved = tuple(
        x.to(device=device, dtype=precision.dtype) if x.is_floating_point() else x.to(device)
        for x in inputs
    )
    return placed, moved


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that blocks until queued work on ``device`` has finished (no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class BoundInputs:
    """The inputs a prepared model runs on, replaceable between calls (``Prepared.rebind``).

    New inputs are moved and cast once, when bound, so ``run`` stays free of copies.
    """

    def __init__(
        self, inputs: tuple[torch.Tensor, ...], device: torch.device, precision: Precision
    ) -> None:
        self.device, self.precision = device, precision
        self.tensors = inputs

    def rebind(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tuple(
            x.to(device=self.device, dtype=self.precision.dtype)
            if x.is_floating_point()
            else x.to(self.device)
            for x in inputs
        )

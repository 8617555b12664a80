"""The zoo at a glance: every model's input size, parameters and MACs, without real weights.

Models are built on the ``meta`` device (no memory, no initialisation), so listing the whole
torchvision zoo takes seconds; the counts are dense by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchlib.flops import count
from benchlib.models import build_model, zoo_names


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """One row of ``bench models``: counts per image at the native input size."""

    name: str
    source: str
    input_shape: tuple[int, ...]
    params: int
    macs: int


def describe(name: str, input_size: int | None = None) -> ZooEntry:
    """Counts for one zoo model, computed on the meta device."""
    model = build_model(name, input_size=input_size, device="meta")
    example = torch.empty((1, *model.input_shape), device="meta")
    report = count(model.module, example)
    return ZooEntry(
        name=name,
        source=model.source,
        input_shape=model.input_shape,
        params=report.params,
        macs=report.macs,
    )


def describe_zoo() -> list[ZooEntry]:
    """Every zoo model, in name order."""
    return [describe(name) for name in zoo_names()]

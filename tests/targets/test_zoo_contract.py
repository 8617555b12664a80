"""Every available target on real zoo models and pruned variants: outputs equal eager.

The models the issue names: resnet18, mobilenet_v3_small, efficientnet_b0, a structured-pruned
resnet (``l1:0.5``: physically smaller layers) and a 90%-sparse resnet (``magnitude:0.9``: zeros
that sparse targets exploit), plus a 2:4 resnet for the semi-structured targets. Inputs are
32x32 so that eager and the runtimes take milliseconds; torch.compile's compile time (tens of
seconds a model on two cores) is what this file costs.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchlib.harness.cell import device_for
from benchlib.harness.verify import TOLERANCE, relative_error
from benchlib.models import Model, build_model
from benchlib.pruning import prune
from benchlib.target import Precision, Target, TargetRegistry

REGISTRY = TargetRegistry.from_entry_points()
SIZE = 32
PREFERRED = (Precision.FP32, Precision.FP16, Precision.BF16)

CASES = {
    "resnet18": ("resnet18", "dense"),
    "mobilenet_v3_small": ("mobilenet_v3_small", "dense"),
    "efficientnet_b0": ("efficientnet_b0", "dense"),
    "resnet18-l1:0.5": ("resnet18", "l1:0.5"),
    "resnet18-magnitude:0.9": ("resnet18", "magnitude:0.9"),
    "resnet18-nm:2:4": ("resnet18", "nm:2:4"),
}


@functools.cache
def case(label: str) -> tuple[Model, torch.Tensor, torch.Tensor]:
    """The model of ``label``, an example batch of two, and eager's fp32 outputs on it."""
    name, spec = CASES[label]
    model = build_model(name, input_size=SIZE)
    if spec != "dense":
        model = prune(model, spec).model
    batch = model.example_input(2, seed=1)
    with torch.no_grad():
        expected = model.module(batch)
    return model, batch, expected


def available(name: str) -> Target:
    target = REGISTRY.get(name)
    reason = target.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return target


@pytest.mark.parametrize("label", list(CASES))
@pytest.mark.parametrize("name", REGISTRY.names())
def test_target_matches_eager_on_zoo_models(name: str, label: str) -> None:
    target = available(name)
    model, batch, expected = case(label)
    precision = next(p for p in PREFERRED if p in target.precisions)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    prepared = target.prepare(model.module, (batch,), device_for(target), precision)
    actual = prepared.run()
    prepared.synchronize()
    assert relative_error(actual, expected) <= TOLERANCE[precision]
    # prepare built its own copy: the caller's weights are as they were
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())

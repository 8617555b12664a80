"""Every registered target, by the same contract: outputs equal eager within tolerance."""

from __future__ import annotations

import pytest
import torch

from benchlib.errors import ConfigError
from benchlib.harness.cell import device_for
from benchlib.harness.verify import TOLERANCE, relative_error
from benchlib.models import Model
from benchlib.target import DeviceKind, Precision, Target, TargetRegistry

REGISTRY = TargetRegistry.from_entry_points()


def available(name: str) -> Target:
    target = REGISTRY.get(name)
    reason = target.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return target


def test_built_in_targets_are_registered() -> None:
    assert {
        "torch-eager",
        "torch-eager-cuda",
        "torchscript",
        "torchscript-cuda",
        "torch-compile",
        "torch-compile-cuda",
        "onnxruntime",
        "onnxruntime-cuda",
        "tensorrt",
        "cpu-sparse",
        "cuda-sparse24",
    } <= set(REGISTRY.names())


def test_cpu_selector_expands_to_the_cpu_backends() -> None:
    chosen = set(REGISTRY.select(["cpu"]).targets)
    assert {"torch-eager", "torchscript", "torch-compile", "onnxruntime", "cpu-sparse"} <= chosen
    assert all(REGISTRY.get(name).device_kind is DeviceKind.CPU for name in chosen)


@pytest.mark.parametrize("name", REGISTRY.names())
def test_target_declares_what_it_is(name: str) -> None:
    target = REGISTRY.get(name)
    assert isinstance(target, Target)
    assert target.name == name
    assert target.precisions and target.precisions <= set(Precision)
    reason = target.unavailable_reason()
    assert reason is None or (reason and "\n" not in reason)


@pytest.mark.parametrize("name", REGISTRY.names())
@pytest.mark.parametrize("precision", list(Precision))
def test_outputs_match_eager(name: str, precision: Precision, tiny_model: Model) -> None:
    target = available(name)
    if precision not in target.precisions:
        pytest.skip(f"{name} does not declare {precision.value}")
    inputs = (tiny_model.example_input(2),)
    with torch.no_grad():
        expected = tiny_model.module(*inputs)
    prepared = target.prepare(tiny_model.module, inputs, device_for(target), precision)
    actual = prepared.run()
    prepared.synchronize()
    assert relative_error(actual, expected) <= TOLERANCE[precision]
    assert isinstance(dict(prepared.info), dict)


@pytest.mark.parametrize("name", REGISTRY.names())
def test_prepare_leaves_the_model_untouched(name: str, tiny_model: Model) -> None:
    target = available(name)
    before = {k: v.clone() for k, v in tiny_model.module.state_dict().items()}
    precision = next(p for p in (Precision.FP32, Precision.FP16) if p in target.precisions)
    target.prepare(
        tiny_model.module, (tiny_model.example_input(1),), device_for(target), precision
    ).run()
    after = tiny_model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_model.module.training


def test_a_target_option_is_part_of_the_name() -> None:
    registry = TargetRegistry.from_entry_points()
    compiled = registry.get("torch-compile:max-autotune")
    assert compiled is registry.get("torch-compile:max-autotune")
    assert compiled is not registry.get("torch-compile")
    with pytest.raises(ConfigError, match=r"unknown option of target torch-compile 'fast'"):
        registry.get("torch-compile:fast")
    with pytest.raises(ConfigError, match=r"'torch-eager' has no build options"):
        registry.get("torch-eager:fast")

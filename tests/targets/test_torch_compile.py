"""torch.compile: compile time kept apart, graph breaks counted, options, fresh builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchlib.harness.verify import relative_error
from benchlib.target import Precision, TargetRegistry
from targets.torch_compile import TorchCompile

REGISTRY = TargetRegistry.from_entry_points()
CPU = torch.device("cpu")


def available() -> TorchCompile:
    target = REGISTRY.get("torch-compile")
    reason = target.unavailable_reason()
    if reason is not None:
        pytest.skip(f"torch-compile: {reason}")
    assert isinstance(target, TorchCompile)
    return target


class Mlp(nn.Module):
    def __init__(self, width: int, graph_break: bool = False) -> None:
        super().__init__()
        self.graph_break = graph_break
        self.fc1, self.fc2 = nn.Linear(8, width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.fc2(x)


def test_compile_happens_in_prepare_and_is_timed_apart() -> None:
    target = available()
    torch.manual_seed(0)
    model = Mlp(16).eval()
    x = torch.randn(3, 8)
    prepared = target.prepare(model, (x,), CPU, Precision.FP32)
    assert prepared.info["mode"] == "default"
    assert prepared.info["compile_s"] > 0
    assert prepared.info["graph_breaks"] == 0
    with torch.no_grad():
        assert relative_error(prepared.run(), model(x)) < 1e-5


def test_the_graph_cache_outcome_is_recorded() -> None:
    """Whether a graph came from inductor's cache decides what compile_s means; frozen
    graphs (the default here) bypass the cache, so every build generates its code."""
    target = available()
    model = Mlp(16).eval()
    x = torch.randn(3, 8)
    for _ in range(2):
        cache = target.prepare(model, (x,), CPU, Precision.FP32).info["fx_graph_cache"]
        assert cache == {"hits": 0, "misses": 0, "bypasses": 1}


def test_graph_breaks_are_counted() -> None:
    target = available()
    model = Mlp(16, graph_break=True).eval()
    prepared = target.prepare(model, (torch.randn(3, 8),), CPU, Precision.FP32)
    assert prepared.info["graph_breaks"] >= 1


def test_models_of_one_class_with_other_shapes_each_compile_fresh() -> None:
    """Every build starts from a reset compiler: a pruned model (same class, narrower layers)
    never reuses a guard-failed cache entry or turns dynamic."""
    target = available()
    x = torch.randn(2, 8)
    for width in (16, 12, 7):
        model = Mlp(width).eval()
        prepared = target.prepare(model, (x,), CPU, Precision.FP32)
        with torch.no_grad():
            assert relative_error(prepared.run(), model(x)) < 1e-5


def test_rebind_runs_the_compiled_model_on_new_inputs() -> None:
    target = available()
    model = Mlp(16).eval()
    first, second = torch.randn(2, 8), torch.randn(2, 8)
    prepared = target.prepare(model, (first,), CPU, Precision.FP32)
    assert prepared.rebind is not None
    prepared.rebind((second,))
    with torch.no_grad():
        assert relative_error(prepared.run(), model(second)) < 1e-5


def test_max_autotune_is_an_option() -> None:
    target = REGISTRY.get("torch-compile:max-autotune")
    assert isinstance(target, TorchCompile) and target.mode == "max-autotune"
    assert "max-autotune" in TorchCompile.options

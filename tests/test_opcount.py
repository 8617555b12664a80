"""Counting and pruning models that have no hookable modules: TorchScript and torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchlib.flops import count
from benchlib.models import Model, build_model
from benchlib.pruning import prune

JIT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(trace|trace_method)` is deprecated:FutureWarning"
)


@pytest.fixture(scope="module")
def resnet20() -> Model:
    return build_model("resnet20")


def as_model(module: nn.Module, source: str) -> Model:
    return Model(name=source, module=module, input_shape=(3, 32, 32), source=source)


@pytest.fixture(scope="module")
def archives(resnet20: Model) -> dict[str, Model]:
    example = resnet20.example_input(1)
    # torch 2.14 warns FutureWarning, older releases DeprecationWarning
    with pytest.warns((FutureWarning, DeprecationWarning), match="deprecated"), torch.no_grad():
        scripted = torch.jit.trace(resnet20.module, (example,))
    exported = torch.export.export(resnet20.module, (example,)).module()
    return {
        "torchscript": as_model(scripted, "torchscript"),
        "export": as_model(exported, "export"),
    }


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_op_level_count_equals_module_count(
    kind: str, resnet20: Model, archives: dict[str, Model]
) -> None:
    expected = count(resnet20.module, resnet20.example_input(1))
    got = count(archives[kind].module, resnet20.example_input(1))
    assert got.macs == expected.macs == 40_551_040
    assert got.params == expected.params
    assert [layer.name for layer in got.layers] == [layer.name for layer in expected.layers]
    assert got.layer("layer2.0.conv1").macs == expected.layer("layer2.0.conv1").macs


@JIT_DEPRECATED
@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_magnitude_pruning_of_archives_matches_the_module(
    kind: str, resnet20: Model, archives: dict[str, Model]
) -> None:
    reference = prune(resnet20, "magnitude:0.8")
    variant = prune(archives[kind], "magnitude:0.8")
    assert variant.recipe.layers == reference.recipe.layers
    assert variant.recipe.details == reference.recipe.details
    assert variant.flops.nonzero_macs == reference.flops.nonzero_macs
    x = resnet20.example_input(1)  # the export was made at batch 1 (static)
    with torch.no_grad():
        torch.testing.assert_close(variant.module(x), reference.module(x))

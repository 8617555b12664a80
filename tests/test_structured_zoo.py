"""The zoo contract of structured pruning: every classification builder of torchvision and every
CIFAR net of benchlib, randomly initialised at the smallest input it takes, pruned by
``l1:0.3``, runs, keeps its output shape, and has strictly fewer MACs and parameters.

A model the pruner cannot handle must say so with PruningError (the documented failure mode);
none does today, so any PruningError fails here. Slow (the whole zoo, ~7 minutes on 2 cores):
run with ``--slow``. Each test prints one line with its MAC and parameter ratios (``-s``).
"""

from __future__ import annotations

import time

import pytest
import torch
import torchvision
from torch import nn

from benchlib.flops import count
from benchlib.models import _size_problem, build_model
from benchlib.pruning import prune
from benchlib.pruning.graph import DependencyGraph, build_graph
from benchlib.pruning.surgery import apply_cuts

CIFAR_NETS = ["resnet20", "resnet32", "resnet56", "resnet110", "vgg16_cifar"]
TORCHVISION = sorted(torchvision.models.list_models(module=torchvision.models))
SPEC = "l1:0.3"


def smallest_size(name: str) -> int:
    """The smallest input of at least 32 pixels that ``build_model`` accepts for ``name``
    (alexnet 63, inception_v3 75, vit_h_14 42, maxvit_t 221, most others 32)."""
    return next(size for size in range(32, 1025) if _size_problem(name, size) is None)


def test_the_zoo_is_every_torchvision_classifier_and_the_cifar_nets() -> None:
    assert len(TORCHVISION) >= 80
    assert {"resnet50", "vit_b_16", "swin_t", "maxvit_t", "regnet_y_128gf"} <= set(TORCHVISION)
    assert smallest_size("maxvit_t") == 221 and smallest_size("vit_h_14") == 42


@pytest.mark.slow
@pytest.mark.parametrize("name", [*TORCHVISION, *CIFAR_NETS])
def test_l1_pruning_shrinks_every_zoo_model(name: str) -> None:
    start = time.perf_counter()
    model = build_model(name, input_size=smallest_size(name))
    x = model.example_input(1)
    with torch.no_grad():
        expected = model.module(x).shape
    dense = count(model.module, x)
    variant = prune(model, SPEC)
    with torch.no_grad():
        out = variant.module(x)
    assert out.shape == expected
    assert torch.isfinite(out).all()
    assert variant.flops.macs < dense.macs
    assert variant.flops.params < dense.params
    kept = variant.recipe.details["kept"]
    assert kept, "at least one group was cut"
    macs, params = variant.flops.macs / dense.macs, variant.flops.params / dense.params
    print(  # one line per model; ``pytest -s`` or ``-rP`` shows the table
        f"zoo {name} size={model.input_shape[-1]} macs={macs:.4f} params={params:.4f} "
        f"groups_cut={len(kept)} pinned_ops={len(variant.recipe.details['pinned'])} "
        f"seconds={time.perf_counter() - start:.1f}"
    )


# -- exactness on real architectures ----------------------------------------------------------

EXACT = [
    "alexnet", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "mnasnet0_5",
    "mobilenet_v2", "mobilenet_v3_small", "regnet_y_400mf", "resnet18", "resnet50",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "vgg11_bn", "resnet20",
    "vgg16_cifar",
]  # fmt: skip
"""CNNs whose removed channels can be made exactly zero: BatchNorm (no LayerNorm, which
normalizes over the channels) and activations with f(0) = 0."""


def _zero_removed(module: nn.Module, graph: DependencyGraph, kept: dict[str, list[int]]) -> None:
    """Make every removed channel exactly 0 wherever it appears: zero its filters and biases
    and, in every BatchNorm it passes (concats included), its beta and running mean."""
    with torch.no_grad():
        for member, indices, size in graph.cuts(kept):
            gone = sorted(set(range(size)) - set(indices))
            layer = module.get_submodule(member.target)
            if member.kind in ("out", "depthwise"):
                layer.weight[gone] = 0.0
                if layer.bias is not None:
                    layer.bias[gone] = 0.0
            elif member.kind == "norm":
                assert isinstance(layer, nn.modules.batchnorm._BatchNorm), member
                layer.bias[gone] = 0.0
                layer.running_mean[gone] = 0.0
            else:
                assert member.kind == "in", member


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_pruned_zoo_model_equals_the_dense_one_with_removed_channels_zeroed(name: str) -> None:
    model = build_model(name, input_size=smallest_size(name))
    module = model.module
    generator = torch.Generator().manual_seed(0)
    for m in module.modules():  # BN statistics and affine terms that make every index matter
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
    module.train()
    with torch.no_grad():
        module(model.example_input(8, seed=1))
    module.eval()
    x = model.example_input(2, seed=2)
    graph = build_graph(module, x)
    kept = {
        g.key: sorted(torch.randperm(g.size, generator=generator)[: g.size - g.size * 3 // 10])
        for g in graph.groups
    }
    kept = {k: [int(i) for i in v] for k, v in kept.items()}
    with torch.no_grad():
        original = module(x)
        _zero_removed(module, graph, kept)
        expected = module(x)
        assert not torch.allclose(original, expected, rtol=1e-3, atol=1e-3)  # channels mattered
        apply_cuts(module, graph, kept)
        actual = module(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * max(1.0, scale))

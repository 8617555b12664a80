"""Oracle: our structured-pruning graph and surgery against Torch-Pruning (``torch_pruning``).

For resnet18, resnet50, mobilenet_v2 and vgg16_bn (torchvision, ``weights=None``, seeded, with
random BatchNorm statistics so that a wrong channel index shows in the weights and outputs):

* the coupled groups are the same: every Torch-Pruning group of
  ``DG.get_all_groups(root_module_types=[Conv2d, Linear], ignored_layers=[classifier])`` has the
  producers (conv/linear layers whose output channels it prunes) of exactly one of our groups,
  and touches exactly the same (kind, layer) slices;
* the same removed channels (a seeded random 30% of every group) give the same model: the same
  state dict (names, shapes, values), the same layer attributes, the same output and the same
  MACs and parameters.

Expected differences between the two representations, mapped explicitly here (no assertion is
loosened for them):

1. Depthwise convs. Torch-Pruning lists a depthwise conv in a group with
   ``prune_depthwise_conv_out_channels`` (its in- and out-channel handlers are the same
   function), and ``get_all_groups`` may even root a group at one (mobilenet_v2 does). We list
   it as one ``"depthwise"`` member, never as a producer: its output channels are its input's.
   So both handlers map to ``"depthwise"``, and a Torch-Pruning group's producers are its
   out-pruned convs/linears that are not depthwise.
2. Roots and keys. Torch-Pruning roots each group at the first layer of its own traversal order
   (a downsample conv in resnets, a depthwise conv in mobilenet_v2); ours is keyed by the first
   producer in execution order. Groups are therefore matched by their set of producers.
3. The classifier. Torch-Pruning is told to ignore the final Linear (a group whose out-channels
   include it is not yielded); ours pins the network output, so no group produces it. Both
   then have no group for it, which the equal group counts check.
4. Reshapes. In vgg16_bn the last conv's channels reach ``classifier.0`` through
   ``avgpool``/``flatten`` (each channel repeated 7 x 7 times). Our ``Group.members`` lists only
   slices that follow the channel space directly; the flattened input of ``classifier.0`` is cut
   through a derived index space, which ``DependencyGraph.cuts`` reports. Our touched slices are
   therefore read from ``cuts`` (everything the surgery would change), not from ``members``.
5. Torch-Pruning's pseudo-nodes for elementwise ops and reshapes (``_ElementWiseOp``,
   ``_ReshapeOp``) hold no tensors and are left out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from benchlib.flops import count
from benchlib.pruning.graph import DependencyGraph, build_graph
from benchlib.pruning.surgery import apply_cuts

MODELS = {"resnet18": 64, "resnet50": 64, "mobilenet_v2": 64, "vgg16_bn": 32}
"""Model -> input size: small inputs (vgg16_bn's adaptive pool turns 1x1 into 7x7)."""
REMOVE = 0.3
LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)

# Torch-Pruning's handler -> our Member.kind (both depthwise handlers are one function).
KINDS = {
    tp.prune_conv_out_channels: "out",
    tp.prune_linear_out_channels: "out",
    tp.prune_conv_in_channels: "in",
    tp.prune_linear_in_channels: "in",
    tp.prune_depthwise_conv_out_channels: "depthwise",
    tp.prune_depthwise_conv_in_channels: "depthwise",
    tp.prune_batchnorm_out_channels: "norm",
    tp.prune_batchnorm_in_channels: "norm",
}

Slices = frozenset[tuple[str, str]]
"""The (kind, layer name) slices a group cuts."""


@dataclass(frozen=True)
class Case:
    name: str
    model: nn.Module
    example: torch.Tensor


def build(name: str) -> Case:
    """A seeded torchvision model in eval mode, with random BatchNorm affine and statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
        size = MODELS[name]
        example = torch.randn(1, 3, size, size)
    return Case(name=name, model=model, example=example)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> Case:
    return build(request.param)


def classifier(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def tp_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def tp_groups(model: nn.Module, example: torch.Tensor) -> dict[frozenset[str], Slices]:
    """Torch-Pruning's groups: producers -> the (kind, layer) slices the group cuts."""
    graph = tp_graph(model, example)
    names = {module: name for name, module in model.named_modules()}
    groups: dict[frozenset[str], Slices] = {}
    for group in graph.get_all_groups(
        root_module_types=[nn.Conv2d, nn.Linear], ignored_layers=[classifier(model)]
    ):
        touched = frozenset(
            (KINDS[dep.handler], names[dep.target.module])
            for dep, _ in group
            if isinstance(dep.target.module, LAYERS)
        )
        producers = frozenset(layer for kind, layer in touched if kind == "out")
        assert producers not in groups, f"two Torch-Pruning groups produced by {producers}"
        groups[producers] = touched
    return groups


def our_groups(graph: DependencyGraph) -> dict[frozenset[str], Slices]:
    """Our groups: producers -> the (kind, layer) slices the surgery cuts (see note 4)."""
    groups: dict[frozenset[str], Slices] = {}
    for group in graph.groups:
        cut = graph.cuts({group.key: list(range(1, group.size))})
        groups[frozenset(group.producers)] = frozenset((m.kind, m.target) for m, _, _ in cut)
    return groups


def removed_channels(graph: DependencyGraph, seed: int = 0) -> dict[str, list[int]]:
    """A seeded random ``REMOVE`` share of every group's channels (at least one)."""
    generator = torch.Generator().manual_seed(seed)
    removed = {}
    for group in graph.groups:
        n = max(1, int(REMOVE * group.size))
        removed[group.key] = sorted(torch.randperm(group.size, generator=generator)[:n].tolist())
    return removed


def test_groups_match_torch_pruning(case: Case) -> None:
    ours = our_groups(build_graph(case.model, case.example))
    theirs = tp_groups(case.model, case.example)
    assert ours, f"{case.name}: no prunable group found"
    assert sorted(map(sorted, ours)) == sorted(map(sorted, theirs)), "producers differ"
    for producers, touched in ours.items():
        only_ours, only_tp = touched - theirs[producers], theirs[producers] - touched
        assert not only_ours and not only_tp, (
            f"{case.name} group {sorted(producers)}: only ours {sorted(only_ours)}, "
            f"only Torch-Pruning {sorted(only_tp)}"
        )


def test_same_cuts_give_the_same_model(case: Case) -> None:
    graph = build_graph(case.model, case.example)
    removed = removed_channels(graph)

    ours = copy.deepcopy(case.model)
    kept = {
        group.key: sorted(set(range(group.size)) - set(removed[group.key]))
        for group in graph.groups
    }
    apply_cuts(ours, graph, kept)

    theirs = copy.deepcopy(case.model)
    tp_dg = tp_graph(theirs, case.example)
    for group in graph.groups:
        root = theirs.get_submodule(group.key)
        fn = (
            tp.prune_linear_out_channels
            if isinstance(root, nn.Linear)
            else (tp.prune_conv_out_channels)
        )
        tp_dg.get_pruning_group(root, fn, idxs=list(removed[group.key])).prune()

    # Both really pruned: every producer lost its share (a no-op on both sides cannot pass).
    for group in graph.groups:
        for producer in group.producers:
            layer = ours.get_submodule(producer)
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            assert width == group.size - len(removed[group.key]), producer

    dense, mine, tps = (m.state_dict() for m in (case.model, ours, theirs))
    assert list(mine) == list(tps)
    for key, tensor in mine.items():
        assert tensor.shape == tps[key].shape, (
            f"{case.name} {key}: {tensor.shape} vs {tps[key].shape}"
        )
        assert torch.equal(tensor, tps[key]), f"{case.name} {key}: values differ"
    assert any(mine[k].shape != dense[k].shape for k in mine)

    our_layers = dict(ours.named_modules())
    for name, layer in theirs.named_modules():
        if isinstance(layer, LAYERS):
            assert repr(our_layers[name]) == repr(layer), name  # channels, features, groups

    with torch.no_grad():
        torch.testing.assert_close(ours(case.example), theirs(case.example))
    mine_count, tp_count = count(ours, case.example), count(theirs, case.example)
    assert (mine_count.macs, mine_count.params) == (tp_count.macs, tp_count.params)
    assert mine_count.macs < count(case.model, case.example).macs

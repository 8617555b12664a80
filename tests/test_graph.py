"""The dependency graph (``build_graph``) and the surgery (``apply_cuts``) on tiny hand-written
modules: which channels are coupled, what is pinned, and that cutting a model gives exactly the
dense model with the removed channels made zero.

The exactness check: a removed channel is made exactly 0 where it is produced (its filter, its
bias, the following BatchNorm's beta and running mean are zeroed; ReLU/GELU keep 0 at 0), so it
contributes nothing to any consumer. Cutting it away must then leave the output unchanged. The
BatchNorm statistics and affine parameters are random, so a wrong index shows in the output.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from benchlib.errors import PruningError
from benchlib.models import Model
from benchlib.pruning import prune
from benchlib.pruning.graph import DependencyGraph, Member, build_graph
from benchlib.pruning.surgery import apply_cuts


def opaque_scale(x: torch.Tensor) -> torch.Tensor:
    """A function the graph has no rule for (wrapped, so fx records one call)."""
    return x * 2.0


torch.fx.wrap("opaque_scale")


def conv_bn(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU()]


class Chain(nn.Module):
    """conv -> bn -> relu -> conv: one group (out, norm, in); the last conv is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


class Residual(nn.Module):
    """stem -> (conv_a + stem) -> head: the stem and conv_a share one channel space."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 5, 3, padding=1)
        self.bn_mid = nn.BatchNorm2d(5)
        self.conv_a = nn.Conv2d(5, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_stem(self.stem(x)))
        y = self.bn_a(self.conv_a(torch.relu(self.bn_mid(self.mid(x)))))
        return self.head(torch.relu(y + x))


class Concat(nn.Module):
    """Two branches concatenated along channels, then one consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(6)
        self.conv_c = nn.Conv2d(10, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn_a(self.conv_a(x)))
        b = torch.relu(self.bn_b(self.conv_b(x)))
        return self.conv_c(torch.cat([a, b], dim=1))


class DenseConcat(nn.Module):
    """DenseNet-style: the network input is concatenated with a conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(9, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([x, torch.relu(self.bn(self.conv(x)))], 1))


class ConcatThenAdd(nn.Module):
    """A concat whose output is added to a conv's output: its layout is fixed, all pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv_a(x), self.conv_b(x)], 1) + self.conv_c(x))


class Depthwise(nn.Module):
    """conv -> bn -> relu -> depthwise -> bn -> relu -> pointwise (MobileNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.pw(torch.relu(self.bn2(self.dw(x))))


class Grouped(nn.Module):
    """A grouped (not depthwise) conv pins its input and output; conv3 stays prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.conv4 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv4(torch.relu(self.conv3(self.gconv(self.conv1(x)))))


class SqueezeExcite(nn.Module):
    """conv -> torchvision SqueezeExcitation -> conv: the SE multiply couples conv1 and fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.se = torchvision.ops.SqueezeExcitation(8, 4)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.se(self.conv1(x)))


class FlattenLinear(nn.Module):
    """conv (no bias) -> bn -> relu -> pool to 2x2 -> flatten -> linear -> relu -> linear."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.view = view
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        x = x.view(x.size(0), -1) if self.view else torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class ChannelsLast(nn.Module):
    """A ConvNeXt block: depthwise -> permute -> LayerNorm -> Linear -> GELU -> Linear ->
    permute back -> residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pw1 = nn.Linear(8, 16)
        self.pw2 = nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(nn.functional.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        return self.head(x + y)


class Rolled(nn.Module):
    """torch.roll along channels has no rule: it pins conv1's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(torch.roll(self.conv1(x), 1, dims=1)))


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return opaque_scale(x)


class Wrapped(nn.Module):
    """A wrapped function of unknown effect, inside a submodule named ``inner``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = Opaque()
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.inner(self.conv1(x))))


class Chunked(nn.Module):
    def __init__(self, split: bool) -> None:
        super().__init__()
        self.split = split
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        a, b = y.split([4, 4], dim=1) if self.split else torch.chunk(y, 2, dim=1)
        return self.conv3(torch.relu(self.conv2(a * b)))


class InputAdd(nn.Module):
    """conv1(x) + x: conv1's channels are the network input's; the last conv is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(self.conv1(x) + x)))


def example(size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random BN statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator))
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def kinds(members: tuple[Member, ...]) -> list[tuple[str, str]]:
    return [(m.kind, m.target) for m in members]


def zero_removed(model: nn.Module, graph: DependencyGraph, kept: dict[str, list[int]]) -> None:
    """Make every removed channel exactly 0 at its producers (filter, bias, BN beta/mean)."""
    with torch.no_grad():
        for group in graph.groups:
            if group.key not in kept:
                continue
            gone = sorted(set(range(group.size)) - set(kept[group.key]))
            for member in group.members:
                module = model.get_submodule(member.target)
                if member.kind in ("out", "depthwise"):
                    module.weight[gone] = 0.0
                    if module.bias is not None:
                        module.bias[gone] = 0.0
                elif member.kind == "norm":
                    assert isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d)
                    module.bias[gone] = 0.0
                    module.running_mean[gone] = 0.0


def some_kept(graph: DependencyGraph, seed: int) -> dict[str, list[int]]:
    """A random, non-trivial subset (about half, at least one) of every group's channels."""
    generator = torch.Generator().manual_seed(seed)
    kept = {}
    for group in graph.groups:
        keep = max(1, group.size // 2)
        kept[group.key] = sorted(torch.randperm(group.size, generator=generator)[:keep].tolist())
    return kept


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- structure --------------------------------------------------------------------------------


def test_chain_is_one_group_of_out_norm_in() -> None:
    model = Chain()
    graph = build_graph(model, example())
    assert len(graph.groups) == 1
    group = graph.groups[0]
    assert (group.key, group.size, group.producers) == ("conv1", 8, ("conv1",))
    assert kinds(group.members) == [("out", "conv1"), ("norm", "bn1"), ("in", "conv2")]
    assert graph.blocked == []


def test_chain_cut_slices_every_member() -> None:
    model = randomized(Chain())
    dense = copy.deepcopy(model)
    graph = build_graph(model, example())
    apply_cuts(model, graph, {"conv1": [1, 4, 6]})
    index = [1, 4, 6]
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (3, 3, 3)
    torch.testing.assert_close(model.conv1.weight, dense.conv1.weight[index])
    torch.testing.assert_close(model.conv1.bias, dense.conv1.bias[index])
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(model.bn1, name), getattr(dense.bn1, name)[index])
    torch.testing.assert_close(model.conv2.weight, dense.conv2.weight[:, index])
    torch.testing.assert_close(model.conv2.bias, dense.conv2.bias)  # output side untouched
    assert model.conv2.out_channels == 6
    assert model(example()).shape == (2, 6, 8, 8)


def test_build_graph_leaves_the_model_unchanged() -> None:
    model = randomized(Residual())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_graph(model, example())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_groups_not_named_in_kept_keep_every_channel() -> None:
    model = randomized(Residual())
    dense = copy.deepcopy(model)
    graph = build_graph(model, example())
    assert list(graph.cuts({})) == []
    apply_cuts(model, graph, {})
    torch.testing.assert_close(model(example()), dense(example()), rtol=0, atol=0)
    keys = {g.key for g in graph.groups}
    assert keys == {"stem", "mid"}
    cut = {member.target for member, _, _ in graph.cuts({"mid": [0, 1]})}
    assert cut == {"mid", "bn_mid", "conv_a"}


def test_residual_add_puts_both_producers_in_one_group() -> None:
    model = randomized(Residual())
    graph = build_graph(model, example())
    group = graph.group("stem")
    assert group.producers == ("stem", "conv_a")
    assert group.size == 8
    assert set(kinds(group.members)) == {
        ("out", "stem"), ("norm", "bn_stem"), ("in", "mid"),
        ("out", "conv_a"), ("norm", "bn_a"), ("in", "head"),
    }  # fmt: skip
    assert graph.group("mid").producers == ("mid",)
    kept = [0, 3, 7]
    dense = copy.deepcopy(model)
    apply_cuts(model, graph, {"stem": kept})
    torch.testing.assert_close(model.stem.weight, dense.stem.weight[kept])
    torch.testing.assert_close(model.conv_a.weight, dense.conv_a.weight[kept])
    torch.testing.assert_close(model.bn_a.running_mean, dense.bn_a.running_mean[kept])
    torch.testing.assert_close(model.mid.weight, dense.mid.weight[:, kept])
    torch.testing.assert_close(model.head.weight, dense.head.weight[:, kept])
    assert model(example()).shape == (2, 4, 8, 8)


def test_unknown_group_key_raises() -> None:
    graph = build_graph(Chain(), example())
    with pytest.raises(PruningError, match="conv2"):
        graph.group("conv2")


def test_concat_maps_each_part_to_its_columns() -> None:
    model = randomized(Concat())
    dense = copy.deepcopy(model)
    graph = build_graph(model, example())
    assert [(g.key, g.size) for g in graph.groups] == [("conv_a", 4), ("conv_b", 6)]
    apply_cuts(model, graph, {"conv_a": [0, 2], "conv_b": [1, 3, 5]})
    assert model.conv_c.in_channels == 5
    columns = [0, 2, 4 + 1, 4 + 3, 4 + 5]
    torch.testing.assert_close(model.conv_c.weight, dense.conv_c.weight[:, columns])
    torch.testing.assert_close(model.bn_b.running_var, dense.bn_b.running_var[[1, 3, 5]])


def test_concat_with_the_network_input_cuts_only_the_conv_part() -> None:
    model = randomized(DenseConcat())
    dense = copy.deepcopy(model)
    graph = build_graph(model, example())
    assert [g.key for g in graph.groups] == ["conv"]
    apply_cuts(model, graph, {"conv": [1, 2, 5]})
    assert model.head.in_channels == 6
    columns = [0, 1, 2, 3 + 1, 3 + 2, 3 + 5]
    torch.testing.assert_close(model.head.weight, dense.head.weight[:, columns])


def test_concat_added_to_a_producer_pins_all_parts() -> None:
    graph = build_graph(ConcatThenAdd(), example())
    assert graph.groups == []


@pytest.mark.parametrize("split", [False, True], ids=["chunk", "split"])
def test_chunk_and_split_pin_the_split_dim(split: bool) -> None:
    graph = build_graph(Chunked(split), example())
    producers = {p for g in graph.groups for p in g.producers}
    assert "conv1" not in producers
    assert producers == {"conv2"}  # the rest of the model stays prunable


def test_depthwise_conv_joins_its_input_group_and_keeps_groups_consistent() -> None:
    model = randomized(Depthwise())
    dense = copy.deepcopy(model)
    graph = build_graph(model, example())
    assert len(graph.groups) == 1
    assert kinds(graph.groups[0].members) == [
        ("out", "conv1"), ("norm", "bn1"), ("depthwise", "dw"), ("norm", "bn2"), ("in", "pw"),
    ]  # fmt: skip
    kept = [0, 2, 3, 7]
    apply_cuts(model, graph, {"conv1": kept})
    dw = model.dw
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 4, 4)
    assert dw.weight.shape == (4, 1, 3, 3)
    torch.testing.assert_close(dw.weight, dense.dw.weight[kept])
    torch.testing.assert_close(dw.bias, dense.dw.bias[kept])
    assert model(example()).shape == (2, 6, 8, 8)


def test_grouped_conv_is_pinned_and_recorded() -> None:
    graph = build_graph(Grouped(), example())
    assert [g.key for g in graph.groups] == ["conv3"]
    assert graph.blocked == ["grouped conv (groups=2) gconv"]


def test_squeeze_excitation_multiply_couples_the_conv_and_the_gate() -> None:
    graph = build_graph(SqueezeExcite(), example())
    assert [(g.key, g.size, g.producers) for g in graph.groups] == [
        ("conv1", 8, ("conv1", "se.fc2")),
        ("se.fc1", 4, ("se.fc1",)),
    ]
    assert kinds(graph.group("conv1").members) == [
        ("out", "conv1"), ("in", "se.fc1"), ("out", "se.fc2"), ("in", "conv2"),
    ]  # fmt: skip
    assert kinds(graph.group("se.fc1").members) == [("out", "se.fc1"), ("in", "se.fc2")]


@pytest.mark.parametrize("view", [False, True], ids=["flatten", "view"])
def test_flatten_maps_each_channel_to_its_spatial_block(view: bool) -> None:
    model = randomized(FlattenLinear(view))
    dense = copy.deepcopy(model)
    graph = build_graph(model, example())
    assert [(g.key, g.size) for g in graph.groups] == [("conv", 4), ("fc1", 7)]
    assert {("out", "conv"), ("norm", "bn")} <= set(kinds(graph.group("conv").members))
    kept = [1, 3]
    apply_cuts(model, graph, {"conv": kept})
    assert model.fc1.in_features == len(kept) * 2 * 2
    columns = [c * 4 + j for c in kept for j in range(4)]
    assert columns == [4, 5, 6, 7, 12, 13, 14, 15]
    torch.testing.assert_close(model.fc1.weight, dense.fc1.weight[:, columns])
    torch.testing.assert_close(model.fc1.bias, dense.fc1.bias)


def test_channels_last_layernorm_follows_the_channels() -> None:
    model = ChannelsLast().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1.0, 1.0)
    dense = copy.deepcopy(model)
    graph = build_graph(model, example())
    assert [(g.key, g.size, g.producers) for g in graph.groups] == [
        ("stem", 8, ("stem", "pw2")),
        ("pw1", 16, ("pw1",)),
    ]
    assert set(kinds(graph.group("stem").members)) == {
        ("out", "stem"), ("depthwise", "dw"), ("norm", "norm"), ("in", "pw1"),
        ("out", "pw2"), ("in", "head"),
    }  # fmt: skip
    kept = [0, 1, 4, 6, 7]
    apply_cuts(model, graph, {"stem": kept})
    assert model.norm.normalized_shape == (5,)
    torch.testing.assert_close(model.norm.weight, dense.norm.weight[kept])
    torch.testing.assert_close(model.norm.bias, dense.norm.bias[kept])
    assert (model.pw1.in_features, model.pw2.out_features, model.dw.groups) == (5, 5, 5)
    torch.testing.assert_close(model.pw2.weight, dense.pw2.weight[kept])
    torch.testing.assert_close(model.pw1.weight, dense.pw1.weight[:, kept])
    assert model(example()).shape == (2, 4, 8, 8)


def test_channels_last_hidden_group_cut_is_exact() -> None:
    # GELU(0) = 0: a zeroed hidden unit of the MLP contributes nothing.
    model = ChannelsLast().eval()
    graph = build_graph(model, example())
    kept = {"pw1": [0, 2, 3, 5, 8, 9, 11, 15]}
    zero_removed(model, graph, kept)
    expected = model(example())
    apply_cuts(model, graph, kept)
    assert model.pw1.out_features == model.pw2.in_features == 8
    torch.testing.assert_close(model(example()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "op", "layer"),
    [(Rolled(), "roll", "roll"), (Wrapped(), "opaque_scale", "inner")],
    ids=["roll", "wrapped"],
)
def test_unknown_op_pins_what_it_touches_and_is_listed(
    model: nn.Module, op: str, layer: str
) -> None:
    graph = build_graph(model, example())
    assert [g.key for g in graph.groups] == ["conv2"]  # conv1's channels are pinned
    # the op and where it is: its module, or its node name at the top level
    assert graph.blocked == [f"{op} in {layer}"]
    assert graph.unknown == graph.blocked  # unknown effect, unlike a grouped conv's known pin


def test_strict_refuses_a_model_with_an_unknown_op_and_names_it() -> None:
    model = Model(name="rolled", module=Rolled(), input_shape=(3, 16, 16), source="factory")
    with pytest.raises(PruningError, match=r"strict: roll in roll has an effect on channels"):
        prune(model, "l1:0.5[strict=true]")
    pruned = prune(model, "l1:0.5")  # by default the op's channels are kept
    assert pruned.module.conv1.out_channels == 8 and pruned.module.conv2.out_channels == 2
    assert pruned.recipe.details["pinned"] == ["roll in roll"]


def test_network_input_and_output_are_never_in_a_group() -> None:
    graph = build_graph(InputAdd(), example())
    assert [g.key for g in graph.groups] == ["conv2"]  # conv1 = input's, conv3 = output's
    sequential = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    assert [g.key for g in build_graph(sequential, example()).groups] == ["0"]
    linear = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    assert build_graph(linear, example()).groups == []


def test_a_batch_of_one_is_widened() -> None:
    # with batch 1 the batch dim would look like a broadcast dim; the graph is the same
    one = build_graph(Residual(), example()[:1])
    two = build_graph(Residual(), example())
    assert [(g.key, g.members) for g in one.groups] == [(g.key, g.members) for g in two.groups]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_untraceable_and_scripted_models_raise_pruning_error() -> None:
    with pytest.raises(PruningError, match="cannot trace DataDependent"):
        build_graph(DataDependent(), example())
    with pytest.warns(FutureWarning, match="deprecated"):
        scripted = torch.jit.script(Chain())
    with pytest.raises(PruningError, match=r"eager nn\.Module"):
        build_graph(scripted, example())
    traced = torch.fx.symbolic_trace(Chain())
    with pytest.raises(PruningError, match=r"eager nn\.Module"):
        build_graph(traced, example())


def test_a_model_that_does_not_run_on_the_example_raises() -> None:
    with pytest.raises(PruningError, match="does not run"):
        build_graph(Chain(), torch.randn(2, 5, 8, 8))


# -- exactness: pruned == dense with the removed channels zeroed ---------------------------


NETS: dict[str, Callable[[], nn.Module]] = {
    "chain": Chain,
    "residual": Residual,
    "concat": Concat,
    "dense-concat": DenseConcat,
    "depthwise": Depthwise,
    "squeeze-excite": SqueezeExcite,
    "flatten-linear": FlattenLinear,
    "view-linear": lambda: FlattenLinear(view=True),
    "convs": lambda: nn.Sequential(*conv_bn(3, 6), *conv_bn(6, 10, 1), nn.MaxPool2d(2),
                                   *conv_bn(10, 4), nn.Flatten(), nn.Linear(64, 5)),
}  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(NETS))
def test_pruned_output_equals_dense_with_removed_channels_zeroed(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = randomized(NETS[name](), seed)
    inputs = example(seed=seed)
    graph = build_graph(model, inputs)
    assert graph.groups, "the net has something to prune"
    kept = some_kept(graph, seed)
    original = model(inputs)
    zero_removed(model, graph, kept)
    expected = model(inputs)
    # the removed channels mattered: the test would see a wrong channel mapping
    assert not torch.allclose(original, expected, atol=1e-3)
    dense_params = n_params(model)
    apply_cuts(model, graph, kept)
    assert n_params(model) < dense_params
    actual = model(inputs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_shifted_kept_indices_would_be_caught() -> None:
    # The exactness check itself: cutting other channels than the zeroed ones changes the output.
    model = randomized(Concat())
    graph = build_graph(model, example())
    zero_removed(model, graph, {"conv_a": [0, 2], "conv_b": [1, 3, 5]})
    expected = model(example())
    apply_cuts(model, graph, {"conv_a": [0, 2], "conv_b": [0, 2, 4]})
    assert not torch.allclose(model(example()), expected, atol=1e-3)

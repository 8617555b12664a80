"""The dependency graph: which channels of which layers must be removed together.

Choice of tracer: ``torch.fx`` symbolic tracing, with conv, linear, norm and attention modules
kept as leaves. It traces every classification model of torchvision (82 of 82, the CIFAR nets
included), keeps module names on the nodes, and, unlike ``torch.export``, leaves the original
modules in place, so the pruned model keeps its class and its ``forward``. Models with
data-dependent control flow cannot be traced; they raise :class:`PruningError`.

How coupling is found. A shape pass runs the traced graph once on the example input. Every
dimension of every tensor value gets a *space* node; ops join nodes that must keep the same
size (union-find): an elementwise op joins the aligned dims of its operands (a residual add or
an SE multiply couples two layers' channels), a norm or activation joins its input and output,
a depthwise conv joins its input and output channels. A conv or linear layer *produces* a new
space for its output channels and *consumes* its input's. ``cat`` along a dim makes a derived
node whose indices are its parts' at offsets; ``flatten`` of ``C x H x W`` makes a derived node
that repeats each channel ``H*W`` times (the channel-by-spatial mapping of a classifier).

A class of joined nodes is a :class:`Group` (prunable together) when it holds a producer, no
derived node, and nothing *pinned*. Pinned are: the network's inputs and outputs, spatial and
sequence dims, grouped (non-depthwise) convs, GroupNorm channels, attention modules' embedding
dims, and every dim an op of unknown effect touches (the graph records the op and the layer in
:attr:`DependencyGraph.blocked`). Pinning never guesses: a dim the graph does not understand
keeps its size, so a pruned model never has wrong shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from benchlib.errors import PruningError
from benchlib.pruning.graph_ops import LEAVES, PRODUCER_KINDS, Builder, Member, Node, find

__all__ = ["DependencyGraph", "Group", "Member", "build_graph"]


@dataclass(frozen=True)
class Group:
    """Channels that must be removed together.

    ``producers`` are the layers whose output channels form the group, in execution order
    (``producers[0]`` *defines* it: criteria score it, as the papers do); ``members`` are all the
    slices to cut, the producers' outputs included. ``key`` names the group in recipes.
    """

    key: str
    size: int
    producers: tuple[str, ...]
    members: tuple[Member, ...]


@dataclass
class DependencyGraph:
    """The groups of a model, and how to map kept channels onto every member.

    ``blocked`` lists the ops that pinned dims (op and layer), ``unknown`` those of them whose
    effect on channels no rule knows (``strict=true`` refuses those); ``traced`` is the ``torch.fx``
    module the graph was read from, sharing the model's parameters (criteria that need
    activations run it).
    """

    groups: list[Group]
    blocked: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    traced: fx.GraphModule | None = field(default=None, repr=False)
    _slices: list[tuple[Member, Node]] = field(default_factory=list, repr=False)
    _roots: dict[str, Node] = field(default_factory=dict, repr=False)
    _derived: dict[int, Node] = field(default_factory=dict, repr=False)

    def group(self, key: str) -> Group:
        for group in self.groups:
            if group.key == key:
                return group
        raise PruningError(f"the model has no prunable group {key!r}")

    def cuts(self, kept: dict[str, list[int]]) -> Iterator[tuple[Member, list[int], int]]:
        """For each member whose size changes: the member, its kept indices and its old size.

        ``kept`` maps group keys to the sorted channel indices each group keeps; groups not in
        it keep everything.
        """
        by_root = {id(self._roots[key]): indices for key, indices in kept.items()}
        for member, node in self._slices:
            indices = _kept(node, by_root, self._derived)
            if len(indices) != node.size:
                yield member, indices, node.size


def _kept(node: Node, by_root: dict[int, list[int]], derived: dict[int, Node]) -> list[int]:
    """The indices of ``node``'s dim that survive when groups keep ``by_root``."""
    if not node.derived:
        root = find(node)
        if id(root) not in derived:
            return by_root.get(id(root), list(range(node.size)))
        node = derived[id(root)]  # a plain dim joined to a cat/flatten output follows it
    if node.expand:
        return [i * node.expand + j for i in _kept(node.parts[0], by_root, derived)
                for j in range(node.expand)]  # fmt: skip
    out: list[int] = []
    offset = 0
    for part in node.parts:
        out.extend(offset + i for i in _kept(part, by_root, derived))
        offset += part.size
    return out


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math, torchvision.ops))  # type: ignore[arg-type]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Trace ``model`` and record every node's output shape (a forward pass on ``example``)."""
    if isinstance(model, (torch.jit.ScriptModule, fx.GraphModule)) or not isinstance(
        model, nn.Module
    ):
        raise PruningError(
            f"structured pruning needs an eager nn.Module; got {type(model).__name__} "
            "(a TorchScript or torch.export archive cannot be rebuilt smaller)"
        )
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise PruningError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    traced = fx.GraphModule(model, graph)
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(example)
    except Exception as exc:
        raise PruningError(f"the traced {type(model).__name__} does not run: {exc}") from exc
    return traced


def build_graph(model: nn.Module, example: torch.Tensor) -> DependencyGraph:
    """Find the coupled channel groups of ``model`` (left unchanged) for input ``example``.

    ``example`` is one batch; a batch of one is widened to two so the batch dim cannot be
    mistaken for a broadcast dim. Raises PruningError when the model cannot be traced.
    """
    if example.dim() > 0 and example.shape[0] == 1:
        example = torch.cat([example, example])
    traced = trace(model, example)
    builder = Builder(traced)
    builder.walk()
    graph = _collect(builder)
    graph.traced = traced
    return graph


def _collect(builder: Builder) -> DependencyGraph:
    """The groups: classes of joined nodes with a producer and no pin or derived node."""
    _resolve_derived(builder)
    classes: dict[int, list[Node]] = {}
    for node in builder.nodes:
        classes.setdefault(id(find(node)), []).append(node)
    members: dict[int, list[Member]] = {}
    for member, node in builder.slices:
        if not node.derived:
            members.setdefault(id(find(node)), []).append(member)
    groups: list[Group] = []
    roots: dict[str, Node] = {}
    derived: dict[int, Node] = {}
    for root_id, nodes in classes.items():
        root = find(nodes[0])
        if root.pinned:
            continue
        made = [n for n in nodes if n.derived]
        if made:
            derived[root_id] = made[0]  # one at most: resolve_derived pinned the rest
            continue
        own = members.get(root_id, [])
        producers = tuple(m.target for m in own if m.kind in PRODUCER_KINDS)
        if not producers:
            continue
        group = Group(key=producers[0], size=root.size, producers=producers,
                      members=tuple(own))  # fmt: skip
        groups.append(group)
        roots[group.key] = root
    order = {name: i for i, name in enumerate(builder.modules)}
    groups.sort(key=lambda g: order.get(g.producers[0], len(order)))
    return DependencyGraph(groups=groups, blocked=builder.blocked, unknown=builder.unknown_ops,
                           _slices=builder.slices,
                           _roots=roots, _derived=derived)  # fmt: skip


def _resolve_derived(builder: Builder) -> None:
    """Pin the sources of every derived node whose class also holds anything that
    defines indices (a producer, a pin, another derived node): its layout is fixed."""
    derived = [n for n in builder.nodes if n.derived]
    holders: dict[int, list[Node]] = {}
    for node in builder.nodes:
        holders.setdefault(id(find(node)), []).append(node)
    changed = True
    while changed:
        changed = False
        for node in derived:
            root = find(node)
            mates = holders[id(root)]
            busy = root.pinned or any(
                m is not node and (m.derived or m.producer or m.pinned) for m in mates
            )
            if busy:
                for part in node.parts:
                    if not find(part).pinned:
                        builder.pin(part)
                        changed = True
            if busy and not root.pinned:
                root.pinned = True
                changed = True

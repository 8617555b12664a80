"""How each traced op moves channel dims: the rules that build the union-find of channel spaces.

The walk visits the nodes of a ``torch.fx`` graph in order and gives every dim of every tensor
value a :class:`Node`; the rules below join, pin or derive those nodes (see
:mod:`benchlib.pruning.graph` for the model and the groups it yields).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from benchlib.pruning.graph_tables import (
    ATTENTION,
    BATCH_NORM,
    CONV,
    ELEMENTWISE,
    HEADS,
    LEAVES,
    PERMUTES,
    POOL_CALLS,
    POOL_MODULES,
    REDUCTIONS,
    RESHAPES,
    SAME_SHAPE_CALLS,
    SAME_SHAPE_MODULES,
)

__all__ = ["LEAVES", "PRODUCER_KINDS", "Builder", "Member", "Node", "find"]


@dataclass(frozen=True)
class Member:
    """One tensor slice that follows a channel space.

    ``kind`` says how :mod:`benchlib.pruning.structured` cuts ``target`` (a module name, or a
    parameter's dotted name for ``"param"``): ``"out"`` (conv/linear output channels: weight
    dim 0 and bias), ``"in"`` (conv/linear input channels: weight dim 1), ``"norm"``
    (BatchNorm/LayerNorm parameters and statistics), ``"depthwise"`` (a depthwise conv: weight
    dim 0, bias and ``groups``), ``"param"`` (a parameter used directly, cut along ``dim``),
    ``"heads"`` (the heads of an attention module: the module is replaced by a
    :class:`~benchlib.pruning.attention.HeadPrunedAttention` of the kept heads).
    ``"out"`` and ``"heads"`` members are a group's producers (:data:`PRODUCER_KINDS`).
    """

    kind: str
    target: str
    dim: int = 0


PRODUCER_KINDS = frozenset({"out", "heads"})
"""Member kinds whose channels a layer creates: the producers of a group."""


class Node:
    """A union-find node: one dim of one tensor value, or a derived index space."""

    __slots__ = ("expand", "members", "parent", "parts", "pinned", "producer", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.parent: Node = self
        self.members: list[Member] = []
        self.pinned = False
        self.producer = False
        self.parts: tuple[Node, ...] = ()  # cat: the parts, in order
        self.expand = 0  # flatten: each index of parts[0] repeated `expand` times

    @property
    def derived(self) -> bool:
        return bool(self.parts)


def find(node: Node) -> Node:
    while node.parent is not node:
        node.parent = node.parent.parent
        node = node.parent
    return node


@dataclass
class _Value:
    """A traced tensor: its shape and one node per dim."""

    shape: tuple[int, ...]
    dims: list[Node]


class Builder:
    """The walk: ``walk()`` fills ``nodes`` (every channel space), ``slices`` (which member
    follows which node), ``blocked`` (ops that pinned dims, with their layers) and ``unknown``
    (the subset of ``blocked`` whose effect on channels the rules do not know)."""

    def __init__(self, traced: fx.GraphModule) -> None:
        self.traced = traced
        self.modules = dict(traced.named_modules())
        self.env: dict[fx.Node, Any] = {}
        self.slices: list[tuple[Member, Node]] = []
        self.nodes: list[Node] = []
        self.blocked: list[str] = []
        self.unknown_ops: list[str] = []
        self.heads: dict[str, Node | None] = {}  # attention module -> its heads (None: pinned)

    # -- nodes ----------------------------------------------------------------------------
    def fresh(self, size: int, *, pinned: bool = False) -> Node:
        node = Node(size)
        node.pinned = pinned
        self.nodes.append(node)
        return node

    def value(self, shape: Sequence[int], dims: Sequence[Node] | None = None) -> _Value:
        shape = tuple(int(s) for s in shape)
        return _Value(shape, list(dims) if dims is not None else
                      [self.fresh(s, pinned=True) for s in shape])  # fmt: skip

    def join(self, a: Node, b: Node) -> None:
        ra, rb = find(a), find(b)
        if ra is rb:
            return
        if ra.size != rb.size:
            ra.pinned = rb.pinned = True
            return
        rb.parent = ra
        ra.pinned = ra.pinned or rb.pinned

    def pin(self, node: Node) -> None:
        find(node).pinned = True

    def pin_value(self, value: Any) -> None:
        for v in _values(value):
            for node in v.dims:
                self.pin(node)

    def attach(self, node: Node, member: Member) -> None:
        self.slices.append((member, node))

    # -- walk -----------------------------------------------------------------------------
    def walk(self) -> None:
        """Visit every node of the traced graph, in execution order."""
        for node in self.traced.graph.nodes:
            self.env[node] = self.visit(node)

    def out_shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = self.out_shape(node)
            return self.value(shape) if shape is not None else None
        if node.op == "get_attr":
            return self.visit_param(node)
        if node.op == "output":
            self.pin_value(self.lookup(node.args[0]))
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)])
        return self.visit_call(node)

    def lookup(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        if isinstance(arg, (list, tuple)):
            return [self.lookup(a) for a in arg]
        return None

    def tensor_args(self, node: fx.Node) -> list[_Value]:
        found: list[_Value] = []
        for arg in (*node.args, *node.kwargs.values()):
            found.extend(_values(self.lookup(arg)))
        return found

    def visit_param(self, node: fx.Node) -> _Value | None:
        shape = self.out_shape(node)
        if shape is None:
            return None
        value = self.value(shape, [self.fresh(s) for s in shape])
        for dim, dim_node in enumerate(value.dims):
            self.attach(dim_node, Member("param", str(node.target), dim))
        return value

    def unknown(self, node: fx.Node, what: str) -> Any:
        """An op of unknown effect on channels: pin everything it touches."""
        for value in self.tensor_args(node):
            self.pin_value(value)
        stack = node.meta.get("nn_module_stack") or {}
        layer = list(stack.values())[-1][0] if stack else node.name
        self.blocked.append(f"{what} in {layer}")
        self.unknown_ops.append(f"{what} in {layer}")
        shape = self.out_shape(node)
        return self.value(shape) if shape is not None else self.opaque(node)

    def opaque(self, node: fx.Node) -> Any:
        """Fresh pinned values for a node whose output is a tuple of tensors (or no tensor)."""
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (list, tuple)):
            return [self.value(m.shape) if hasattr(m, "shape") else None for m in meta]
        return None

    # -- modules --------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, module: nn.Module) -> Any:
        inputs = self.tensor_args(node)
        shape = self.out_shape(node)
        name = str(node.target)
        if isinstance(module, ATTENTION):
            for value in inputs:
                self.pin_value(value)
            if isinstance(module, HEADS):
                self.attention_heads(node, name, module)
            return self.value(shape) if shape is not None else self.opaque(node)
        if not inputs or shape is None:
            return self.unknown(node, type(module).__name__)
        x = inputs[0]
        if isinstance(module, CONV):
            return self.conv(name, module, x, shape)
        if isinstance(module, nn.Linear):
            out = self.value(shape, [*x.dims[:-1], self.fresh(shape[-1])])
            self.attach(x.dims[-1], Member("in", name))
            self.produce(out.dims[-1], name)
            return out
        if isinstance(module, BATCH_NORM):
            self.attach(x.dims[1], Member("norm", name))
            return self.value(shape, x.dims)
        if isinstance(module, nn.LayerNorm):
            channels_first = type(module).__name__ == "LayerNorm2d"
            if len(module.normalized_shape) == 1:
                self.attach(x.dims[1 if channels_first else -1], Member("norm", name))
            else:
                for dim in x.dims[-len(module.normalized_shape) :]:
                    self.pin(dim)
            return self.value(shape, x.dims)
        if isinstance(module, nn.GroupNorm):
            self.pin(x.dims[1])
            return self.value(shape, x.dims)
        if isinstance(module, SAME_SHAPE_MODULES):
            return self.same(x, shape)
        if isinstance(module, POOL_MODULES):
            return self.pool(x, shape)
        if isinstance(module, nn.Flatten):
            return self.flatten(x, shape, module.start_dim, module.end_dim)
        return self.unknown(node, type(module).__name__)

    def attention_heads(self, node: fx.Node, name: str, module: nn.Module) -> None:
        """The heads of an attention module: a fresh producer space of ``num_heads`` (joined
        to nothing: the embedding dims stay pinned) when every call is unmasked self-attention
        without attention weights; else pinned, with the reason in ``blocked``."""
        why = _heads_blocked(node, module)
        known = self.heads.get(name)
        if why is not None:
            if known is not None:
                self.pin(known)
            self.heads[name] = None
            self.blocked.append(f"attention heads of {name}: {why}")
            return
        if name in self.heads or int(getattr(module, "num_heads", 1)) < 2:
            return  # a second call of the same module, or a single head (nothing to prune)
        heads = self.fresh(int(getattr(module, "num_heads", 1)))
        heads.producer = True
        self.attach(heads, Member("heads", name))
        self.heads[name] = heads

    def produce(self, dim: Node, name: str) -> None:
        dim.producer = True
        self.attach(dim, Member("out", name))

    def conv(self, name: str, conv: nn.Module, x: _Value, shape: tuple[int, ...]) -> _Value:
        assert isinstance(conv, CONV)
        spatial = [self.fresh(s, pinned=True) for s in shape[2:]]
        if conv.groups == 1:
            out = self.value(shape, [x.dims[0], self.fresh(shape[1]), *spatial])
            self.attach(x.dims[1], Member("in", name))
            self.produce(out.dims[1], name)
            return out
        if conv.groups == conv.in_channels == conv.out_channels:
            self.attach(x.dims[1], Member("depthwise", name))
            return self.value(shape, [x.dims[0], x.dims[1], *spatial])
        self.pin(x.dims[1])
        self.blocked.append(f"grouped conv (groups={conv.groups}) {name}")
        return self.value(shape, [x.dims[0], self.fresh(shape[1], pinned=True), *spatial])

    # -- shape rules ----------------------------------------------------------------------
    def same(self, x: _Value, shape: tuple[int, ...]) -> _Value:
        if x.shape != shape:
            self.pin_value(x)
            return self.value(shape)
        return self.value(shape, x.dims)

    def pool(self, x: _Value, shape: tuple[int, ...]) -> _Value:
        """Batch and channels pass through; the spatial dims are new."""
        if len(shape) != len(x.shape) or len(shape) < 3 or shape[:2] != x.shape[:2]:
            self.pin_value(x)
            return self.value(shape)
        return self.value(shape, [*x.dims[:2], *(self.fresh(s, pinned=True) for s in shape[2:])])

    def broadcast(self, values: list[_Value], shape: tuple[int, ...]) -> _Value:
        out = self.value(shape, [self.fresh(s) for s in shape])
        for value in values:
            offset = len(shape) - len(value.shape)
            for i, node in enumerate(value.dims):
                j = offset + i
                if value.shape[i] == shape[j] > 1:
                    self.join(out.dims[j], node)
        return out

    def flatten(self, x: _Value, shape: tuple[int, ...], start: int, end: int) -> _Value:
        rank = len(x.shape)
        start, end = start % rank, end % rank
        merged = self.merge(x.dims[start : end + 1], shape[start])
        return self.value(shape, [*x.dims[:start], merged, *x.dims[end + 1 :]])

    def merge(self, dims: Sequence[Node], size: int) -> Node:
        """One node for several dims flattened together (channel-major, as ``flatten``)."""
        real = [d for d in dims if d.size != 1]
        for d in dims:
            if d.size == 1:
                self.pin(d)
        if not real:
            return self.fresh(size, pinned=True)
        if len(real) == 1:
            return real[0]
        for d in real[1:]:
            self.pin(d)
        merged = self.fresh(size)
        merged.parts = (real[0],)
        merged.expand = size // real[0].size
        return merged

    def reshape(self, x: _Value, shape: tuple[int, ...]) -> _Value:
        """Map dims through a view: 1:1 dims keep their node, merges flatten, splits pin."""
        src = [(s, d) for s, d in zip(x.shape, x.dims, strict=True)]
        out: list[Node | None] = [None] * len(shape)
        i = j = 0
        while i < len(src) or j < len(shape):
            if j < len(shape) and shape[j] == 1:
                j += 1
                continue
            if i < len(src) and src[i][0] == 1:
                self.pin(src[i][1])
                i += 1
                continue
            if i >= len(src) or j >= len(shape):
                self.pin_value(x)
                return self.value(shape)
            group = [src[i]]
            i += 1
            total = group[0][0]
            while total < shape[j] and i < len(src):
                total *= src[i][0]
                group.append(src[i])
                i += 1
            if total != shape[j]:  # a split (or a mixed regroup): unknown channel mapping
                self.pin_value(x)
                return self.value(shape)
            out[j] = self.merge([d for _, d in group], shape[j])
            j += 1
        return self.value(shape, [d if d is not None else self.fresh(1, pinned=True)
                                  for d in out])  # fmt: skip

    # -- functions and methods ------------------------------------------------------------
    def visit_call(self, node: fx.Node) -> Any:
        target: Any = node.target
        shape = self.out_shape(node)
        inputs = self.tensor_args(node)
        if target is operator.getitem:
            return self.getitem(node, shape)
        if not inputs:
            return self.value(shape) if shape is not None else None
        if shape is None and target not in (torch.chunk, torch.split, "chunk", "split"):
            return None if target in (getattr, "size", "dim") else self.unknown(node, _name(target))
        x = inputs[0]
        if target in ELEMENTWISE:
            assert shape is not None
            return self.broadcast(inputs, shape)
        if target in SAME_SHAPE_CALLS:
            assert shape is not None
            return self.same(x, shape)
        if target in POOL_CALLS:
            assert shape is not None
            return self.pool(x, shape)
        if target in PERMUTES:
            return self.permute(node, x, target)
        if target in ("unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze, "expand") or (
            target in RESHAPES
        ):
            assert shape is not None
            return self.reshape(x, shape) if target != "expand" else self.expand(x, shape)
        if target in REDUCTIONS:
            assert shape is not None
            return self.reduce(node, x, shape)
        if target is torch.cat:
            return self.cat(node, shape)
        if target in (torch.chunk, torch.split, "chunk", "split"):
            return self.chunk(node, x)
        if target is torch.nn.functional.pad:
            assert shape is not None
            return self.pad(node, x, shape)
        return self.unknown(node, _name(target))

    def getitem(self, node: fx.Node, shape: tuple[int, ...] | None) -> Any:
        source = self.lookup(node.args[0])
        index = node.args[1]
        if isinstance(source, list):
            return source[index] if isinstance(index, int) else None
        if not isinstance(source, _Value) or shape is None:
            return None
        items: list[Any] = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, fx.Node) for i in items) or items.count(Ellipsis) > 1:
            return self.unknown(node, "tensor indexing")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = len(source.shape) - (len([i for i in items if i not in (None, Ellipsis)]))
            items[at : at + 1] = [slice(None)] * fill
        dims: list[Node] = []
        k = 0
        for item in items:
            if item is None:
                dims.append(self.fresh(1, pinned=True))
                continue
            dim = source.dims[k]
            size = source.shape[k]
            k += 1
            if isinstance(item, int):
                self.pin(dim)
            elif item == slice(None) or (
                isinstance(item, slice) and range(size)[item] == range(size)
            ):
                dims.append(dim)
            else:
                self.pin(dim)
                dims.append(self.fresh(len(range(size)[item]), pinned=True))
        dims.extend(source.dims[k:])
        if len(dims) != len(shape):
            return self.unknown(node, "tensor indexing")
        return self.value(shape, dims)

    def permute(self, node: fx.Node, x: _Value, target: Any) -> _Value:
        rank = len(x.shape)
        rest: list[Any] = list(node.args[1:])
        if target in (torch.transpose, torch.swapaxes, "transpose"):
            a, b = (int(v) % rank for v in rest[:2])
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        else:
            flat: Any = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            if not flat:
                flat = node.kwargs.get("dims", ())
            order = [int(v) % rank for v in flat]
        shape = tuple(x.shape[i] for i in order)
        return self.value(shape, [x.dims[i] for i in order])

    def expand(self, x: _Value, shape: tuple[int, ...]) -> _Value:
        offset = len(shape) - len(x.shape)
        dims = [self.fresh(s, pinned=True) for s in shape]
        for i, node in enumerate(x.dims):
            if x.shape[i] == shape[offset + i]:
                dims[offset + i] = node
            else:
                self.pin(node)
        return self.value(shape, dims)

    def reduce(self, node: fx.Node, x: _Value, shape: tuple[int, ...]) -> _Value:
        dim = self.arg(node, 1, "dim")
        keepdim = bool(self.arg(node, 2, "keepdim", False))
        rank = len(x.shape)
        if dim is None:
            return self.value(shape)
        reduced = {int(d) % rank for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        dims: list[Node] = []
        for i, d in enumerate(x.dims):
            if i not in reduced:
                dims.append(d)
            elif keepdim:
                dims.append(self.fresh(1, pinned=True))
        if len(dims) != len(shape):
            return self.value(shape)
        return self.value(shape, dims)

    def cat(self, node: fx.Node, shape: tuple[int, ...] | None) -> Any:
        parts = [v for v in _values(self.lookup(self.arg(node, 0, "tensors"))) if v is not None]
        if shape is None or not parts:
            return None
        rank = len(shape)
        dim = int(self.arg(node, 1, "dim", 0)) % rank
        if any(len(p.shape) != rank for p in parts):
            return self.unknown(node, "cat")
        dims: list[Node] = []
        for i in range(rank):
            if i == dim:
                joined = self.fresh(shape[i])
                joined.parts = tuple(p.dims[i] for p in parts)
                dims.append(joined)
            else:
                for p in parts[1:]:
                    self.join(parts[0].dims[i], p.dims[i])
                dims.append(parts[0].dims[i])
        return self.value(shape, dims)

    def chunk(self, node: fx.Node, x: _Value) -> Any:
        rank = len(x.shape)
        default = 0
        dim = int(self.arg(node, 2, "dim", default)) % rank
        self.pin(x.dims[dim])
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, (list, tuple)):
            return None
        outs = []
        for m in meta:
            dims = [self.fresh(int(s), pinned=True) if i == dim else x.dims[i]
                    for i, s in enumerate(m.shape)]  # fmt: skip
            outs.append(self.value(m.shape, dims))
        return outs

    def pad(self, node: fx.Node, x: _Value, shape: tuple[int, ...]) -> _Value:
        widths = self.arg(node, 1, "pad", ())
        padded = len(widths) // 2
        rank = len(x.shape)
        dims = list(x.dims)
        for i in range(rank - padded, rank):
            if x.shape[i] != shape[i] or any(widths[2 * (rank - 1 - i) : 2 * (rank - i)]):
                self.pin(dims[i])
                dims[i] = self.fresh(shape[i], pinned=True)
        return self.value(shape, dims)

    # -- result ---------------------------------------------------------------------------


def _heads_blocked(node: fx.Node, module: nn.Module) -> str | None:
    """Why the heads of this call of an attention module cannot be pruned (None: they can)."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return "separate q/k/v projection sizes (kdim/vdim)"
        if module.bias_k is not None or module.bias_v is not None:
            return "bias_k/bias_v"
        if module.add_zero_attn:
            return "add_zero_attn"
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return "a call the rule does not recognise"
    bound.apply_defaults()
    args = bound.arguments
    if not (args.get("key") is args.get("query") and args.get("value") is args.get("query")):
        return "not self-attention (query, key and value differ)"
    if args.get("need_weights") is not False:
        return "need_weights=True (per-head attention weights are an output)"
    if any(args.get(k) is not None for k in ("key_padding_mask", "attn_mask")):
        return "an attention mask"
    if args.get("is_causal") is not False:
        return "is_causal"
    return None


def _values(value: Any) -> list[_Value]:
    if isinstance(value, _Value):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _values(item)]
    return []


def _name(target: Callable[..., Any] | str) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))

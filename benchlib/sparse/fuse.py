"""Graph fusions around the sparse layers: BatchNorm folded into convs, ReLU into the kernels.

A pruned CNN spends a good part of its sparse time outside the products: every BatchNorm and
ReLU is one more pass over an activation. ``cpu-sparse`` therefore traces the model with
``torch.fx`` (when it can) and

* ``fold_batchnorm``: folds each eval-mode ``nn.BatchNorm2d`` whose input is an ``nn.Conv2d``
  used by nothing else into that conv (weight scaled per output channel, so zeros stay zeros;
  bias added), as ONNX Runtime and TensorRT do;
* ``fuse_residual`` (after ``sparsify``): a pointwise ``SparseConv2d`` whose only user adds
  it to another tensor (a residual block's ``out += identity``) takes that tensor as a second
  input and adds it in the kernel (its accumulators start from it), and the add is removed;
* ``fuse_relu`` (after those): lets a ``SparseConv2d`` / ``SparseLinear`` whose only user is a
  ReLU apply it in the kernel's store (after the residual), and removes the ReLU; a ReLU whose
  only user is a ``NativeMaxPool2d`` (a dense stem conv's, in ResNet) moves into the pool,
  which applies it to its outputs (the same values: max and ReLU commute).

Both keep the conv and linear layers under their names, so per-layer reports still match the
model's. A model ``torch.fx`` cannot trace is left as it is (``trace`` says why).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from benchlib.sparse.modules import SparseConv2d, SparseLinear
from benchlib.sparse.pool import NativeMaxPool2d

RELUS = (torch.relu, F.relu, torch.relu_)
"""Functions that are a ReLU (``call_function`` targets)."""


def trace(model: nn.Module) -> fx.GraphModule | str:
    """``model`` as a ``torch.fx.GraphModule`` (sharing its submodules), or one line saying
    why it cannot be traced."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # tracing runs arbitrary user code: any failure means "no"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"not traceable by torch.fx: {type(exc).__name__}: {first}"[:200]


def _module(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module" or not isinstance(node.target, str):
        return None
    return graph_module.get_submodule(node.target)


def fold_batchnorm(graph_module: fx.GraphModule) -> int:
    """Fold eval-mode BatchNorm2d layers into the ``nn.Conv2d`` before them; returns how
    many. Skipped: a conv whose output has other users or that runs more than once, a
    BatchNorm in training mode or without running statistics, subclasses of either."""
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    folded = 0
    for node in list(graph_module.graph.nodes):
        bn = _module(graph_module, node)
        if type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats:
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        conv = _module(graph_module, source)
        if type(conv) is not nn.Conv2d or conv.training or calls[source.target] != 1:
            continue
        graph_module.set_submodule(str(source.target), fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded += 1
    if folded:
        graph_module.graph.lint()
        graph_module.recompile()
    return folded


ADDS = (operator.add, operator.iadd, torch.add)
"""Functions that add two tensors (``call_function`` targets)."""


def fuse_residual(graph_module: fx.GraphModule) -> int:
    """Let pointwise native sparse convs add the other operand of the add that is their only
    user; returns how many. The conv moves after that operand in the graph when it came first
    (torchvision computes the downsample branch after conv3)."""
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    fused = 0
    for node in list(graph_module.graph.nodes):
        found = _residual_add(graph_module, node, calls)
        if found is None:
            continue
        add, other = found
        if order[other] > order[node]:
            other.append(node)  # the conv now runs after the tensor it adds
        node.args = (node.args[0], other)
        add.replace_all_uses_with(node)
        graph_module.graph.erase_node(add)
        fused += 1
    if fused:
        graph_module.graph.lint()
        graph_module.recompile()
    return fused


def _residual_add(
    graph_module: fx.GraphModule, node: fx.Node, calls: Counter[Any]
) -> tuple[fx.Node, fx.Node] | None:
    """The add ``fuse_residual`` folds into ``node`` and that add's other operand, or None:
    ``node`` must call a native pointwise ``SparseConv2d`` (once, without a ReLU yet) whose
    only user adds it to another tensor."""
    layer = _module(graph_module, node)
    if not isinstance(layer, SparseConv2d) or not (layer.gathers and layer.pointwise):
        return None
    if calls[node.target] != 1 or len(node.users) != 1 or len(node.args) != 1 or layer.relu:
        return None
    [add] = node.users
    if add.op != "call_function" or add.target not in ADDS or add.kwargs:
        return None
    if len(add.args) != 2 or add.args.count(node) != 1:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    return (add, other) if isinstance(other, fx.Node) else None


def _relu_user(graph_module: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ReLU that is ``node``'s only user (reading it as its input), or None."""
    if len(node.users) != 1:
        return None
    [user] = node.users
    return user if user.args[:1] == (node,) and _is_relu(graph_module, user) else None


@dataclass(frozen=True)
class Epilogue:
    """What ``fuse_residual`` and ``fuse_relu`` will fold into a sparse layer: the add of a
    residual, the ReLU after it (or after the layer)."""

    residual: bool = False
    relu: bool = False

    def __bool__(self) -> bool:
        return self.residual or self.relu

    def __str__(self) -> str:
        return " and ".join(p for p, on in (("add", self.residual), ("ReLU", self.relu)) if on)


def epilogues(graph_module: fx.GraphModule) -> dict[str, Epilogue]:
    """Per sparse layer (by module name) what the fusions will fold into it, for those
    where they fold something: ``tune.keep_faster`` then times the dense layer with that add
    and ReLU after it, as it would run, against the sparse one applying them."""
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    found: dict[str, Epilogue] = {}
    for node in graph_module.graph.nodes:
        layer = _module(graph_module, node)
        if not isinstance(layer, (SparseConv2d, SparseLinear)) or calls[node.target] != 1:
            continue
        added = _residual_add(graph_module, node, calls)
        tail = node if added is None else added[0]
        epilogue = Epilogue(added is not None, _relu_user(graph_module, tail) is not None)
        if epilogue:
            found[str(node.target)] = epilogue
    return found


def _is_relu(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    only_inplace = set(node.kwargs) <= {"inplace"}  # in place or not: the same values
    if node.op == "call_function" and node.target in RELUS:
        return len(node.args) <= 2 and only_inplace
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1 and not node.kwargs
    return type(_module(graph_module, node)) is nn.ReLU


def fuse_relu(graph_module: fx.GraphModule) -> int:
    """Let sparse layers apply the ReLU that is their output's only user, and native max
    pools the ReLU that is their input's only user; returns how many. A layer or pool called
    more than once keeps its ReLUs apart."""
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    fused = 0
    for node in list(graph_module.graph.nodes):
        layer = _module(graph_module, node)
        if not isinstance(layer, (SparseConv2d, SparseLinear)) or calls[node.target] != 1:
            continue
        user = None if layer.relu else _relu_user(graph_module, node)
        if user is None:
            continue
        layer.relu = True
        user.replace_all_uses_with(node)
        graph_module.graph.erase_node(user)
        fused += 1
    for node in list(graph_module.graph.nodes):
        pool = _module(graph_module, node)
        if not isinstance(pool, NativeMaxPool2d) or calls[node.target] != 1 or pool.relu:
            continue
        relu = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(relu, fx.Node) or len(relu.users) != 1 or not relu.args:
            continue
        source = relu.args[0]
        # the ReLU's input read by nothing else: an in-place ReLU changes no other reader
        if not _is_relu(graph_module, relu) or not isinstance(source, fx.Node):
            continue
        if len(source.users) != 1:
            continue
        pool.relu = True
        relu.replace_all_uses_with(source)
        graph_module.graph.erase_node(relu)
        fused += 1
    if fused:
        graph_module.graph.lint()
        graph_module.recompile()
    return fused

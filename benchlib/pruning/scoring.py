"""Channel scores for groups: the criteria of :mod:`benchlib.pruning.importance` applied to
the layers of a :class:`~benchlib.pruning.graph.DependencyGraph`.

Every criterion scores one *producer* (a conv or linear layer whose output channels form the
group): its filters (``l1``, ``l2``, ``fpgm``, ``taylor``), the BatchNorm that follows it
(``slim``), or its post-activation feature maps (``hrank``). A group's score is its defining
producer's (``reduce="first"``, the papers' choice) or the mean over its producers that have
one (``reduce="mean"``). A group none of whose producers can be scored gets no score and
keeps every channel (e.g. ``slim`` on a layer without BatchNorm, ``hrank`` on a linear layer).

An attention module's heads (a group of ``nn.MultiheadAttention`` heads) are scored on one
row of weights per head, :func:`~benchlib.pruning.attention.head_rows` (its q, k, v rows and
biases and its out-projection columns): ``l1``, ``l2`` and ``fpgm`` on those rows, ``taylor``
on those rows times their gradients; ``slim`` (no BatchNorm follows) and ``hrank`` (no
H x W maps) give heads no score, so they keep every head.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from benchlib.data import Dataset, batches
from benchlib.errors import PruningError
from benchlib.pruning import importance
from benchlib.pruning.attention import attention_params, head_rows, rows_like
from benchlib.pruning.graph import DependencyGraph, Group
from benchlib.pruning.graph_tables import BATCH_NORM, HEADS

__all__ = ["CRITERIA", "DATA_CRITERIA", "Calibration", "score_groups"]

CRITERIA = ("l1", "l2", "fpgm", "slim", "hrank", "taylor", "random")
DATA_CRITERIA = frozenset({"hrank", "taylor"})
"""Criteria that run calibration data through the model."""

_WEIGHT_CRITERIA: dict[str, Callable[[Tensor], Tensor]] = {
    "l1": importance.l1_scores,
    "l2": importance.l2_scores,
    "fpgm": importance.fpgm_scores,
}
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.PReLU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid,
)  # fmt: skip
_ACTIVATION_CALLS: set[Any] = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.nn.functional.hardswish, "relu", "relu_",
}  # fmt: skip
_PASS_CALLS: set[Any] = {torch.add, "add", "add_", operator.add}


@dataclass(frozen=True)
class Calibration:
    """Data for the criteria that need it: ``num_batches`` batches of ``batch_size``."""

    dataset: Dataset
    batch_size: int
    num_batches: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return batches(self.dataset, self.batch_size, self.num_batches)


def score_groups(
    model: nn.Module,
    graph: DependencyGraph,
    groups: Sequence[Group],
    criterion: str,
    *,
    reduce: str = "first",
    seed: int = 0,
    calibration: Calibration | None = None,
) -> dict[str, Tensor]:
    """Scores (float64, CPU, one per channel; low = pruned first) for each group that has one.

    Raises:
        PruningError: an unknown criterion, missing calibration data for ``hrank``/``taylor``.
    """
    producers = [p for g in groups for p in (g.producers if reduce == "mean" else g.producers[:1])]
    if criterion in _WEIGHT_CRITERIA:
        score = _WEIGHT_CRITERIA[criterion]
        per_layer = {p: score(_weight(model, p)) for p in producers}
    elif criterion == "random":
        return {g.key: importance.random_scores(g.size, seed + i) for i, g in enumerate(groups)}
    elif criterion == "slim":
        norms = _following(graph, producers, lambda n, m: isinstance(m, BATCH_NORM))
        per_layer = {
            p: importance.slim_scores(_module(model, norm).weight)  # type: ignore[arg-type]
            for p, norm in norms.items()
            if isinstance(_module(model, norm).weight, Tensor)
        }
    elif criterion in DATA_CRITERIA:
        if calibration is None:
            raise PruningError(f"{criterion} needs calibration data")
        if criterion == "hrank":
            per_layer = _hrank(model, graph, producers, calibration)
        else:
            per_layer = _taylor(model, producers, calibration)
    else:
        raise PruningError(f"unknown criterion {criterion!r}; choose from: {', '.join(CRITERIA)}")
    return _reduce(groups, per_layer, reduce)


def _reduce(
    groups: Sequence[Group], per_layer: dict[str, Tensor], reduce: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for group in groups:
        found = [per_layer[p] for p in group.producers if p in per_layer]
        if reduce == "first":
            found = found[:1] if group.producers[0] in per_layer else []
        if found:
            out[group.key] = torch.stack([f.to(torch.float64).cpu() for f in found]).mean(dim=0)
    return out


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _weight(model: nn.Module, name: str) -> Tensor:
    """The rows a weight criterion scores: a layer's weight, or an attention module's heads."""
    module = _module(model, name)
    if isinstance(module, HEADS):
        return head_rows(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise PruningError(f"layer {name} has no weight to score")
    return weight.detach()


def _fx_nodes(graph: DependencyGraph) -> dict[str, fx.Node]:
    if graph.traced is None:
        raise PruningError("the dependency graph kept no traced module")
    return {str(n.target): n for n in graph.traced.graph.nodes if n.op == "call_module"}


def _following(
    graph: DependencyGraph, producers: Sequence[str], want: Callable[[fx.Node, nn.Module], bool]
) -> dict[str, str]:
    """For each producer, the first module right after it (single-user chain) that ``want``s."""
    assert graph.traced is not None
    nodes = _fx_nodes(graph)
    modules = dict(graph.traced.named_modules())
    out: dict[str, str] = {}
    for name in producers:
        node = nodes.get(name)
        users = list(node.users) if node is not None else []
        if len(users) == 1 and users[0].op == "call_module":
            module = modules[str(users[0].target)]
            if want(users[0], module):
                out[name] = str(users[0].target)
    return out


def _post_activation(graph: DependencyGraph, producer: str) -> fx.Node | None:
    """The node HRank hooks for ``producer``: its output after norm, residual add and the first
    activation (following single users); the last such node when no activation comes."""
    assert graph.traced is not None
    modules = dict(graph.traced.named_modules())
    node = _fx_nodes(graph).get(producer)
    if node is None:
        return None
    while len(node.users) == 1:
        user = next(iter(node.users))
        module = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, _ACTIVATION_MODULES) or user.target in _ACTIVATION_CALLS:
            return user
        if isinstance(module, BATCH_NORM) or (
            user.op in ("call_function", "call_method") and user.target in _PASS_CALLS
        ):
            node = user
            continue
        break
    return node


class _Capture(fx.Interpreter):
    """Runs the traced model and hands chosen nodes' outputs to callbacks."""

    def __init__(
        self, module: fx.GraphModule, hooks: dict[fx.Node, list[Callable[[Tensor], None]]]
    ) -> None:
        super().__init__(module)
        self.hooks = hooks

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        for hook in self.hooks.get(n, ()):
            hook(result)
        return result


def _hrank(
    model: nn.Module, graph: DependencyGraph, producers: Sequence[str], data: Calibration
) -> dict[str, Tensor]:
    assert graph.traced is not None
    accumulators: dict[str, importance.HRankAccumulator] = {}
    hooks: dict[fx.Node, list[Callable[[Tensor], None]]] = {}
    for name in producers:
        node = _post_activation(graph, name)
        meta = node.meta.get("tensor_meta") if node is not None else None
        if node is None or meta is None or len(getattr(meta, "shape", ())) != 4:
            continue  # HRank ranks H x W maps: conv layers only
        accumulators[name] = importance.HRankAccumulator()
        hooks.setdefault(node, []).append(accumulators[name].update)
    if not accumulators:
        return {}
    with _eval(model), torch.no_grad():
        interpreter = _Capture(graph.traced, hooks)
        for images, _ in data:
            interpreter.run(images)
    return {name: acc.scores() for name, acc in accumulators.items()}


def _taylor(model: nn.Module, producers: Sequence[str], data: Calibration) -> dict[str, Tensor]:
    """Taylor scores from the gradient of the cross-entropy summed over the calibration batches
    (labels taken modulo the number of logits, so any data set fits any classifier). A layer's
    rows are its weight's filters; an attention module's, its heads (``rows_like``)."""
    params = {name: _taylor_params(model, name) for name in producers}
    weights = list({id(p): p for group in params.values() for p in group}.values())
    saved = [w.requires_grad for w in weights]
    sums = {id(w): torch.zeros_like(w) for w in weights}
    try:
        for w in weights:
            w.requires_grad_(True)
        with _eval(model):
            for images, labels in data:
                logits = model(images)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise PruningError("taylor needs a classifier (a 2-D logits output)")
                loss = torch.nn.functional.cross_entropy(logits, labels % logits.shape[1])
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for w, grad in zip(weights, grads, strict=True):
                    if grad is not None:
                        sums[id(w)] += grad
    finally:
        for w, flag in zip(weights, saved, strict=True):
            w.requires_grad_(flag)
    out: dict[str, Tensor] = {}
    for name, group in params.items():
        values, totals = [w.detach() for w in group], [sums[id(w)] for w in group]
        module = _module(model, name)
        if isinstance(module, HEADS):
            out[name] = importance.taylor_scores(
                rows_like(module, values), rows_like(module, totals)
            )
        else:
            out[name] = importance.taylor_scores(values[0], totals[0])
    return out


def _taylor_params(model: nn.Module, name: str) -> list[nn.Parameter]:
    module = _module(model, name)
    if isinstance(module, HEADS):
        return attention_params(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise PruningError(f"layer {name} has no weight parameter to score")
    return [weight]


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)

"""``chain_convs``: runs of sparse convs in a traced model, executed by one native call.

After ``fuse_residual`` and ``fuse_relu`` the body of a CNN such as ResNet is a run of
``SparseConv2d`` calls whose inputs are the run's input and each other's outputs. Called one by
one from Python, each costs about 15-25 us besides its kernels (the module call, its plan
lookup, two tensor allocations, the arguments): 1-1.5 ms of ResNet-50's 24 ms at 90% sparsity.
``chain_convs`` replaces each such run in the graph by one ``NativeChain``.

A ``NativeChain`` runs its layers one by one (as before) on the first call for an input shape,
which builds their plans, and then binds a private copy of each layer's packed calls to fixed
buffers (``binding.py``): an intermediate output takes a freed buffer of its size where there
is one (the buffers of outputs no later layer reads are reused), the layout copies share one
scratch buffer. Later calls set the input's and the output's addresses and run the whole run
in one native call (``benchlib_run_chain``); the output is a new tensor each call, the
intermediate ones never leave the chain.

Inside the chain, the activations of large images (ResNet-50's 56x56 and 28x28) live in bands
of rows (``bands.py``): a 1x1 conv then reads one contiguous strip of its input per band, where
NCHW gives it a short run in each channel's plane. ResNet-50 ``magnitude:0.9`` at batch 1 ran
in 0.933-0.937x the time (three in-process A/B runs of 60 alternating rounds, AVX2 EPYC, 2
threads). Smaller ones (14x14, 7x7) are NCHW with their planes padded to a multiple of 8
floats, so that no vector load of a strip straddles a cache line (0.97-0.98x end to end). A
residual is laid out as the output it is added to; the chain's input and output stay NCHW, and
the head reads its input NCHW or in padded planes. A 1x1 conv whose only reader is a 3x3 conv
(stride 1) writes its output straight into the zero-padded images that conv's layout copy
would make (``binding._fused_copies``), so that no copy runs.

It runs the layers one by one instead (the same results) for an input of another shape, dtype
or device, while any layer has forward hooks (per-layer profiling) or global ones are set, and
rebinds after a layer's kernel, values, bias or ReLU changed (``.to()``, new weights). Calls
from several threads serialize on the bound buffers.

A CNN's classifier head joins the chain (``Head``, native steps after the last layer): a
global average pool that is the run's only reader (``nn.AdaptiveAvgPool2d(1)`` or
``F.adaptive_avg_pool2d(x, 1)``), and, where the pool's only reader is a flatten to (N, C)
(``torch.flatten(x, 1)``, ``nn.Flatten()``) read only by a dense fp32 ``nn.Linear``, that layer
too; the chain then returns what the head's last step does. Run from Python after the chain,
the first torch call found the interpreter's and the dispatcher's code and data evicted by
the chain's weights: on ResNet-50 the pool took 140-320 us against about 30 us warm, and
moved into the chain alone the cost went to the linear layer after it (1.000x end to end).
With both in the chain, ResNet-50 ``magnitude:0.9`` at batch 1 ran in 0.966-0.985x the time
(median 0.972x; five in-process A/B runs of 60 alternating rounds, AVX2 EPYC, 2 threads).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as module_hooks

from benchlib.sparse.binding import CHAIN_INPUT, Binding, Head, bind, hooked
from benchlib.sparse.modules import SparseConv2d


class NativeChain(nn.Module):
    """A run of ``SparseConv2d`` calls as one module (see the module docstring). ``arguments``
    gives per layer its inputs: ``CHAIN_INPUT`` or the index of an earlier layer, a second
    one being the residual the layer adds. With a ``head`` the chain returns the head's output
    on the last layer's: (N, C, 1, 1) means, or the linear layer's (N, M). The layers (and the
    head's modules) stay registered under their own names in the model; the chain only calls
    them."""

    def __init__(
        self,
        layers: list[SparseConv2d],
        arguments: list[tuple[int, ...]],
        head: Head | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != len(arguments) or not layers:
            raise ValueError(f"{len(layers)} layers for {len(arguments)} argument lists")
        for index, refs in enumerate(arguments):
            if not 1 <= len(refs) <= 2 or any(not CHAIN_INPUT <= r < index for r in refs):
                raise ValueError(f"layer {index}'s inputs {refs} must be earlier layers or -1")
        self.layers = list(layers)  # a plain list: not submodules a second time
        self.arguments = [tuple(refs) for refs in arguments]
        self.head = head
        self._bindings: dict[tuple[int, ...], Binding] = {}

    def __getstate__(self) -> dict[str, Any]:
        """For copy and pickle: without the bindings (addresses), rebound on first use."""
        state = self.__dict__.copy()
        state["_bindings"] = {}
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        binding = self._bindings.get(tuple(x.shape))
        if binding is not None and binding.current(x) and not _global_hooks():
            return binding.run(x.contiguous())
        outputs = self._run_layers(x)
        modules = [*self.layers, *(self.head.modules() if self.head else [])]
        if not _global_hooks() and not any(hooked(module) for module in modules):
            self._bind(x, outputs)
        return outputs[-1] if self.head is None else self.head(outputs[-1])

    def bound_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes the chain runs natively for (bound on a first call)."""
        return list(self._bindings)

    def banded_layers(self) -> int:
        """How many layers write their output in bands of rows (``bands.py``: more than one
        band), the most of any bound input shape (0 before the first binding)."""
        return self._held(one_band=False)

    def fused_copies(self) -> int:
        """How many layers write their output as the padded images their reader's layout copy
        would make (``binding._fused_copies``: no copy runs), the most of any bound input shape."""
        return max((b.fused_copies for b in self._bindings.values()), default=0)

    def padded_layers(self) -> int:
        """How many layers write their output as NCHW planes padded to an aligned stride
        (``bands.py``: one band), the most of any bound input shape (0 before the first
        binding)."""
        return self._held(one_band=True)

    def _held(self, one_band: bool) -> int:
        return max(
            (
                sum(
                    bands is not None and (bands.rows == height) == one_band
                    for bands, height in binding.layouts()
                )
                for binding in self._bindings.values()
            ),
            default=0,
        )

    def _run_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output, the layers called one by one."""
        outputs: list[torch.Tensor] = []
        for layer, refs in zip(self.layers, self.arguments, strict=True):
            args = [x if r == CHAIN_INPUT else outputs[r] for r in refs]
            outputs.append(layer(*args))
        return outputs

    def _bind(self, x: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """Bind the chain for ``x``'s shape, from a run's ``outputs``; where a layer has no
        native plan for its input (or cannot add its residual) the chain stays unbound (and
        tries again on the next call, which may find the layers changed)."""
        if not x.is_contiguous():
            return
        bound = bind(self.layers, self.arguments, x, outputs, self.head)
        if bound is not None:
            self._bindings[tuple(x.shape)] = bound


def _global_hooks() -> bool:
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def chain_convs(graph_module: fx.GraphModule, min_layers: int = 2) -> int:
    """Replace each run of at least ``min_layers`` consecutive native ``SparseConv2d`` calls
    whose inputs are one tensor from before the run and the run's own outputs, and whose
    outputs only the run reads (but the last's), by one ``NativeChain``, with the classifier
    head that alone reads the last output, if any (``Head``); returns how many layers were
    chained."""
    nodes = list(graph_module.graph.nodes)
    calls = Counter(n.target for n in nodes if n.op == "call_module")  # as fuse.py counts
    chained, index, count = 0, 0, 0
    while index < len(nodes):
        run = _run_from(graph_module, nodes, index, calls)
        if len(run) < min_layers:
            index += 1
            continue
        _replace(graph_module, run, f"sparse_chain_{count}")
        chained += len(run)
        count += 1
        index += len(run)
    if chained:
        graph_module.graph.lint()
        graph_module.recompile()
    return chained


def _eligible(graph_module: fx.GraphModule, node: fx.Node, calls: Counter[Any]) -> bool:
    if node.op != "call_module" or calls.get(node.target) != 1 or node.kwargs:
        return False
    layer = graph_module.get_submodule(str(node.target))
    if not isinstance(layer, SparseConv2d) or not layer.gathers:
        return False
    return 1 <= len(node.args) <= 2 and all(isinstance(a, fx.Node) for a in node.args)


def _run_from(
    graph_module: fx.GraphModule, nodes: list[fx.Node], start: int, calls: Counter[Any]
) -> list[fx.Node]:
    """The longest valid run starting at ``nodes[start]`` (empty when none)."""
    if not _eligible(graph_module, nodes[start], calls):
        return []
    external = set(nodes[start].args)
    if len(external) != 1:
        return []
    run = [nodes[start]]
    members = {nodes[start]}
    for node in nodes[start + 1 :]:
        if not _eligible(graph_module, node, calls):
            break
        if not all(a in members or a in external for a in node.args):
            break
        run.append(node)
        members.add(node)
    while len(run) >= 2:  # only the last output may be read outside the run
        inside = set(run)
        if all(set(node.users) <= inside for node in run[:-1]):
            return run
        run.pop()
    return run


def _only_user(node: fx.Node) -> fx.Node | None:
    """The one node that reads ``node``, taking it as its first argument, or None."""
    if len(node.users) != 1:
        return None
    [user] = node.users
    return user if user.args[:1] == (node,) and node not in user.args[1:] else None


def _head(graph_module: fx.GraphModule, node: fx.Node) -> tuple[Head, list[fx.Node]] | None:
    """The classifier head that reads ``node`` alone (see ``Head``) and its nodes in order, or
    None: a global average pool (to 1 x 1), then, where they follow as each other's only
    readers, a flatten to (N, C) and a dense fp32 ``nn.Linear``."""
    pool = _only_user(node)
    if pool is None or pool.kwargs:
        return None
    if pool.op == "call_module" and len(pool.args) == 1:
        module = graph_module.get_submodule(str(pool.target))
        if type(module) is not nn.AdaptiveAvgPool2d or module.output_size not in (1, (1, 1)):
            return None
        head = Head(pool=module)
    elif pool.op == "call_function" and pool.target is F.adaptive_avg_pool2d:
        if pool.args[1:] not in ((1,), ((1, 1),)):
            return None
        head = Head()
    else:
        return None
    flatten = _only_user(pool)
    linear = None if flatten is None else _only_user(flatten)
    if flatten is None or linear is None or linear.kwargs or len(linear.args) != 1:
        return head, [pool]
    if flatten.op == "call_function" and flatten.target is torch.flatten:
        flat = None
        if flatten.args[1:] != (1,) or flatten.kwargs:
            return head, [pool]
    elif flatten.op == "call_module" and not flatten.kwargs and len(flatten.args) == 1:
        flat = graph_module.get_submodule(str(flatten.target))
        if type(flat) is not nn.Flatten or (flat.start_dim, flat.end_dim) != (1, -1):
            return head, [pool]
    else:
        return head, [pool]
    if linear.op != "call_module":
        return head, [pool]
    layer = graph_module.get_submodule(str(linear.target))
    if type(layer) is not nn.Linear or layer.weight.dtype != torch.float32:
        return head, [pool]
    return replace(head, flatten=flat, linear=layer), [pool, flatten, linear]


def _replace(graph_module: fx.GraphModule, run: list[fx.Node], name: str) -> None:
    position = {node: index for index, node in enumerate(run)}
    [external] = {a for node in run for a in node.args if a not in position}
    layers = [graph_module.get_submodule(str(node.target)) for node in run]
    arguments = [
        tuple(CHAIN_INPUT if a is external else position[a] for a in node.args)  # type: ignore[index]
        for node in run
    ]
    found = _head(graph_module, run[-1])
    head, absorbed = found if found is not None else (None, [])
    chain_module = NativeChain(layers, arguments, head)  # type: ignore[arg-type]
    graph_module.add_submodule(name, chain_module)
    with graph_module.graph.inserting_before(run[0]):
        chain = graph_module.graph.call_module(name, (external,))
    [*run, *absorbed][-1].replace_all_uses_with(chain)
    for node in [*reversed(absorbed), *reversed(run)]:
        graph_module.graph.erase_node(node)

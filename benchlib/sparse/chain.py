"""``chain_convs``: runs of sparse convs in a traced model, executed by one native call.

After ``fuse_residual`` and ``fuse_relu`` the body of a CNN such as ResNet is a run of
``SparseConv2d`` calls whose inputs are the run's input and each other's outputs. Called one by
one from Python, each costs about 15-25 us besides its kernels (the module call, its plan
lookup, two tensor allocations, the arguments): 1-1.5 ms of ResNet-50's 24 ms at 90% sparsity.
``chain_convs`` replaces each such run in the graph by one ``NativeChain``.

A ``NativeChain`` runs its layers one by one (as before) on the first call for an input shape,
which builds their plans, and then binds a private copy of each layer's packed calls to fixed
buffers: an intermediate output takes a freed buffer of its size where there is one (the
buffers of outputs no later layer reads are reused), the layout copies share one scratch
buffer. Later calls set the input's and the output's addresses and run the whole run in one
native call (``benchlib_run_chain``); the output is a new tensor each call, the intermediate
ones never leave the chain.

It runs the layers one by one instead (the same results) for an input of another shape, dtype
or device, while any layer has forward hooks (per-layer profiling) or global ones are set, and
rebinds after a layer's kernel, values, bias or ReLU changed (``.to()``, new weights). Calls
from several threads serialize on the bound buffers.
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules import module as module_hooks

from benchlib.sparse.build import PackedCall
from benchlib.sparse.direct import COPY_OUT, COPY_SOURCE, COPY_THREADS
from benchlib.sparse.modules import SparseConv2d
from benchlib.sparse.native import (
    GATHER_OUT,
    GATHER_RELU,
    GATHER_RESIDUAL,
    GATHER_SOURCE,
    GATHER_THREADS,
    library,
)

CHAIN_INPUT = -1
"""A step's argument that is the chain's input (others are earlier steps' indices)."""
GATHER_STEP, COPY_STEP = 0, 1
"""Step kinds of ``benchlib_run_chain``."""


@dataclass(frozen=True)
class _Snapshot:
    """What a binding assumed of one layer: any change makes it stale."""

    layer: SparseConv2d
    kernel: object
    values: torch.Tensor
    bias: torch.Tensor | None
    relu: bool

    def current(self) -> bool:
        layer, kernel = self.layer, self.layer._modules["kernel"]
        return (
            kernel is self.kernel
            and kernel is not None
            and kernel._buffers["values"] is self.values
            and layer._buffers["bias"] is self.bias
            and layer.relu == self.relu
            and not layer._forward_hooks
            and not layer._forward_pre_hooks
        )


class _Binding:
    """The chain's packed calls bound to fixed buffers for one input shape."""

    def __init__(
        self,
        shape: tuple[int, ...],
        snapshots: list[_Snapshot],
        calls: list[tuple[int, PackedCall]],
        input_slots: list[tuple[PackedCall, int]],
        output_slot: tuple[PackedCall, int],
        out_shape: tuple[int, ...],
        buffers: list[torch.Tensor],
    ) -> None:
        self.shape, self.snapshots, self.out_shape = shape, snapshots, out_shape
        self.calls, self.input_slots, self.output_slot = calls, input_slots, output_slot
        self.buffers = buffers  # kept alive: the calls hold their addresses
        self.steps = (ctypes.c_int64 * (2 * len(calls)))(
            *(value for kind, call in calls for value in (kind, call.address))
        )
        self.threads = 0
        self.lock = threading.Lock()

    def current(self, x: torch.Tensor) -> bool:
        """True when ``x`` and every layer are as when bound (and no layer has hooks)."""
        if x.shape != self.shape or x.dtype != torch.float32 or not x.is_cpu:
            return False
        return all(snapshot.current() for snapshot in self.snapshots)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The chain's output for a contiguous ``x`` of the bound shape."""
        out = x.new_empty(self.out_shape)
        threads = torch.get_num_threads()
        with self.lock:
            if threads != self.threads:
                for kind, call in self.calls:
                    call[GATHER_THREADS if kind == GATHER_STEP else COPY_THREADS] = threads
                self.threads = threads
            address = x.data_ptr()
            for call, index in self.input_slots:
                call[index] = address
            self.output_slot[0][self.output_slot[1]] = out.data_ptr()
            status = library().run_chain(ctypes.addressof(self.steps), len(self.calls))
        if status:
            raise ValueError(f"the native kernels refused a chain step's operands ({status})")
        return out


class NativeChain(nn.Module):
    """A run of ``SparseConv2d`` calls as one module (see the module docstring). ``arguments``
    gives per layer its inputs: ``CHAIN_INPUT`` or the index of an earlier layer, a second
    one being the residual the layer adds. The layers stay registered under their own names
    in the model; the chain only calls them."""

    def __init__(self, layers: list[SparseConv2d], arguments: list[tuple[int, ...]]) -> None:
        super().__init__()
        if len(layers) != len(arguments) or not layers:
            raise ValueError(f"{len(layers)} layers for {len(arguments)} argument lists")
        for index, refs in enumerate(arguments):
            if not 1 <= len(refs) <= 2 or any(not CHAIN_INPUT <= r < index for r in refs):
                raise ValueError(f"layer {index}'s inputs {refs} must be earlier layers or -1")
        self.layers = list(layers)  # a plain list: not submodules a second time
        self.arguments = [tuple(refs) for refs in arguments]
        self._bindings: dict[tuple[int, ...], _Binding] = {}

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
        if not _global_hooks() and not any(_hooked(layer) for layer in self.layers):
            self._bind(x, outputs)
        return outputs[-1]

    def bound_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes the chain runs natively for (bound on a first call)."""
        return list(self._bindings)

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
        bound = _bind(self.layers, self.arguments, x, outputs)
        if bound is not None:
            self._bindings[tuple(x.shape)] = bound


def _hooked(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def _bind(
    layers: list[SparseConv2d],
    arguments: list[tuple[int, ...]],
    x: torch.Tensor,
    outputs: list[torch.Tensor],
) -> _Binding | None:
    """The binding for input ``x`` (whose run gave ``outputs``), or None where a layer does
    not run natively on its input."""
    tensors = [*outputs, x]  # index CHAIN_INPUT (-1) is x
    plans = []
    for layer, refs in zip(layers, arguments, strict=True):
        plan = layer.gather_plan(tensors[refs[0]])
        if plan is None or not tensors[refs[0]].is_contiguous():
            return None
        if len(refs) == 2:
            residual = tensors[refs[1]]
            if not plan.fuses_residual or residual.shape != plan.out_shape:
                return None
            if residual.dtype != torch.float32 or not residual.is_contiguous():
                return None
        plans.append(plan)
    last_use = {ref: step for step, refs in enumerate(arguments) for ref in refs}
    scratch_floats = max(
        (x.shape[0] * plan.source_floats for plan in plans if plan.copy is not None), default=0
    )
    scratch = x.new_empty(scratch_floats)
    buffers: list[torch.Tensor] = [scratch]
    free: dict[int, list[torch.Tensor]] = {}
    placed: dict[int, torch.Tensor] = {}  # step -> its output buffer (not the last step's)
    calls: list[tuple[int, PackedCall]] = []
    input_slots: list[tuple[PackedCall, int]] = []
    output_slot: tuple[PackedCall, int] | None = None

    def address(ref: int, call: PackedCall, index: int) -> None:
        if ref == CHAIN_INPUT:
            input_slots.append((call, index))
        else:
            call[index] = placed[ref].data_ptr()

    last = len(layers) - 1
    for step, (layer, refs, plan) in enumerate(zip(layers, arguments, plans, strict=True)):
        product = plan.product.copy()
        if plan.copy is not None:
            copy = plan.copy.copy()
            address(refs[0], copy, COPY_SOURCE)
            copy[COPY_OUT] = scratch.data_ptr()
            calls.append((COPY_STEP, copy))
            product[GATHER_SOURCE] = scratch.data_ptr()
        else:
            address(refs[0], product, GATHER_SOURCE)
        product[GATHER_RELU] = int(layer.relu)
        product[GATHER_RESIDUAL] = 0
        if len(refs) == 2:
            address(refs[1], product, GATHER_RESIDUAL)
        if step == last:
            output_slot = (product, GATHER_OUT)
        else:
            pool = free.setdefault(torch.Size(plan.out_shape).numel(), [])
            if pool:
                out = pool.pop().view(plan.out_shape)
            else:
                out = x.new_empty(plan.out_shape)
                buffers.append(out)
            placed[step] = out
            product[GATHER_OUT] = out.data_ptr()
        calls.append((GATHER_STEP, product))
        for ref in {*refs, step}:  # outputs no later step reads go back to the pool
            if ref != CHAIN_INPUT and ref != last and last_use.get(ref, ref) <= step:
                free.setdefault(placed[ref].numel(), []).append(placed[ref])
    assert output_slot is not None
    snapshots = [
        _Snapshot(layer, plan.kernel, plan.values, plan.bias, layer.relu)
        for layer, plan in zip(layers, plans, strict=True)
    ]
    return _Binding(
        tuple(x.shape), snapshots, calls, input_slots, output_slot, plans[-1].out_shape, buffers
    )


def chain_convs(graph_module: fx.GraphModule, min_layers: int = 2) -> int:
    """Replace each run of at least ``min_layers`` consecutive native ``SparseConv2d`` calls
    whose inputs are one tensor from before the run and the run's own outputs, and whose
    outputs only the run reads (but the last's), by one ``NativeChain``; returns how many
    layers were chained."""
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


def _replace(graph_module: fx.GraphModule, run: list[fx.Node], name: str) -> None:
    position = {node: index for index, node in enumerate(run)}
    [external] = {a for node in run for a in node.args if a not in position}
    layers = [graph_module.get_submodule(str(node.target)) for node in run]
    arguments = [
        tuple(CHAIN_INPUT if a is external else position[a] for a in node.args)  # type: ignore[index]
        for node in run
    ]
    graph_module.add_submodule(name, NativeChain(layers, arguments))  # type: ignore[arg-type]
    with graph_module.graph.inserting_before(run[0]):
        chain = graph_module.graph.call_module(name, (external,))
    run[-1].replace_all_uses_with(chain)
    for node in reversed(run):
        graph_module.graph.erase_node(node)

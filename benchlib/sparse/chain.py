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

Inside the chain, the activations of large images (ResNet-50's 56x56 and 28x28) live in bands
of rows (``bands.py``): a 1x1 conv then reads one contiguous strip of its input per band, where
NCHW gives it a short run in each channel's plane. ResNet-50 ``magnitude:0.9`` at batch 1 ran
in 0.933-0.937x the time (three in-process A/B runs of 60 alternating rounds, AVX2 EPYC, 2
threads). Smaller ones (14x14, 7x7) are NCHW with their planes padded to a multiple of 8
floats, so that no vector load of a strip straddles a cache line (0.97-0.98x end to end). A
residual is laid out as the output it is added to; the chain's input and output stay NCHW, and
the head reads its input NCHW or in padded planes. A 1x1 conv whose only reader is a 3x3 conv
(stride 1) writes its output straight into the zero-padded images that conv's layout copy
would make (``_fused_copies``), so that no copy runs.

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

import ctypes
import threading
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as module_hooks

from benchlib.sparse.bands import (
    Bands,
    adds_residual,
    bands_for,
    layer_calls,
    padded_product,
    padded_start,
    writes_padded,
)
from benchlib.sparse.build import PackedCall
from benchlib.sparse.direct import COPY_OUT, COPY_SOURCE, COPY_THREADS, ConvLayout
from benchlib.sparse.modules import GatherPlan, SparseConv2d
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
GATHER_STEP, COPY_STEP, POOL_STEP, LINEAR_STEP = 0, 1, 2, 3
"""Step kinds of ``benchlib_run_chain``."""
POOL_OUT, POOL_THREADS = 3, 4
"""Arguments of ``benchlib_mean_planes_packed`` (the pool step) set per call."""
LINEAR_OUT, LINEAR_THREADS = 6, 7
"""Arguments of ``benchlib_dense_linear_packed`` (the linear step) set per call."""
THREADS_ARGUMENT = {
    GATHER_STEP: GATHER_THREADS,
    COPY_STEP: COPY_THREADS,
    POOL_STEP: POOL_THREADS,
    LINEAR_STEP: LINEAR_THREADS,
}


@dataclass(frozen=True, eq=False)
class Head:
    """The classifier head a chain runs after its last layer: the global average pool
    (``pool``: the ``nn.AdaptiveAvgPool2d`` module the model called, None for
    ``F.adaptive_avg_pool2d``), then, with a ``linear``, the flatten to (N, C) (``flatten``: the
    ``nn.Flatten`` module called, None for ``torch.flatten(x, 1)``) and that dense layer."""

    pool: nn.Module | None = None
    flatten: nn.Module | None = None
    linear: nn.Linear | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The head by torch, through its modules (so their hooks run)."""
        x = F.adaptive_avg_pool2d(x, 1) if self.pool is None else self.pool(x)
        if self.linear is None:
            return x
        x = torch.flatten(x, 1) if self.flatten is None else self.flatten(x)
        out: torch.Tensor = self.linear(x)
        return out

    def modules(self) -> list[nn.Module]:
        """Its modules (not the functions)."""
        return [m for m in (self.pool, self.flatten, self.linear) if m is not None]


@dataclass(frozen=True)
class _HeadSnapshot:
    """What a binding assumed of the head: its linear layer's weight and bias (the objects and
    their memory: ``.to()`` swaps a parameter's data in place), and no hooks."""

    head: Head
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    memory: tuple[tuple[torch.dtype, int] | None, ...]

    @staticmethod
    def of(head: Head) -> _HeadSnapshot:
        linear = head.linear
        if linear is None:
            return _HeadSnapshot(head, None, None, ())
        return _HeadSnapshot(head, linear.weight, linear.bias, _memory(linear))

    def current(self) -> bool:
        if any(_hooked(module) for module in self.head.modules()):
            return False
        linear = self.head.linear
        return linear is None or (
            linear.weight is self.weight
            and linear.bias is self.bias
            and _memory(linear) == self.memory
        )


def _memory(linear: nn.Linear) -> tuple[tuple[torch.dtype, int] | None, ...]:
    """The dtype and address of a linear layer's weight and bias (None: no bias)."""
    return tuple(
        None if t is None else (t.dtype, t.data_ptr()) for t in (linear.weight, linear.bias)
    )


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
        snapshots: list[_Snapshot | _HeadSnapshot],
        calls: list[tuple[int, PackedCall]],
        input_slots: list[tuple[PackedCall, int]],
        output_slot: tuple[PackedCall, int],
        out_shape: tuple[int, ...],
        buffers: list[torch.Tensor],
        bands: list[Bands | None],
        heights: list[int],
        fused_copies: int,
    ) -> None:
        self.shape, self.snapshots, self.out_shape = shape, snapshots, out_shape
        self.bands = bands
        """Per layer, the bands its output is held in (``bands.py``; None: NCHW)."""
        self.heights = heights
        """Per layer, its output's height."""
        self.fused_copies = fused_copies
        """How many layers write their output as the next layer's padded copy (no copy step
        then)."""
        self.calls, self.input_slots, self.output_slot = calls, input_slots, output_slot
        self.buffers = buffers  # kept alive: the calls hold their addresses
        self.steps = (ctypes.c_int64 * (2 * len(calls)))(
            *(value for kind, call in calls for value in (kind, call.address))
        )
        self.threads = 0
        self.lock = threading.Lock()

    def layouts(self) -> list[tuple[Bands | None, int]]:
        """Per layer, the bands of its output and its output's height."""
        return list(zip(self.bands, self.heights, strict=True))

    def current(self, x: torch.Tensor) -> bool:
        """True when ``x``, every layer and the head are as when bound (and none has hooks)."""
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
                    call[THREADS_ARGUMENT[kind]] = threads
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
        modules = [*self.layers, *(self.head.modules() if self.head else [])]
        if not _global_hooks() and not any(_hooked(module) for module in modules):
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
        would make (``_fused_copies``: no copy runs), the most of any bound input shape."""
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
        bound = _bind(self.layers, self.arguments, x, outputs, self.head)
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
    head: Head | None = None,
) -> _Binding | None:
    """The binding for input ``x`` (whose run gave ``outputs``), or None where a layer does
    not run natively on its input or the ``head``'s linear layer is not a contiguous fp32 one
    of the right size; the head's steps follow the last layer's."""
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
    bands = _bands(layers, arguments, tensors, plans, head is not None)
    last_use = {ref: step for step, refs in enumerate(arguments) for ref in refs}
    fused = _fused_copies(layers, arguments, tensors, plans)
    readers = {reader: writer for writer, reader in fused.items()}
    scratch_floats = max(
        (
            x.shape[0] * plan.source_floats
            for step, plan in enumerate(plans)
            if plan.copy is not None and step not in readers
        ),
        default=0,
    )
    scratch = x.new_empty(scratch_floats)
    buffers: list[torch.Tensor] = [scratch]
    free: dict[int, list[torch.Tensor]] = {}
    placed: dict[int, torch.Tensor] = {}  # step -> its output buffer (not the last step's)
    padded: dict[ConvLayout, torch.Tensor] = {}  # a zeroed buffer of padded images per layout
    calls: list[tuple[int, PackedCall]] = []
    input_slots: list[tuple[PackedCall, int]] = []
    output_slot: tuple[PackedCall, int] | None = None
    features = x  # the last layer's output where a head reads it (set below)

    def address(ref: int, call: PackedCall, index: int) -> None:
        if ref == CHAIN_INPUT:
            input_slots.append((call, index))
        else:
            call[index] = placed[ref].data_ptr()

    last = len(layers) - 1
    for step, (layer, refs, plan) in enumerate(zip(layers, arguments, plans, strict=True)):
        shape = tensors[refs[0]].shape
        if step in fused:  # writes the padded images its reader's copy would make
            target, _ = layers[fused[step]].layout(*plan.out_shape[2:])
            product = padded_product(layer, shape, bands[refs[0]], target)
            if target not in padded:  # shared by the writers of one layout: same padding
                padded[target] = x.new_zeros(x.shape[0] * target.floats)  # stays zero
                buffers.append(padded[target])
            placed[step] = padded[target]
            address(refs[0], product, GATHER_SOURCE)
            product[GATHER_OUT] = placed[step].data_ptr() + 4 * padded_start(target)
            product[GATHER_RELU], product[GATHER_RESIDUAL] = int(layer.relu), 0
            calls.append((GATHER_STEP, product))
            continue
        copy, product = layer_calls(layer, plan, shape, bands[refs[0]], bands[step])
        if step in readers:  # its writer made the copy
            copy = None
            product[GATHER_SOURCE] = placed[refs[0]].data_ptr()
        elif copy is not None:
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
        if step == last and head is None:
            output_slot = (product, GATHER_OUT)
        elif step == last:  # its own buffer, read by the head's steps below
            features = x.new_empty(_floats(plan.out_shape, bands[step]))
            buffers.append(features)
            product[GATHER_OUT] = features.data_ptr()
        else:
            floats = _floats(plan.out_shape, bands[step])
            spare = free.setdefault(floats, [])
            if spare:
                out = spare.pop()
            else:
                out = x.new_empty(floats)
                buffers.append(out)
            placed[step] = out
            product[GATHER_OUT] = out.data_ptr()
        calls.append((GATHER_STEP, product))
        for ref in {*refs, step}:  # outputs no later step reads go back to the pool
            if ref in fused:  # padded images: their padding must stay zero
                continue
            if ref != CHAIN_INPUT and ref != last and last_use.get(ref, ref) <= step:
                free.setdefault(placed[ref].numel(), []).append(placed[ref])
    out_shape: tuple[int, ...] = plans[-1].out_shape
    snapshots: list[_Snapshot | _HeadSnapshot] = [
        _Snapshot(layer, plan.kernel, plan.values, plan.bias, layer.relu)
        for layer, plan in zip(layers, plans, strict=True)
    ]
    if head is not None:
        steps = _head_steps(head, features, plans[-1].out_shape, bands[last])
        if steps is None:
            return None
        head_calls, output_slot, out_shape = steps
        calls.extend(head_calls)
        snapshots.append(_HeadSnapshot.of(head))
    assert output_slot is not None
    return _Binding(
        tuple(x.shape), snapshots, calls, input_slots, output_slot, out_shape, buffers,
        [None if step in fused else bands[step] for step in range(len(layers))],
        [plan.out_shape[2] for plan in plans], len(fused),
    )  # fmt: skip


def _fused_copies(
    layers: list[SparseConv2d],
    arguments: list[tuple[int, ...]],
    tensors: list[torch.Tensor],
    plans: list[GatherPlan],
) -> dict[int, int]:
    """Writer step -> reader step, where the writer's output is read only by the reader, whose
    layout copy (zero-padded, stride 1) the writer can make itself by writing its output into
    it (``bands.writes_padded``; a 1x1 conv before a 3x3 one): the chain then runs no copy
    for the reader. The writer adds no residual, and is not the last step.

    Measured on ResNet-50 ``magnitude:0.9`` (AVX2 EPYC, 2 threads, in-process A/B, 60
    alternating rounds, four runs in slow phases of 36-42 ms): 0.956-0.996x the time end to
    end. Per step, the 3x3 convs (their copy gone) took 0.55-0.92x the time; the writers at
    14x14 and 7x7 0.93-1.04x, at 28x28 (two rows a part) 0.97-1.04x, and at 56x56 1.09-1.24x
    (each row of a channel in another padded plane, where a band keeps them together), about
    what the copy cost there: fusing everywhere ran no slower than leaving 56x56 out (in all
    four runs)."""
    readers: dict[int, list[int]] = {}
    for step, refs in enumerate(arguments):
        for ref in refs:
            readers.setdefault(ref, []).append(step)
    fused: dict[int, int] = {}
    for writer, plan in enumerate(plans[:-1]):
        if len(arguments[writer]) != 1 or len(readers.get(writer, [])) != 1:
            continue
        [reader] = readers[writer]
        if arguments[reader] != (writer,) or plans[reader].copy is None:
            continue
        target, _ = layers[reader].layout(*plan.out_shape[2:])
        if writes_padded(layers[writer], tensors[arguments[writer][0]].shape, target):
            fused[writer] = reader
    return fused


def _floats(shape: tuple[int, ...], bands: Bands | None) -> int:
    """Floats of an activation of ``shape`` held in ``bands`` (None: NCHW)."""
    return torch.Size(shape).numel() if bands is None else bands.floats(shape)


def _bands(
    layers: list[SparseConv2d],
    arguments: list[tuple[int, ...]],
    tensors: list[torch.Tensor],
    plans: list[GatherPlan],
    head: bool,
) -> dict[int, Bands | None]:
    """The bands each step's output is held in inside the chain (``bands.bands_for`` of its
    size; None: NCHW), and None for the chain's input (``CHAIN_INPUT``). NCHW as well: the
    last step's output where the chain returns it, or, read by a ``head``, where it is in more
    than one band; and both a residual and the output it is added to wherever either is NCHW
    or the layer cannot add it to bands (the residual is laid out as the output)."""
    bands: dict[int, Bands | None] = {CHAIN_INPUT: None}
    last = len(plans) - 1
    for step, plan in enumerate(plans):
        bands[step] = bands_for(*plan.out_shape[2:])
    held = bands[last]
    if not head or (held is not None and held.rows != plans[last].out_shape[2]):
        bands[last] = None
    changed = True
    while changed:
        changed = False
        for step, refs in enumerate(arguments):
            if len(refs) < 2:
                continue
            out, shape = bands[step], tensors[refs[0]].shape
            if out is not None and (
                out != bands[refs[1]] or not adds_residual(layers[step], shape, out)
            ):
                bands[step] = None
                changed = True
            if bands[refs[1]] is not None and bands[step] is None:
                bands[refs[1]] = None
                changed = True
    return bands


def _head_steps(
    head: Head, features: torch.Tensor, shape: tuple[int, ...], bands: Bands | None
) -> tuple[list[tuple[int, PackedCall]], tuple[PackedCall, int], tuple[int, ...]] | None:
    """The native steps of ``head`` on the last layer's output ``features`` of (N, C, H, W)
    ``shape``, NCHW or in one band of ``bands`` (its planes ``bands.stride`` floats apart):
    the calls, the slot of the output's address, and the output's shape; None where its
    linear layer is not a contiguous fp32 CPU one taking C features."""
    images, channels, height, width = shape
    planes = (features.data_ptr(), images * channels, height * width)
    stride = 0 if bands is None else bands.stride
    linear = head.linear
    if linear is None:  # the pool writes the chain's output (its address set per call)
        mean = PackedCall(library().mean_planes_packed, (*planes, 0, 1, stride), (features,))
        return [(POOL_STEP, mean)], (mean, POOL_OUT), (images, channels, 1, 1)
    weight, bias = linear.weight, linear.bias
    if (
        not all(
            t is None or (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous())
            for t in (weight, bias)
        )
        or weight.shape[1] != channels
    ):
        return None
    pooled = features.new_empty(images, channels)
    mean = PackedCall(
        library().mean_planes_packed,
        (*planes, pooled.data_ptr(), 1, stride),
        (features, pooled),
    )
    product = PackedCall(
        library().dense_linear_packed,
        (
            pooled.data_ptr(), images, channels, weight.data_ptr(),
            None if bias is None else bias.data_ptr(), weight.shape[0], 0, 1,
        ),
        (pooled,),
    )  # fmt: skip
    return (
        [(POOL_STEP, mean), (LINEAR_STEP, product)],
        (product, LINEAR_OUT),
        (images, weight.shape[0]),
    )


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

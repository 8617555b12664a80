"""How a ``NativeChain`` (``chain.py``) runs natively: its layers' packed calls bound to fixed
buffers for one input shape (``bind``, ``Binding``), and the classifier ``Head`` it may end
with.

``bind`` takes the layers' plans, picks the layout each intermediate activation is held in
(``bands.py``: bands of rows, or planes padded to an aligned stride; ``_bands``), lets a 1x1
conv write its 3x3 reader's padded input itself where it can (``_fused_copies``), places every
output in a buffer (a conv that adds a residual no later step reads writes over it, else an
output takes a freed buffer of its size where there is one; ``_overwritable``), and
appends the head's steps (``_head_steps``). A ``Binding`` then runs all of it in one native
call (``benchlib_run_chain``) and knows what it assumed of each layer, so the chain can tell
when it is stale.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchlib.sparse.bands import (
    Bands,
    adds_residual,
    bands_for,
    copy_floats,
    layer_calls,
    padded_product,
    padded_start,
    thread_parts,
    writes_padded,
)
from benchlib.sparse.build import PackedCall
from benchlib.sparse.direct import COPY_OUT, COPY_SOURCE, COPY_THREADS, ConvLayout
from benchlib.sparse.modules import SparseConv2d
from benchlib.sparse.native import (
    GATHER_OUT,
    GATHER_RELU,
    GATHER_RESIDUAL,
    GATHER_SOURCE,
    GATHER_THREADS,
    library,
)
from benchlib.sparse.plans import GatherPlan

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
        if any(hooked(module) for module in self.head.modules()):
            return False
        linear = self.head.linear
        return linear is None or (
            linear.weight is self.weight
            and linear.bias is self.bias
            and _memory(linear) == self.memory
        )


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks (a chain then runs its layers one by one)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


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
            and not hooked(layer)
        )


class Binding:
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
        parts: int = 1,
    ) -> None:
        self.shape, self.snapshots, self.out_shape = shape, snapshots, out_shape
        self.parts = parts
        """The parts its activations are banded for (``bands.thread_parts``)."""
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
        """True when ``x``, every layer and the head are as when bound (and none has hooks),
        and torch's thread count asks for the bands it was bound with (``thread_parts``)."""
        if x.shape != self.shape or x.dtype != torch.float32 or not x.is_cpu:
            return False
        if thread_parts() != self.parts:
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


def _overwritable(
    residual: int,
    step: int,
    source: int,
    last_use: dict[int, int],
    fused: dict[int, int],
    placed: dict[int, torch.Tensor],
    floats: int,
) -> bool:
    """Whether ``step`` may write its output over its ``residual``'s buffer: a chain buffer
    (not the chain's input, not padded images) that no later step reads, not the step's
    input too, and of the output's size (a residual is laid out as the output). The kernels
    read a tile's residual before they write the tile (``csrc/spmm.cpp``), so the output's
    lines are in cache when written instead of read from memory first: in ResNet-50
    magnitude:0.9's chain (AVX2 EPYC, 2 threads, in-process A/B, two runs) most convs that add
    a residual took 0.84-0.96x the time per step (the small 7x7 ones 0.82-1.13x, within a
    step's noise), and the whole chain 0.978x and 0.984x."""
    return (
        residual != CHAIN_INPUT
        and residual != source
        and residual not in fused
        and last_use.get(residual, residual) <= step
        and residual in placed
        and placed[residual].numel() == floats
    )


def bind(
    layers: list[SparseConv2d],
    arguments: list[tuple[int, ...]],
    x: torch.Tensor,
    outputs: list[torch.Tensor],
    head: Head | None = None,
) -> Binding | None:
    """The binding for input ``x`` (whose run gave ``outputs``), or None where a layer does
    not run natively on its input or the ``head``'s linear layer is not a contiguous fp32 one
    of the right size; the head's steps follow the last layer's.

    Each layout copy writes a buffer of its own, not one scratch buffer for all: a copy then
    never writes over lines that the other thread wrote in another copy's layout (row parts of
    another size, or planes split by channels). Measured on the Zen 4 EPYC VM (ResNet-50
    ``magnitude:0.9``, 2 threads, in-process A/B, alternating): 0.936x the time end to end
    where the vCPUs sit on different CCDs (19.16 against 20.48 ms), 0.997x on one CCX; its
    eight copies take 5.3 MB (one shared buffer: 2.0 MB). Outputs still reuse the buffers of
    outputs no later step reads: a fresh buffer for each ran 0.995x / 1.005x."""
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
    parts = thread_parts()
    bands = _bands(layers, arguments, tensors, plans, head is not None, parts)
    last_use = {ref: step for step, refs in enumerate(arguments) for ref in refs}
    fused = _fused_copies(layers, arguments, tensors, plans)
    readers = {reader: writer for writer, reader in fused.items()}
    buffers: list[torch.Tensor] = []
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
        copy, product = layer_calls(
            layer, plan, shape, bands[refs[0]], bands[step], whole_layout=step in readers
        )
        if step in readers:  # its writer made the copy
            copy = None
            product[GATHER_SOURCE] = placed[refs[0]].data_ptr()
        elif copy is not None:
            address(refs[0], copy, COPY_SOURCE)
            floats = copy_floats(layer, plan, shape, bands[refs[0]], bands[step])
            scratch = x.new_empty(x.shape[0] * floats)  # its own: see bind
            buffers.append(scratch)
            copy[COPY_OUT] = scratch.data_ptr()
            calls.append((COPY_STEP, copy))
            product[GATHER_SOURCE] = scratch.data_ptr()
        else:
            address(refs[0], product, GATHER_SOURCE)
        product[GATHER_RELU] = int(layer.relu)
        product[GATHER_RESIDUAL] = 0
        if len(refs) == 2:
            address(refs[1], product, GATHER_RESIDUAL)
        floats = _floats(plan.out_shape, bands[step])
        added = refs[1] if len(refs) == 2 else CHAIN_INPUT  # the residual's step
        in_place = _overwritable(added, step, refs[0], last_use, fused, placed, floats)
        if step == last and head is None:
            output_slot = (product, GATHER_OUT)
        else:  # the last step's buffer is read by the head's steps below
            spare = free.setdefault(floats, [])
            if in_place:
                out = placed[added]  # each tile reads its residual, then writes it
            elif spare:
                out = spare.pop()
            else:
                out = x.new_empty(floats)
                buffers.append(out)
            placed[step] = features = out
            product[GATHER_OUT] = out.data_ptr()
        calls.append((GATHER_STEP, product))
        for ref in {*refs, step}:  # outputs no later step reads go back to the pool
            if ref in fused or (in_place and ref == added):  # zero padding; overwritten
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
    return Binding(
        tuple(x.shape), snapshots, calls, input_slots, output_slot, out_shape, buffers,
        [None if step in fused else bands[step] for step in range(len(layers))],
        [plan.out_shape[2] for plan in plans], len(fused), parts,
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
    parts: int,
) -> dict[int, Bands | None]:
    """The bands each step's output is held in inside the chain (``bands.bands_for`` of its
    size, for ``parts``; None: NCHW), and None for the chain's input (``CHAIN_INPUT``). NCHW
    as well: the last step's output where the chain returns it, or, read by a ``head``, where
    it is in more than one band; and both a residual and the output it is added to wherever
    either is NCHW or the layer cannot add it to bands (the residual is laid out as the
    output)."""
    bands: dict[int, Bands | None] = {CHAIN_INPUT: None}
    last = len(plans) - 1
    for step, plan in enumerate(plans):
        _, _, height, width = plan.out_shape
        bands[step] = bands_for(height, width, parts=parts)
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

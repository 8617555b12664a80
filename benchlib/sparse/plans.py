"""The native calls a ``SparseConv2d`` binds once per input shape (``GatherPlan``).

A plan holds the layout copy of the conv's input (none where the kernel reads the input in
place) and the product, their constant arguments bound in packed argument arrays
(``build.PackedCall``), so that a call sets only the activations' addresses and the thread
count. Where the conv runs by itself (``SparseConv2d.forward``, not a chain's step), the plan
may hold other calls for that (``SourceCalls``): a source in row parts, one a thread, or one
whole copy a thread, so that each thread reads only what it wrote.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from benchlib.sparse.build import PackedCall
from benchlib.sparse.direct import ConvLayout, RowParts
from benchlib.sparse.operands import ColumnBlocks
from benchlib.sparse.tiling import output_halves

if TYPE_CHECKING:
    from benchlib.sparse.modules import GatherKernel, SparseConv2d

COPIES_THREADS = 2
"""The thread count at which a conv run by itself on a layout copy (not in row parts) copies
its input once a thread (``direct.RowParts.copies``), each thread then reading only what it
wrote. On the Zen 4 EPYC VM, 2 threads, at 90% (in-process A/B, alternating, 120 s): 3x3
512 -> 512 @7 took 0.66x the time of one shared copy where the two vCPUs sit on different
CCDs (317 against 480 us) and 0.95x on one CCX; the strided 1x1 convs 256 -> 512 @56,
512 -> 1024 @28 and 1024 -> 2048 @14 0.48-0.62x and 0.94-0.99x. On more threads each would
copy the whole input: not measured, not done."""


@dataclass(frozen=True)
class GatherPlan:
    """A conv's native calls for one input shape (``SparseConv2d.gather_plan``): the layout
    copy (None where the kernel reads the input in place) and the product, their constant
    arguments bound once, so that a call sets only the activations' addresses."""

    kernel: object
    values: torch.Tensor
    """The kernel's ``values`` when the plan was built: another tensor makes it stale."""
    bias: torch.Tensor | None
    out_shape: tuple[int, int, int, int]
    source_floats: int
    copy: PackedCall | None
    product: PackedCall
    fuses_residual: bool
    """The output's rows are contiguous (pitch == output width): a residual can be added in
    the kernel."""
    lock: threading.Lock
    """Held from the first argument set to the end of the product: one call at a time."""
    alone: SourceCalls | None = None
    """Where the layer runs by itself (``forward``) on a source in row parts (a kxk conv over
    an even number of output rows, ``direct.RowParts``) or in copies, one a thread
    (``RowParts.copies``), the calls for it; ``copy`` and ``product`` read the whole layout,
    as a chain's steps (``bands.py``, ``binding.py``) and the padded images a chain's writer
    makes (``padded_product``) lay it out."""


@dataclass(frozen=True)
class SourceCalls:
    """A layout copy, the product that reads what it writes, and the floats per image of the
    source between them."""

    copy: PackedCall
    product: PackedCall
    source_floats: int
    threads: int = 0
    """The thread count the calls are for (0: any)."""


def build_plan(
    conv: SparseConv2d, kernel: GatherKernel, bias: torch.Tensor | None, x: torch.Tensor
) -> GatherPlan | None:
    """``conv``'s native calls for ``x``'s shape with ``kernel`` and ``bias``, or None where
    the kernel does not take them (``GatherKernel.accepts``)."""
    if not (kernel.accepts(x) if bias is None else kernel.accepts(x, bias)):
        return None
    n, _, h, w = x.shape
    layout, offsets = conv.layout(h, w)
    ksplit = conv.ksplit(h, w)
    halves = output_halves(conv.kernel_size, conv.stride, layout, conv.out_channels)
    shifts = conv.shift_groups(h, w) > 1
    product = None
    if halves is not None:
        with contextlib.suppress(ValueError):  # the last half would read past the source
            product = kernel.gather_call(
                offsets, layout.floats, n, halves.source_step, layout.pitch, layout.out_w,
                bias, ksplit, halves, in_order=True, shift_groups=shifts,
            )  # fmt: skip
    if product is None:
        product = kernel.gather_call(
            offsets, layout.floats, n, layout.columns, layout.pitch, layout.out_w, bias,
            ksplit, shift_groups=shifts,
        )  # fmt: skip
    return GatherPlan(
        kernel=kernel,
        values=kernel.values,
        bias=bias,
        out_shape=(n, conv.out_channels, layout.out_h, layout.out_w),
        source_floats=layout.floats,
        copy=None if layout.in_place else layout.copy_call(n),
        product=product,
        fuses_residual=layout.pitch == layout.out_w,
        lock=threading.Lock(),
        alone=_alone_calls(conv, kernel, bias, layout, n, ksplit, shifts),
    )


def _alone_calls(
    conv: SparseConv2d,
    kernel: GatherKernel,
    bias: torch.Tensor | None,
    layout: ConvLayout,
    images: int,
    ksplit: ColumnBlocks | None,
    shifts: bool,
) -> SourceCalls | None:
    """The calls for ``conv`` run by itself on ``images`` images over ``layout``: in row
    parts where ``output_halves(alone=True)`` gives them, else in copies, one a thread, on
    ``COPIES_THREADS`` threads where the input takes a copy; else None."""
    parts = output_halves(conv.kernel_size, conv.stride, layout, conv.out_channels, True)
    if parts is not None:
        with contextlib.suppress(ValueError):
            split = RowParts.of(layout, parts.count)
            return SourceCalls(
                split.copy_call(images),
                kernel.gather_call(
                    split.entry_offsets(kernel.col), split.floats, images, split.columns,
                    layout.pitch, layout.out_w, bias, ksplit,
                    replace(parts, source_step=split.part_floats), in_order=True,
                    shift_groups=shifts,
                ),
                split.floats,
            )  # fmt: skip
    threads = torch.get_num_threads()
    if layout.in_place or threads != COPIES_THREADS:
        return None
    copies = RowParts.copies(layout, threads)
    return SourceCalls(
        copies.copy_call(images),
        kernel.gather_call(
            copies.entry_offsets(kernel.col), copies.floats, images, copies.columns,
            layout.pitch, layout.out_w, bias, ksplit, shift_groups=shifts, copies=threads,
            copy_floats=copies.part_floats,
        ),
        copies.floats,
        threads,
    )  # fmt: skip

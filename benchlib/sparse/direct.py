"""Direct sparse convolution: where each weight of a conv reads its input, without im2col.

A conv output pixel (oh, ow) is ``sum over (c, r, s) of W[m, c, r, s] * Xpad[c, oh*S + r*d,
ow*S + s*d]`` (Xpad: the zero-padded input, S stride, d dilation, per axis). With the padded
input flattened row by row, the output position ``q = oh * Wp + ow`` of a stride-1 conv reads
``Xpad`` at ``c*Hp*Wp + r*d*Wp + s*d + q``: one offset per weight plus q, so a sparse conv is
the gather-form product of ``NativeSparseMatrix.gather`` over q in [0, (Ho-1)*Wp + Wo), and the
columns ow >= Wo of each padded row are computed and dropped (a waste of (Wp - Wo) / Wp).

Stride S > 1, polyphase: the padded input is split into the S x S phase images
``Xpad[:, a::S, b::S]`` (each zero-padded to a common Hs x Ws), stored one after another; a
weight (c, r, s) reads phase ``((r*d) % S, (s*d) % S)`` at ``phase_base + c*Hs*Ws +
((r*d) // S) * Ws + (s*d) // S + q`` with ``q = oh * Ws + ow``: a stride-1 read again. Only the
phases some kernel position reads are stored (a strided 1x1 conv stores one: the subsampled
input). The copy costs one pass over the input, where im2col writes kh*kw of them; a 1x1 or
unpadded stride-1 conv reads its input in place.

Every read of a computed column stays inside its phase image, so the layout needs no slack:
``max(offsets) + columns <= floats per image`` (checked when the offsets are built).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchlib.sparse.build import NativeLibrary, PackedCall, load_library

INT32_MAX = 2**31 - 1
COPY_SOURCE, COPY_OUT, COPY_THREADS = 0, 14, 15
"""The arguments of a ``copy_call`` set per call (indices into ``benchlib_conv_layout``'s)."""
COPY_BAND, COPY_STRIDE = 16, 17
"""The arguments of a ``copy_call`` giving the source's rows per band and the floats from one
channel's rows of a band to the next (``bands.py``); 0 and 0, as built, read an NCHW
source."""

COPY_PLANE = 13
"""The argument of a ``copy_call`` giving the floats from one phase image to the next."""
COPY_PART_ROWS, COPY_ROW_PARTS, COPY_PART_SPAN = 18, 19, 20
"""The arguments of a ``copy_call`` that store its source in row parts (``RowParts``); 0, 0
and 0, as built, store it whole."""
ALIGN = 16
"""Floats per 64 bytes (a cache line, an AVX-512 vector)."""


@dataclass(frozen=True)
class ConvLayout:
    """The gather-form layout of one conv geometry on one input size (pixels), batch-free.

    ``padding`` is (top, bottom, left, right). Construct with ``ConvLayout.of``.
    """

    channels: int
    height: int
    width: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]
    out_h: int
    out_w: int
    phase_h: int
    phase_w: int
    phases: tuple[tuple[int, int], ...]
    """The (row, col) origins of the stored phase images, in storage order."""
    plane: int
    """Floats from one channel's phase image to the next: ``phase_h * phase_w`` rounded up to
    a multiple of the ``align`` it was built with (``ALIGN``: a 1x1 conv's reads then all
    start on a 64-byte boundary)."""

    @classmethod
    def of(
        cls,
        channels: int,
        size: tuple[int, int],
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
        padding: tuple[int, int, int, int],
        *,
        align: int = 1,
        row_align: int = 1,
    ) -> ConvLayout:
        """The layout for an input of ``channels`` x ``size`` (height, width); ``align`` rounds
        the planes up to a multiple of that many floats (a copy then, where the input could be
        read in place), ``row_align`` the phase images' rows (and so the planes) as well.
        Raises ValueError when the input is smaller than the (dilated) kernel after padding, or
        an image would not fit int32 offsets."""
        top, bottom, left, right = padding
        padded = (size[0] + top + bottom, size[1] + left + right)
        out = [
            (p - d * (k - 1) - 1) // s + 1
            for p, k, s, d in zip(padded, kernel_size, stride, dilation, strict=True)
        ]
        if min(out) < 1:
            raise ValueError(
                f"input {size[0]}x{size[1]} padded to {padded[0]}x{padded[1]} is smaller than "
                f"the kernel {kernel_size} at dilation {dilation}"
            )
        (sh, sw), (dh, dw) = stride, dilation
        phases = tuple(
            sorted({((r * dh) % sh, (s * dw) % sw) for r in range(kernel_size[0])
                    for s in range(kernel_size[1])})
        )  # fmt: skip
        phase_h, phase_w = math.ceil(padded[0] / sh), math.ceil(padded[1] / sw)
        row_align = max(1, row_align)
        phase_w = -(-phase_w // row_align) * row_align
        align = math.lcm(max(1, align), row_align)
        plane = -(-phase_h * phase_w // align) * align
        layout = cls(
            channels, size[0], size[1], kernel_size, stride, dilation, padding, out[0], out[1],
            phase_h, phase_w, phases, plane,
        )  # fmt: skip
        if layout.floats > INT32_MAX:
            raise ValueError(f"a {layout.floats}-float image layout exceeds int32 offsets")
        return layout

    @functools.cached_property
    def _phase_table(self) -> torch.Tensor:
        return torch.tensor(self.phases, dtype=torch.int32).reshape(-1)

    @property
    def floats(self) -> int:
        """Floats per image of the source."""
        return len(self.phases) * self.channels * self.plane

    @property
    def pitch(self) -> int:
        """Computed columns per output row (the phase width)."""
        return self.phase_w

    @property
    def columns(self) -> int:
        """Columns computed per image: output rows at ``pitch`` apart, the last one cut."""
        return (self.out_h - 1) * self.phase_w + self.out_w

    @functools.cached_property
    def in_place(self) -> bool:
        """The (contiguous) input is itself the source: stride 1, no padding, aligned planes."""
        return (
            self.phases == ((0, 0),)
            and self.stride == (1, 1)
            and not any(self.padding)
            and self.plane == self.height * self.width
        )

    def column_offsets(self, plane: int | None = None) -> torch.Tensor:
        """int64 (channels * kh * kw,): where column ``c*kh*kw + r*kw + s`` of the conv matrix
        (``conv_matrix``) starts reading, in floats from the start of an image (of planes
        ``plane`` floats apart; default this layout's)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        plane = self.plane if plane is None else plane
        phase_base = {phase: i * self.channels * plane for i, phase in enumerate(self.phases)}
        window = torch.tensor(
            [phase_base[((r * dh) % sh, (s * dw) % sw)] + (r * dh // sh) * self.phase_w
             + s * dw // sw for r in range(kh) for s in range(kw)],
            dtype=torch.int64,
        )  # fmt: skip
        channel = torch.arange(self.channels, dtype=torch.int64) * plane
        return (channel.unsqueeze(1) + window.unsqueeze(0)).reshape(-1)

    def entry_offsets(self, entry_columns: torch.Tensor) -> torch.Tensor:
        """int32 offsets of the stored entries of a kernel whose entry ``e`` holds conv matrix
        column ``entry_columns[e]``. Raises ValueError when a read would leave the image."""
        starts = self.column_offsets()
        return _entry_offsets(starts, entry_columns, self.columns, self.floats, "image")

    def copy_call(self, images: int) -> PackedCall:
        """The native copy of ``source`` for ``images`` images as a ``PackedCall``: per call
        the caller sets ``COPY_SOURCE`` (a contiguous fp32 NCHW input of this layout's size),
        ``COPY_OUT`` (an (images, floats) fp32 buffer) and ``COPY_THREADS``, and may set
        ``COPY_BAND`` and ``COPY_STRIDE`` (the input then in bands of that many rows, each
        channel's rows of a band that many floats apart, ``bands.py``). Raises
        RuntimeError where the native kernels are unavailable."""
        loaded = load_library()
        if not isinstance(loaded, NativeLibrary):
            raise RuntimeError(f"the native layout copy is unavailable: {loaded.reason}")
        phases = self._phase_table
        args = (
            0, images, self.channels, self.height, self.width, phases.data_ptr(),
            len(self.phases), *self.stride, self.padding[0], self.padding[2], self.phase_h,
            self.phase_w, self.plane, 0, 1, 0, 0, 0, 0, 0,
        )  # fmt: skip
        return PackedCall(loaded.conv_layout_packed, args, (phases,))

    def source(self, x: torch.Tensor) -> torch.Tensor:
        """The (batch, floats) source for the NCHW input ``x`` (any memory format): written by
        the native kernels' parallel copy for fp32 where they are built, else by torch ops."""
        batch = x.shape[0]
        if self.in_place:
            return x.contiguous().reshape(batch, -1)
        loaded = load_library()
        if (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and isinstance(loaded, NativeLibrary)
        ):
            x = x.contiguous()
            out = x.new_empty(batch, self.floats)
            copy = self.copy_call(batch)
            copy[COPY_SOURCE], copy[COPY_OUT] = x.data_ptr(), out.data_ptr()
            copy[COPY_THREADS] = torch.get_num_threads()
            copy()
            return out
        top, bottom, left, right = self.padding
        if (
            self.stride == (1, 1)
            and self.phase_w == self.width + left + right
            and self.plane == self.phase_h * self.phase_w
        ):
            return F.pad(x, (left, right, top, bottom)).contiguous().reshape(batch, -1)
        (sh, sw), h, w = self.stride, self.height, self.width
        flat = x.new_zeros(batch, len(self.phases), self.channels, self.plane)
        shape = (batch, len(self.phases), self.channels, self.phase_h, self.phase_w)
        buffer = flat[..., : self.phase_h * self.phase_w].view(shape)  # writes land in flat
        for index, (a, b) in enumerate(self.phases):
            i0, j0 = max(0, -((a - top) // sh)), max(0, -((b - left) // sw))
            r0, c0 = a + sh * i0 - top, b + sw * j0 - left  # first input row / col read
            if r0 >= h or c0 >= w:
                continue
            rows = min((h - 1 - r0) // sh + 1, self.phase_h - i0)
            cols = min((w - 1 - c0) // sw + 1, self.phase_w - j0)
            buffer[:, index, :, i0 : i0 + rows, j0 : j0 + cols] = x[
                :, :, r0 : r0 + sh * (rows - 1) + 1 : sh, c0 : c0 + sw * (cols - 1) + 1 : sw
            ]
        return flat.reshape(batch, -1)


def _entry_offsets(
    starts: torch.Tensor, entry_columns: torch.Tensor, columns: int, floats: int, what: str
) -> torch.Tensor:
    """int32: ``starts`` (where each conv matrix column starts reading) of each entry's column.
    Raises ValueError where reading ``columns`` columns from one would leave the ``floats``
    floats of the ``what`` (an image, a part)."""
    offsets = starts[entry_columns.long()]
    if offsets.numel() and int(offsets.max()) + columns > floats:
        raise ValueError(
            f"offset {int(offsets.max())} + {columns} columns leaves the {floats}-float {what}"
        )
    return offsets.to(torch.int32)


@dataclass(frozen=True)
class RowParts:
    """A layout's source split into ``count`` parts of ``rows`` output rows each, stored apart:
    part k holds, of every phase image, the ``span`` phase rows from row ``k * step`` (the
    rows its outputs read: its own and the halo below, which the next part holds too), as
    (images, count, phases, channels, ``plane``) floats. A product run in order over the
    parts (``gather_call``'s ``in_order``, one part a thread) then reads one contiguous run
    that its own thread wrote (``benchlib_conv_layout``'s row parts). Construct with
    ``RowParts.of``, or ``RowParts.copies`` for parts that each hold every row."""

    layout: ConvLayout
    count: int
    rows: int
    span: int
    plane: int
    step: int
    """Output rows from one part's first to the next's: ``rows``, or fewer where the parts
    overlap (two parts of an odd number of rows: 7 as 0-3 and 3-6); 0 for copies."""

    @classmethod
    def of(cls, layout: ConvLayout, count: int) -> RowParts:
        """``layout`` in ``count`` parts of equal rows, or, for two parts of an odd number of
        rows, two that share the middle row (both compute it, to the same values). Raises
        ValueError for other counts that do not divide the output rows."""
        out_h = layout.out_h
        if count < 1 or (out_h % count and count != 2) or out_h < count:
            raise ValueError(f"{out_h} output rows do not split into {count} parts")
        rows = -(-out_h // count)
        return cls._spanning(layout, count, rows, rows if out_h % count == 0 else out_h - rows)

    @classmethod
    def copies(cls, layout: ConvLayout, count: int) -> RowParts:
        """``count`` parts that each hold the whole layout, one a thread: a product that splits
        its block rows, each thread reading all of its source, then has each read a copy that
        it wrote itself (``gather_call``'s ``copies``). Raises ValueError for count < 1."""
        if count < 1:
            raise ValueError(f"{count} copies: need at least 1")
        return cls._spanning(layout, count, layout.out_h, 0)

    @classmethod
    def _spanning(cls, layout: ConvLayout, count: int, rows: int, step: int) -> RowParts:
        """``count`` parts of ``rows`` output rows, ``step`` apart: each spans its rows and the
        halo below them, its planes aligned."""
        halo = (layout.kernel_size[0] - 1) * layout.dilation[0] // layout.stride[0]
        span = rows + halo
        plane = -(-span * layout.phase_w // ALIGN) * ALIGN
        return cls(layout, count, rows, span, plane, step)

    @property
    def part_floats(self) -> int:
        """Floats from one part of an image to the next."""
        return len(self.layout.phases) * self.layout.channels * self.plane

    @property
    def floats(self) -> int:
        """Floats per image of the source."""
        return self.count * self.part_floats

    @property
    def columns(self) -> int:
        """Columns computed per part: its output rows at ``pitch`` apart, the last one cut."""
        return (self.rows - 1) * self.layout.phase_w + self.layout.out_w

    def entry_offsets(self, entry_columns: torch.Tensor) -> torch.Tensor:
        """int32 offsets within a part of the entries of a kernel whose entry ``e`` holds conv
        matrix column ``entry_columns[e]``."""
        starts = self.layout.column_offsets(self.plane)
        return _entry_offsets(starts, entry_columns, self.columns, self.part_floats, "part")

    def copy_call(self, images: int) -> PackedCall:
        """The native copy into this split as a ``PackedCall``, set per call as
        ``ConvLayout.copy_call``'s (``COPY_SOURCE``, ``COPY_OUT``: (images, floats) fp32,
        ``COPY_THREADS``). Raises RuntimeError where the native kernels are unavailable."""
        call = self.layout.copy_call(images)
        call[COPY_PLANE] = self.plane
        call[COPY_PART_ROWS], call[COPY_ROW_PARTS], call[COPY_PART_SPAN] = (
            self.step, self.count, self.span,
        )  # fmt: skip
        return call

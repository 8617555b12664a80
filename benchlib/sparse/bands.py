"""Activations in bands of rows inside a ``NativeChain`` (``chain.py``).

An intermediate activation (N, C, H, W) of a chain may be stored in bands of ``rows`` whole
rows: per image, per band, every channel's ``rows`` rows of it in turn, i.e. the tensor
``(N, H / rows, C, rows * W)``. A 1x1 conv then reads, per band (one part of the gather
kernel's columns, see ``native.Parts``), a contiguous strip of ``C * rows * W`` floats, where
NCHW gives it one short run per channel plane, each in another page; and it writes its output
band the same way. A conv whose source is a layout copy (padded or strided) reads a banded
input through the copy (``COPY_BAND``) and can write a banded output as well, one band per
part.

Measured on the AVX2 EPYC (2 threads, in-process A/B). ResNet-50's 1x1 convs at their
``magnitude:0.9`` densities, both sides banded against both NCHW: 56x56 in bands of one row
(56 floats) 0.82-0.85x the time, 28x28 in bands of two rows 0.94x (512 -> 128, 512 -> 256) and
0.81x (128 -> 512); but 14x14 in bands of 1, 2 or 7 rows 1.00-1.77x, 7x7 in rows 1.00-2.70x,
and 28x28 in bands of 112 floats 1.02x. Per step inside ResNet-50's chain: the 1x1 convs at
56x56 and 28x28 0.79-0.93x; the 3x3 convs writing bands from their NCHW padded source
0.93-0.95x at 56x56 and 1.00-1.09x at 28x28 (kept: the 1x1 conv after each reads the bands);
end to end 0.933-0.937x. So bands are as wide as fit in ``BAND_FLOATS`` (a column tile of the
kernels), and only where an image has at least ``BAND_MIN_PIXELS``.
"""

from __future__ import annotations

import torch
from torch import nn

from benchlib.sparse.build import PackedCall
from benchlib.sparse.direct import COPY_BAND, COPY_OUT, COPY_SOURCE, COPY_THREADS
from benchlib.sparse.modules import GatherKernel, GatherPlan, SparseConv2d
from benchlib.sparse.native import (
    GATHER_OUT,
    GATHER_RELU,
    GATHER_RESIDUAL,
    GATHER_SOURCE,
    GATHER_THREADS,
    Parts,
)

BAND_FLOATS = 64
"""At most this many floats per channel and band (the AVX2 kernels' column tile)."""
BAND_MIN_PIXELS = 512
"""Images of fewer pixels stay NCHW: 14x14 (196) and 7x7 ran no faster in bands (above)."""


def band_rows(height: int, width: int) -> int | None:
    """Rows per band for an activation of (height, width) pixels inside a chain: the most
    whole rows that fit ``BAND_FLOATS`` and divide ``height``; None (NCHW) for an image under
    ``BAND_MIN_PIXELS`` or a row wider than ``BAND_FLOATS``."""
    if height * width < BAND_MIN_PIXELS or width > BAND_FLOATS:
        return None
    return max(r for r in range(1, height + 1) if height % r == 0 and r * width <= BAND_FLOATS)


def to_bands(x: torch.Tensor, rows: int) -> torch.Tensor:
    """The NCHW ``x`` in bands of ``rows`` rows, as a contiguous (N, H / rows, C, rows * W)
    tensor (for tests and for reading a chain's buffers)."""
    n, c, h, w = x.shape
    if rows < 1 or h % rows:
        raise ValueError(f"bands of {rows} rows must divide the height {h}")
    return x.reshape(n, c, h // rows, rows * w).transpose(1, 2).contiguous()


def from_bands(banded: torch.Tensor, shape: tuple[int, int, int, int], rows: int) -> torch.Tensor:
    """The NCHW tensor of ``shape`` that ``banded`` (any tensor of its floats, in bands of
    ``rows`` rows) holds: the inverse of ``to_bands``."""
    n, c, h, w = shape
    if rows < 1 or h % rows:
        raise ValueError(f"bands of {rows} rows must divide the height {h}")
    bands = banded.reshape(n, h // rows, c, rows * w)
    return bands.transpose(1, 2).reshape(n, c, h, w).contiguous()


def banded_product(
    layer: SparseConv2d,
    shape: tuple[int, ...],
    source_rows: int | None,
    out_rows: int | None,
) -> PackedCall:
    """``layer``'s product on an input of (N, C, H, W) ``shape`` (its plan built) held in bands
    of ``source_rows`` rows, for an output in bands of ``out_rows`` (None: NCHW); it adds a
    residual (laid out as its output) where ``adds_residual`` says so. A layer that reads its
    input in place (a 1x1 conv, stride 1, no padding) takes bands on either side, one band per
    part; one that reads a layout copy reads the copy (which reads the bands: ``COPY_BAND``)
    and writes one output band per part. Raises ValueError where the bands do not divide the
    heights."""
    n, _, h, w = shape
    layout, offsets = layer.layout(h, w)
    ksplit = layer.ksplit(h, w)
    kernel: GatherKernel = layer.kernel  # type: ignore[assignment]
    m, ho, wo = layer.out_channels, layout.out_h, layout.out_w
    out_image = m * ho * wo
    if layout.in_place:  # input and output of one size: a band of each per part
        rows = out_rows or source_rows
        if rows is None:
            raise ValueError("an NCHW input and output take the layer's plan")
        if h % rows:
            raise ValueError(f"bands of {rows} rows must divide the height {h}")
        band = rows * w
        if source_rows is not None:
            offsets = layer.band_offsets(band)
        parts = Parts(
            count=h // rows,
            source_step=band if source_rows is None else layout.channels * band,
            out_step=band if out_rows is None else m * band,
            out_row=ho * wo if out_rows is None else band,
            out_image=out_image,
        )
        return kernel.gather_call(offsets, layout.floats, n, band, w, w, layer.bias, ksplit, parts)
    if out_rows is None:
        raise ValueError("a layer reading a layout copy into NCHW takes the layer's plan")
    if ho % out_rows:
        raise ValueError(f"bands of {out_rows} rows must divide the output height {ho}")
    pitch = wo if out_rows == 1 else layout.pitch  # one row per part: no dropped columns
    parts = Parts(
        count=ho // out_rows,
        source_step=out_rows * layout.pitch,
        out_step=m * out_rows * wo,
        out_row=out_rows * wo,
        out_image=out_image,
    )
    columns = (out_rows - 1) * layout.pitch + wo
    return kernel.gather_call(
        offsets, layout.floats, n, columns, pitch, wo, layer.bias, ksplit, parts
    )


def layer_calls(
    layer: SparseConv2d,
    plan: GatherPlan,
    shape: tuple[int, ...],
    source_rows: int | None,
    out_rows: int | None,
) -> tuple[PackedCall | None, PackedCall]:
    """Private copies of ``plan``'s calls (``layer``'s, for an input of ``shape``) for an input
    in bands of ``source_rows`` rows and an output in bands of ``out_rows`` (None: NCHW): the
    layout copy (None where the layer reads its input in place), reading the bands, and the
    product (``banded_product`` where a side is banded that the plan's cannot take)."""
    if out_rows is None and (plan.copy is not None or source_rows is None):
        product = plan.product.copy()
    else:
        product = banded_product(layer, shape, source_rows, out_rows)
    copy = None
    if plan.copy is not None:
        copy = plan.copy.copy()
        copy[COPY_BAND] = source_rows or 0
    return copy, product


def adds_residual(layer: SparseConv2d, shape: tuple[int, ...], out_rows: int) -> bool:
    """Whether ``layer``'s ``banded_product`` on an input of ``shape`` can add a residual to an
    output in bands of ``out_rows`` rows: its rows are contiguous (a 1x1 conv read in place,
    one row per band, or a copy whose rows have no dropped columns)."""
    layout, _ = layer.layout(shape[2], shape[3])
    return layout.in_place or out_rows == 1 or layout.pitch == layout.out_w


class ChainedConv(nn.Module):
    """``layer`` as a ``NativeChain`` runs it on ``x``, to be timed (``tune.keep_faster``):
    its input and its output in the bands ``band_rows`` gives their sizes (NCHW where it gives
    none), the layout copy reading the bands, fixed buffers, and nothing allocated per call.
    With ``residual`` (N, M, Ho, Wo) the layer adds it (its output then NCHW where it cannot
    add it to bands); ``relu`` applies the ReLU after.

    ``forward`` runs on the ``x`` it was built for (another tensor raises ValueError) and
    returns the output buffer as it lies (``nchw`` gives the NCHW tensor). Raises ValueError
    where the layer has no native plan for ``x``."""

    def __init__(
        self,
        layer: SparseConv2d,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__()
        plan = layer.gather_plan(x)
        if plan is None:
            raise ValueError(f"{layer} has no native plan for a {tuple(x.shape)} input")
        self.x = x
        source_rows, out_rows = band_rows(*x.shape[2:]), band_rows(*plan.out_shape[2:])
        if out_rows is not None and residual is not None:
            out_rows = out_rows if adds_residual(layer, x.shape, out_rows) else None
        self.copy, self.product = layer_calls(layer, plan, x.shape, source_rows, out_rows)
        self.out_shape, self.out_rows = plan.out_shape, out_rows
        source = x.contiguous() if source_rows is None else to_bands(x, source_rows)
        self.buffers_ = [source]  # what the calls' addresses point into
        if self.copy is not None:
            scratch = x.new_empty(x.shape[0], plan.source_floats)
            self.copy[COPY_SOURCE], self.copy[COPY_OUT] = source.data_ptr(), scratch.data_ptr()
            self.buffers_.append(scratch)
            source = scratch
        self.out = x.new_empty(plan.out_shape)
        if residual is not None:
            residual = residual.contiguous() if out_rows is None else to_bands(residual, out_rows)
            self.buffers_.append(residual)
        self.product[GATHER_SOURCE], self.product[GATHER_OUT] = (
            source.data_ptr(),
            self.out.data_ptr(),
        )
        self.product[GATHER_RELU] = int(relu)
        self.product[GATHER_RESIDUAL] = 0 if residual is None else residual.data_ptr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x:
            raise ValueError("a ChainedConv runs on the input it was built for")
        threads = torch.get_num_threads()
        if self.copy is not None:
            self.copy[COPY_THREADS] = threads
            self.copy()
        self.product[GATHER_THREADS] = threads
        if self.product():
            raise ValueError("the native kernel refused its operands")
        return self.out

    def nchw(self) -> torch.Tensor:
        """The last output as an NCHW tensor."""
        if self.out_rows is None:
            return self.out
        return from_bands(self.out, self.out_shape, self.out_rows)

"""Activations in bands of rows inside a ``NativeChain`` (``chain.py``).

An intermediate activation (N, C, H, W) of a chain may be stored in bands of ``rows`` whole
rows (``Bands``): per image, per band, every channel's ``rows`` rows of it in turn, each
channel's strip ``stride`` floats after the last, i.e. the tensor ``(N, H / rows, C,
stride)``. A 1x1 conv then reads, per band (one part of the gather kernel's columns, see
``operands.Parts``), a contiguous strip of about ``C * rows * W`` floats, where NCHW gives it
one short run per channel plane, each in another page; and it writes its output band the same
way. A conv whose source is a layout copy (padded or strided) reads a banded input through the
copy (``COPY_BAND``, ``COPY_STRIDE``) and can write a banded output as well, one band per part.
A small image is held in one band: NCHW, its planes padded to an aligned ``stride`` where
``H * W`` is not a multiple of a vector. A 1x1 conv whose reader is a 3x3 conv can
instead write the zero-padded images that reader's layout copy would make (``padded_product``;
``binding._fused_copies``).

Measured on the AVX2 EPYC (2 threads, in-process A/B). ResNet-50's 1x1 convs at their
``magnitude:0.9`` densities, both sides banded against both NCHW: 56x56 in bands of one row
(56 floats) 0.82-0.85x the time, 28x28 in bands of two rows 0.94x (512 -> 128, 512 -> 256) and
0.81x (128 -> 512); but 14x14 in bands of 1, 2 or 7 rows 1.00-1.77x, 7x7 in rows 1.00-2.70x,
and 28x28 in bands of 112 floats 1.02x. Per step inside ResNet-50's chain: the 1x1 convs at
56x56 and 28x28 0.79-0.93x; the 3x3 convs writing bands from their NCHW padded source
0.93-0.95x at 56x56 and 1.00-1.09x at 28x28 (kept: the 1x1 conv after each reads the bands);
end to end 0.933-0.937x. So bands are as wide as fit in a column tile of the kernels
(``tiling.tile_floats``), and only where an image has at least ``BAND_MIN_PIXELS``. With the
strips aligned (to a vector), 14x14 in bands of 7 rows (104 floats) ran end to end in 1.00x
the time of one band of 200, in bands of 2 rows (32 floats) 1.03-1.05x. The planes of 14x14
and 7x7 padded to 200 and 56 floats: their 1x1 convs 0.82-0.93x per step in the chain,
ResNet-50 end to end 0.968x (per step), 0.973x and 0.978x (two A/B runs of 60 alternating
rounds; a third, in a noisy minute, 0.987x), bit-identical outputs.

On the Zen 4 EPYC VM, whose host at times puts the two vCPUs on different CCDs, every
activation from 56x56 to 14x14 is held in a number of bands the threads split evenly, and the
products run them in order (``in_order``): each thread keeps the same rows from step to step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from benchlib.sparse.build import PackedCall
from benchlib.sparse.direct import (
    COPY_BAND,
    COPY_OUT,
    COPY_SOURCE,
    COPY_STRIDE,
    COPY_THREADS,
    ConvLayout,
    RowParts,
)
from benchlib.sparse.modules import GatherKernel, SparseConv2d
from benchlib.sparse.native import (
    GATHER_OUT,
    GATHER_RELU,
    GATHER_RESIDUAL,
    GATHER_SOURCE,
    GATHER_THREADS,
)
from benchlib.sparse.operands import Parts
from benchlib.sparse.plans import GatherPlan
from benchlib.sparse.tiling import IN_ORDER_PARTS, tile_floats, vector_floats

BAND_MIN_PIXELS = 512
"""Images of fewer pixels stay in one band: 14x14 (196) and 7x7 ran no faster in bands of
rows (above), but for ``HALVES_MIN_PIXELS``."""
HALVES_MIN_PIXELS = 196
"""Images of fewer pixels than ``BAND_MIN_PIXELS`` but at least these, whose halves fit in a
tile, are held in two bands, one a thread (``in_order``). Measured on the Zen 4 EPYC VM
(AVX-512, 2 threads; ResNet-50 ``magnitude:0.9``, in-process A/B, alternating): 14x14 in two
bands of 7 rows, its aligned 1x1 convs reading the bands in place (``reads_in_place``), ran
0.952x the time end to end where the vCPUs sit on different CCDs (18.07 against 18.99 ms) and
1.007x on one CCX (16.41 / 16.30). On AVX2 (64-float tiles) 14x14 stays one band: there its
bands of 1, 2 or 7 rows measured 1.00-1.77x the time per 1x1 conv (above)."""
# A band holds at most a column tile of the loaded kernels per channel (``tiling.tile_floats``:
# 64 floats on AVX2, 128 on AVX-512), and each channel's strip starts a vector of them apart
# (``tiling.vector_floats``: 8 or 16 floats), so that the kernels' vector loads of a strip
# never straddle a cache line (one in two does on AVX2 for planes of 196 floats; on AVX-512
# every load not 64-byte aligned does). Measured on the AVX2 EPYC (2 threads, in-process A/B
# of one layer, planes of 196 / 49 floats against 200 / 56): ResNet-50's 1x1 convs at 14x14
# and 7x7 at their ``magnitude:0.9`` densities ran in 0.83-0.89x the time (512 -> 2048 @7x7 at
# 0.03: 0.92-0.97x). On the AVX-512 Xeon, bands of 128 floats and strips aligned to 16 ran
# ResNet-50 end to end in 0.864-0.874x the time of AVX2's 64 and 8 (see ``vector_floats``).


@dataclass(frozen=True)
class Bands:
    """How a chain holds an (N, C, H, W) activation: per image, in bands of ``rows`` whole
    rows, per band each channel's ``rows * W`` floats in turn, ``stride`` floats apart (at
    least ``rows * W``; the floats between are never read): the tensor (N, H / rows, C,
    ``stride``) whose ``[..., : rows * W]`` holds the values. One band (``rows == H``) is NCHW
    with its planes padded to ``stride`` floats."""

    rows: int
    stride: int

    def floats(self, shape: Sequence[int]) -> int:
        """Floats of an activation of (N, C, H, W) ``shape`` in these bands."""
        n, c, h, _ = shape
        return n * (h // self.rows) * c * self.stride

    def check(self, shape: Sequence[int]) -> None:
        """Raises ValueError where these bands do not fit (N, C, H, W) ``shape``."""
        h, w = shape[2], shape[3]
        if self.rows < 1 or h % self.rows:
            raise ValueError(f"bands of {self.rows} rows must divide the height {h}")
        if self.stride < self.rows * w:
            raise ValueError(
                f"a band's stride of {self.stride} floats must hold its {self.rows} rows of "
                f"{w} floats"
            )


def thread_parts(threads: int | None = None) -> int:
    """The parts ``bands_for`` splits images into for ``threads`` (None: torch's thread count
    now): ``IN_ORDER_PARTS`` where the threads are that many, else 1 (the bands as they were
    before, by the tile alone). One thread ran ResNet-50 ``magnitude:0.9`` in 1.036x the time
    with 28x28 and 14x14 in halves (Zen 4 EPYC VM, in-process A/B: 30.54 against 29.49 ms):
    two bands of 392 floats take more tiles than seven of 112; other counts were not measured."""
    threads = torch.get_num_threads() if threads is None else threads
    return IN_ORDER_PARTS if threads == IN_ORDER_PARTS else 1


def bands_for(
    height: int,
    width: int,
    band: int | None = None,
    align: int | None = None,
    parts: int = IN_ORDER_PARTS,
) -> Bands | None:
    """The bands a chain holds an activation of (height, width) pixels in: the most whole rows
    that fit ``band`` floats (``tiling.tile_floats()`` when None) and divide ``height`` for an
    image of at least ``BAND_MIN_PIXELS`` pixels whose rows fit; else one band. Either way each
    channel's strip is aligned to ``align`` floats (``tiling.vector_floats()`` when None); None
    (plain NCHW) where one band's planes are already. Where those bands would not split
    evenly into ``parts`` (``thread_parts``; 28x28 in bands of 4 rows on AVX-512: 7), the
    bands are ``height / parts`` rows instead, one a thread (``in_order``); so are those of a
    smaller image of at least ``HALVES_MIN_PIXELS`` whose part fits in ``band`` (14x14 on
    AVX-512: two bands of 7 rows, 98 floats)."""
    band = tile_floats() if band is None else band
    align = vector_floats() if align is None else align
    if height * width >= BAND_MIN_PIXELS and width <= band:
        rows = max(r for r in range(1, height + 1) if height % r == 0 and r * width <= band)
        if (height // rows) % parts and height % parts == 0:
            rows = height // parts  # one band a thread (``in_order``)
        return Bands(rows, -(-rows * width // align) * align)
    part = height // parts
    halves = parts > 1 and not height % parts and part * width <= band
    if halves and height * width >= HALVES_MIN_PIXELS:
        return Bands(part, -(-part * width // align) * align)
    if (height * width) % align:
        return Bands(height, -(-height * width // align) * align)
    return None


def in_order(parts: Parts) -> bool:
    """Whether a chain's product over ``parts`` (bands) runs them in order, thread t the t-th
    equal run (``gather_call``'s ``in_order``) rather than claiming tiles or splitting the
    rows: where they are a multiple of ``IN_ORDER_PARTS``. Each thread then reads and writes
    the same rows of every activation from step to step (a 3x3 conv reads the one halo row
    across), where a row split has each thread read all of its input, half of it written by
    the other core, and claims a random half.

    Measured on the Zen 4 EPYC VM, whose host at times places the two vCPUs on different CCDs
    (a cache-line round trip of 330-440 ns against 50-120 ns on one CCX): ResNet-50
    ``magnitude:0.9`` with its 56x56 and 28x28 steps in order (28x28 in two bands of 14 rows,
    not seven of 4), in-process A/B, alternating: 0.885x the time end to end across CCDs
    (20.61 against 23.29 ms), 1.006x on one CCX (16.44 / 16.34 ms). The same for 14x14 (two
    bands of 7 rows) ran 0.911x / 1.058x while its aligned 1x1 convs took a layout copy each;
    reading the bands in place instead (``reads_in_place``), 0.952x / 1.007x on top of the
    rest (``HALVES_MIN_PIXELS``)."""
    return parts.count >= IN_ORDER_PARTS and parts.count % IN_ORDER_PARTS == 0


def to_bands(x: torch.Tensor, bands: Bands) -> torch.Tensor:
    """The NCHW ``x`` in ``bands``, as a contiguous (N, H / rows, C, stride) tensor whose
    padding is zero (for tests and for the inputs of a ``ChainedConv``). Raises ValueError
    where the bands do not fit ``x``."""
    bands.check(x.shape)
    n, c, h, w = x.shape
    out = x.new_zeros(n, h // bands.rows, c, bands.stride)
    out[..., : bands.rows * w] = x.reshape(n, c, h // bands.rows, bands.rows * w).transpose(1, 2)
    return out


def from_bands(
    banded: torch.Tensor, shape: tuple[int, int, int, int], bands: Bands
) -> torch.Tensor:
    """The NCHW tensor of ``shape`` that ``banded`` (any tensor of its floats, in ``bands``)
    holds: the inverse of ``to_bands``. Raises ValueError where the bands do not fit."""
    bands.check(shape)
    n, c, h, w = shape
    held = banded.reshape(n, h // bands.rows, c, bands.stride)[..., : bands.rows * w]
    return held.transpose(1, 2).reshape(n, c, h, w).contiguous()


def banded_product(
    layer: SparseConv2d,
    shape: tuple[int, ...],
    source: Bands | None,
    out: Bands | None,
) -> PackedCall:
    """``layer``'s product on an input of (N, C, H, W) ``shape`` (its plan built) held in
    ``source`` bands (None: NCHW), for an output in ``out`` bands; it adds a residual (laid out
    as its output) where ``adds_residual`` says so. A layer that reads its input in place (a
    1x1 conv, stride 1, no padding) takes bands of the same rows on either side, one band per
    part; one that reads a layout copy reads the copy (which reads the bands: ``COPY_BAND``,
    ``COPY_STRIDE``) and writes one output band per part. Raises ValueError where the bands do
    not fit the sizes."""
    n, _, h, w = shape
    layout, offsets = layer.layout(h, w)
    ksplit = layer.ksplit(h, w)
    kernel: GatherKernel = layer.kernel  # type: ignore[assignment]
    m, ho, wo = layer.out_channels, layout.out_h, layout.out_w
    out_shape = (n, m, ho, wo)
    out_image = m * ho * wo if out is None else out.floats(out_shape) // n
    if source is not None:
        source.check(shape)
    if out is not None:
        out.check(out_shape)
    if reads_in_place(layer, shape, source):  # one size in and out: a band of each per part
        bands = out or source
        if bands is None:
            raise ValueError("an NCHW input and output take the layer's plan")
        if source is not None and out is not None and source.rows != out.rows:
            raise ValueError(f"bands of {source.rows} rows in and {out.rows} rows out")
        band = bands.rows * w
        offsets, source_floats, source_step = _in_place_reads(layer, shape, source, bands.rows)
        parts = Parts(
            count=h // bands.rows,
            source_step=source_step,
            out_step=band if out is None else m * out.stride,
            out_row=ho * wo if out is None else out.stride,
            out_image=out_image,
        )
        return kernel.gather_call(
            offsets, source_floats, n, band, w, w, layer.bias, ksplit, parts, in_order(parts)
        )
    if out is None:
        raise ValueError("a layer reading a layout copy into NCHW takes the layer's plan")
    pitch = wo if out.rows == 1 else layout.pitch  # one row per part: no dropped columns
    parts = Parts(
        count=ho // out.rows,
        source_step=out.rows * layout.pitch,
        out_step=m * out.stride,
        out_row=out.stride,
        out_image=out_image,
    )
    columns = (out.rows - 1) * layout.pitch + wo
    shifts = layer.shift_groups(h, w) > 1
    return kernel.gather_call(
        offsets, layout.floats, n, columns, pitch, wo, layer.bias, ksplit, parts,
        in_order(parts), shift_groups=shifts,
    )  # fmt: skip


def _in_place_reads(
    layer: SparseConv2d, shape: tuple[int, ...], source: Bands | None, rows: int
) -> tuple[torch.Tensor, int, int]:
    """How a layer that reads its input in place reads one of (N, C, H, W) ``shape`` held in
    ``source`` bands (None: NCHW), a part of ``rows`` rows at a time: its entry offsets, the
    floats of an image, and the floats from one part to the next."""
    n, c, h, w = shape
    layout, offsets = layer.layout(h, w)
    if source is None:
        return offsets, layout.floats, rows * w
    source.check(shape)
    return layer.band_offsets(source.stride), source.floats(shape) // n, c * source.stride


def writes_padded(layer: SparseConv2d, shape: tuple[int, ...], target: ConvLayout) -> bool:
    """Whether ``layer`` (on an input of ``shape``) can write its output straight into the
    zero-padded ``target`` layout that a next conv's copy would make of it (``padded_product``):
    the layer reads its input in place (a 1x1 conv, stride 1, no padding) and the target is
    one padded image (stride 1) of its output's size and channels."""
    layout, _ = layer.layout(shape[2], shape[3])
    return (
        layout.in_place
        and target.phases == ((0, 0),)
        and target.stride == (1, 1)
        and (target.channels, target.height, target.width)
        == (layer.out_channels, layout.out_h, layout.out_w)
        and target.padding[0] + target.height <= target.phase_h
        and target.padding[2] + target.width <= target.phase_w
    )


def padded_start(target: ConvLayout) -> int:
    """Floats from the start of a ``target`` image to its first input pixel (past the top and
    left padding): where ``padded_product``'s output address points."""
    return target.padding[0] * target.phase_w + target.padding[2]


def padded_product(
    layer: SparseConv2d, shape: tuple[int, ...], source: Bands | None, target: ConvLayout
) -> PackedCall:
    """``layer``'s product on an input of (N, C, H, W) ``shape`` held in ``source`` bands (None:
    NCHW), writing its output into the zero-padded ``target`` layout (``writes_padded``) whose
    buffer, at ``padded_start(target)`` floats, the caller sets as the output: each output
    row at its place in the padded plane (``Parts.out_pitch``), one band per part. The padding
    is never written (the caller zeroes it once), so the next conv reads the buffer as its
    copy. Raises ValueError where the layer cannot (``writes_padded``)."""
    if not writes_padded(layer, shape, target):
        raise ValueError(f"{layer} cannot write into the padded layout {target}")
    n, _, h, w = shape
    kernel: GatherKernel = layer.kernel  # type: ignore[assignment]
    own = bands_for(h, w)  # an NCHW input: a part per band of the output's size
    rows = source.rows if source is not None else h if own is None else own.rows
    offsets, source_floats, source_step = _in_place_reads(layer, shape, source, rows)
    parts = Parts(
        count=h // rows,
        source_step=source_step,
        out_step=rows * target.phase_w,
        out_row=target.plane,
        out_image=target.floats,
        out_pitch=target.phase_w,
    )
    band = rows * w
    return kernel.gather_call(
        offsets, source_floats, n, band, w, w, layer.bias, layer.ksplit(h, w), parts,
        in_order(parts),
    )  # fmt: skip


def layer_calls(
    layer: SparseConv2d,
    plan: GatherPlan,
    shape: tuple[int, ...],
    source: Bands | None,
    out: Bands | None,
    whole_layout: bool = False,
) -> tuple[PackedCall | None, PackedCall]:
    """Private copies of ``plan``'s calls (``layer``'s, for an input of ``shape``) for an input
    in ``source`` bands and an output in ``out`` bands (None: NCHW): the layout copy (None
    where the layer reads its input in place, or ``copies_as_is``: the product then reads the
    input), reading the bands, and the product (``banded_product`` where a side is banded
    that the plan's cannot take). The copy is into ``row_parts`` where those apply, but with
    ``whole_layout``: the product then reads the plan's whole layout (which a chain's writer
    makes for its stride-1 reader, ``padded_product``)."""
    split = None if whole_layout else row_parts(layer, plan, shape, source, out)
    in_place = reads_in_place(layer, shape, source)
    if split is not None:
        assert out is not None  # (row_parts says so)
        product = _row_part_product(layer, shape, split, out)
        copy: PackedCall | None = split.copy_call(shape[0])
    elif out is None and (source is None or (plan.copy is not None and not in_place)):
        product = plan.product.copy()
    else:
        product = banded_product(layer, shape, source, out)
    if split is None:
        copy = None
        if plan.copy is not None and not in_place and not copies_as_is(layer, shape, source):
            copy = plan.copy.copy()
    if copy is not None:
        copy[COPY_BAND] = 0 if source is None else source.rows
        copy[COPY_STRIDE] = 0 if source is None else source.stride
    return copy, product


def row_parts(
    layer: SparseConv2d,
    plan: GatherPlan,
    shape: tuple[int, ...],
    source: Bands | None,
    out: Bands | None,
) -> RowParts | None:
    """The row parts ``layer_calls`` copies the input of ``layer`` (``plan``'s, on an input of
    ``shape`` in ``source`` bands) into for an output in ``out`` bands, or None (the plan's
    whole layout): where the layer takes a copy (a strided conv: a chain's stride-1 kxk convs
    read the padded images their writers make) and its output is one band a thread
    (``IN_ORDER_PARTS`` bands: 28x28 and 14x14 behind ResNet-50's strided convs). Each thread then
    copies the rows of its part (of an input whose rows it wrote, one step before, in order)
    and reads them back, instead of each copying half of the channels that its product then
    reads in full."""
    if (
        plan.copy is None
        or out is None
        or out.rows * IN_ORDER_PARTS != plan.out_shape[2]
        or reads_in_place(layer, shape, source)
        or copies_as_is(layer, shape, source)
    ):
        return None
    layout, _ = layer.layout(shape[2], shape[3])
    return RowParts.of(layout, IN_ORDER_PARTS)


def copy_floats(
    layer: SparseConv2d,
    plan: GatherPlan,
    shape: tuple[int, ...],
    source: Bands | None,
    out: Bands | None,
) -> int:
    """Floats per image of the copy ``layer_calls`` makes for these bands (where it makes one)."""
    split = row_parts(layer, plan, shape, source, out)
    return plan.source_floats if split is None else split.floats


def _row_part_product(
    layer: SparseConv2d, shape: tuple[int, ...], split: RowParts, out: Bands
) -> PackedCall:
    """``layer``'s product over the row parts of ``split`` (its input of ``shape`` copied into
    them), in order, each part writing one band of ``out``."""
    n, _, h, w = shape
    layout = split.layout
    kernel: GatherKernel = layer.kernel  # type: ignore[assignment]
    plan_shape = (n, layer.out_channels, layout.out_h, layout.out_w)
    parts = Parts(
        count=split.count,
        source_step=split.part_floats,
        out_step=layer.out_channels * out.stride,
        out_row=out.stride,
        out_image=out.floats(plan_shape) // n,
    )
    return kernel.gather_call(
        split.entry_offsets(kernel.col), split.floats, n, split.columns, layout.pitch,
        layout.out_w, layer.bias, layer.ksplit(h, w), parts, in_order=True,
        shift_groups=layer.shift_groups(h, w) > 1,
    )  # fmt: skip


def reads_in_place(layer: SparseConv2d, shape: tuple[int, ...], source: Bands | None) -> bool:
    """Whether ``layer``'s product reads its input of ``shape``, held in ``source`` bands (None:
    NCHW), where it lies, with no layout copy: its layout is read in place (a 1x1 conv, stride
    1, no padding), or it is such a conv whose layout copies into aligned planes
    (``tiling.plane_align``) and the input is in more than one band, whose strips are aligned
    already."""
    layout, _ = layer.layout(shape[2], shape[3])
    if layout.in_place:
        return True
    return (
        source is not None
        and source.rows < shape[2]
        and layer.pointwise
        and layer.stride == (1, 1)
        and layer.groups == 1
        and source.stride % vector_floats() == 0
    )


def copies_as_is(layer: SparseConv2d, shape: tuple[int, ...], source: Bands | None) -> bool:
    """Whether ``layer``'s layout copy of an input of ``shape`` held in ``source`` bands (None:
    NCHW) would write each channel's values where the input holds them already: one phase
    image (stride 1, no padding) with rows as long as the input's, and planes as far apart as
    its channels (one band, its ``stride`` the layout's plane; an aligned 1x1 conv's copy at
    14x14 and 7x7 in ResNet-50's chain, whose bands are planes of 208 and 64 floats). The
    kernel reads no float past a plane's values, so the floats after them may differ.

    Measured in ResNet-50 magnitude:0.9's chain (AVX-512 Xeon): such copies took 10-11 us for
    256 x 14x14 and 38-42 us for 1024 x 14x14 and 2048 x 7x7, nine of them 0.19 ms in all."""
    _, _, h, w = shape
    layout, _ = layer.layout(h, w)
    if (
        layout.phases != ((0, 0),)
        or layout.stride != (1, 1)
        or any(layout.padding)
        or (layout.phase_h, layout.phase_w) != (h, w)
    ):
        return False
    if source is None:
        return layout.plane == h * w
    return source.rows == h and source.stride == layout.plane


def adds_residual(layer: SparseConv2d, shape: tuple[int, ...], out: Bands) -> bool:
    """Whether ``layer``'s ``banded_product`` on an input of ``shape`` can add a residual to an
    output in ``out`` bands: its rows are contiguous (a 1x1 conv read in place, one row per
    band, or a copy whose rows have no dropped columns)."""
    layout, _ = layer.layout(shape[2], shape[3])
    return layout.in_place or out.rows == 1 or layout.pitch == layout.out_w


class ChainedConv(nn.Module):
    """``layer`` as a ``NativeChain`` runs it on ``x``, to be timed (``tune.keep_faster``):
    its input and its output in the bands ``bands_for`` gives their sizes (NCHW where it gives
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
        parts = thread_parts()
        source_bands = bands_for(x.shape[2], x.shape[3], parts=parts)
        out_bands = bands_for(plan.out_shape[2], plan.out_shape[3], parts=parts)
        if out_bands is not None and residual is not None:
            out_bands = out_bands if adds_residual(layer, x.shape, out_bands) else None
        self.copy, self.product = layer_calls(layer, plan, x.shape, source_bands, out_bands)
        self.out_shape, self.out_bands = plan.out_shape, out_bands
        source = x.contiguous() if source_bands is None else to_bands(x, source_bands)
        self.buffers_ = [source]  # what the calls' addresses point into
        if self.copy is not None:
            floats = copy_floats(layer, plan, x.shape, source_bands, out_bands)
            scratch = x.new_empty(x.shape[0], floats)
            self.copy[COPY_SOURCE], self.copy[COPY_OUT] = source.data_ptr(), scratch.data_ptr()
            self.buffers_.append(scratch)
            source = scratch
        self.out = (
            x.new_empty(plan.out_shape)
            if out_bands is None
            else x.new_zeros(out_bands.floats(plan.out_shape))
        )
        if residual is not None:
            residual = residual.contiguous() if out_bands is None else to_bands(residual, out_bands)
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
        if self.out_bands is None:
            return self.out
        return from_bands(self.out, self.out_shape, self.out_bands)

"""How a sparse conv's direct form lays out its work: aligned input planes and rows, column
blocks, and the parts a standalone strided conv's product runs in.

``SparseConv2d`` asks ``plane_align`` what a copy of its input rounds its planes up to (a
much-reused 1x1 input copied into cache-line aligned planes where ``aligned_copy_pays``, with
``ALIGN_MIN_REUSE``), ``aligned_rows`` what a strided kxk conv's phase rows round up to,
``column_block`` how many input channels one column block of the kernels should take, and
``output_halves`` whether a strided conv's product runs in halves of its output rows. The
constants carry the measurements they were chosen by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchlib.sparse.build import NativeLibrary, load_library
from benchlib.sparse.direct import ALIGN
from benchlib.sparse.operands import MAX_SHIFT_GROUPS, SHIFT_GROUP_ISAS, Parts

if TYPE_CHECKING:
    from benchlib.sparse.direct import ConvLayout
    from benchlib.sparse.modules import MatrixKernel


ALIGN_MIN_REUSE = 128
"""A 1x1 conv whose kernel reads each input value at least this often (stored weights per
input channel) copies its input into 64-byte aligned planes first, with the AVX-512 kernels
(``ALIGN_ISAS``): the copy costs more than the aligned loads save until the reuse is high.
No AVX-512 machine was at hand to tune it; 128 is where the copy came closest to paying on
AVX2 (512 -> 2048 @7x7, reuse about 200)."""
ALIGN_ISAS = frozenset({"avx512"})
"""The kernels' instruction sets that take the aligned copy: those whose vector is a cache line.
With AVX2's 32-byte vectors it measured slower everywhere (AVX2 EPYC, 2 threads, in-process
A/B, aligned / in place): 512 -> 2048 @7x7 at density 0.1 (reuse 206) 1.13x the time, 0.05
1.26x; 2048 -> 512 @7x7 at 0.29 1.08x, 0.1 2.20x; 256 -> 1024 @14x14 at 0.13 1.32x, 0.2
1.23x; 1024 -> 256 @14x14 at 0.45 1.43x; 128 -> 512 @28x28 at 0.3 1.03x; 64 -> 256 @56x56
at 0.6 1.04x."""


ALIGNED_ROWS_ISAS = frozenset({"avx512"})
"""The kernels' instruction sets whose strided kxk convs read phase images with vector-aligned
rows (``ConvLayout.of``'s ``row_align``): those whose vector is a cache line, so that every
unaligned load straddles two (a tile's loop of 8 loads and 8 FMAs per entry over an
L1-resident strip ran 63-65 GMAC/s a core aligned and 37-38 unaligned, on the AVX-512 Xeon).
Rows a multiple of 16 floats align six of a 3x3/2 conv's nine taps (those that read no
column to the right of their phase's). Measured there (2 threads, the two layouts in turn,
12 x 40 calls each, alternating which goes first; at density 0.1 where not said): 3x3/2
128 -> 128 @56x56 (rows of 29 floats -> 32) 0.959x the time, at 0.3 0.936x; 256 -> 256
@28x28 (15 -> 16) 0.944x; but 512 -> 512 @14x14 (8 -> 16) 1.400x (in an earlier, shorter
run), hence ``ALIGNED_ROWS_MAX_WIDENING``. The stride-1 3x3 convs, with three taps of nine
aligned, ran 1.00-1.05x: not done. Identical layouts read 0.986-1.008x in the same runs."""
ALIGNED_ROWS_MAX_WIDENING = 1.125
"""A strided conv's phase rows are aligned only where that widens them by at most this
factor (29 -> 32 floats: 1.10; 8 -> 16: 2)."""


def _loaded_isa() -> str | None:
    """The instruction set the native kernels were built for; None where they are not."""
    loaded = load_library()
    return loaded.isa if isinstance(loaded, NativeLibrary) else None


def aligned_rows_pay() -> bool:
    """True where the native kernels are built for an instruction set in
    ``ALIGNED_ROWS_ISAS``."""
    return _loaded_isa() in ALIGNED_ROWS_ISAS


def aligned_copy_pays() -> bool:
    """True where the native kernels are built for an instruction set in ``ALIGN_ISAS``."""
    return _loaded_isa() in ALIGN_ISAS


def plane_align(
    kernel_size: tuple[int, int], stride: tuple[int, int], pointwise: bool, reuse: float
) -> int:
    """The floats a copy of a conv's input rounds its planes up to: ``ALIGN`` for a 1x1 conv
    whose kernel reads each input value at least ``ALIGN_MIN_REUSE`` times (``reuse``) where
    aligned copies pay (``aligned_copy_pays``), else a vector of the loaded kernels
    (``vector_floats``) for a 1x1 conv whose input is copied anyway (strided or padded: not
    ``pointwise``), else 1 (a kxk conv, or a 1x1 conv read in place)."""
    if kernel_size != (1, 1):
        return 1
    if reuse >= ALIGN_MIN_REUSE and aligned_copy_pays():
        return ALIGN
    return 1 if pointwise and stride == (1, 1) else vector_floats()


KSPLIT_MIN_ENTRIES = 12
"""Stored entries per block row and column block, at least, when splitting a conv's input
channels into blocks (``NativeSparseMatrix.gather``'s ``ksplit``): each block costs a row a
load and a store of its partial sums, so a block narrower than ``STRIP_FLOATS`` asks grows
until its rows hold this many. Measured in ResNet-50 magnitude:0.9's chain (AVX2 EPYC, 2
threads, per step, in-process A/B): at 14x14, 256 -> 1024 (density 0.13) and 3x3 256 -> 256
(0.024) ran 0.90-0.97x the time with blocks of about 12-17 entries against 24-33 (blocks of 6-8
entries: 1.05-1.13x); 3x3/2 128 -> 128 @56x56 at 90% sparsity took 334 us in blocks of 16
channels (14 entries) against 375 in blocks of 32. Earlier measurements of the split against
one block (us): 1x1 256 -> 128 @56x56 at 50% 840 -> 393, 1024 -> 256 @14x14 at 50% 399 ->
228, 2048 -> 512 @7x7 at 50% 396 -> 306, 3x3 128 -> 128 @28x28 at 90% 184 -> 150; but 3x3 512
-> 512 @7x7 (61 columns, one tile) at 50% 831 -> 875 (see ``L2_FLOATS``)."""
KSPLIT_MIN_DENSITY_1X1 = 0.075
"""Below this fraction of stored entries a 1x1 conv runs in one block: at 95% sparsity the
split measured no faster, or slower (2048 -> 512 @7x7, blocks of 512: 68 -> 71 us)."""
STRIP_FLOATS = 4096
"""The input a column tile reads per column block (``strip_floats`` per channel), at most,
before ``KSPLIT_MIN_ENTRIES`` widens the block: 16 KiB, half of the Zen 3 EPYC's L1d (the other
half holds the weights' stream, the partial sums and the output). Measured against the rule
before it (strips estimated as ``kh`` rows of 128 columns for every ISA, within 32 KiB, blocks
of at least 24 entries; AVX2 EPYC, 2 threads, in-process A/B in ResNet-50 magnitude:0.9's
chain): 3x3 256 -> 256 @14x14 0.89-0.96x the time per step, strided 1x1 256 -> 512 @56x56
0.75x, 512 -> 1024 @28x28 0.86x, 1024 -> 512 @14x14 0.89x, 128 -> 512 @28x28 0.93-1.05x; end
to end 0.970x (the steps' sum 0.977x). The budget of the ISAs not in ``STRIP_FLOATS_BY_ISA``
(``strip_budget``)."""
STRIP_FLOATS_BY_ISA = {"avx512": 8192}
"""``STRIP_FLOATS`` for the kernels built for these ISAs. AVX-512: 32 KiB, two thirds of the
AVX-512 Xeon's 48 KiB L1d. Measured there, ResNet-50 magnitude:0.9 end to end with its stride-1
3x3 convs in shift groups (in-process A/B on one converted model, 20 rounds of 6 calls each;
against 4096 floats): 8192 floats 0.952x the time, 12288 0.945x, 16384 0.990x, 32768 1.156x,
one block everywhere 1.197x; 12288 against 8192 0.979x and 1.000x; 4096 against itself 1.004x.
Blocks of at least 24 entries (``KSPLIT_MIN_ENTRIES``) instead of 12 read 0.958x against 4096
floats, but 0.997x (18) with 8192."""


def strip_budget() -> int:
    """The strip budget of the loaded kernels' ISA (``STRIP_FLOATS_BY_ISA``, else
    ``STRIP_FLOATS``)."""
    return STRIP_FLOATS_BY_ISA.get(_loaded_isa() or "", STRIP_FLOATS)


TILE_VECTORS = 8
"""Vectors per column tile of the R = 1 kernels (``BENCHLIB_NV1`` in ``csrc/spmm.cpp``)."""
VECTOR_FLOATS = {"avx512": 16, "avx2": 8, "generic": 8}
"""Floats per vector of each instruction set the kernels build for (``V::W``)."""


def vector_floats() -> int:
    """Floats per vector of the loaded kernels (AVX2's where none are loaded): what the
    activations a chain holds (``bands.py``) and a 1x1 conv's copied input
    (``SparseConv2d.layout``) align each channel's strip to, so that no vector load of it
    straddles a cache line.

    Measured for the copies of the strided 1x1 convs (2 threads, in-process A/B of one layer,
    planes of 196 / 49 floats against 200 / 56; AVX2 EPYC): 512 -> 1024 @28x28 at density
    0.13 0.93x the time, 0.3 0.87x; 1024 -> 2048 @14x14 at 0.033 0.95-0.97x, 0.2 0.89-0.90x.
    The 3x3 convs, whose taps read at every column offset anyway, ran 0.97-1.04x with their
    planes rounded up: not done. On the AVX-512 Xeon (Intel, 2 vCPUs), a vector is a whole
    cache line, so every load of a strip not 64-byte aligned straddles two: ResNet-50
    magnitude:0.9 end to end with the chain's strips aligned to 16 floats instead of 8 ran
    0.985x the time; with the bands a tile wide as well (``tile_floats``) 0.864x, and 0.874x
    with the strided 1x1 convs' copies aligned to 16 too (in-process A/B on one converted
    model, 20 rounds of 8 calls each)."""
    return VECTOR_FLOATS.get(_loaded_isa() or "avx2", 8)


def tile_floats() -> int:
    """The columns of one tile of the loaded kernels (AVX2's where none are loaded)."""
    return TILE_VECTORS * vector_floats()


def strip_floats(layout: ConvLayout, tile: int) -> int:
    """Floats of one input channel that one column tile of ``tile`` columns reads: per phase
    image of the source, the tile's columns and the rows below them that its taps reach (a
    kxk conv's ``kh - 1`` padded rows, fewer in a strided conv's phase rows)."""
    reach = layout.dilation[0] * (layout.kernel_size[0] - 1)
    rows_below = -(-(reach + 1) // layout.stride[0]) - 1
    return len(layout.phases) * (min(layout.columns, tile) + rows_below * layout.pitch)


L2_FLOATS = 65536
"""A kxk conv over one narrow tile (under 128 columns) runs in one block while its whole
source (one image) fits in this many floats, 256 KiB, half of Zen 3's L2, where the kernels
are built for an ISA of ``L2_ONE_BLOCK_ISAS``: then the blocks' partial sums cost more than
they save (3x3 512 -> 512 @7x7, 166 KiB, at 50%: above). Above it they pay: 3x3/2 512 -> 512
@14x14, whose four phase images take 512 KiB, ran 0.73-0.85x the time of one block with
blocks of 32 channels at 70-90% sparsity (AVX2 EPYC, 2 threads)."""
L2_ONE_BLOCK_ISAS = frozenset({"avx2", "generic"})
"""The kernels' instruction sets whose narrow kxk convs keep one block while their source fits
in ``L2_FLOATS``. Not AVX-512: on the AVX-512 Xeon (2 vCPUs, 48 KiB L1d) blocks of 32 channels
ran 3x3 512 -> 512 @7x7 in 0.81x the time of one block at 50% sparsity, 0.75x at 70%, 0.68x at
80%, 0.66x at 90% (424 -> 278 us), 0.72x at 95% and 0.98x at 99% (2 threads, the two plans in
turn, 8 x 30 calls each, alternating which goes first)."""


def column_block(
    kernel: MatrixKernel, layout: ConvLayout, tile: int | None = None, groups: int = 1
) -> int | None:
    """The matrix columns per block (whole input channels) for a conv's direct form over
    ``layout`` with column tiles of ``tile`` floats (``tile_floats()`` when None), or None where
    one block is best: the channels' strips fit ``strip_budget()`` already, one block would span
    every channel, a 1x1 conv is sparser than ``KSPLIT_MIN_DENSITY_1X1``, or a kxk conv has one
    narrow tile and a source (one image) that fits in L2 (``L2_FLOATS``, with the kernels of
    an ISA in ``L2_ONE_BLOCK_ISAS``). Else the widest power
    of two channels whose strips fit that budget, doubled while its rows hold fewer than
    ``KSPLIT_MIN_ENTRIES`` entries on average per shift group (``groups``: see
    ``shift_groups``)."""
    rows, cols = kernel.shape
    block_rows = rows // max(1, int(getattr(kernel, "rows_per_block", 1)))
    col = getattr(kernel, "col", None)
    kh, kw = layout.kernel_size
    taps, columns = kh * kw, layout.columns
    if col is None or not block_rows or not cols or not columns or cols % taps:
        return None
    channels = cols // taps
    one_narrow_tile = taps > 1 and columns < 128
    if one_narrow_tile and layout.floats <= L2_FLOATS and _loaded_isa() in L2_ONE_BLOCK_ISAS:
        return None
    strip = strip_floats(layout, tile_floats() if tile is None else tile)
    budget = strip_budget()
    if channels * strip <= budget:
        return None
    density = int(col.numel()) / (block_rows * cols)
    if taps == 1 and density < KSPLIT_MIN_DENSITY_1X1:
        return None
    width = max(1, 1 << max(0, (budget // strip).bit_length() - 1))  # channels
    while width * taps * density < KSPLIT_MIN_ENTRIES * groups and width < channels:
        width *= 2
    return None if width >= channels else width * taps


def aligned_rows(
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    width: int,
    dilation: tuple[int, int] = (1, 1),
) -> int:
    """The floats a kxk conv's phase rows round up to (``ConvLayout.of``'s ``row_align``) for
    an input ``width`` pixels wide: a vector of the loaded kernels on an ISA of
    ``ALIGNED_ROWS_ISAS`` where that widens them by at most ``ALIGNED_ROWS_MAX_WIDENING``, for
    a strided conv or one that runs in ``shift_groups``; else 1 (a 1x1 conv, a stride-1 conv
    without shift groups, another ISA, a wider rounding)."""
    if kernel_size == (1, 1) or not aligned_rows_pay():
        return 1
    if stride == (1, 1) and shift_groups(kernel_size, stride, dilation) == 1:
        return 1
    phase_w = -(-(width + padding[2] + padding[3]) // stride[1])
    vector = vector_floats()
    return vector if -(-phase_w // vector) * vector <= phase_w * ALIGNED_ROWS_MAX_WIDENING else 1


def shift_groups(
    kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> int:
    """The shift groups a conv's product runs its entries in, its rows vector-aligned
    (``aligned_rows``): its kernel's width for a stride-1 kxk conv of column dilation 1 and a
    width of at most ``native.MAX_SHIFT_GROUPS`` where the kernels are built for an ISA of
    ``native.SHIFT_GROUP_ISAS``; else 1 (none).

    With the rows aligned, a tap in column dx of the kernel reads each tile's columns at an
    offset dx floats past a vector boundary, so that its loads straddle two cache lines; in
    shift groups every load is aligned, each group's sums over one vector more are shifted
    into place once per tile and group, and a column block holds ``KSPLIT_MIN_ENTRIES`` per
    group (``column_block``'s ``groups``). Measured on the AVX-512 Xeon (2 threads, each
    layer standalone with and without, 10 x 30 calls each, alternating which goes first) at
    90% sparsity: 3x3 64 -> 64 @56x56 (rows of 58 floats -> 64) 0.834x the time, 128 -> 128
    @28x28 (30 -> 32) 0.825x, 256 -> 256 @14x14 (16 already) 0.913x; at 75% 64 -> 64 0.889x,
    at 70% 128 -> 128 0.846x, at 50% 64 -> 64 0.861x. The strided 3x3 convs, whose aligned
    phase rows leave three taps of nine shifted, ran 1.05-1.09x: not done."""
    if (
        kernel_size == (1, 1)
        or stride != (1, 1)
        or dilation[1] != 1
        or kernel_size[1] > MAX_SHIFT_GROUPS
        or _loaded_isa() not in SHIFT_GROUP_ISAS
    ):
        return 1
    return kernel_size[1]


IN_ORDER_PARTS = 2
"""Parts of whole output rows a standalone strided kxk conv's product runs in, one per thread
in order (``output_halves``): the two vCPUs of the machines measured."""
IN_ORDER_MIN_ROWS = 4
"""Output rows per part, at least (smaller outputs run as one part)."""


def output_halves(
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    layout: ConvLayout,
    out_channels: int,
    alone: bool = False,
) -> Parts | None:
    """Where a standalone strided kxk conv's product (over ``layout``, ``out_channels``
    outputs, NCHW) runs in ``IN_ORDER_PARTS`` parts of whole output rows, one per thread in
    order (``gather_call``'s ``in_order``), the parts; else None (a 1x1 or stride-1 conv, an
    input read in place, an output of too few or an uneven number of rows).

    Its input's layout copy runs just before, each thread writing half the channels; a
    product that splits the block rows then has each thread read all of the copy, half of it
    from the other core's cache, and one that claims tiles reads a random half. In order, a
    thread reads about its half of the source's rows. Measured (AVX-512 Xeon, 2 threads):
    ``benchmarks/sparse_kernels.py``'s 3x3/2 128 -> 128 @56x56 at 90% took 0.34-0.39 ms in six
    runs against 0.40-0.42 ms in five before. Two such layers in one process, called in turn
    (12 x 30 calls each, alternating which goes first): 0.851-0.908x the time of the block
    rows split in four runs (at density 0.3 0.906-0.928x; 64 -> 64 @56x56 0.789x; 256 -> 256
    @28x28 0.993x), but 0.996-1.023x in six runs minutes later with the same plans, where the
    row split itself ran faster (357-378 us against 398-425). The stride-1 3x3 convs (their
    products claim tiles) ran 0.98-1.01x: not done. A copy whose threads split each image's
    rows instead (to match the halves) took 90 us against 51 and ran the layer slower; the
    same order for the strided convs inside a chain (7 parts, so 3 and 4 a thread) ran no
    faster.

    ``alone``: the parts for a conv run by itself on a source in row parts (``RowParts``:
    each thread copies and then reads only its own part), stride-1 kxk convs included. On
    the Zen 4 VM, where the host at times places the two vCPUs on different CCDs, a copy
    handed over by channels made 3x3 64 -> 64 @56 and 128 -> 128 @28 at 90% take 1.8-2.1x
    their time in that placement (0.53 against 0.30 ms). A strided conv with an odd number
    of output rows runs alone as two parts that share the middle row, both threads computing
    it: 3x3/2 512 -> 512 @14 at 90% took 400 us against 884 across CCDs, 397 against 406 on
    one CCX (in-process A/B, alternating). Not a stride-1 one: 3x3 512 -> 512 @7 at 90% took
    617 / 483 us against 435 / 319 in parts of 4 rows, each thread all the weights."""
    parts = IN_ORDER_PARTS
    rows = -(-layout.out_h // parts)
    if (
        kernel_size == (1, 1)
        or (stride == (1, 1) and not alone)
        or layout.in_place
        or (layout.out_h % parts and not (alone and parts == 2 and stride != (1, 1)))
        or rows < IN_ORDER_MIN_ROWS
    ):
        return None
    step = rows if layout.out_h % parts == 0 else layout.out_h - rows  # odd: parts overlap
    plane = layout.out_h * layout.out_w
    return Parts(
        count=parts,
        source_step=step * layout.pitch,
        out_step=step * layout.out_w,
        out_row=plane,
        out_image=out_channels * plane,
    )

"""How a sparse conv's direct form lays out its work: aligned input planes and column blocks.

``SparseConv2d`` asks ``aligned_copy_pays`` (with ``ALIGN_MIN_REUSE``) whether a much-reused 1x1
input is worth copying into cache-line aligned planes, and ``column_block`` how many input
channels one column block of the kernels should take. The constants carry the measurements
they were chosen by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchlib.sparse.build import NativeLibrary, load_library

if TYPE_CHECKING:
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


COPY_ALIGN_1X1 = 8
"""A 1x1 conv whose input is copied anyway (strided: the subsampled phase; or padded) rounds
the copy's planes up to this many floats (32 bytes, an AVX2 vector), so that the kernels'
vector loads of a channel's strip never straddle a cache line; the copy writes no more.
Measured (AVX2 EPYC, 2 threads, in-process A/B of one layer, planes of 196 / 49 floats
against 200 / 56): ResNet-50's strided 1x1 convs 512 -> 1024 @28x28 at density 0.13 0.93x
the time, 0.3 0.87x; 1024 -> 2048 @14x14 at 0.033 0.95-0.97x, 0.2 0.89-0.90x (256 -> 512
@56x56 reads planes of 784 floats, aligned already). Its 3x3 convs, whose taps read at
every column offset anyway, ran 0.97-1.04x with their planes rounded up: not done."""


def aligned_copy_pays() -> bool:
    """True where the native kernels are built for an instruction set in ``ALIGN_ISAS``."""
    loaded = load_library()
    return isinstance(loaded, NativeLibrary) and loaded.isa in ALIGN_ISAS


KSPLIT_MIN_ENTRIES = 24
"""Stored entries per block row and column block that make splitting a conv's input channels
into blocks (``NativeSparseMatrix.gather``'s ``ksplit``) pay: each block costs a row a load and
a store of its partial sums. Measured, 2 threads (one block -> split, us): 1x1 256 -> 128
@56x56 at 50% 840 -> 393 (blocks of 64 channels), at 90% 125 -> 117 (128); 1x1 1024 -> 256
@14x14 at 50% 399 -> 228 (64), at 90% 90 -> 83 (256); 1x1 2048 -> 512 @7x7 at 50% 396 -> 306
(128), at 90% 112 -> 107 (256), with blocks of 64 at 90% (about 13 entries): 129; 3x3 128 ->
128 @28x28 at 90% 184 -> 150 (32), 3x3/2 128 -> 128 @56x56 at 50% 880 -> 703 (16); but 3x3
512 -> 512 @7x7 (61 columns, one tile) at 50% 831 -> 875 (32)."""
KSPLIT_MIN_ENTRIES_STRIDED = 12
"""``KSPLIT_MIN_ENTRIES`` for a strided kxk conv, whose taps read twice the rows of a tile from
its phase images: 3x3/2 128 -> 128 @56x56 at 90%, 2 threads, blocks of 16 channels 334 us
against 375 with 32 (which 24 entries asks); 256 -> 256 @28x28 343 / 337, 512 -> 512 @14x14
keeps 32 (L1 bound)."""
KSPLIT_MIN_DENSITY_1X1 = 0.075
"""Below this fraction of stored entries a 1x1 conv runs in one block: at 95% sparsity the
split measured no faster, or slower (2048 -> 512 @7x7, blocks of 512: 68 -> 71 us)."""
L1_FLOATS = 8192
"""The strip of the input that a column tile reads per channel block, at most: 32 KiB. On the
Zen 3 EPYC (32 KiB L1d) half of it (4096) ran ResNet-50 magnitude:0.9 end to end in the same
time (1.00x, in-process A/B), as did ``KSPLIT_MIN_ENTRIES`` 20 (32: 1.015x the time)."""
L2_FLOATS = 65536
"""A kxk conv over one narrow tile (under 128 columns) runs in one block while its whole
source (one image) fits in this many floats, 256 KiB, half of Zen 3's L2: then the blocks'
partial sums cost more than they save (3x3 512 -> 512 @7x7, 166 KiB, at 50%: above). Above
it they pay: 3x3/2 512 -> 512 @14x14, whose four phase images take 512 KiB, ran 0.73-0.85x
the time of one block with blocks of 32 channels at 70-90% sparsity (AVX2 EPYC, 2 threads)."""


def column_block(
    kernel: MatrixKernel,
    columns: int,
    kernel_size: tuple[int, int],
    source_floats: int | None = None,
    strided: bool = False,
) -> int | None:
    """The matrix columns per block (whole input channels) for a conv's direct form over
    ``columns`` computed columns (``KSPLIT_MIN_ENTRIES``, ``KSPLIT_MIN_ENTRIES_STRIDED`` for a
    ``strided`` kxk conv), or None where one block is best: the
    input strip of a tile fits in L1 already, one block would span every channel, or a kxk
    conv has one narrow tile and a ``source_floats`` (one image's source) that fits in L2
    (``L2_FLOATS``; unknown counts as fitting). A channel's strip is ``kh`` input rows of a
    tile (the ``kw`` taps of a row share its lines)."""
    rows, cols = kernel.shape
    block_rows = rows // max(1, int(getattr(kernel, "rows_per_block", 1)))
    col = getattr(kernel, "col", None)
    taps = kernel_size[0] * kernel_size[1]
    if col is None or not block_rows or not cols or not columns or cols % taps:
        return None
    channels = cols // taps
    small = source_floats is None or source_floats <= L2_FLOATS
    if taps > 1 and columns < 128 and small:  # one narrow tile, its source in L2: no gain
        return None
    strip = min(-(-columns // 16) * 16, 128) * kernel_size[0]  # floats per channel and tile
    if channels * strip <= L1_FLOATS:
        return None
    density = int(col.numel()) / (block_rows * cols)
    if taps == 1 and density < KSPLIT_MIN_DENSITY_1X1:
        return None
    width = max(1, 1 << max(0, (L1_FLOATS // strip).bit_length() - 1))  # channels
    minimum = KSPLIT_MIN_ENTRIES_STRIDED if strided and taps > 1 else KSPLIT_MIN_ENTRIES
    while width * taps * density < minimum and width < channels:
        width *= 2
    return None if width >= channels else width * taps

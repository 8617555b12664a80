"""The operands of the native gather form besides the matrix (``native.NativeSparseMatrix``):
the parts an image's columns come in (``Parts``), the column blocks of a matrix
(``ColumnBlocks``), and its entries by shift (``ShiftGroups``, with the instruction sets that
run them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHIFT_GROUP_ISAS = frozenset({"avx512"})
"""The kernels' instruction sets with the shift-group tiles (``spmm.cpp``'s tile_shifted):
those whose vector is a cache line (``tiling.shift_groups`` says where they run)."""
SHIFT_VECTOR = 16
"""Floats per vector of those ISAs: an entry's shift is its offset modulo this."""
MAX_SHIFT_GROUPS = 4
"""Shift groups the kernels take per segment, at most (shifts 0-3)."""


@dataclass(frozen=True, eq=False)
class ShiftGroups:
    """A conv's entries sorted by shift (offset modulo ``SHIFT_VECTOR``) within each segment
    (a block row's entries on one column block), for ``gather_call``'s ``shift_groups``: the
    kernels then load every entry's columns from the aligned address below it and shift the
    sums once per tile and group (``spmm.cpp``'s tile_shifted)."""

    shifts: int
    bounds: torch.Tensor
    """int32 (segments, shifts + 1): segment s's entries of shift g are ``[bounds[s, g],
    bounds[s, g + 1])``."""
    offsets: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class Parts:
    """Each image's columns as ``count`` parts (``gather_call``'s ``parts``; see spmm.cpp):
    part t of image b is read at ``source + b * source_floats + t * source_step`` and written
    at ``out + b * out_image + t * out_step``, its rows ``out_row`` floats apart; a residual
    is laid out as the output. Where ``bands.py`` stores activations in bands of rows, a part
    is one band. Within a row, the output's rows of pixels lie ``out_pitch`` floats apart (0:
    the row length, packed; more: the padded layout a next conv reads, no residual then)."""

    count: int
    source_step: int
    out_step: int
    out_row: int
    out_image: int
    out_pitch: int = 0


@dataclass(frozen=True, eq=False)
class ColumnBlocks:
    """A matrix's columns in blocks of ``width`` (``NativeSparseMatrix.k_split``), for the
    gather form's ``ksplit``: the kernels then run the blocks outer over each column tile and
    read the entries block-major (by block, then block row), so that the weights stream in
    the order the loops use them."""

    width: int
    bounds: torch.Tensor
    """int32 (blocks, block rows + 1): block row i's entries on block b are the block-major
    entries ``[bounds[b, i], bounds[b, i + 1])``."""
    order: torch.Tensor
    """int32 (entries,): the row-major index of each block-major entry (``values[order]``,
    ``offsets[order]`` are what the kernels read)."""

    @property
    def blocks(self) -> int:
        return int(self.bounds.shape[0])

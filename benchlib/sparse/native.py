"""``NativeSparseMatrix``: a weight matrix for benchlib's own CPU kernels (``csrc/spmm.cpp``).

Storage: block rows of ``rows_per_block`` (R) consecutive output rows sharing one column index
per stored block: R = 1 is CSR (only nonzeros stored), R = 2 / 4 / 8 the Rx1 block formats
(a block is stored when any of its R values is nonzero). Indices int32, values fp32.

Besides ``MatrixKernel``'s ``W @ X`` the kernel offers the two forms the layer modules use
(``GatherKernel``): ``gather`` reads the dense operand through one offset per stored entry, so a
conv reads its (padded) input directly, without im2col; ``linear`` multiplies a linear layer's
row-major input as it is (the rows kernel: a sparse dot product per row and input, for a batch
of at most ``ROWS_MAX_BATCH``) or its transpose (the gather form, for larger batches). Both run
on torch's OpenMP threads (``torch.get_num_threads()``).
Inputs other than fp32 (a module moved to float64) take PyTorch's COO product instead: correct,
not fast.

Layout, measured: NCHW, vectorized over the pixels of a channel (XNNPACK's and DeepSparse's
scheme), against NHWC, where each output pixel is a sparse dot product over the channels of its
input pixel (the rows kernel over H*W "rows"): 1x1 convs at 90% sparsity, 2 threads, batch 1,
256 -> 64 @56x56: NCHW 153 us, NHWC 1575 us; 128 -> 512 @28x28: 68 / 1242 us; 1024 -> 256
@14x14: 104 / 988 us. NHWC cannot put a weight in a register for 16 outputs at once, so NCHW.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from benchlib.sparse.build import NativeLibrary, NativeUnavailable, PackedCall, load_library
from benchlib.sparse.operands import (
    MAX_SHIFT_GROUPS,
    SHIFT_GROUP_ISAS,
    SHIFT_VECTOR,
    ColumnBlocks,
    Parts,
    ShiftGroups,
)

ROWS_PER_BLOCK = (1, 2, 4, 8)
"""Block heights the kernels are compiled for."""
ROWS_MAX_BATCH = 2
"""A linear layer with at most this many input rows runs the rows kernel, more the gather form.
Measured, 2048 -> 1000 at 90% sparsity, 2 threads (rows / gather / dense ``F.linear`` us):
batch 1: 51 / 82 / 164, 2: 88 / 105 / 331, 3: 128 / 111 / 490, 8: 383 / 129 / 748; at 70%
batch 2 is even (216 / 205), batch 3 not (318 / 219)."""


# The arguments of a ``gather_call`` set per call: indices into ``benchlib_spmm_gather``'s.
GATHER_SOURCE = 6
GATHER_OUT = 12
GATHER_RELU = 15
GATHER_RESIDUAL = 16
GATHER_THREADS = 19
GATHER_PARTS, GATHER_IN_ORDER, GATHER_SHIFTS = 20, 24, 26
"""Arguments of a ``gather_call`` fixed when it is built: the parts per image, whether the
threads take the column tiles in order, and the shift groups (0: none)."""
_ROWS_X, _ROWS_BIAS, _ROWS_Y, _ROWS_RELU, _ROWS_THREADS = 6, 3, 9, 11, 12


def library() -> NativeLibrary:
    """The loaded kernels. Raises RuntimeError (with the build's reason) when unavailable."""
    loaded = load_library()
    if isinstance(loaded, NativeUnavailable):
        raise RuntimeError(f"benchlib's native sparse kernels are unavailable: {loaded.reason}")
    return loaded


class NativeSparseMatrix(nn.Module):
    """A fixed sparse (M, K) fp32 matrix for the native kernels; see the module docstring.

    Raises ValueError for a matrix that is not 2-D, a block height not in ``ROWS_PER_BLOCK``
    or not dividing M, and RuntimeError when the native kernels cannot be built here.
    """

    rowptr: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor

    def __init__(self, matrix: torch.Tensor, rows_per_block: int = 1) -> None:
        super().__init__()
        if matrix.dim() != 2:
            raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(matrix.shape)}")
        rows, cols = int(matrix.shape[0]), int(matrix.shape[1])
        if rows_per_block not in ROWS_PER_BLOCK or rows % rows_per_block:
            raise ValueError(
                f"block height {rows_per_block} must be one of {ROWS_PER_BLOCK} and divide the "
                f"{rows} rows"
            )
        self.isa = library().isa
        self.shape = (rows, cols)
        self.rows_per_block = rows_per_block
        self.name = "native-csr" if rows_per_block == 1 else f"native-bsr-{rows_per_block}x1"
        self.format = "csr" if rows_per_block == 1 else "bsr"
        blocks = matrix.detach().float().reshape(rows // rows_per_block, rows_per_block, cols)
        kept = (blocks != 0).any(dim=1)  # (block rows, cols)
        counts = kept.sum(dim=1)
        rowptr = torch.zeros(rows // rows_per_block + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(counts, 0)
        block_row, col = kept.nonzero(as_tuple=True)  # row-major order: sorted by block row
        self.register_buffer("rowptr", rowptr.to(torch.int32))
        self.register_buffer("col", col.to(torch.int32).contiguous())
        self.register_buffer("values", blocks[block_row, :, col].contiguous())  # (entries, R)
        self._batch_offsets: dict[int, torch.Tensor] = {}
        self._k_splits: dict[int, ColumnBlocks] = {}
        # per column block width: the values it was made of (the tensor and its version, -1
        # for an inference tensor, which has none) and their block-major copy, which every
        # gather call with that ksplit shares
        self._block_values: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._row_calls: dict[int, PackedCall] = {}  # per batch size
        self._row_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """For copy and pickle: without the packed calls (addresses) and their lock."""
        state = self.__dict__.copy()
        state["_row_calls"], state["_row_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._row_lock = threading.Lock()
        self.__dict__.setdefault("_block_values", {})

    @property
    def entries(self) -> int:
        """Stored entries (nonzeros for CSR, blocks for BSR)."""
        return int(self.col.numel())

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.col, self.values))

    def _check_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None and (
            bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != self.shape[0]
        ):
            raise ValueError(
                f"bias must be {self.shape[0]} contiguous fp32 values, got {tuple(bias.shape)} "
                f"{bias.dtype}"
            )

    def accepts(self, *tensors: torch.Tensor) -> bool:
        """True when ``gather`` / ``linear`` run natively on these tensors: fp32 on the CPU
        (and this kernel's values still fp32)."""
        return self._fast(*tensors)

    def _fast(self, *tensors: torch.Tensor) -> bool:
        values = self._buffers["values"]  # (without nn.Module's attribute lookup: ~2 us)
        if values is None or values.dtype != torch.float32:
            return False
        for tensor in tensors:  # noqa: SIM110 - a loop, not all(...): runs on every layer call
            if tensor.dtype != torch.float32 or not tensor.is_cpu:
                return False
        return True

    def reference(self, dense: torch.Tensor) -> torch.Tensor:
        """``W @ dense`` by PyTorch's COO product, in ``dense``'s dtype (the non-fp32 path)."""
        r = self.rows_per_block
        block_row = torch.repeat_interleave(
            torch.arange(self.shape[0] // r), (self.rowptr[1:] - self.rowptr[:-1]).long()
        )
        rows = (block_row.unsqueeze(1) * r + torch.arange(r)).reshape(-1)
        cols = self.col.long().repeat_interleave(r)
        indices = torch.stack([rows, cols]).to(dense.device)
        matrix = torch.sparse_coo_tensor(
            indices,
            self.values.reshape(-1).to(dense),
            self.shape,
            is_coalesced=False,
            check_invariants=False,  # valid by construction
        )
        product: torch.Tensor = torch.sparse.mm(matrix, dense)
        return product

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """``W @ dense`` for a (K, N) matrix; a transposed row-major input (a linear layer's
        ``x.t()``) runs the rows kernel without a copy."""
        if not self._fast(dense) or dense.dim() != 2 or dense.shape[0] != self.shape[1]:
            return self.reference(dense)
        if dense.t().is_contiguous():  # a linear layer's x.t()
            return self.linear(dense.t(), None).t()
        source = dense.contiguous()
        columns = int(source.shape[1])
        if source.numel() >= 2**31:  # int32 offsets
            return self.reference(dense)
        offsets = (self.col * columns) if columns else self.col
        out = source.new_empty(1, self.shape[0], columns)
        self.gather(
            source.reshape(1, -1), offsets, columns, columns, columns, out, None, check=False
        )
        return out[0]

    def gather(
        self,
        source: torch.Tensor,
        offsets: torch.Tensor,
        columns: int,
        pitch: int,
        row_length: int,
        out: torch.Tensor,
        bias: torch.Tensor | None,
        relu: bool = False,
        *,
        check: bool = True,
        residual: torch.Tensor | None = None,
        ksplit: ColumnBlocks | None = None,
    ) -> torch.Tensor:
        """``out[b, m, place(q)] = act(bias[m] + sum_e W[m, k_e] * source[b, offsets[e] + q]
        (+ residual[b, m, place(q)]))`` for q in [0, columns), where place(q) = (q // pitch) *
        row_length + q % pitch and the columns with q % pitch >= row_length are dropped; ``act``
        is ReLU when ``relu``. A ``residual`` (shaped and laid out as ``out``) needs
        ``pitch == row_length``. A ``ksplit`` from ``k_split`` runs the matrix's columns in
        blocks, outer over each column tile: the same sums (their order differs), with the
        block of ``source`` a tile reads kept in L1 (this call reorders the values and
        ``offsets`` block-major for it; ``gather_call`` does so once).

        ``source`` (images, floats) and ``out`` (images, M, ...) contiguous fp32, ``offsets``
        int32 per stored entry with ``max(offsets) + columns <= floats``: the bound is the
        caller's (its layout guarantees it, checked where the offsets are built); the rest is
        checked here unless ``check`` is False (a caller that built every operand itself).
        Returns ``out``. Raises ValueError when the operands do not fit.
        """
        images = int(source.shape[0])
        rows_out = -(-columns // pitch) if columns > 0 and pitch > 0 else 0
        if check:
            self._check_gather(source, offsets, columns, pitch, row_length, out, rows_out)
            self._check_bias(bias)
            if ksplit is not None:
                self._check_ksplit(ksplit)
        if residual is not None and (
            residual.shape != out.shape
            or not residual.is_contiguous()
            or residual.dtype != torch.float32
            or pitch != row_length
        ):
            raise ValueError(
                f"a residual must be contiguous fp32 shaped as out {tuple(out.shape)}, with "
                f"pitch == row length; got {tuple(residual.shape)} {residual.dtype}, pitch "
                f"{pitch}, row length {row_length}"
            )
        if columns == 0 or images == 0:
            return out
        plane = rows_out * row_length
        values = self.values
        if ksplit is not None:
            offsets, values = self._block_major(offsets, ksplit)
        status = library().gather(
            self.rowptr.data_ptr(), offsets.data_ptr(), values.data_ptr(),
            None if bias is None else bias.data_ptr(), self.shape[0] // self.rows_per_block,
            self.rows_per_block, source.data_ptr(), int(source.shape[1]), images, columns, pitch,
            row_length, out.data_ptr(), self.shape[0] * plane, plane, int(relu),
            None if residual is None else residual.data_ptr(),
            None if ksplit is None else ksplit.bounds.data_ptr(),
            0 if ksplit is None else ksplit.blocks,
            torch.get_num_threads(), 1, 0, 0, 0, 0, None, 0, 1, 0,
        )  # fmt: skip
        if status:
            raise ValueError(f"the native kernel refused its operands (status {status})")
        return out

    def gather_call(
        self,
        offsets: torch.Tensor,
        source_floats: int,
        images: int,
        columns: int,
        pitch: int,
        row_length: int,
        bias: torch.Tensor | None,
        ksplit: ColumnBlocks | None = None,
        parts: Parts | None = None,
        in_order: bool = False,
        shift_groups: bool = False,
        copies: int = 1,
        copy_floats: int = 0,
    ) -> PackedCall:
        """``gather`` for one geometry as a ``PackedCall``, its operands checked once (as
        ``gather`` checks them): per call the caller sets ``GATHER_SOURCE`` and ``GATHER_OUT``
        (the addresses of a contiguous (images, source_floats) source and of an out as
        ``gather``'s), ``GATHER_THREADS``, and may set ``GATHER_RELU`` (1) and
        ``GATHER_RESIDUAL`` (a residual's address; needs ``pitch == row_length``). The call
        keeps this kernel's tensors, ``offsets``, ``bias`` and ``ksplit`` (with ``ksplit``, its
        own block-major copies of the values and offsets); it is stale once ``values`` is
        another tensor (``.to``, a new kernel). With ``parts``, ``columns`` are per part and
        the out is (images, ``parts.out_image``) floats. With ``in_order`` the threads take
        equal runs of the column tiles in order (thread t the t-th: one part each where the
        parts are as many as the threads) instead of claiming them or splitting the rows,
        where their number divides the parts of all images (else as without). With ``copies``
        > 1 the source holds that many copies of its operand, ``copy_floats`` apart within each
        image, and thread t reads copy t % copies (``direct.RowParts.copies``).
        Raises ValueError as ``gather``, where a part would read or write outside its image,
        and where a copy would read outside its floats or the copies leave the source.
        """
        rows_out = -(-columns // pitch) if columns > 0 and pitch > 0 else 0
        plane = rows_out * row_length
        source = self.values.new_empty(images, source_floats)  # shapes for the checks only
        if parts is None:
            out = self.values.new_empty(images, self.shape[0], plane)
            self._check_gather(source, offsets, columns, pitch, row_length, out, rows_out)
        else:
            self._check_parts(offsets, source_floats, columns, pitch, row_length, parts)
        self._check_bias(bias)
        self._check_copies(offsets, source_floats, columns, copies, copy_floats)
        values = self.values
        if ksplit is not None:
            self._check_ksplit(ksplit)
            offsets, values = self._block_major(offsets, ksplit)
        groups = None
        if shift_groups:
            groups = self._by_shift(offsets, values, ksplit)
            if groups is not None:
                offsets, values = groups.offsets, groups.values
        if parts is None:
            parts = Parts(1, 0, 0, plane, self.shape[0] * plane)
        args = (
            self.rowptr.data_ptr(), offsets.data_ptr(), values.data_ptr(),
            None if bias is None else bias.data_ptr(), self.shape[0] // self.rows_per_block,
            self.rows_per_block, 0, source_floats, images, columns, pitch, row_length, 0,
            parts.out_image, parts.out_row, 0, 0,
            None if ksplit is None else ksplit.bounds.data_ptr(),
            0 if ksplit is None else ksplit.blocks, 1, parts.count, parts.source_step,
            parts.out_step, parts.out_pitch, int(in_order),
            None if groups is None else groups.bounds.data_ptr(),
            0 if groups is None else groups.shifts, copies, copy_floats,
        )  # fmt: skip
        keep = (self.rowptr, offsets, values, bias, ksplit, groups)
        return PackedCall(library().gather_packed, args, keep)

    def _check_parts(
        self,
        offsets: torch.Tensor,
        source_floats: int,
        columns: int,
        pitch: int,
        row_length: int,
        parts: Parts,
    ) -> None:
        """``gather_call``'s checks with ``parts``: every part's reads and writes inside its
        image (the last part's last column read, the last row's last output written)."""
        rows_out = -(-columns // pitch) if columns > 0 and pitch > 0 else 0
        out_pitch = parts.out_pitch or row_length
        channel_floats = (rows_out - 1) * out_pitch + row_length if rows_out else 0
        last_read = (
            (int(offsets.max()) if offsets.numel() else 0)
            + (parts.count - 1) * parts.source_step
            + columns
        )
        last_write = (
            (parts.count - 1) * parts.out_step
            + (self.shape[0] - 1) * parts.out_row
            + channel_floats
        )
        if (
            offsets.dtype != torch.int32
            or not offsets.is_contiguous()
            or offsets.numel() != self.entries
            or parts.count < 1
            or min(parts.source_step, parts.out_step, parts.out_row, columns) < 0
            or not 0 < row_length <= pitch
            or out_pitch < row_length
            or last_read > source_floats
            or last_write > parts.out_image
            or channel_floats > parts.out_row
        ):
            raise ValueError(
                f"gather parts do not fit {self.name} {self.shape}: {parts}, {columns} "
                f"columns (pitch {pitch}, row length {row_length}) on a {source_floats}-float "
                f"source, {offsets.numel()} {offsets.dtype} offsets for {self.entries} entries"
            )

    def _check_copies(
        self, offsets: torch.Tensor, source_floats: int, columns: int, copies: int, floats: int
    ) -> None:
        """``gather_call``'s checks of ``copies``: at least one; more only where each copy's
        reads stay inside its ``floats`` and the copies inside the source."""
        if copies == 1:
            return
        last_read = (int(offsets.max()) if offsets.numel() else 0) + columns
        if copies < 1 or floats <= 0 or copies * floats > source_floats or last_read > floats:
            raise ValueError(
                f"{copies} copies of {floats} floats do not fit {self.name} {self.shape} on a "
                f"{source_floats}-float source reading {last_read} floats of each"
            )

    def _check_ksplit(self, ksplit: ColumnBlocks) -> None:
        bounds, order = ksplit.bounds, ksplit.order
        if (
            bounds.dtype != torch.int32
            or not bounds.is_contiguous()
            or bounds.dim() != 2
            or bounds.shape[0] < 1
            or bounds.shape[1] != self.shape[0] // self.rows_per_block + 1
            or order.dtype != torch.int32
            or order.numel() != self.entries
        ):
            raise ValueError(
                f"ksplit must come from k_split: got bounds {tuple(bounds.shape)} "
                f"{bounds.dtype}, order of {order.numel()} entries for {self.entries}"
            )

    def _block_major(
        self, offsets: torch.Tensor, ksplit: ColumnBlocks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``offsets`` and the values in ``ksplit``'s block-major entry order (the values'
        copy made once per column block width and state of the values tensor, and shared)."""
        values = self.values
        version = -1 if values.is_inference() else values._version  # inference: untracked
        cached = self._block_values.get(ksplit.width)
        if cached is None or cached[0] is not values or cached[1] != version:
            cached = (values, version, values[ksplit.order].contiguous())
            self._block_values[ksplit.width] = cached
        return offsets[ksplit.order].contiguous(), cached[2]

    def _by_shift(
        self, offsets: torch.Tensor, values: torch.Tensor, ksplit: ColumnBlocks | None
    ) -> ShiftGroups | None:
        """The entries (``offsets`` and ``values`` in the kernels' order: block-major with
        ``ksplit``) sorted by shift within each segment, or None where shift groups do not
        apply: kernels not built for an ISA in ``SHIFT_GROUP_ISAS``, blocks of rows, an entry
        shift of ``MAX_SHIFT_GROUPS`` or more, or every shift 0 (see ``ShiftGroups``)."""
        if self.isa not in SHIFT_GROUP_ISAS or self.rows_per_block != 1 or not offsets.numel():
            return None
        shift = offsets.long() % SHIFT_VECTOR
        shifts = int(shift.max()) + 1
        if shifts < 2 or shifts > MAX_SHIFT_GROUPS:
            return None
        if ksplit is None:
            counts = (self.rowptr[1:] - self.rowptr[:-1]).long()
        else:
            counts = (ksplit.bounds[:, 1:] - ksplit.bounds[:, :-1]).long().reshape(-1)
        segment = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        key = segment * shifts + shift
        order = torch.argsort(key, stable=True)
        per_group = torch.zeros(counts.numel() * shifts, dtype=torch.int64)
        per_group.index_add_(0, key, torch.ones_like(key))
        starts = torch.cat([per_group.new_zeros(1), per_group.cumsum(0)])
        take = torch.arange(counts.numel()).unsqueeze(1) * shifts + torch.arange(shifts + 1)
        return ShiftGroups(
            shifts=shifts,
            bounds=starts[take].to(torch.int32).contiguous(),
            offsets=offsets[order].contiguous(),
            values=values[order].contiguous(),
        )

    def k_split(self, block_columns: int) -> ColumnBlocks:
        """The matrix's columns in blocks of ``block_columns`` for ``gather``'s ``ksplit``
        (cached per width). Raises ValueError for a width below 1."""
        if block_columns < 1:
            raise ValueError(f"a column block must be at least 1 column, got {block_columns}")
        cached = self._k_splits.get(block_columns)
        if cached is None:
            block_rows, cols = self.shape[0] // self.rows_per_block, self.shape[1]
            blocks = max(1, -(-cols // block_columns))
            counts = (self.rowptr[1:] - self.rowptr[:-1]).long()
            row = torch.repeat_interleave(torch.arange(block_rows), counts)
            block = self.col.long() // block_columns
            # block-major: by block, then row; within a row the columns stay sorted
            order = torch.argsort(block * block_rows + row, stable=True).to(torch.int32)
            per_block_row = torch.zeros(blocks * block_rows, dtype=torch.int64)
            per_block_row.index_add_(0, block * block_rows + row, torch.ones_like(row))
            starts = torch.cat([per_block_row.new_zeros(1), per_block_row.cumsum(0)])
            take = torch.arange(blocks).unsqueeze(1) * block_rows + torch.arange(block_rows + 1)
            bounds = starts[take].to(torch.int32).contiguous()
            cached = self._k_splits[block_columns] = ColumnBlocks(block_columns, bounds, order)
        return cached

    def _check_gather(
        self,
        source: torch.Tensor,
        offsets: torch.Tensor,
        columns: int,
        pitch: int,
        row_length: int,
        out: torch.Tensor,
        rows_out: int,
    ) -> None:
        need = (int(source.shape[0]), self.shape[0], rows_out * row_length)
        if (
            source.dim() != 2
            or not source.is_contiguous()
            or not out.is_contiguous()
            or out.numel() != need[0] * need[1] * need[2]
            or offsets.dtype != torch.int32
            or not offsets.is_contiguous()
            or offsets.numel() != self.entries
            or columns < 0
            or not 0 < row_length <= pitch
            or not self._fast(source, out)
        ):
            raise ValueError(
                f"gather operands do not fit {self.name} {self.shape}: source "
                f"{tuple(source.shape)} {source.dtype}, out {tuple(out.shape)} (need {need}), "
                f"{offsets.numel()} {offsets.dtype} offsets for {self.entries} entries, "
                f"pitch {pitch}, row length {row_length}"
            )

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, relu: bool = False
    ) -> torch.Tensor:
        """``act(x @ W^T + bias)`` for a row-major (batch, K) ``x``: (batch, M). At most
        ``ROWS_MAX_BATCH`` rows run the rows kernel on ``x`` as it is, more the gather form
        over ``x^T`` (its offsets cached per batch size)."""
        fast = self._fast(x) if bias is None else self._fast(x, bias)
        if not fast or x.dim() != 2 or x.shape[1] != self.shape[1]:
            result = self.reference(x.t()).t()
            result = result if bias is None else result + bias.to(result)
            return torch.relu(result) if relu else result
        if bias is not None:
            self._check_bias(bias)
        batch = int(x.shape[0])
        if batch <= ROWS_MAX_BATCH or x.numel() >= 2**31:
            return self._rows(x, bias, relu)
        offsets = self._batch_offsets.get(batch)
        if offsets is None:
            offsets = self._batch_offsets[batch] = self.col * batch
        source = x.t().contiguous().reshape(1, -1)
        out = source.new_empty(1, self.shape[0], batch)
        self.gather(source, offsets, batch, batch, batch, out, bias, relu, check=False)
        return out[0].t().contiguous()

    def rows(self, x: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
        """``act(x @ W^T + bias)`` by the rows kernel, for a (batch, K) fp32 ``x``."""
        if not self._fast(x) or x.dim() != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(
                f"rows takes a (batch, {self.shape[1]}) fp32 CPU tensor, got "
                f"{tuple(x.shape)} {x.dtype} on {x.device}"
            )
        self._check_bias(bias)
        return self._rows(x, bias, relu)

    def _rows(self, x: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
        x = x.contiguous()
        batch = int(x.shape[0])
        out = x.new_empty(batch, self.shape[0])
        if batch == 0 or self.shape[0] == 0:
            return out
        values = self._buffers["values"]  # (without nn.Module's slow attribute lookup)
        assert values is not None
        call = self._row_calls.get(batch)
        if call is None or call.keep[2] is not values:  # first call, or new tensors (.to)
            args = (
                self.rowptr.data_ptr(), self.col.data_ptr(), values.data_ptr(), 0,
                self.shape[0] // self.rows_per_block, self.rows_per_block, 0, self.shape[1],
                batch, 0, self.shape[0], 0, 1,
            )  # fmt: skip
            call = PackedCall(library().rows_packed, args, (self.rowptr, self.col, values))
            self._row_calls[batch] = call
        with self._row_lock:
            call[_ROWS_X] = x.data_ptr()
            call[_ROWS_BIAS] = 0 if bias is None else bias.data_ptr()
            call[_ROWS_Y] = out.data_ptr()
            call[_ROWS_RELU] = int(relu)
            call[_ROWS_THREADS] = torch.get_num_threads()
            status = call()
        if status:
            raise ValueError(f"the native kernel refused block height {self.rows_per_block}")
        return out

    def extra_repr(self) -> str:
        return f"{self.name} ({self.isa}), shape={self.shape}, stored={self.entries} entries"

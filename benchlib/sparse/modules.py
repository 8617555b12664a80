"""Inference-only sparse replacements for ``nn.Linear`` and ``nn.Conv2d``.

Each layer becomes one sparse x dense matrix product ``W @ X``: ``W`` is the layer's weight as
an (out, in * kh * kw) matrix held by a swappable **kernel** (an ``nn.Module`` that computes
``W @ X`` and says what it stores), ``X`` the dense input rearranged as columns:

* linear: ``X = x^T`` (in, batch);
* 1x1 conv, no padding: the (C, N*H*W) view of the input (strides by slicing), no unfold;
* any other conv (stride, padding, dilation, groups): ``F.unfold`` (im2col) columns, column
  index ``c*kh*kw + i*kw + j``. Grouped and depthwise convs use one block-diagonal matrix over
  all the unfolded columns, so every conv is a single product.

``TorchSparseMatrix`` is the kernel here: PyTorch's CSR (or BSR) ``@`` on the CPU. A faster kernel
only has to satisfy ``MatrixKernel``; the layer modules never look inside it.

A kernel that is also a ``GatherKernel`` (``NativeSparseMatrix``) is used without im2col: a
conv reads its input through one offset per stored weight (``direct.ConvLayout``: the input in
place, or padded, or split into stride phases), and a small-batch linear layer multiplies its
row-major input as it is. Inputs the gather kernel does not take (not fp32) use the product.
A conv binds its native calls once per input shape (``SparseConv2d.gather_plan``: the weights'
addresses and the geometry in one packed argument array), so that a call costs a few us of
Python: ResNet-56 (CIFAR, batch 1, 90% per layer) ran 1.29-1.40x faster than with every
argument passed per call (in-process A/B, 2 threads, AVX2 EPYC), ResNet-50 1.01-1.04x.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from benchlib.sparse.build import PackedCall
from benchlib.sparse.direct import COPY_OUT, COPY_SOURCE, COPY_THREADS, ConvLayout
from benchlib.sparse.native import (
    GATHER_OUT,
    GATHER_RELU,
    GATHER_RESIDUAL,
    GATHER_SOURCE,
    GATHER_THREADS,
)
from benchlib.sparse.operands import ColumnBlocks, Parts
from benchlib.sparse.plans import GatherPlan, build_plan
from benchlib.sparse.tiling import (
    aligned_rows,
    column_block,
    plane_align,
    shift_groups,
    vector_floats,
)

BETA_WARNING = r"Sparse (CSR|CSC|BSR|BSC) tensor support is in beta state"
"""PyTorch warns once per process that its compressed sparse layouts are beta: that is a fact
about PyTorch, not about this model, so it is silenced where the layouts are built."""


@runtime_checkable
class MatrixKernel(Protocol):
    """A fixed sparse (M, K) matrix ``W`` that multiplies dense (K, N) fp32 matrices.

    Implementations are ``nn.Module`` s (so ``.to``, ``deepcopy`` and ``state_dict`` carry their
    tensors). ``__call__(X)`` returns the dense (M, N) product ``W @ X``.
    """

    name: str
    """Short kernel name for reports, e.g. ``torch-csr``, ``torch-bsr-4x4``."""
    format: str
    """Storage format: ``csr`` or ``bsr``."""
    shape: tuple[int, int]

    def __call__(self, dense: torch.Tensor) -> torch.Tensor: ...

    def stored_bytes(self) -> int:
        """Bytes of every tensor the kernel keeps (values, column indices, row pointers)."""
        ...


class TorchSparseMatrix(nn.Module):
    """``W`` in PyTorch's CSR layout, or BSR with ``block`` = (rows, cols), using ``torch``'s
    sparse x dense product (MKL sparse BLAS on x86 builds).

    Only nonzeros (CSR) or blocks holding a nonzero (BSR) are stored; indices are int32. The
    compressed tensor is rebuilt from its three plain buffers at each call (about 2 us), since
    PyTorch cannot deep-copy a sparse CSR tensor held as a buffer.
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor

    def __init__(self, matrix: torch.Tensor, block: tuple[int, int] | None = None) -> None:
        super().__init__()
        if matrix.dim() != 2:
            raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(matrix.shape)}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=BETA_WARNING, category=UserWarning)
            dense = matrix.detach()
            compressed = dense.to_sparse_csr() if block is None else dense.to_sparse_bsr(block)
        self.block = block
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.name = "torch-csr" if block is None else f"torch-bsr-{block[0]}x{block[1]}"
        self.format = "csr" if block is None else "bsr"
        self.register_buffer("crow", compressed.crow_indices().to(torch.int32))
        self.register_buffer("col", compressed.col_indices().to(torch.int32))
        self.register_buffer("values", compressed.values().contiguous())

    def compressed(self) -> torch.Tensor:
        """The matrix as a PyTorch sparse CSR/BSR tensor (sharing this module's buffers)."""
        layout = torch.sparse_csr if self.block is None else torch.sparse_bsr
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=BETA_WARNING, category=UserWarning)
            return torch.sparse_compressed_tensor(
                self.crow,
                self.col,
                self.values,
                self.shape,
                layout=layout,
                check_invariants=False,  # valid by construction; a check costs O(nnz) per call
            )

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.compressed() @ dense

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.values))

    def extra_repr(self) -> str:
        return f"{self.name}, shape={self.shape}, stored={self.values.numel()} values"


@runtime_checkable
class GatherKernel(Protocol):
    """A ``MatrixKernel`` that also reads its dense operand through per-entry offsets (the
    contract of ``NativeSparseMatrix.gather`` and ``.rows``, documented there)."""

    name: str
    format: str
    shape: tuple[int, int]
    col: torch.Tensor
    """int32: the matrix column of each stored entry."""

    def __call__(self, dense: torch.Tensor) -> torch.Tensor: ...

    def stored_bytes(self) -> int: ...

    def accepts(self, *tensors: torch.Tensor) -> bool:
        """True when ``gather`` and ``rows`` run on these tensors (fp32 on the CPU)."""
        ...

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
    ) -> torch.Tensor: ...

    def k_split(self, block_columns: int) -> ColumnBlocks:
        """The ``ksplit`` operand of ``gather`` for blocks of ``block_columns`` columns."""
        ...

    values: torch.Tensor
    """The stored values: another tensor object once the kernel's tensors are replaced
    (``.to``), which makes a ``gather_call`` built before stale."""

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
        """``gather`` for one geometry, its constant operands bound and checked once; with
        ``parts``, each image's columns in parts (``operands.Parts``); ``in_order``: the threads
        take equal runs of the column tiles in order; ``shift_groups``: the entries run by
        shift (offset modulo a vector) where the kernel can (``operands.ShiftGroups``);
        ``copies``: the source holds that many copies, ``copy_floats`` apart, one a thread."""
        ...

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, relu: bool = False
    ) -> torch.Tensor:
        """``act(x @ W^T + bias)`` for a row-major (batch, K) ``x``, any dtype: what
        ``accepts`` refuses goes through a slower exact product."""
        ...


KernelFactory = Callable[[torch.Tensor], MatrixKernel]
"""Builds the kernel for one dense (M, K) weight matrix (``TorchSparseMatrix`` is one)."""


def _checked(kernel: MatrixKernel, rows: int, cols: int) -> MatrixKernel:
    if not isinstance(kernel, nn.Module):
        raise TypeError(f"a sparse kernel must be an nn.Module, got {type(kernel).__name__}")
    if tuple(kernel.shape) != (rows, cols):
        raise ValueError(f"kernel shape {tuple(kernel.shape)} != weight matrix {(rows, cols)}")
    return kernel


class SparseLinear(nn.Module):
    """``nn.Linear`` as ``y = (W @ x^T)^T + b`` with a sparse ``W``; input (*, in_features).

    With ``relu`` set (``fuse.fuse_relu`` does) the layer returns ``relu(y)``.
    """

    bias: torch.Tensor | None

    def __init__(self, kernel: MatrixKernel, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = kernel.shape
        self.kernel = _checked(kernel, self.out_features, self.in_features)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.gathers = isinstance(kernel, GatherKernel)
        self.relu = False

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, make_kernel: KernelFactory = TorchSparseMatrix
    ) -> SparseLinear:
        """The sparse form of ``linear`` (its weight and bias are copied)."""
        return cls(make_kernel(linear.weight.detach()), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gathers:  # the kernel takes every input (other dtypes by its reference path)
            # the kernel and the bias without nn.Module's attribute lookup (about 2 us each)
            kernel: GatherKernel = self._modules["kernel"]  # type: ignore[assignment]
            bias = self._buffers["bias"]
            if x.dim() == 2:  # (batch, in_features) already: no reshapes (each costs ~1 us)
                return kernel.linear(x, bias, self.relu)
            out = kernel.linear(x.reshape(-1, self.in_features), bias, self.relu)
            return out.reshape(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        out = self.kernel(x.reshape(-1, self.in_features).t())
        if self.bias is not None:
            out = out.add_(self.bias.unsqueeze(1))
        if self.relu:
            out = out.relu_()
        return out.t().contiguous().reshape(*lead, self.out_features)


def conv_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv weight (Cout, Cin/groups, kh, kw) as the dense (Cout, Cin*kh*kw) matrix that
    multiplies ``F.unfold`` columns: block-diagonal over the groups."""
    out_channels, per_group = weight.shape[0], weight[0].numel()
    flat = weight.detach().reshape(out_channels, per_group)
    if groups == 1:
        return flat.clone()
    matrix = flat.new_zeros(out_channels, per_group * groups)
    rows = out_channels // groups
    for g in range(groups):
        span = slice(g * rows, (g + 1) * rows)
        matrix[span, g * per_group : (g + 1) * per_group] = flat[span]
    return matrix


def _entries(kernel: MatrixKernel) -> int:
    """Stored weights of a gather kernel (blocks times their height)."""
    col = getattr(kernel, "col", None)
    rows = int(getattr(kernel, "rows_per_block", 1))
    return 0 if col is None else int(col.numel()) * rows


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class SparseConv2d(nn.Module):
    """``nn.Conv2d`` (zeros padding) as one sparse x dense product; NCHW in, NCHW out.

    ``padding`` is (top, bottom, left, right) in pixels, so ``"same"`` with an even kernel
    (more padding after than before, as ``F.conv2d`` does) is exact too. With ``relu`` set
    (``fuse.fuse_relu`` does) the layer returns ``relu(conv(x))``.
    """

    bias: torch.Tensor | None

    def __init__(
        self,
        kernel: MatrixKernel,
        bias: torch.Tensor | None,
        *,
        in_channels: int,
        groups: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int, int, int],
        dilation: tuple[int, int],
    ) -> None:
        super().__init__()
        self.out_channels = kernel.shape[0]
        self.in_channels, self.groups = in_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding = padding
        k = kernel_size[0] * kernel_size[1]
        self.kernel = _checked(kernel, self.out_channels, in_channels * k)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.pointwise = kernel_size == (1, 1) and not any(padding)
        self.gathers = isinstance(kernel, GatherKernel)
        self.relu = False
        self._layouts: dict[tuple[int, int], tuple[ConvLayout, torch.Tensor]] = {}
        self._ksplits: dict[tuple[int, int], ColumnBlocks | None] = {}
        self._band_offsets: dict[int, torch.Tensor] = {}
        self._plans: dict[tuple[int, ...], GatherPlan] = {}

    def __getstate__(self) -> dict[str, Any]:
        """For copy and pickle: without the plans (addresses, locks), rebuilt on first use."""
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, make_kernel: KernelFactory = TorchSparseMatrix
    ) -> SparseConv2d:
        """The sparse form of ``conv``: the kernel holds ``conv_matrix(conv.weight, groups)``.
        Raises ValueError for a padding mode other than ``zeros``."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only zeros)")
        kh, kw = _pair(conv.kernel_size)
        dilation = _pair(conv.dilation)
        if isinstance(conv.padding, str):  # "valid", or "same" (stride 1): extra pixel after
            same = conv.padding == "same"
            th, tw = (dilation[0] * (kh - 1), dilation[1] * (kw - 1)) if same else (0, 0)
            padding = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            ph, pw = _pair(conv.padding)
            padding = (ph, ph, pw, pw)
        return cls(
            make_kernel(conv_matrix(conv.weight, conv.groups)),
            conv.bias,
            in_channels=conv.in_channels,
            groups=conv.groups,
            kernel_size=(kh, kw),
            stride=_pair(conv.stride),
            padding=padding,
            dilation=dilation,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (height, width) in pixels for an input of (height, width)."""
        top, bottom, left, right = self.padding
        sizes = []
        for size, pad, k, s, d in zip(
            (height, width),
            (top + bottom, left + right),
            self.kernel_size,
            self.stride,
            self.dilation,
            strict=True,
        ):
            sizes.append(math.floor((size + pad - d * (k - 1) - 1) / s) + 1)
        return sizes[0], sizes[1]

    def plan_bytes(self) -> int:
        """Bytes the layer's native plans hold beside its kernel's tensors and its bias: the
        entry offsets per input size (and per band width, for a chain's bands, and per row part
        split, for a kxk conv run alone), the column blocks, and the block-major copies of
        the entries that a column-blocked product reads instead of the kernel's own (0 before
        the first native call, or where none runs)."""
        kernel = self.kernel
        kernel_tensors = list(kernel.buffers()) if isinstance(kernel, nn.Module) else []
        own = {t.data_ptr() for t in (*kernel_tensors, *self.buffers())}
        held: dict[int, int] = {}

        def hold(value: object) -> None:
            if isinstance(value, ColumnBlocks):
                hold(value.bounds)
                hold(value.order)
            elif isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() not in own:
                bytes_ = value.numel() * value.element_size()
                held[value.data_ptr()] = max(held.get(value.data_ptr(), 0), bytes_)

        for _, offsets in self._layouts.values():
            hold(offsets)
        for offsets in self._band_offsets.values():
            hold(offsets)
        for blocks in self._ksplits.values():
            hold(blocks)
        for plan in self._plans.values():
            alone = () if plan.alone is None else (plan.alone.product, plan.alone.copy)
            for call in (plan.product, plan.copy, *alone):
                for value in () if call is None else call.keep:
                    hold(value)
        return sum(held.values())

    def reuse(self) -> float:
        """Stored weights per input channel: how often the kernel reads each input value."""
        return _entries(self.kernel) / self.in_channels

    def layout(self, height: int, width: int) -> tuple[ConvLayout, torch.Tensor]:
        """The direct layout for an input of (height, width) pixels and the kernel's entry
        offsets in it (built once per size). Raises ValueError as ``ConvLayout.of``."""
        key = (height, width)
        cached = self._layouts.get(key)
        if cached is None:
            kernel: GatherKernel = self.kernel  # type: ignore[assignment]
            layout = ConvLayout.of(
                self.in_channels,
                key,
                self.kernel_size,
                self.stride,
                self.dilation,
                self.padding,
                align=plane_align(self.kernel_size, self.stride, self.pointwise, self.reuse()),
                row_align=aligned_rows(
                    self.kernel_size, self.stride, self.padding, width, self.dilation
                ),
            )
            cached = self._layouts[key] = (layout, layout.entry_offsets(kernel.col))
        return cached

    def band_offsets(self, band: int) -> torch.Tensor:
        """The kernel's entry offsets where a 1x1 conv reads its input in bands of ``band``
        floats per channel (``bands.py``): the entry's input channel times ``band`` (built once
        per band)."""
        cached = self._band_offsets.get(band)
        if cached is None:
            kernel: GatherKernel = self.kernel  # type: ignore[assignment]
            cached = (kernel.col.long() * band).to(torch.int32)
            self._band_offsets[band] = cached
        return cached

    def ksplit(self, height: int, width: int) -> ColumnBlocks | None:
        """The column-block bounds ``gather`` runs the direct form with on an input of
        (height, width) pixels (``column_block``), or None (built once per size)."""
        key = (height, width)
        if key not in self._ksplits:
            layout, _ = self.layout(height, width)
            kernel: GatherKernel = self.kernel  # type: ignore[assignment]
            groups = self.shift_groups(height, width)
            block = column_block(kernel, layout, groups=groups) if self.groups == 1 else None
            self._ksplits[key] = None if block is None else kernel.k_split(block)
        return self._ksplits[key]

    def shift_groups(self, height: int, width: int) -> int:
        """The shift groups the product runs its entries in on an input of (height, width)
        pixels (``gather_call``'s ``shift_groups``; ``tiling.shift_groups``), where its
        layout's rows and planes are a whole number of vectors; else 1."""
        groups = shift_groups(self.kernel_size, self.stride, self.dilation)
        if groups == 1:
            return 1
        layout, _ = self.layout(height, width)
        vector = vector_floats()
        return groups if not (layout.phase_w % vector or layout.plane % vector) else 1

    def gather_plan(self, x: torch.Tensor) -> GatherPlan | None:
        """The native calls for ``x``'s shape (built on its first call, rebuilt when the kernel
        or the bias is replaced), or None where they do not run: a kernel that is no gather
        kernel, an input or bias the kernel does not take (not fp32 on the CPU), no images."""
        if not self.gathers or x.dtype != torch.float32 or not x.is_cpu or not x.shape[0]:
            return None
        kernel: GatherKernel = self._modules["kernel"]  # type: ignore[assignment]
        bias = self._buffers["bias"]  # (both without nn.Module's slow attribute lookup)
        plan = self._plans.get(x.shape)
        if (
            plan is not None
            and plan.kernel is kernel
            and plan.values is kernel.values
            and plan.bias is bias
        ):
            return plan
        plan = build_plan(self, kernel, bias, x)
        if plan is not None:
            self._plans[tuple(x.shape)] = plan
        return plan

    def _run(
        self, plan: GatherPlan, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """``forward`` by the plan's native calls."""
        x = x.contiguous()
        out = x.new_empty(plan.out_shape)
        fused = (
            residual is not None
            and plan.fuses_residual
            and residual.shape == out.shape
            and residual.dtype == torch.float32
            and residual.is_cpu
        )
        if fused and residual is not None:
            residual = residual.contiguous()
        threads = torch.get_num_threads()
        copy, product, source_floats = plan.copy, plan.product, plan.source_floats
        alone = plan.alone
        if alone is not None and alone.threads in (0, threads):
            copy, product, source_floats = alone.copy, alone.product, alone.source_floats
        with plan.lock:
            source = x
            if copy is not None:
                source = x.new_empty(x.shape[0], source_floats)
                copy[COPY_SOURCE] = x.data_ptr()
                copy[COPY_OUT] = source.data_ptr()
                copy[COPY_THREADS] = threads
                copy()
            product[GATHER_SOURCE] = source.data_ptr()
            product[GATHER_OUT] = out.data_ptr()
            product[GATHER_RELU] = int(self.relu and (residual is None or fused))
            product[GATHER_RESIDUAL] = residual.data_ptr() if fused and residual is not None else 0
            product[GATHER_THREADS] = threads
            status = product()
        if status:
            raise ValueError(f"the native kernel refused its operands (status {status})")
        return self._add(out, None if fused else residual)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The conv of ``x``, plus ``residual`` when given (added before the ReLU of ``relu``;
        ``fuse.fuse_residual`` passes the identity branch of a residual block here)."""
        plan = self.gather_plan(x)
        if plan is not None:
            return self._run(plan, x, residual)
        n, c, h, w = x.shape  # not fp32, or no images: im2col and the kernel's product
        out_h, out_w = self.output_size(h, w)
        if self.pointwise:
            strided = x[:, :, :: self.stride[0], :: self.stride[1]]
            columns = strided.transpose(0, 1).reshape(c, n * out_h * out_w)
        else:
            top, bottom, left, right = self.padding
            if top == bottom and left == right:
                padding: tuple[int, int] = (top, left)
            else:
                x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
            unfolded = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)
            columns = unfolded.transpose(0, 1).reshape(unfolded.shape[1], n * out_h * out_w)
        out = self.kernel(columns)
        if self.bias is not None:
            out = out.add_(self.bias.unsqueeze(1))
        if self.relu and residual is None:
            out = out.relu_()
        out = out.reshape(self.out_channels, n, out_h, out_w).transpose(0, 1).contiguous()
        return self._add(out, residual)

    def _add(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``out + residual``, then the ReLU when set (the unfused path)."""
        if residual is None:
            return out
        out = out + residual
        return out.relu_() if self.relu else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}"
        )

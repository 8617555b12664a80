"""Convert a model's sparse enough conv and linear layers to sparse modules, with a report.

``sparsify(model, threshold)`` deep-copies ``model`` and replaces every ``nn.Conv2d`` and
``nn.Linear`` whose weight density (nonzeros / numel) is at most ``threshold`` by a
``SparseConv2d`` / ``SparseLinear``; the other layers stay dense, and the report says why.

Kernels: ``choose_kernel`` gives benchlib's native kernels (``NativeSparseMatrix``: CSR, or BSR
Rx1 for a weight pruned in blocks of R rows, R in 2/4/8; a 3x3 conv runs directly on its padded
input, no im2col) where they build, else PyTorch's CSR / BSR product (``choose_torch_kernel``),
and the report says why.

Thresholds, measured with ``benchmarks/sparse_kernels.py`` (ResNet-50's layer shapes, batch 1,
random unstructured masks, 2 threads, torch 2.14.1, whole layers; the ratio dense / native,
above 1 the sparse layer is faster; these shared VMs' runs differ by up to 20%, a few single
rows by more). On a 2-core AMD EPYC with AVX-512 (medians of 60 interleaved calls)::

    layer (ResNet-50 shape)     dense ms   dense / native at sparsity   0.5    0.7    0.9
    conv 1x1 256->64 @56          0.35                                  0.86   1.69   4.23
    conv 3x3 64->64 @56           0.67                                  0.89   1.27   2.90
    conv 3x3/2 128->128 @56       0.69                                  0.73   1.07   2.23
    conv 1x1 1024->256 @14        0.43                                  0.75   1.49   4.49
    conv 3x3/2 512->512 @14       1.13                                  1.22   1.70   3.52
    linear 2048->1000             0.13                                  1.19   1.50   2.57

and on a 2-core AMD EPYC (Zen 3) with AVX2 only, where the dense convs have half the vector
width and the sparse ones, bound by loads, lose less (steady-state medians of blocks)::

    conv 1x1 256->64 @56          2.03                                  1.62   2.23   5.19
    conv 3x3 64->64 @56           2.54                                  0.97   1.79   3.68
    conv 3x3/2 128->128 @56       3.50                                  0.91   1.26   3.03
    conv 1x1 1024->256 @14        2.29                                  1.40   2.81   6.23
    conv 3x3/2 512->512 @14       5.10                                  1.37   1.20   2.94
    linear 2048->1000             0.62                                  1.31   1.26   3.60

At density 0.3 every measured layer shape ran faster sparse on both (the closest, the strided
3x3 at 56x56, by 1.06-1.12x with AVX-512); at 0.5 most lose with AVX-512 and most win with
AVX2. So ``DEFAULT_THRESHOLD`` (``sparsify`` by density alone) is 0.3, and the gate of
``cpu-sparse``, which then keeps a candidate sparse only where it times faster on its real
input (``tune.keep_faster``: the break-even density moves with the shape and the machine), is
``CANDIDATE_THRESHOLD`` 0.8: on the AVX2 machine, ResNet-50 ``magnitude:0.9`` (global: its
1x1 convs into 64 and 128 channels keep density 0.59-0.71) timed those 7 layers faster sparse,
and end to end ran 73.7 ms against 83.9 ms with the gate at 0.5 (70.9 against 76.1 ms in a
second run); a gate of 0.65 (4 of them) measured no faster than 0.5.

PyTorch's BSR: its CPU product (MKL) refuses non-square blocks, so ``choose_torch_kernel`` runs
4x1 / 8x1 as CSR and square blocks as BSR (``BSR_BLOCKS``: 0.57-0.88x the time of CSR in 15 of
18 measured cases).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from benchlib.errors import ConfigError, ExportError
from benchlib.sparse.build import NativeUnavailable, load_library
from benchlib.sparse.modules import (
    KernelFactory,
    MatrixKernel,
    SparseConv2d,
    SparseLinear,
    TorchSparseMatrix,
    conv_matrix,
)
from benchlib.sparse.native import NativeSparseMatrix

DEFAULT_THRESHOLD = 0.3
"""``sparsify`` runs layers of weight density <= this sparse (measured above: all faster)."""
CANDIDATE_THRESHOLD = 0.8
"""``cpu-sparse`` times layers of weight density <= this, dense against sparse (above)."""

BLOCK_SHAPES: tuple[tuple[int, int], ...] = (
    (8, 8), (4, 4), (8, 1), (1, 8), (2, 2), (4, 1), (1, 4), (2, 1), (1, 2),
)  # fmt: skip
"""Candidate (rows, cols) blocks of the (out, in*kh*kw) matrix, largest area first."""

BSR_BLOCKS: frozenset[tuple[int, int]] = frozenset({(8, 8), (4, 4), (2, 2)})
"""Block shapes stored as BSR: those where PyTorch's CPU BSR product beat CSR, measured."""

NATIVE_BLOCK_ROWS: frozenset[int] = frozenset({8, 4, 2})
"""Detected block heights the native kernels run as BSR Rx1 (measured faster than CSR)."""


def detect_block(matrix: torch.Tensor) -> tuple[int, int] | None:
    """The largest of ``BLOCK_SHAPES`` whose blocks tile ``matrix`` (2-D) exactly: every block
    all zero or all nonzero. None for an all-zero or all-nonzero matrix, or when none tiles."""
    nonzero = matrix.detach() != 0
    if not bool(nonzero.any()) or bool(nonzero.all()):
        return None
    rows, cols = nonzero.shape
    for r, c in BLOCK_SHAPES:
        if rows % r or cols % c:
            continue
        counts = nonzero.reshape(rows // r, r, cols // c, c).sum(dim=(1, 3))
        if bool(((counts == 0) | (counts == r * c)).all()):
            return (r, c)
    return None


def native_block_rows(block: tuple[int, int] | None) -> int:
    """The block height ``NativeSparseMatrix`` stores a matrix of detected ``block`` with: an
    R x C pattern is also an R x 1 one, and R in ``NATIVE_BLOCK_ROWS`` runs as BSR Rx1."""
    return block[0] if block is not None and block[0] in NATIVE_BLOCK_ROWS else 1


def choose_torch_kernel(matrix: torch.Tensor) -> TorchSparseMatrix:
    """PyTorch's product: BSR when the matrix's pattern is made of blocks in ``BSR_BLOCKS``
    and this PyTorch build multiplies BSR on the CPU, else CSR."""
    block = detect_block(matrix)
    if block in BSR_BLOCKS:
        kernel = TorchSparseMatrix(matrix, block)
        try:
            kernel(matrix.new_zeros(matrix.shape[1], 1))
        except RuntimeError:  # a build whose CPU sparse BLAS lacks this BSR product
            return TorchSparseMatrix(matrix)
        return kernel
    return TorchSparseMatrix(matrix)


def choose_kernel(matrix: torch.Tensor) -> MatrixKernel:
    """The default kernel for a weight matrix: benchlib's native kernels (``NativeSparseMatrix``,
    CSR or BSR Rx1 after ``native_block_rows``) where they build, else ``choose_torch_kernel``."""
    if isinstance(load_library(), NativeUnavailable):
        return choose_torch_kernel(matrix)
    return NativeSparseMatrix(matrix, native_block_rows(detect_block(matrix)))


def native_unavailable() -> str | None:
    """Why the native kernels cannot run in this process (one line), or None when they can."""
    loaded = load_library()
    return loaded.reason if isinstance(loaded, NativeUnavailable) else None


@dataclass(frozen=True)
class LayerReport:
    """What ``sparsify`` did with one conv or linear layer.

    ``stored_bytes`` are the bytes the weight occupies as run (a sparse kernel's values, column
    indices and row pointers; a dense layer's weight); ``dense_bytes`` those of the dense
    weight. Bias bytes are in neither. ``format`` is ``csr``, ``bsr`` or ``dense``; ``kernel``
    the sparse kernel's name (None when dense); ``block`` the detected block pattern (``4x1``).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    density: float
    sparse: bool
    reason: str
    format: str
    kernel: str | None
    block: str | None
    stored_bytes: int
    dense_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (shape as a list)."""
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a conv or linear layer; None for other modules and for lazy layers that
    have not yet seen an input."""
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return None
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter) or weight.numel() == 0:
        return None
    return weight.detach()


def _why_dense(module: nn.Module, density: float, threshold: float) -> str | None:
    if type(module) not in (nn.Linear, nn.Conv2d):
        return f"{type(module).__name__} is not nn.Linear or nn.Conv2d"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} (only 'zeros' runs sparse)"
    if density > threshold:
        return f"density {density:.3g} > threshold {threshold:g}"
    return None


def _convert(
    name: str,
    module: nn.Module,
    weight: torch.Tensor,
    threshold: float,
    make_kernel: KernelFactory,
) -> tuple[nn.Module, LayerReport]:
    density = int(torch.count_nonzero(weight)) / weight.numel()
    dense_bytes = weight.numel() * weight.element_size()
    groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
    block = detect_block(conv_matrix(weight, groups) if weight.dim() > 2 else weight)
    why_dense = _why_dense(module, density, threshold)
    replacement: nn.Module = module
    kernel: MatrixKernel | None = None
    if why_dense is None and isinstance(module, nn.Conv2d):
        replacement = SparseConv2d.from_dense(module, make_kernel)
        kernel = replacement.kernel
    elif why_dense is None and isinstance(module, nn.Linear):
        replacement = SparseLinear.from_dense(module, make_kernel)
        kernel = replacement.kernel
    reason = why_dense or f"density {density:.3g} <= threshold {threshold:g}"
    if isinstance(kernel, TorchSparseMatrix) and make_kernel is choose_kernel:
        reason += (
            f"; {kernel.name} because the native kernels are unavailable: {native_unavailable()}"
        )
    report = LayerReport(
        name=name,
        kind="linear" if isinstance(module, nn.Linear) else type(module).__name__.lower(),
        shape=tuple(weight.shape),
        density=density,
        sparse=kernel is not None,
        reason=reason,
        format="dense" if kernel is None else kernel.format,
        kernel=None if kernel is None else kernel.name,
        block=None if block is None else f"{block[0]}x{block[1]}",
        stored_bytes=dense_bytes if kernel is None else kernel.stored_bytes(),
        dense_bytes=dense_bytes,
    )
    return replacement, report


def sparsify(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    make_kernel: KernelFactory = choose_kernel,
    *,
    in_place: bool = False,
) -> tuple[nn.Module, list[LayerReport]]:
    """A copy of ``model`` whose ``nn.Conv2d`` and ``nn.Linear`` layers of weight density
    <= ``threshold`` are sparse modules (kernels from ``make_kernel``), and one report per
    conv/linear layer, in ``named_modules`` order. ``model`` is not modified unless
    ``in_place`` (then its layers are swapped and ``model`` itself is returned).

    A module shared under several names is converted once and replaced everywhere. Subclasses
    (their forward may differ) and padding modes other than zeros stay dense, with the reason.
    Raises ConfigError when ``threshold`` is not in [0, 1], ExportError (naming the layer)
    when a layer's kernel cannot be built.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"sparsity threshold {threshold} is outside [0, 1] (a weight density)")
    converted = model if in_place else copy.deepcopy(model)
    done: dict[int, nn.Module] = {}
    reports: list[LayerReport] = []
    for name, module in converted.named_modules():
        weight = _weight(module)
        if weight is None:
            continue
        try:
            done[id(module)], report = _convert(name, module, weight, threshold, make_kernel)
        except (RuntimeError, ValueError, TypeError) as exc:  # torch raises RuntimeError
            raise ExportError(
                f"layer {name!r} ({type(module).__name__}, weight {tuple(weight.shape)}) "
                f"cannot run sparse: {exc}"
            ) from exc
        reports.append(report)
    swaps = [
        (name, done[id(module)])
        for name, module in converted.named_modules(remove_duplicate=False)
        if done.get(id(module), module) is not module
    ]
    for name, replacement in swaps:
        if not name:  # the model is itself one layer
            return replacement, reports
        converted.set_submodule(name, replacement)
    return converted, reports


def totals(reports: list[LayerReport]) -> dict[str, int]:
    """Layer counts and weight bytes over ``reports``: ``sparse_layers``, ``dense_layers``,
    ``weight_bytes_stored`` (as run) and ``weight_bytes_dense``."""
    return {
        "sparse_layers": sum(r.sparse for r in reports),
        "dense_layers": sum(not r.sparse for r in reports),
        "weight_bytes_stored": sum(r.stored_bytes for r in reports),
        "weight_bytes_dense": sum(r.dense_bytes for r in reports),
    }

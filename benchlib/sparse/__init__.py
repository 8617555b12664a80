"""Sparse execution of pruned models on the CPU (the ``cpu-sparse`` target's engine).

``sparsify(model, threshold)`` replaces each conv and linear layer of weight density at most
``threshold`` by ``SparseConv2d`` / ``SparseLinear``, modules that compute the layer as one
sparse x dense matrix product through a swappable kernel (``MatrixKernel``; the built-in one
is ``TorchSparseMatrix``: PyTorch's CSR or BSR product), and reports per layer what it did.
"""

from benchlib.sparse.convert import (
    BLOCK_SHAPES,
    BSR_BLOCKS,
    DEFAULT_THRESHOLD,
    LayerReport,
    choose_kernel,
    detect_block,
    sparsify,
    totals,
)
from benchlib.sparse.modules import (
    KernelFactory,
    MatrixKernel,
    SparseConv2d,
    SparseLinear,
    TorchSparseMatrix,
    conv_matrix,
)

__all__ = [
    "BLOCK_SHAPES",
    "BSR_BLOCKS",
    "DEFAULT_THRESHOLD",
    "KernelFactory",
    "LayerReport",
    "MatrixKernel",
    "SparseConv2d",
    "SparseLinear",
    "TorchSparseMatrix",
    "choose_kernel",
    "conv_matrix",
    "detect_block",
    "sparsify",
    "totals",
]

"""Sparse execution of pruned models on the CPU (the ``cpu-sparse`` target's engine).

``sparsify(model, threshold)`` replaces each conv and linear layer of weight density at most
``threshold`` by ``SparseConv2d`` / ``SparseLinear``, modules that compute the layer as one
sparse x dense matrix product through a swappable kernel (``MatrixKernel``), and reports per
layer what it did. The default kernel is ``NativeSparseMatrix``: benchlib's own C++ kernels
(``csrc/``: ``spmm.cpp`` the products, ``layout.cpp`` the conv input copy and max pooling,
``head.cpp`` a classifier head's average pool and dense linear, ``chain.cpp`` runs of calls;
built just in time by ``build.load_library``; CSR and BSR 2x1/4x1/8x1, direct convolution
without im2col). Where they cannot build, ``TorchSparseMatrix`` (PyTorch's
CSR or BSR product) runs instead and the layer report says why.

Modules: ``convert`` (``sparsify``, thresholds, kernel choice), ``modules`` (the layers),
``native`` (the native kernel), ``build`` (compiling and loading it), ``direct`` (the direct
convolution's input layout), ``tune`` (keep a layer sparse only where it times faster),
``fuse`` (BatchNorm folding, ReLU fusion) and ``pool`` (native max pooling), the last three
used by the ``cpu-sparse`` target.
"""

from benchlib.sparse.build import NativeLibrary, NativeUnavailable, load_library
from benchlib.sparse.convert import (
    BLOCK_SHAPES,
    BSR_BLOCKS,
    CANDIDATE_THRESHOLD,
    DEFAULT_THRESHOLD,
    NATIVE_BLOCK_ROWS,
    LayerReport,
    choose_kernel,
    choose_torch_kernel,
    detect_block,
    native_block_rows,
    native_unavailable,
    sparsify,
    totals,
)
from benchlib.sparse.direct import ConvLayout
from benchlib.sparse.modules import (
    GatherKernel,
    KernelFactory,
    MatrixKernel,
    SparseConv2d,
    SparseLinear,
    TorchSparseMatrix,
    conv_matrix,
)
from benchlib.sparse.native import NativeSparseMatrix

__all__ = [
    "BLOCK_SHAPES",
    "BSR_BLOCKS",
    "CANDIDATE_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "NATIVE_BLOCK_ROWS",
    "ConvLayout",
    "GatherKernel",
    "KernelFactory",
    "LayerReport",
    "MatrixKernel",
    "NativeLibrary",
    "NativeSparseMatrix",
    "NativeUnavailable",
    "SparseConv2d",
    "SparseLinear",
    "TorchSparseMatrix",
    "choose_kernel",
    "choose_torch_kernel",
    "conv_matrix",
    "detect_block",
    "load_library",
    "native_block_rows",
    "native_unavailable",
    "sparsify",
    "totals",
]

"""pytest-benchmark timings of one ResNet-50 layer per kind: dense, PyTorch CSR, native kernels.

Run with ``pytest benchmarks/test_sparse_kernels_bench.py --benchmark-only`` (``python -m
pytest`` collects ``tests/`` only). The layers and masks are those of
``benchmarks/sparse_kernels.py`` (which prints the whole table with ratios, interleaved); here a
1x1 conv, a 3x3 conv, a strided 3x3 conv and the classifier at sparsity 0.7 and 0.9, batch 1,
each grouped so that pytest-benchmark's table sets the three implementations side by side.
Every sparse layer first passes the exactness check against the dense one (1e-4 relative).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture
from sparse_kernels import LAYERS, Shape, round_trip, sparse_twin
from torch import nn

from benchlib.harness.verify import relative_error
from benchlib.sparse import NativeSparseMatrix, NativeUnavailable, TorchSparseMatrix, load_library

CHOSEN = ("1x1 256->64 @56", "3x3 128->128 @28", "3x3/2 256->256 @28", "linear 2048->1000")
SHAPES = {shape.name: shape for shape in LAYERS if shape.name in CHOSEN}
SPARSITIES = (0.7, 0.9)
KERNELS: dict[str, Callable[[torch.Tensor], Any] | None] = {
    "dense": None,
    "torch-csr": TorchSparseMatrix,
    "native": NativeSparseMatrix,
}
ROUNDS = 30
WARMUP_ROUNDS = 3


def masked_layer(shape: Shape, sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    layer = shape.build().eval()
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) >= sparsity)
    return layer


@pytest.mark.parametrize("implementation", list(KERNELS))
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("layer_name", list(SHAPES))
def test_layer(
    benchmark: BenchmarkFixture, layer_name: str, sparsity: float, implementation: str
) -> None:
    kernel = KERNELS[implementation]
    if implementation == "native" and isinstance(loaded := load_library(), NativeUnavailable):
        pytest.skip(f"native kernels unavailable: {loaded.reason}")
    shape = SHAPES[layer_name]
    dense = masked_layer(shape, sparsity)
    module = dense if kernel is None else sparse_twin(dense, kernel)
    x = torch.randn(shape.input)
    with torch.inference_mode():
        error = relative_error(module(x), dense(x))
    assert error <= 1e-4

    def once() -> Any:
        with torch.inference_mode():
            return module(x)

    benchmark.group = f"{layer_name} sparsity {sparsity}"
    benchmark.extra_info.update(
        {
            "layer": layer_name,
            "sparsity": sparsity,
            "implementation": implementation,
            "threads": torch.get_num_threads(),
            "relative_error": error,
        }
    )
    benchmark.pedantic(  # type: ignore[no-untyped-call]
        once, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1
    )


def test_the_round_trip_probe_reports_nanoseconds_or_why_not() -> None:
    """``round_trip`` (printed around the table) reads "<n> ns" where a compiler and two CPUs
    are there, else "unavailable (<why>)"."""
    text = round_trip()
    if (os.cpu_count() or 1) < 2:
        assert text.startswith("unavailable (")
    elif text.startswith("unavailable ("):
        pytest.skip(f"no probe here: {text}")
    else:
        value, unit = text.split()
        assert unit == "ns" and 0 < float(value) < 1e6

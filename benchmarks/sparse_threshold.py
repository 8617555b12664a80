"""Sparse (benchlib.sparse, PyTorch CSR) against dense per layer: where ``cpu-sparse`` pays.

For ResNet-50 layer shapes at batch 1, each layer with random unstructured masks at several
densities is timed dense and sparse, interleaved call by call (so machine drift hits both),
and the ratio dense / sparse of the medians is printed: above 1, sparse is faster. The
largest density where every GEMM-shaped layer wins is ``cpu-sparse``'s threshold
(``benchlib.sparse.convert.DEFAULT_THRESHOLD``).

    python benchmarks/sparse_threshold.py [--threads 2] [--reps 200] [--densities 0.5,0.3,0.1,0.05]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchlib.sparse.modules import SparseConv2d, SparseLinear, TorchSparseMatrix

LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1x1 256->64 @56x56": (lambda: nn.Conv2d(256, 64, 1, bias=False), (1, 256, 56, 56)),
    "conv3x3 128->128 @28x28": (
        lambda: nn.Conv2d(128, 128, 3, padding=1, bias=False),
        (1, 128, 28, 28),
    ),
    "linear 2048->1000": (lambda: nn.Linear(2048, 1000), (1, 2048)),
}


def sparse_twin(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d.from_dense(layer, TorchSparseMatrix)
    assert isinstance(layer, nn.Linear)
    return SparseLinear.from_dense(layer, TorchSparseMatrix)


def interleaved(a: nn.Module, b: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median seconds of ``a(x)`` and ``b(x)``, called alternately ``reps`` times each."""
    times_a, times_b = [], []
    with torch.inference_mode():
        for _ in range(5):
            a(x), b(x)
        for _ in range(reps):
            start = time.perf_counter_ns()
            a(x)
            middle = time.perf_counter_ns()
            b(x)
            times_a.append(middle - start)
            times_b.append(time.perf_counter_ns() - middle)
    return statistics.median(times_a) / 1e9, statistics.median(times_b) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--densities", default="0.5,0.3,0.1,0.05")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    densities = [float(d) for d in args.densities.split(",")]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, batch 1, {args.reps} reps")
    print(f"{'layer':26} {'density':>7} {'dense ms':>9} {'sparse ms':>9} {'dense/sparse':>12}")
    for name, (build, shape) in LAYERS.items():
        for density in densities:
            layer = build().eval()
            with torch.no_grad():
                layer.weight.mul_(torch.rand_like(layer.weight) < density)
            sparse = sparse_twin(layer)
            x = torch.randn(shape)
            with torch.inference_mode():
                error = (sparse(x) - layer(x)).abs().max() / layer(x).abs().max()
            if error > 1e-4:
                raise SystemExit(f"{name} at {density}: sparse differs from dense by {error:.2g}")
            dense_s, sparse_s = interleaved(layer, sparse, x, args.reps)
            print(
                f"{name:26} {density:7.2f} {dense_s * 1e3:9.3f} {sparse_s * 1e3:9.3f} "
                f"{dense_s / sparse_s:11.2f}x"
            )


if __name__ == "__main__":
    main()

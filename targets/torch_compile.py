"""torch.compile with the inductor backend, on the CPU and on CUDA.

Compilation is lazy in PyTorch (it happens at the first call), so ``prepare`` makes that first
call itself: the compile time lands in ``info["compile_s"]`` (and in the cell's prepare time),
never in the cold call or the timed samples. Shapes are static (``dynamic=False``): a cell has
one batch size, and static shapes give inductor its best kernels. Inductor's ``freezing`` is on,
as PyTorch recommends for inference: weights become constants, so convolutions get prepacked
oneDNN weights on the CPU and constant folding everywhere. Measured on ResNet-50, batch 1, two
threads: 41 ms with freezing against 82 ms without, and 58 ms in eager mode.

Options (``--targets torch-compile:max-autotune``): ``max-autotune`` benchmarks candidate
kernels (GEMM templates, and CUDA graphs on a GPU) while compiling; it compiles for minutes
instead of seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from benchlib.errors import ExportError
from benchlib.target import DeviceKind, Precision, Prepared, Target
from targets._common import BoundInputs, cuda_unavailable_reason, place, synchronizer

MODES: Mapping[str, str] = {
    "max-autotune": "inductor's max-autotune mode: benchmarks candidate kernels while compiling",
}


def compiler_unavailable_reason() -> str | None:
    """None when inductor can compile for the CPU here, else why not (one line)."""
    from torch._inductor import cpp_builder

    try:
        compiler = cpp_builder.get_cpp_compiler()
    except Exception as exc:  # inductor raises its own types when no compiler is found
        return f"inductor finds no C++ compiler for CPU kernels: {exc}".splitlines()[0]
    return None if compiler else "inductor finds no C++ compiler for CPU kernels"


@contextlib.contextmanager
def quiet_build_logs() -> Iterator[None]:
    """Silence the C++ extension builder's warning that a CPU-only machine has no CUDA
    runtime: it says nothing about the model and would print once per worker."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def compile_counters() -> dict[str, int]:
    """Dynamo's and inductor's counters so far in this process: graph breaks (each splits the
    compiled graph, leaving Python between the pieces) and inductor's FX graph cache: a hit
    skips code generation; frozen graphs bypass it (their weights are part of the code)."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "cache_misses": counters["inductor"]["fxgraph_cache_miss"],
        "cache_bypasses": counters["inductor"]["fxgraph_cache_bypass"],
    }


class TorchCompile:
    """``torch.compile(model, backend="inductor")``, run under ``torch.inference_mode``."""

    name: ClassVar[str] = "torch-compile"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CPU
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32, Precision.BF16})
    exploits_sparsity: ClassVar[bool] = False
    options: ClassVar[Mapping[str, str]] = MODES

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode

    def with_option(self, option: str) -> Target:
        return type(self)(mode=option)

    def version(self) -> str | None:
        return f"torch {torch.__version__} (inductor)"

    def unavailable_reason(self) -> str | None:
        return compiler_unavailable_reason()

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        from torch._inductor import config as inductor_config

        placed, bound = place(model, inputs, device, precision)
        current = BoundInputs(bound, device, precision)
        # A fresh compile per build: dynamo's caches are keyed by the forward's code object,
        # which every instance of a model class shares; a model of the same class but other
        # shapes would otherwise count against the recompile limit (or turn shapes dynamic).
        torch.compiler.reset()
        before = compile_counters()
        compiled = torch.compile(placed, backend="inductor", mode=self.mode, dynamic=False)
        sync = synchronizer(device)
        start = time.perf_counter()
        try:
            with quiet_build_logs(), inductor_config.patch(freezing=True), torch.inference_mode():
                compiled(*current.tensors)
            sync()
        except Exception as exc:  # dynamo and inductor raise many types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(
                f"torch.compile could not compile the model: {type(exc).__name__}: {first_line}"
            ) from exc
        compile_s = time.perf_counter() - start
        counted = {key: value - before[key] for key, value in compile_counters().items()}

        def run() -> Any:
            with torch.inference_mode():
                return compiled(*current.tensors)

        return Prepared(
            run=run,
            synchronize=sync,
            rebind=current.rebind,
            info={
                "engine": f"torch {torch.__version__} (torch.compile, inductor)",
                "mode": self.mode or "default",
                "freezing": True,
                "compile_s": compile_s,
                "graph_breaks": counted["graph_breaks"],
                # Frozen graphs bypass the FX graph cache, so compile_s always includes code
                # generation; the C++ kernels' compilation is cached on disk per kernel, so a
                # model compiled before on this machine compiles faster.
                "fx_graph_cache": {
                    "hits": counted["cache_hits"],
                    "misses": counted["cache_misses"],
                    "bypasses": counted["cache_bypasses"],
                },
            },
        )


class TorchCompileCuda(TorchCompile):
    """torch.compile on a CUDA device (triton kernels)."""

    name: ClassVar[str] = "torch-compile-cuda"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CUDA
    precisions: ClassVar[frozenset[Precision]] = frozenset(Precision)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed: inductor needs it to compile for CUDA"
        return cuda_unavailable_reason()

"""``cpu-sparse``: conv and linear layers of low weight density run as sparse x dense products.

``prepare`` converts every ``nn.Conv2d`` / ``nn.Linear`` whose weight density is at most the
threshold (``benchlib.sparse.DEFAULT_THRESHOLD``, measured there) to a sparse module and keeps
the others dense; ``info`` lists, per layer, what ran sparse, in which format and kernel, and
the weight bytes stored against dense. The kernels are PyTorch's own sparse CSR / BSR products
(MKL sparse BLAS on x86), which run on torch's thread pool, so ``--threads`` applies to them.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import nn

from benchlib.errors import ConfigError, ExportError
from benchlib.sparse import DEFAULT_THRESHOLD, sparsify, totals
from benchlib.target import DeviceKind, Precision, Prepared
from targets._common import BoundInputs, place, synchronizer


class CpuSparse:
    """The model with its sparse layers converted, called under ``torch.inference_mode``."""

    name: ClassVar[str] = "cpu-sparse"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CPU
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32})
    exploits_sparsity: ClassVar[bool] = True

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        """``threshold``: layers of weight density <= this run sparse. ConfigError outside
        [0, 1]."""
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"sparsity threshold {threshold} is outside [0, 1]")
        self.threshold = threshold

    def version(self) -> str | None:
        return f"torch {torch.__version__}"

    def unavailable_reason(self) -> str | None:
        return None  # PyTorch's sparse CSR product is part of every CPU build

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        """Place a copy of ``model`` (fp32, eval, CPU), convert its sparse layers, bind inputs.

        Raises ExportError for a device other than the CPU, a precision other than fp32, or a
        layer that cannot be converted (the message names it).
        """
        if device.type != "cpu":
            raise ExportError(f"{self.name} runs on the CPU only, not on {device}")
        if precision is not Precision.FP32:
            raise ExportError(f"{self.name} runs fp32 only, not {precision.value}")
        placed, bound = place(model, inputs, device, precision)
        current = BoundInputs(bound, device, precision)
        start = time.perf_counter()
        converted, layers = sparsify(placed, self.threshold, in_place=True)
        convert_s = time.perf_counter() - start

        def run() -> Any:
            with torch.inference_mode():
                return converted(*current.tensors)

        counts = totals(layers)
        formats = sorted({layer.format.upper() for layer in layers if layer.sparse})
        info: dict[str, Any] = {
            "engine": f"torch {torch.__version__} (sparse {'+'.join(formats) or 'CSR'})",
            "threshold": self.threshold,
            **counts,
            "sparse_kernel_used": counts["sparse_layers"] > 0,
            "kernels": sorted({layer.kernel for layer in layers if layer.kernel is not None}),
            "threads": torch.get_num_threads(),
            "layers": [layer.to_dict() for layer in layers],
            "convert_s": convert_s,
        }
        return Prepared(run=run, synchronize=synchronizer(device), rebind=current.rebind, info=info)

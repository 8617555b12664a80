"""TorchScript: ``torch.jit.trace``, ``freeze`` and ``optimize_for_inference``.

Freezing inlines the weights and folds conv + batch norm; ``optimize_for_inference`` then applies
the backend's graph rewrites (on the CPU, MKLDNN layouts for convolutions).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from torch.jit._trace import TracerWarning

from benchlib.errors import ExportError
from benchlib.target import DeviceKind, Precision, Prepared
from targets._common import BoundInputs, cuda_unavailable_reason, place, synchronizer


class TorchScript:
    """A traced, frozen and inference-optimized TorchScript module on the CPU."""

    name: ClassVar[str] = "torchscript"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CPU
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32})
    exploits_sparsity: ClassVar[bool] = False

    def version(self) -> str | None:
        return f"torch {torch.__version__}"

    def unavailable_reason(self) -> str | None:
        return None

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        placed, bound = place(model, inputs, device, precision)
        current = BoundInputs(bound, device, precision)
        start = time.perf_counter()
        # Tracer warnings (data-dependent control flow) are recorded, not raised: the
        # correctness gate that follows catches a trace that does not match eager. The
        # FutureWarnings that torch.jit is deprecated say nothing about this model.
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                    placed, bound, check_trace=False
                )
                scripted = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            except Exception as exc:  # the JIT raises many unrelated types
                raise ExportError(f"torchscript could not trace the model: {exc}") from exc
        build_s = time.perf_counter() - start
        tracer_warnings = sorted(
            {str(w.message) for w in caught if issubclass(w.category, TracerWarning)}
        )

        def run() -> Any:
            with torch.inference_mode():
                return scripted(*current.tensors)

        return Prepared(
            run=run,
            synchronize=synchronizer(device),
            rebind=current.rebind,
            info={
                "engine": f"torch {torch.__version__} (TorchScript)",
                "build_s": build_s,
                "tracer_warnings": tracer_warnings,
            },
        )


class TorchScriptCuda(TorchScript):
    """TorchScript on a CUDA device."""

    name: ClassVar[str] = "torchscript-cuda"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CUDA
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32, Precision.FP16})

    def unavailable_reason(self) -> str | None:
        return cuda_unavailable_reason()

"""PyTorch eager mode: the reference every other target is verified against."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from benchlib.target import DeviceKind, Precision, Prepared
from targets._common import BoundInputs, cuda_unavailable_reason, place, synchronizer


class TorchEager:
    """The model as written, called under ``torch.inference_mode`` on the CPU."""

    name: ClassVar[str] = "torch-eager"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CPU
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32, Precision.BF16})
    exploits_sparsity: ClassVar[bool] = False
    profiles_layers: ClassVar[bool] = True  # the module runs as written: its layers can be timed

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

        def run() -> Any:
            with torch.inference_mode():
                return placed(*current.tensors)

        return Prepared(
            run=run,
            synchronize=synchronizer(device),
            rebind=current.rebind,
            info={"engine": f"torch {torch.__version__}", "mode": "eager"},
        )


class TorchEagerCuda(TorchEager):
    """Eager mode on a CUDA device."""

    name: ClassVar[str] = "torch-eager-cuda"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CUDA
    precisions: ClassVar[frozenset[Precision]] = frozenset(Precision)
    profiles_layers: ClassVar[bool] = True

    def unavailable_reason(self) -> str | None:
        return cuda_unavailable_reason()

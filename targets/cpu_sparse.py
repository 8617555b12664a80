"""``cpu-sparse``: conv and linear layers of low weight density run as sparse x dense products.

``prepare`` (1) where the model traces with torch.fx, folds BatchNorm into the convs before it
and runs max pooling natively (``benchlib.sparse.fuse`` / ``pool``); (2) converts every
``nn.Conv2d`` / ``nn.Linear`` whose weight density is at most the threshold
(``benchlib.sparse.CANDIDATE_THRESHOLD``, measured there) to a sparse module; (3) times each
converted layer against its dense original on the input it really gets and keeps it sparse only
where that is faster (``benchlib.sparse.tune``); (4) lets the sparse layers apply the ReLU that
follows them; (5) runs each run of native sparse convs that only feed each other (a ResNet's
body, and the classifier head after it: global average pool, flatten, dense linear) as one
native call, bound here by one call on the real input (``benchlib.sparse.chain``).
``info`` lists, per layer, what ran sparse, in which format and kernel, why (density, and both
timings), and the weight bytes stored against dense, with ``weight_bytes_plans`` the bytes the
layers' native plans hold beside them (entry offsets, and block-major copies of the entries
of column-blocked convs; the plans are built in ``prepare``, by one call on the real input);
``info["fusion"]`` counts the fusions (a residual add folded into the pointwise conv before it,
the layers chained, and the head's average pools and dense linear layers run by a chain, too;
``banded``: chained layers whose output the chain keeps in bands of rows, ``bands.py``), or
says why the model was not traced.

The kernels are benchlib's own (``NativeSparseMatrix``: C++ built just in time, CSR and BSR
Rx1, direct convolution without im2col); where they cannot build, PyTorch's sparse CSR / BSR
products (MKL sparse BLAS on x86) run instead and ``info["native"]`` says why. Both run on
torch's OpenMP threads, so ``--threads`` applies.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import fx, nn

from benchlib.errors import ConfigError, ExportError
from benchlib.sparse import (
    CANDIDATE_THRESHOLD,
    LayerReport,
    NativeUnavailable,
    load_library,
    sparsify,
    totals,
)
from benchlib.sparse.chain import NativeChain, chain_convs
from benchlib.sparse.fuse import epilogues, fold_batchnorm, fuse_relu, fuse_residual, trace
from benchlib.sparse.modules import SparseConv2d
from benchlib.sparse.pool import replace_max_pools
from benchlib.sparse.tune import keep_faster
from benchlib.target import DeviceKind, Precision, Prepared
from targets._common import BoundInputs, place, synchronizer


class CpuSparse:
    """The model with its sparse layers converted, called under ``torch.inference_mode``."""

    name: ClassVar[str] = "cpu-sparse"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CPU
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32})
    exploits_sparsity: ClassVar[bool] = True

    def __init__(
        self, threshold: float = CANDIDATE_THRESHOLD, *, timed: bool = True, fuse: bool = True
    ) -> None:
        """``threshold``: layers of weight density <= this are candidates to run sparse;
        ``timed``: a candidate runs sparse only where it times faster than dense on its real
        input (``benchlib.sparse.tune``), else every candidate does; ``fuse``: fold BatchNorm
        into convs and ReLU into the sparse kernels, and run max pooling natively, where the
        model traces with torch.fx (``benchlib.sparse.fuse``). ConfigError for a threshold
        outside [0, 1] or flags that are not booleans."""
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"sparsity threshold {threshold} is outside [0, 1]")
        for flag, value in (("timed", timed), ("fuse", fuse)):
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name} option {flag}={value!r} must be True or False")
        self.threshold, self.timed, self.fuse = threshold, timed, fuse

    def version(self) -> str | None:
        return f"torch {torch.__version__}"

    def unavailable_reason(self) -> str | None:
        return None  # without the native kernels, PyTorch's sparse CSR product (every CPU build)

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
        converted, layers, fusion = self._convert(placed, bound)
        convert_s = time.perf_counter() - start

        def run() -> Any:
            with torch.inference_mode():
                return converted(*current.tensors)

        counts = totals(layers)
        formats = sorted({layer.format.upper() for layer in layers if layer.sparse})
        loaded = load_library()
        if isinstance(loaded, NativeUnavailable):
            native: dict[str, Any] = {"available": False, "reason": loaded.reason}
            engine = f"torch {torch.__version__} (sparse {'+'.join(formats) or 'CSR'})"
        else:
            native = {"available": True, "isa": loaded.isa, "build_s": loaded.build_s}
            engine = (
                f"benchlib native kernels ({loaded.isa}; sparse {'+'.join(formats) or 'CSR'}), "
                f"torch {torch.__version__}"
            )
        info: dict[str, Any] = {
            "engine": engine,
            "native": native,
            "threshold": self.threshold,
            "timed": self.timed,
            "fusion": fusion,
            **counts,
            "sparse_kernel_used": counts["sparse_layers"] > 0,
            "kernels": sorted({layer.kernel for layer in layers if layer.kernel is not None}),
            "threads": torch.get_num_threads(),
            "layers": [layer.to_dict() for layer in layers],
            "convert_s": convert_s,
            "weight_bytes_plans": sum(
                m.plan_bytes() for m in converted.modules() if isinstance(m, SparseConv2d)
            ),
        }
        return Prepared(run=run, synchronize=synchronizer(device), rebind=current.rebind, info=info)

    def _convert(
        self, model: nn.Module, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[nn.Module, list[LayerReport], dict[str, Any]]:
        """Fuse (when asked and traceable), sparsify in place, keep only faster sparse layers
        (when timed), fuse ReLUs; the model, its layer reports and what was fused."""
        fusion: dict[str, Any] = {
            "batchnorm_folded": 0,
            "residual_fused": 0,
            "relu_fused": 0,
            "max_pools": 0,
            "chained": 0,
            "avgpools_chained": 0,
            "linears_chained": 0,
            "banded": 0,
            "padded_planes": 0,
            "copies_fused": 0,
        }
        if self.fuse:
            traced = trace(model)
            if isinstance(traced, str):
                fusion["skipped"] = traced
            else:
                model = traced
                fusion["batchnorm_folded"] = fold_batchnorm(traced)
            fusion["max_pools"] = replace_max_pools(model)
        dense = dict(model.named_modules())
        converted, layers = sparsify(model, self.threshold, in_place=True)
        if self.timed:
            graph = converted if self.fuse and isinstance(converted, fx.GraphModule) else None
            fused = epilogues(graph) if graph is not None else {}
            chainable = set()  # native convs of a fused graph: a chain may run each (timed so)
            if graph is not None:
                chainable = {
                    name
                    for name, m in graph.named_modules()
                    if isinstance(m, SparseConv2d) and m.gathers
                }
            layers = keep_faster(
                converted, layers, dense, inputs, epilogues=fused, chained=chainable
            )
        if self.fuse and isinstance(converted, fx.GraphModule):
            fusion["residual_fused"] = fuse_residual(converted)
            fusion["relu_fused"] = fuse_relu(converted)
            fusion["chained"] = chain_convs(converted)
        chains = [m for m in converted.modules() if isinstance(m, NativeChain)]
        fusion["avgpools_chained"] = sum(chain.head is not None for chain in chains)
        fusion["linears_chained"] = sum(
            chain.head is not None and chain.head.linear is not None for chain in chains
        )
        with torch.inference_mode():  # builds the layers' plans and binds the chains
            converted(*inputs)
        fusion["banded"] = sum(chain.banded_layers() for chain in chains)
        fusion["padded_planes"] = sum(chain.padded_layers() for chain in chains)
        fusion["copies_fused"] = sum(chain.fused_copies() for chain in chains)
        return converted, layers, fusion

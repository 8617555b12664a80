"""GPU 2:4 semi-structured sparsity: ``torch.sparse.to_sparse_semi_structured`` on tensor cores.

Linear layers, and 1x1 convolutions run as GEMMs, whose weights are 2:4 along the input
dimension (at most 2 nonzeros in every 4 consecutive input weights of a row: what ``nm:2:4``
produces) are compressed once in ``prepare`` and multiplied with ``F.linear``, which the
semi-structured tensor subclass dispatches to cuSPARSELt or CUTLASS. Every other layer runs
dense, with its one-line reason in ``info["dense_layers"]``.

What torch does (``torch/sparse/semi_structured.py`` and ``_semi_structured_ops.py``, read for
2.14 and against the older ``_pad_dense_input`` releases):

- Backends: cuSPARSELt where the build has it (compute capability 8.x and 9.x), else CUTLASS,
  whose kernels run on 8.x only. ``to_sparse_semi_structured`` picks by the class flag
  ``SparseSemiStructuredTensor._FORCE_CUTLASS``, whose default differs between releases, so
  it is set around each conversion and restored.
- Each backend has minimum weight shapes per dtype (``_DTYPE_SHAPE_CONSTRAINTS``): the
  (out, in) weight must be a positive multiple of them in both dimensions. They are checked
  per layer before converting, read from torch so that a release that changes them is obeyed.
- The dense operand's rows (batch x tokens, or N*H*W) are padded inside torch to the
  backend's dense minimum, so every batch size runs; the kernels assume tightly packed rows,
  so the modules here hand ``F.linear`` a contiguous 2-D input.
- Only fp16 and bf16 here: cuSPARSELt has no fp32 kernel.
"""

from __future__ import annotations

import enum
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from benchlib.errors import ExportError
from benchlib.pruning.masks import nm_violation
from benchlib.target import DeviceKind, Precision, Prepared
from targets._common import BoundInputs, cuda_unavailable_reason, place, synchronizer

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``F.linear``'s signature: (rows (M, in), weight (out, in), bias (out,) or None) -> (M, out)."""

Compress = Callable[[torch.Tensor], torch.Tensor]
"""Turns a dense, contiguous (out, in) weight into the tensor a ``LinearFn`` multiplies by."""

_PROTOTYPE_WARNING = "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"
_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class Backend(str, enum.Enum):
    """The kernel library behind torch's semi-structured tensors."""

    CUSPARSELT = "cusparselt"
    CUTLASS = "cutlass"

    @property
    def label(self) -> str:
        return "cuSPARSELt" if self is Backend.CUSPARSELT else "CUTLASS"


def choose_backend(capability: tuple[int, int], cusparselt: bool) -> Backend | None:
    """The backend for a device of compute ``capability`` (None: none runs there).

    cuSPARSELt (when the torch build has it, ``cusparselt``) on 8.0 and above; CUTLASS on 8.x.
    """
    if capability < (8, 0):
        return None
    if cusparselt:
        return Backend.CUSPARSELT
    return Backend.CUTLASS if capability[0] == 8 else None


def availability_reason(device: str, capability: tuple[int, int], cusparselt: bool) -> str | None:
    """None when ``choose_backend`` finds a backend for this device, else why not (one line)."""
    have = f"{device} has compute capability {capability[0]}.{capability[1]}"
    if capability < (8, 0):
        return f"2:4 sparse tensor cores need compute capability 8.0 or higher; {have}"
    if choose_backend(capability, cusparselt) is None:
        return f"this torch build has no cuSPARSELt and CUTLASS 2:4 kernels need 8.x; {have}"
    return None


@dataclass(frozen=True)
class ShapeMinimum:
    """Both dimensions of a weight must be positive multiples of these (``label``'s minimum)."""

    out_features: int
    in_features: int
    label: str


def shape_minimum(backend: Backend, precision: Precision) -> ShapeMinimum:
    """torch's minimum (out, in) weight shape for ``backend`` at ``precision``.

    Raises ExportError when the backend has no kernel for that dtype.
    """
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = (
        SparseSemiStructuredTensorCUSPARSELT
        if backend is Backend.CUSPARSELT
        else SparseSemiStructuredTensorCUTLASS
    )
    constraint = cls._DTYPE_SHAPE_CONSTRAINTS.get(precision.dtype)
    if constraint is None:
        raise ExportError(
            f"torch {torch.__version__} has no {backend.label} 2:4 kernel for {precision.value}"
        )
    label = f"{precision.value} {backend.label}"
    return ShapeMinimum(constraint.sparse_min_rows, constraint.sparse_min_cols, label)


def two_four_violation(matrix: torch.Tensor) -> str | None:
    """None when ``matrix`` (out, in) is 2:4 along its rows, else the first group that is not.

    2:4 means: each row, cut into groups of 4 consecutive columns, holds at most 2 nonzeros per
    group (fewer is fine). The answer names the offending group, e.g. ``"row 3 group 5 has 3
    nonzeros"`` (0-based; group 5 is columns 20-23). Raises ValueError unless ``matrix`` is 2-D.
    """
    if matrix.dim() != 2:
        raise ValueError(f"expected an (out, in) matrix, got shape {tuple(matrix.shape)}")
    return nm_violation(matrix, 2, 4)


def is_two_four(matrix: torch.Tensor) -> bool:
    """Whether ``matrix`` (out, in) is 2:4 along its rows (see ``two_four_violation``)."""
    return two_four_violation(matrix) is None


class Skip(str, enum.Enum):
    """Why a layer stays dense; the failure message of a model where no layer qualifies."""

    KIND = "no layer is a Linear or a 1x1, stride-1, unpadded, ungrouped Conv2d"
    ATTENTION = "its Linear layers are nn.MultiheadAttention's, which reads their weights itself"
    NOT_24 = "no layer is 2:4: prune with nm:2:4"
    SHAPE = "no layer meets the shape minimums"


@dataclass(frozen=True)
class Verdict:
    """One Linear or conv layer: converted (``skip`` None) or dense, with ``reason``."""

    name: str
    skip: Skip | None = None
    reason: str = ""


def judge(
    module: nn.Module, minimum: ShapeMinimum, *, in_attention: bool = False
) -> tuple[Skip, str] | None:
    """None when ``module`` (a Linear or conv) can run 2:4 under ``minimum``, else why not.

    The checks run in the order kind, shape, 2:4 pattern; the first failing one answers, so a
    layer that pruning could not make convertible (its kind or shape) is never told to prune.
    """
    if isinstance(module, nn.Linear):
        if in_attention:
            return Skip.ATTENTION, "Linear of nn.MultiheadAttention, which reads its weight"
        dims = ("out_features", "in_features")
    elif isinstance(module, nn.Conv2d):
        refusal = _conv_refusal(module)
        if refusal is not None:
            return Skip.KIND, refusal
        dims = ("out_channels", "in_channels")
    else:
        return Skip.KIND, f"{type(module).__name__}, only Linear and 1x1 Conv2d run 2:4"
    weight = gemm_weight(module)
    needs = (minimum.out_features, minimum.in_features)
    for dim, size, need in zip(dims, weight.shape, needs, strict=True):
        if size < need or size % need:
            what = "a multiple of" if size % need else "at least"
            return Skip.SHAPE, f"{dim} {size} is not {what} {need} ({minimum.label} minimum)"
    violation = two_four_violation(weight)
    if violation is not None:
        return Skip.NOT_24, f"weight not 2:4 ({violation})"
    return None


def _conv_refusal(conv: nn.Conv2d) -> str | None:
    def text(pair: tuple[int, ...]) -> str:
        return "x".join(map(str, pair))

    if conv.kernel_size != (1, 1):
        return f"kernel {text(conv.kernel_size)}, only 1x1 convs run as GEMMs"
    if conv.stride != (1, 1):
        return f"stride {text(conv.stride)}, only stride-1 convs run as GEMMs"
    # "same" and "valid" both mean no padding for a 1x1 kernel
    if isinstance(conv.padding, tuple) and any(conv.padding):
        return f"padding {text(conv.padding)}, only unpadded convs run as GEMMs"
    if conv.groups != 1:
        return f"groups {conv.groups}, only groups=1 convs run as GEMMs"
    return None


def gemm_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a Linear or a 1x1 Conv2d multiplies its input rows by."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no weight tensor")
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))


@dataclass(frozen=True)
class LayerPlan:
    """Every Linear and conv layer of a model, in ``named_modules`` order, with its verdict."""

    verdicts: tuple[Verdict, ...]

    @property
    def converted(self) -> list[str]:
        return [v.name for v in self.verdicts if v.skip is None]

    @property
    def dense(self) -> dict[str, str]:
        """Layer name -> why it stays dense."""
        return {v.name: v.reason for v in self.verdicts if v.skip is not None}

    def failure(self, minimum: ShapeMinimum) -> str:
        """The ExportError message of a plan that converts nothing: the commonest reason."""
        skipped = [(v.skip, v) for v in self.verdicts if v.skip is not None]
        if not skipped:
            return "the model has no Linear or Conv2d layer"
        skip, count = Counter(why for why, _ in skipped).most_common(1)[0]
        example = next(v for why, v in skipped if why is skip)
        head = skip.value
        if skip is Skip.SHAPE:
            head += (
                f" (out a multiple of {minimum.out_features}, in of {minimum.in_features}:"
                f" {minimum.label})"
            )
        return (
            f"{head}: {count} of {len(self.verdicts)} Linear/conv layers"
            f" (e.g. {example.name}: {example.reason})"
        )


def plan_layers(model: nn.Module, minimum: ShapeMinimum) -> LayerPlan:
    """Judge every Linear and conv layer of ``model`` (see ``judge``); pure, any device."""
    in_attention = {
        id(child)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        for child in module.children()
    }
    verdicts = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, *_CONVS)):
            why = judge(module, minimum, in_attention=id(module) in in_attention)
            verdicts.append(Verdict(name) if why is None else Verdict(name, *why))
    return LayerPlan(tuple(verdicts))


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` with its weight held compressed: ``y = linear(x, weight, bias)``.

    ``weight`` is the (out, in) matrix as ``compress`` left it (a semi-structured tensor on the
    GPU; a dense stand-in in tests); ``linear`` is ``F.linear`` unless injected. Inputs of any
    leading shape are flattened to contiguous rows first.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, linear: LinearFn = F.linear
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight, self.bias, self.linear = weight, bias, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: the 2:4 kernels read the rows as tightly packed whatever their stride
        rows = x.reshape(-1, self.in_features).contiguous()
        out = self.linear(rows, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class SemiStructuredConv1x1(SemiStructuredLinear):
    """A 1x1, stride-1, unpadded, ungrouped ``nn.Conv2d`` as one GEMM over the pixels.

    (N, C, H, W) -> rows (N*H*W, C) @ W^T -> (N, H, W, Cout) -> (N, Cout, H, W). The rows are
    the input's channels-last view, so a channels_last input costs no copy and a channels-first
    one one permute copy; the output keeps the input's memory format, as ``nn.Conv2d`` does: a
    free view for channels_last, one copy back for channels-first (where later ``.view`` calls
    need it). Unbatched (C, H, W) inputs work as well.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        n, _, h, w = batched.shape
        rows = batched.permute(0, 2, 3, 1).reshape(-1, self.in_features).contiguous()
        out = self.linear(rows, self.weight, self.bias)
        out = out.reshape(n, h, w, self.out_features).permute(0, 3, 1, 2)
        if not batched.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()
        return out if x.dim() == 4 else out.squeeze(0)


def convert(
    model: nn.Module, names: list[str], compress: Compress, *, linear: LinearFn = F.linear
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Replace the Linear / 1x1 Conv2d layers ``names`` of ``model``, in place, by their
    ``SemiStructured*`` counterparts holding ``compress(weight)``.

    A layer registered under several names is replaced everywhere. Returns the model (a new
    object only when ``""``, the root itself, is converted) and the compressed weights by
    name. Raises ExportError naming the layer when ``compress`` fails.
    """
    replacements: dict[int, nn.Module] = {}
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        module = model.get_submodule(name)
        try:
            weight = compress(gemm_weight(module).detach().contiguous())
        except (RuntimeError, ValueError) as exc:  # torch's shape/dtype/device checks
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{name or 'model'}: 2:4 compression failed: {detail}") from exc
        bias = module.bias.detach() if isinstance(module.bias, torch.Tensor) else None
        kind = SemiStructuredLinear if isinstance(module, nn.Linear) else SemiStructuredConv1x1
        replacements[id(module)] = kind(weight, bias, linear=linear)
        weights[name] = weight
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return replacements.get(id(model), model), weights


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: for a tensor subclass (a semi-structured weight), the sum over
    the inner tensors it flattens to (values, metadata)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if callable(flatten):
        inner, _ = flatten()
        return sum(stored_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()


def semi_structured_compressor(backend: Backend) -> Compress:
    """``to_sparse_semi_structured`` on ``backend``: the class flag that selects it is set for
    the call and restored, and torch's one-time "prototype" warning is silenced."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    def compress(weight: torch.Tensor) -> torch.Tensor:
        previous = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend is Backend.CUTLASS
        try:
            with warnings.catch_warnings():
                # says the API may change; the version is recorded in info instead
                warnings.filterwarnings("ignore", _PROTOTYPE_WARNING, UserWarning)
                return to_sparse_semi_structured(weight)
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = previous

    return compress


def _cusparselt_version() -> str | None:
    number = torch.backends.cusparselt.version()
    if not torch.backends.cusparselt.is_available() or number is None:
        return None
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"  # MAJOR*1000+MINOR*100+PATCH


class CudaSparse24:
    """2:4 semi-structured sparse GEMMs for Linear and 1x1 conv layers, on a CUDA device."""

    name: ClassVar[str] = "cuda-sparse24"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CUDA
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP16, Precision.BF16})
    exploits_sparsity: ClassVar[bool] = True

    def version(self) -> str | None:
        """``"torch X semi-structured (cuSPARSELt V)"``, or ``(CUTLASS)`` without cuSPARSELt;
        None when this torch has no semi-structured tensors."""
        try:
            from torch.sparse import to_sparse_semi_structured  # noqa: F401
        except ImportError:
            return None
        cusparselt = _cusparselt_version()
        kernels = f"cuSPARSELt {cusparselt}" if cusparselt else "CUTLASS"
        return f"torch {torch.__version__} semi-structured ({kernels})"

    def unavailable_reason(self) -> str | None:
        reason = cuda_unavailable_reason()
        if reason is not None:
            return reason
        try:
            from torch.sparse import to_sparse_semi_structured  # noqa: F401
        except ImportError:
            return f"this torch build ({torch.__version__}) has no to_sparse_semi_structured"
        index = torch.cuda.current_device()
        return availability_reason(
            torch.cuda.get_device_name(index),
            torch.cuda.get_device_capability(index),
            torch.backends.cusparselt.is_available(),
        )

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        """Compress the qualifying layers of a copy of ``model`` on ``device``; see the module.

        A model where no layer qualifies (the dense baseline of a 2:4 variant) runs dense, with
        ``info["all_dense"]`` saying why (the commonest reason) and ``sparse_kernel_used``
        False. Raises ExportError for a precision other than fp16/bf16, a non-CUDA device, a
        device without a backend, or a layer torch refuses to compress. ``info["convert_s"]``
        is the compression time in seconds (synchronized).
        """
        if precision not in self.precisions:
            raise ExportError(f"{self.name} runs fp16 and bf16 only, not {precision.value}")
        if device.type != "cuda":
            raise ExportError(f"{self.name} runs on a CUDA device, not {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        device_name = torch.cuda.get_device_name(index)
        cusparselt = torch.backends.cusparselt.is_available()
        backend = choose_backend(capability, cusparselt)
        if backend is None:
            raise ExportError(availability_reason(device_name, capability, cusparselt))
        minimum = shape_minimum(backend, precision)
        placed, bound = place(model, inputs, device, precision)
        plan = plan_layers(placed, minimum)
        dense_bytes = sum(
            stored_bytes(gemm_weight(placed.get_submodule(name))) for name in plan.converted
        )
        start = time.perf_counter()
        placed, weights = convert(placed, plan.converted, semi_structured_compressor(backend))
        torch.cuda.synchronize(device)
        convert_s = time.perf_counter() - start
        from torch.sparse import SparseSemiStructuredTensor

        current = BoundInputs(bound, device, precision)
        built = placed

        def run() -> Any:
            with torch.inference_mode():
                return built(*current.tensors)

        info: Mapping[str, Any] = {
            "engine": f"torch {torch.__version__} semi-structured ({backend.label})",
            "backend": backend.value,
            "backend_version": _cusparselt_version() if backend is Backend.CUSPARSELT else None,
            "device": f"{device_name} (compute capability {capability[0]}.{capability[1]})",
            "converted_layers": plan.converted,
            "dense_layers": plan.dense,
            "weight_bytes_dense": dense_bytes,
            "weight_bytes_compressed": sum(stored_bytes(w) for w in weights.values()),
            "convert_s": convert_s,
            # a semi-structured weight is what routes F.linear to the 2:4 kernels
            "sparse_kernel_used": bool(weights)
            and all(isinstance(w, SparseSemiStructuredTensor) for w in weights.values()),
        }
        if not plan.converted:  # the dense baseline of a 2:4 variant: runs, and says why dense
            info = {**info, "all_dense": plan.failure(minimum)}
        return Prepared(run=run, synchronize=synchronizer(device), rebind=current.rebind, info=info)

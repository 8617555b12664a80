"""ONNX Runtime: the model exported to ONNX (``targets._onnx``), run by an InferenceSession.

Session options: full graph optimization (``ORT_ENABLE_ALL``), ``intra_op_num_threads`` from
the harness's ``--threads`` (read back as ``torch.get_num_threads()``), one inter-op thread and
sequential execution, so that the thread count means the same as for the torch targets.

* ``onnxruntime``: the CPU execution provider. fp32 and fp16 (an fp16 export; measured correct,
  resnet18 within 7e-4 of eager fp32 like eager fp16 itself, but on x86 no faster than fp32).
  bf16 is not offered: ONNX's Conv takes no bf16 at opset 18, the checker refuses such a graph.
* ``onnxruntime-cuda``: the CUDA execution provider (``onnxruntime-gpu``), fp32 and fp16. Inputs
  and outputs stay on the device through IO binding: the bound torch tensors' memory is handed
  to ONNX Runtime as is, and the outputs are written into torch tensors allocated once.

The .onnx file lives in a temporary directory only until the session is built: ONNX Runtime
keeps the model in memory.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from benchlib.errors import ExportError
from benchlib.target import DeviceKind, Precision, Prepared
from targets._common import BoundInputs, cuda_unavailable_reason, place, synchronizer
from targets._onnx import export_onnx, one_line, onnx_unavailable_reason

if TYPE_CHECKING:
    import onnxruntime as ort
    from numpy.typing import NDArray

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def ort_unavailable_reason() -> str | None:
    """None when onnxruntime and onnx import, else one line saying what to install."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "the onnxruntime package is not installed: pip install onnxruntime"
    return onnx_unavailable_reason()


def ort_version() -> str | None:
    """``"onnxruntime X.Y.Z"``, or None when onnxruntime does not import."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return f"onnxruntime {onnxruntime.__version__}"


def session_options(threads: int) -> ort.SessionOptions:
    """Full graph optimization, ``threads`` intra-op threads, one inter-op thread, sequential
    execution, only errors logged."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # 0 verbose .. 4 fatal
    return options


def build_session(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    providers: list[str | tuple[str, dict[str, str]]],
) -> tuple[ort.InferenceSession, dict[str, Any]]:
    """Export ``model`` (placed) and build a session on ``providers``; the build facts for
    ``info`` (times in seconds). Raises ExportError when either step fails."""
    import onnxruntime as ort

    options = session_options(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="benchlib-onnx-", ignore_cleanup_errors=True) as tmp:
        exported = export_onnx(model, inputs, Path(tmp))
        model_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
        start = time.perf_counter()
        try:
            session = ort.InferenceSession(
                str(exported.path), sess_options=options, providers=providers
            )
        except Exception as exc:  # ORT raises its own types (Fail, InvalidGraph, ...)
            raise ExportError(f"onnxruntime could not load the model: {one_line(exc)}") from exc
        session_build_s = time.perf_counter() - start
    if len(session.get_inputs()) != len(inputs):
        raise ExportError(
            f"the exported graph takes {len(session.get_inputs())} inputs, the model "
            f"{len(inputs)} (an input the model does not use was dropped)"
        )
    used = session.get_session_options()
    info: dict[str, Any] = {
        "engine": f"onnxruntime {ort.__version__}",
        "exporter": exported.exporter,
        "exporter_fallback": exported.fallback_reason,
        "opset": exported.opset,
        "export_s": exported.export_s,
        "session_build_s": session_build_s,
        "providers": session.get_providers(),
        "graph_optimization_level": used.graph_optimization_level.name,
        "intra_op_threads": used.intra_op_num_threads,
        "onnx_model_bytes": model_bytes,
        "onnx_sha256": exported.sha256,
    }
    return session, info


class DeviceBinding:
    """A session's IO binding to torch tensors on ``device``: inputs bound where they lie (their
    ``data_ptr``, no copy), outputs written into torch tensors allocated once, of the graph's
    static output shapes. Works on the CPU as on CUDA.

    Raises ExportError when an output has no static shape or a dtype torch cannot hold.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        device: torch.device,
        inputs: tuple[torch.Tensor, ...],
        precision: Precision,
    ) -> None:
        self._session = session
        self._binding = session.io_binding()
        self._device_type = device.type
        self._device_id = device.index or 0
        self._inputs = BoundInputs(inputs, device, precision)
        self._names = [i.name for i in session.get_inputs()]
        outputs = []
        for meta in session.get_outputs():
            shape = meta.shape
            if not all(isinstance(d, int) for d in shape):
                raise ExportError(f"output {meta.name!r} has no static shape ({shape})")
            outputs.append(torch.empty(shape, dtype=_torch_dtype(meta.type), device=device))
            self._bind(self._binding.bind_output, meta.name, outputs[-1])
        self.outputs = tuple(outputs)
        self._bind_inputs()

    def rebind(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Bind new inputs of the same shapes and dtypes (moved and cast here, once)."""
        self._inputs.rebind(inputs)
        self._bind_inputs()

    def run(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One inference; the outputs (``self.outputs``, a lone one unwrapped)."""
        self._session.run_with_iobinding(self._binding)
        return self.outputs[0] if len(self.outputs) == 1 else self.outputs

    def _bind_inputs(self) -> None:
        self._tensors = tuple(t.contiguous() for t in self._inputs.tensors)  # kept alive here
        for name, tensor in zip(self._names, self._tensors, strict=True):
            self._bind(self._binding.bind_input, name, tensor)
        if self._device_type == "cuda":
            # ORT's kernels run on their own stream: the copies that made the inputs (on
            # torch's stream) must have landed before the next run reads them.
            torch.cuda.synchronize(self._tensors[0].device)

    def _bind(self, bind: Any, name: str, tensor: torch.Tensor) -> None:
        element_type = _NUMPY_TYPES.get(tensor.dtype)
        if element_type is None:
            raise ExportError(f"{name!r} is {tensor.dtype}: ONNX Runtime cannot bind that type")
        shape = list(tensor.shape)
        bind(name, self._device_type, self._device_id, element_type, shape, tensor.data_ptr())


def _torch_dtype(onnx_type: str) -> torch.dtype:
    """The torch dtype of an ORT type string such as ``tensor(float16)``."""
    dtype = _ORT_TYPES.get(onnx_type)
    if dtype is None:
        raise ExportError(f"an output of type {onnx_type} cannot be bound to a torch tensor")
    return dtype


# ORT type string -> torch dtype; bind_* take the element type as a numpy scalar type.
_ORT_TYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
})  # fmt: skip
_NUMPY_TYPES: Mapping[torch.dtype, type[np.generic]] = MappingProxyType({
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
})  # fmt: skip


class OnnxRuntime:
    """An ONNX export run by ONNX Runtime's CPU execution provider."""

    name: ClassVar[str] = "onnxruntime"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CPU
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32, Precision.FP16})
    exploits_sparsity: ClassVar[bool] = False

    def version(self) -> str | None:
        return ort_version()

    def unavailable_reason(self) -> str | None:
        return ort_unavailable_reason()

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        """Export and build a CPU session. ``run`` returns torch tensors that share memory
        with ONNX Runtime's output arrays (a tuple when the graph has several outputs).

        Raises ExportError when the model cannot be exported or loaded.
        """
        placed, bound = place(model, inputs, device, precision)
        session, info = build_session(placed, bound, [CPU_PROVIDER])
        current = BoundInputs(bound, device, precision)
        names = [i.name for i in session.get_inputs()]
        feed: dict[str, NDArray[Any]] = {}

        def bind(tensors: tuple[torch.Tensor, ...]) -> None:
            # numpy views of the bound tensors: session.run reads them without a copy
            feed.update(zip(names, (t.contiguous().numpy() for t in tensors), strict=True))

        def rebind(new: tuple[torch.Tensor, ...]) -> None:
            current.rebind(new)
            bind(current.tensors)

        bind(bound)

        def run() -> Any:
            outputs: list[NDArray[Any]] = session.run(None, feed)
            tensors = tuple(torch.from_numpy(o) for o in outputs)
            return tensors[0] if len(tensors) == 1 else tensors

        return Prepared(run=run, synchronize=synchronizer(device), rebind=rebind, info=info)


class OnnxRuntimeCuda(OnnxRuntime):
    """An ONNX export run by ONNX Runtime's CUDA execution provider, with IO binding."""

    name: ClassVar[str] = "onnxruntime-cuda"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CUDA
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32, Precision.FP16})

    def unavailable_reason(self) -> str | None:
        missing = ort_unavailable_reason()
        if missing is not None:
            return missing
        import onnxruntime as ort

        if CUDA_PROVIDER not in ort.get_available_providers():
            return (
                f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER}: "
                "install onnxruntime-gpu in place of onnxruntime"
            )
        return cuda_unavailable_reason()

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        """Export (the model in ``precision`` on ``device``) and build a CUDA session whose
        inputs and outputs are bound to device memory. ``run`` returns when ONNX Runtime's
        stream has finished (its default), with the outputs in the same device tensors each
        time, overwritten by the next run.

        Raises ExportError when the model cannot be exported or loaded, or when ONNX Runtime
        fell back to the CPU because its CUDA provider could not start.
        """
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        placed, bound = place(model, inputs, device, precision)
        providers: list[str | tuple[str, dict[str, str]]] = [
            (CUDA_PROVIDER, {"device_id": str(device.index)}),
            CPU_PROVIDER,
        ]
        session, info = build_session(placed, bound, providers)
        if CUDA_PROVIDER not in session.get_providers():
            raise ExportError(
                f"onnxruntime could not start its {CUDA_PROVIDER} (it fell back to "
                f"{', '.join(session.get_providers())}): are CUDA and cuDNN libraries for "
                "onnxruntime-gpu installed?"
            )
        binding = DeviceBinding(session, device, bound, precision)
        info["io_binding"] = True
        return Prepared(
            run=binding.run, synchronize=synchronizer(device), rebind=binding.rebind, info=info
        )

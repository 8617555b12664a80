"""TensorRT: the model exported to ONNX, built by ``trt.Builder`` + ``OnnxParser``, run with
``execute_async_v3`` on the current CUDA stream.

The pipeline of ``prepare``: a copy of the model in fp32 on the CPU is exported to ONNX
(``targets._onnx.export_onnx``); fp16 and bf16 engines are built from that fp32 graph with
``BuilderFlag.FP16`` / ``BF16`` (trtexec's ``--fp16`` practice: I/O stays fp32, TensorRT picks
reduced-precision kernels). Models whose conv and linear weights follow 2:4 along the input
channels get ``BuilderFlag.SPARSE_WEIGHTS``. The serialized plan is cached on disk, keyed by the
ONNX file, the TensorRT version, the GPU and the build options (``targets._tensorrt_build``), so
a second cell of the same variant only deserializes it. ``info`` says which layers run sparse
kernels, from the builder's log or the engine inspector (``targets._tensorrt_report``).

Written against the TensorRT 10 Python API: TensorRT 11 removed the weak-typing flags (FP16,
BF16) this target builds with, so it reports itself unavailable there. TensorRT is imported
only inside ``unavailable_reason``, ``version`` and ``prepare``.

Threads: TensorRT's Python API has no CPU thread-pool setting; the ONNX export runs on torch's
threads, which the harness has already set.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from benchlib.errors import ExportError
from benchlib.target import DeviceKind, Precision, Prepared
from targets._common import cuda_unavailable_reason, place
from targets._tensorrt_build import (
    DEFAULT_WORKSPACE_BYTES,
    BuildOptions,
    build_plan,
    cache_key,
    capturing_logger,
    engine_cache_dir,
    read_plan,
    write_plan,
)
from targets._tensorrt_checks import (
    capability_problem,
    torch_dtype,
    two_four_layers,
    version_problem,
)
from targets._tensorrt_report import inspector_sparse_layers, log_sparsity, sparse_report

if TYPE_CHECKING:
    from targets._onnx import OnnxExport

INSTALL_HINT = "pip install 'benchlib[tensorrt]'"


class TensorRT:
    """An engine built by TensorRT 10 from the model's ONNX export, on a CUDA device."""

    name: ClassVar[str] = "tensorrt"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CUDA
    precisions: ClassVar[frozenset[Precision]] = frozenset(Precision)
    exploits_sparsity: ClassVar[bool] = True

    def __init__(self, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> None:
        self.workspace_bytes = workspace_bytes

    def version(self) -> str | None:
        """``"TensorRT X.Y.Z"``, or None when the tensorrt package cannot be imported."""
        try:
            import tensorrt as trt
        except (ImportError, OSError):
            return None
        return f"TensorRT {trt.__version__}"

    def unavailable_reason(self) -> str | None:
        """None when TensorRT 10, onnx and a capable CUDA GPU are here, else one line."""
        try:
            import tensorrt as trt
        except ImportError:
            return f"the tensorrt package is not installed ({INSTALL_HINT})"
        except OSError as exc:  # the wheel is there, libnvinfer is not loadable
            return " ".join(f"the tensorrt package cannot load its libraries: {exc}".split())
        try:
            import onnx  # noqa: F401
        except ImportError:
            return "the onnx package is not installed (pip install onnx)"
        problem = version_problem(trt.__version__) or cuda_unavailable_reason()
        if problem is not None:
            return problem
        return capability_problem(
            trt.__version__, torch.cuda.get_device_capability(), torch.cuda.get_device_name()
        )

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        """Export, build (or load the cached plan) and bind ``inputs`` to device buffers.

        Raises ExportError when the model does not export, TensorRT cannot parse or build it
        (the message names the ONNX node where the parser does), or the GPU lacks ``precision``.
        Build, export and load times are in ``info`` in seconds.
        """
        import tensorrt as trt

        from targets._onnx import export_onnx

        capability = torch.cuda.get_device_capability(device)
        if precision is Precision.BF16 and capability < (8, 0):
            raise ExportError(
                f"TensorRT bf16 needs compute capability 8.0 or newer; this GPU has "
                f"{capability[0]}.{capability[1]}"
            )
        placed, cpu_inputs = place(model, inputs, torch.device("cpu"), Precision.FP32)
        two_four = two_four_layers(placed)
        options = BuildOptions(
            precision=precision,
            sparse_weights=bool(two_four),
            workspace_bytes=self.workspace_bytes,
            input_shapes=tuple(tuple(x.shape) for x in cpu_inputs),
        )
        gpu = torch.cuda.get_device_name(device)
        logger = capturing_logger(trt)
        cache = engine_cache_dir()
        facts: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="benchlib-tensorrt-") as scratch:
            exported = export_onnx(placed, cpu_inputs, Path(scratch))
            key = cache_key(
                onnx_sha256=exported.sha256,
                trt_version=trt.__version__,
                gpu_name=gpu,
                compute_capability=capability,
                options=options,
            )
            with torch.cuda.device(device):
                runtime = trt.Runtime(logger)
                engine, deserialize_s = _deserialize(runtime, read_plan(cache, key))
                build_s = None
                if engine is None:  # not cached, or a plan this TensorRT cannot load
                    start = time.perf_counter()
                    plan = build_plan(trt, logger, exported, options)
                    build_s = time.perf_counter() - start
                    try:
                        write_plan(cache, key, plan)
                    except OSError as exc:  # a read-only cache costs a rebuild, not the cell
                        facts["cache_write_error"] = str(exc)
                    engine, deserialize_s = _deserialize(runtime, plan)
                if engine is None:
                    raise ExportError(f"TensorRT could not deserialize the plan it built ({key})")
                bound = _Bound(trt, engine, exported, cpu_inputs, device, keep=(runtime, logger))
        inspector = engine.create_engine_inspector()
        from_inspector = inspector_sparse_layers(
            inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        )
        sparsity = log_sparsity(logger.messages)
        sparse_layers, source = sparse_report(sparsity, from_inspector)

        def synchronize() -> None:
            torch.cuda.current_stream(device).synchronize()

        return Prepared(
            run=bound.run,
            synchronize=synchronize,
            rebind=bound.rebind,
            info={
                "engine": f"TensorRT {trt.__version__}",
                "exporter": exported.exporter,
                "onnx_opset": exported.opset,
                "onnx_fallback_reason": exported.fallback_reason,
                "export_s": exported.export_s,
                "build_s": build_s,
                "deserialize_s": deserialize_s,
                "cache_hit": build_s is None,
                "cache_key": key,
                "cache_dir": str(cache),
                **facts,
                "gpu": gpu,
                "compute_capability": f"{capability[0]}.{capability[1]}",
                "workspace_bytes": options.workspace_bytes,
                "builder_flags": list(options.flags),
                "tf32": "TF32" not in options.cleared,
                "two_four_layers": two_four,
                "sparse_weights": options.sparse_weights,
                "sparse_layers": sparse_layers,
                "sparse_source": source,
                "sparse_eligible_layers": sparsity.eligible,
                "engine_layers": engine.num_layers,
            },
        )


def _deserialize(runtime: Any, plan: bytes | None) -> tuple[Any, float]:
    """The engine of ``plan`` (None when there is no plan or TensorRT rejects it) and the
    seconds deserializing took."""
    if plan is None:
        return None, 0.0
    start = time.perf_counter()
    engine = runtime.deserialize_cuda_engine(plan)
    return engine, time.perf_counter() - start


class _Bound:
    """An execution context with device buffers for every I/O tensor, bound once.

    Inputs are copied into their buffers by ``rebind`` (outside the timed loop); ``run`` only
    enqueues the engine on the current stream and returns the output buffers, which the next
    ``run`` overwrites.
    """

    def __init__(
        self,
        trt: Any,
        engine: Any,
        exported: OnnxExport,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        keep: tuple[Any, ...],
    ) -> None:
        # The runtime and the logger must outlive the engine and its context.
        self.engine, self.device, self.keep = engine, device, keep
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ExportError("TensorRT could not create an execution context (out of memory?)")
        by_name = dict(zip(exported.input_names, inputs, strict=False))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs: dict[str, torch.Tensor] = {}
        for name in (n for n in names if is_input[n]):
            if name not in by_name:
                raise ExportError(f"TensorRT engine input {name!r} is not one of the model's")
            example = by_name[name]
            if -1 in tuple(engine.get_tensor_shape(name)):
                self.context.set_input_shape(name, tuple(example.shape))
            dtype = torch_dtype(engine.get_tensor_dtype(name).name, name)
            self.inputs[name] = example.to(device=device, dtype=dtype).contiguous()
        # Output shapes are known once every input shape is set.
        outputs = {
            name: torch.empty(
                tuple(self.context.get_tensor_shape(name)),
                dtype=torch_dtype(engine.get_tensor_dtype(name).name, name),
                device=device,
            )
            for name in names
            if not is_input[name]
        }
        for name, buffer in {**self.inputs, **outputs}.items():
            if not self.context.set_tensor_address(name, buffer.data_ptr()):
                raise ExportError(f"TensorRT refused the device buffer of tensor {name!r}")
        self.order = list(exported.input_names)
        missing = [n for n in exported.output_names if n not in outputs]
        if missing:
            raise ExportError(f"TensorRT engine lacks the model outputs {missing}")
        ordered = [outputs[n] for n in exported.output_names]
        self.outputs: torch.Tensor | tuple[torch.Tensor, ...] = (
            ordered[0] if len(ordered) == 1 else tuple(ordered)
        )

    def run(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed to enqueue the engine")
        return self.outputs

    def rebind(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Copy ``inputs`` (any device and float dtype) into the bound input buffers."""
        for name, new in zip(self.order, inputs, strict=False):
            if name in self.inputs:
                self.inputs[name].copy_(new)

"""Building TensorRT engine plans and caching them on disk.

The cache is a directory (``$BENCHLIB_CACHE_DIR/tensorrt``, else
``~/.cache/benchlib/tensorrt``) of ``<key>.plan`` files, written atomically (a temporary file in
the same directory, then ``os.replace``), so concurrent workers never read half a plan. The key
is a sha256 over everything a plan depends on: the ONNX file, the TensorRT version, the GPU
(name and compute capability) and the build options. Plans are not portable across GPUs or
TensorRT versions, hence both in the key.

TensorRT calls are kept to ``build_plan`` and ``capturing_logger``; the rest is pure.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchlib.errors import ConfigError, ExportError
from benchlib.target import Precision
from targets._tensorrt_checks import unsupported_onnx

if TYPE_CHECKING:
    from targets._onnx import OnnxExport

CACHE_ENV = "BENCHLIB_CACHE_DIR"
KEY_SCHEMA = "benchlib-tensorrt-plan/1"
DEFAULT_WORKSPACE_BYTES = 1 << 30
"""1 GiB of scratch memory per layer at most: enough for the zoo's convnets at batch 64."""

_PRECISION_FLAGS: Mapping[Precision, tuple[str, ...]] = {
    Precision.FP32: (),
    Precision.FP16: ("FP16",),
    Precision.BF16: ("BF16",),
}


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What an engine is built with, besides the ONNX graph.

    ``input_shapes`` are the example inputs' shapes (the engine is built for exactly these);
    fp32 clears ``BuilderFlag.TF32`` (on by default in TensorRT), so that an fp32 cell really
    computes in fp32, as the fp32 tolerance of the correctness gate assumes.
    """

    precision: Precision
    sparse_weights: bool
    workspace_bytes: int
    input_shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.workspace_bytes <= 0:
            raise ConfigError(f"TensorRT workspace must be positive, got {self.workspace_bytes}")

    @property
    def flags(self) -> tuple[str, ...]:
        """Names of the ``trt.BuilderFlag`` members to set."""
        sparse = ("SPARSE_WEIGHTS",) if self.sparse_weights else ()
        return _PRECISION_FLAGS[self.precision] + sparse

    @property
    def cleared(self) -> tuple[str, ...]:
        """Names of the ``trt.BuilderFlag`` members to clear."""
        return ("TF32",) if self.precision is Precision.FP32 else ()


def cache_key(
    *,
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    options: BuildOptions,
) -> str:
    """The hex sha256 naming the plan built from these inputs (stable across processes)."""
    fields = {
        "schema": KEY_SCHEMA,
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "compute_capability": list(compute_capability),
        "precision": options.precision.value,
        "flags": list(options.flags),
        "cleared": list(options.cleared),
        "workspace_bytes": options.workspace_bytes,
        "input_shapes": [list(shape) for shape in options.input_shapes],
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def engine_cache_dir(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """``$BENCHLIB_CACHE_DIR/tensorrt``, else ``~/.cache/benchlib/tensorrt`` (``~`` expanded).

    ``environ`` defaults to ``os.environ`` and ``home`` to ``Path.home()``; an empty
    ``BENCHLIB_CACHE_DIR`` counts as unset. Nothing is created here.
    """
    environ = os.environ if environ is None else environ
    configured = environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser() / "tensorrt"
    return (Path.home() if home is None else home) / ".cache" / "benchlib" / "tensorrt"


def plan_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.plan"


def read_plan(directory: Path, key: str) -> bytes | None:
    """The cached plan for ``key``, or None when there is none (or it cannot be read)."""
    try:
        return plan_path(directory, key).read_bytes()
    except OSError:
        return None


def write_plan(directory: Path, key: str, plan: bytes) -> Path:
    """Store ``plan`` under ``key`` atomically; returns its path. Raises OSError when the
    directory cannot be created or written."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(plan)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, plan_path(directory, key))
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return plan_path(directory, key)


def capturing_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that keeps INFO and more severe messages in ``.messages`` (the
    sparsity report is INFO) and errors also in ``.errors``; VERBOSE ones are dropped."""
    severity = trt.ILogger.Severity
    kept = {severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING, severity.INFO}
    failed = {severity.INTERNAL_ERROR, severity.ERROR}

    class CapturingLogger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []
            self.errors: list[str] = []
            self._lock = threading.Lock()  # TensorRT may log from its own threads

        def log(self, level: Any, message: str) -> None:
            if level not in kept:
                return
            with self._lock:
                self.messages.append(message)
                if level in failed:
                    self.errors.append(message)

    return CapturingLogger()


def describe_parser_errors(errors: Sequence[tuple[str, str, str]], unsupported: list[str]) -> str:
    """One line for a failed ONNX parse: the first ``(node name, op, description)`` error,
    how many more there were, and the ops or opset outside what TensorRT 10 documents."""
    if errors:
        name, op, description = errors[0]
        where = f"node {name!r} ({op}): " if name or op else ""
        message = f"TensorRT could not parse the ONNX graph: {where}{description}"
        if len(errors) > 1:
            message += f" (+{len(errors) - 1} more errors)"
    else:
        message = "TensorRT could not parse the ONNX graph"
    if unsupported:
        message += "; outside what TensorRT 10 parses: " + ", ".join(unsupported)
    return " ".join(message.split())


def build_plan(trt: Any, logger: Any, exported: OnnxExport, options: BuildOptions) -> bytes:
    """Parse ``exported`` and build a serialized engine plan with ``options``.

    Runs on the current CUDA device. Raises ExportError when the parser rejects the graph
    (naming the node) or the builder fails (with TensorRT's last error message).
    """
    import onnx

    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(exported.path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        described = [(_call(e, "node_name"), _call(e, "node_operator"), e.desc()) for e in errors]
        graph = onnx.load(str(exported.path), load_external_data=False)
        raise ExportError(describe_parser_errors(described, unsupported_onnx(graph)))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in options.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in options.cleared:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    shapes = dict(zip(exported.input_names, options.input_shapes, strict=False))
    dynamic = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [tensor for tensor in dynamic if -1 in tuple(tensor.shape)]
    if dynamic:  # an exporter's dynamic dims: build for exactly the example shapes
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            if tensor.name not in shapes:
                raise ExportError(f"ONNX input {tensor.name!r} is not one of the model's inputs")
            shape = shapes[tensor.name]
            profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        last = logger.errors[-1] if logger.errors else "no error was logged"
        raise ExportError(" ".join(f"TensorRT could not build the engine: {last}".split()))
    return bytes(serialized)


def _call(error: Any, method: str) -> str:
    """``error.method()`` as text, or "" where the bindings lack it (the Python names of
    IParserError's nodeName/nodeOperator are not in the TensorRT 10 Python docs)."""
    found = getattr(error, method, None)
    return str(found()) if callable(found) else ""

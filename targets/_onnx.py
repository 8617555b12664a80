"""Export a placed model to an ONNX file, checked, for the targets that run ONNX (ORT, TensorRT).

Two exporters, tried in this order:

* ``"torchscript"``: ``torch.onnx.export(..., dynamo=False)``, the legacy tracer. Preferred
  because it is 4 to 8 times faster on the CNN zoo (resnet18 / mobilenet_v3_small /
  efficientnet_b0 at 224x224: 0.4 / 0.2 / 0.6 s against 1.6 / 2.3 / 3.4 s for dynamo, torch
  2.14.1, one thread) and its graphs run equally fast once ONNX Runtime has optimized them.
* ``"dynamo"``: ``torch.onnx.export(..., dynamo=True)``, based on ``torch.export``. Used when the
  tracer fails, or when it warns that the trace may not generalize (a ``TracerWarning``: a tensor
  turned into a Python bool or number), because a trace specialized to the example input gives
  wrong outputs on other inputs, which the harness rotates through, while ``torch.export`` either
  captures the model soundly or refuses it. Transformers take this path (nn.MultiheadAttention
  and vit_b_16 make the tracer warn), as do models using ops the tracer cannot export.

Opset 18: the dynamo exporter writes 18 natively (asked for 17, its down-conversion fails on
ReduceMean and it silently keeps 18), ONNX Runtime accepts it from 1.14 and TensorRT 10's parser
from 10.0. Shapes are static, taken from the example inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.jit._trace import TracerWarning

from benchlib.errors import ExportError

if TYPE_CHECKING:
    import onnx

OPSET = 18
FILE_NAME = "model.onnx"
_PROTOBUF_LIMIT_BYTES = 2**31  # a larger model must keep its weights in external data
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class OnnxExport:
    """An exported, checked ONNX model and how it was made.

    Attributes:
        path: the .onnx file (weights inside, or external data beside it if > 2 GB).
        exporter: "dynamo" (torch.export based) or "torchscript" (legacy), the one that worked.
        export_s: seconds spent exporting, a failed attempt of the preferred exporter included
            (the checker excluded).
        opset: the default-domain opset the file declares.
        input_names: the graph's inputs, in the order of the model's arguments.
        output_names: the graph's outputs, in the order of the model's flattened outputs.
        sha256: hex digest of the .onnx file's bytes, followed by those of its external data
            files (sorted by name) when there are any, so that it covers the weights.
        fallback_reason: why the preferred exporter was not used, else None.
    """

    path: Path
    exporter: str
    export_s: float
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sha256: str
    fallback_reason: str | None


def onnx_unavailable_reason() -> str | None:
    """None when the ``onnx`` package imports, else one line saying how to install it."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return "the onnx package is not installed: pip install onnx"
    return None


def export_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], directory: Path) -> OnnxExport:
    """Export ``model`` (already placed: eval mode, device and dtype as wanted) with static
    shapes taken from ``inputs`` into ``directory``, check it with onnx.checker (by path, so
    >2GB works), raise ExportError with a one-line reason when no exporter can export it.

    ``directory`` must exist (a fresh temporary one: the file is ``directory / "model.onnx"``,
    plus its external data). The exporters' progress prints, log records and warnings are kept
    out of the caller's output.
    """
    import onnx

    path = directory / FILE_NAME
    input_names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    failures: list[str] = []
    start = time.perf_counter()
    for exporter in ("torchscript", "dynamo"):
        before = set(directory.iterdir())
        try:
            if exporter == "torchscript":
                _export_torchscript(model, inputs, path, input_names)
            else:
                _export_dynamo(model, inputs, path, input_names)
            export_s = time.perf_counter() - start
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # exporters and the checker raise many unrelated types
            failures.append(f"{exporter}: {one_line(exc)}")
            for leftover in set(directory.iterdir()) - before:  # a half-written file
                leftover.unlink()
            continue
        proto = onnx.load(str(path), load_external_data=False)
        initializers = {init.name for init in proto.graph.initializer}
        return OnnxExport(
            path=path,
            exporter=exporter,
            export_s=export_s,
            opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            input_names=tuple(i.name for i in proto.graph.input if i.name not in initializers),
            output_names=tuple(o.name for o in proto.graph.output),
            sha256=_sha256(path, _external_files(proto)),
            fallback_reason=failures[0] if failures else None,
        )
    raise ExportError("could not export the model to ONNX: " + "; ".join(failures))


def one_line(exc: BaseException) -> str:
    """The innermost cause of ``exc`` as ``Type: first line``: the exporters wrap the error that
    names the op or the layer in several layers of advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _export_torchscript(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: list[str]
) -> None:
    """The legacy tracing exporter; raises when it fails or its trace is input-specific."""
    # record=True keeps the exporter's DeprecationWarning (that it is legacy) and its advice on
    # the graph out of the caller's warnings; TracerWarnings decide whether the trace is usable.
    with warnings.catch_warnings(record=True) as caught, _quiet():
        warnings.simplefilter("always")
        torch.onnx.export(
            model, inputs, str(path), dynamo=False, opset_version=OPSET, input_names=input_names
        )
    tracer = [w for w in caught if issubclass(w.category, TracerWarning)]
    if tracer:
        first = tracer[0]
        raise InputSpecificTrace(
            f"the trace may only hold for the example input ({len(tracer)} TracerWarning(s), "
            f"first at {Path(first.filename).name}:{first.lineno}: "
            f"{str(first.message).split('. ')[0]})"
        )


def _export_dynamo(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: list[str]
) -> None:
    """The torch.export based exporter (needs onnxscript)."""
    weight_bytes = sum(
        t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
    )
    # The dynamo exporter writes weights beside the file by default; keep them inside while
    # protobuf allows, so that one file is the whole model.
    with warnings.catch_warnings(record=True), _quiet():
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            external_data=weight_bytes >= _PROTOBUF_LIMIT_BYTES,
            verbose=False,
        )


def _external_files(proto: onnx.ModelProto) -> list[str]:
    return [
        entry.value
        for init in proto.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    ]


class InputSpecificTrace(Exception):
    """The tracer warned that its graph may only be valid for the example input."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow what the exporters print: dynamo's progress and, when capture fails, the graphs
    both dump (Python prints, torch's log handlers and, from the tracer's C++ side, straight to
    file descriptors 1 and 2); the raised exception says what failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with tempfile.TemporaryFile() as native, io.StringIO() as sink:
            for fd in saved:
                os.dup2(native.fileno(), fd)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
    finally:
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)


def _sha256(path: Path, external: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for part in (path, *(path.parent / name for name in sorted(set(external)))):
        with part.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()

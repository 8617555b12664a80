"""The ONNX export helper and the ONNX Runtime targets (CPU here; CUDA where a GPU is)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchlib.errors import ExportError, TargetUnavailable
from benchlib.harness.verify import TOLERANCE, relative_error
from benchlib.models import Model
from benchlib.target import Precision, TargetRegistry

onnx = pytest.importorskip(
    "onnx", reason="the onnx package is not installed (pip install onnx onnxruntime)"
)
ort = pytest.importorskip(
    "onnxruntime", reason="the onnxruntime package is not installed (pip install onnx onnxruntime)"
)

from targets import _onnx  # noqa: E402
from targets._onnx import OPSET, export_onnx, onnx_unavailable_reason  # noqa: E402
from targets.onnx_runtime import (  # noqa: E402
    CUDA_PROVIDER,
    DeviceBinding,
    OnnxRuntime,
    OnnxRuntimeCuda,
    build_session,
    ort_unavailable_reason,
)

CPU = torch.device("cpu")


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x) + y, y * 2


class Branchy(nn.Module):
    """Control flow on a tensor's value: a trace holds only for the example's branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1


class KthValue(nn.Module):
    """aten::kthvalue has no ONNX translation in either exporter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(x, 2).values


class Attention(nn.Module):
    """nn.MultiheadAttention checks its inputs' values on the host: the tracer warns."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended: torch.Tensor = self.attn(x, x, x, need_weights=False)[0]
        return attended


def eval_mode(module: nn.Module) -> nn.Module:
    nn.Module.train(module, False)
    return module


@pytest.fixture
def transformer_block() -> nn.Module:
    torch.manual_seed(0)
    return eval_mode(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True))


def test_export_passes_the_checker_and_holds_what_it_claims(
    tiny_model: Model, tmp_path: Path
) -> None:
    exported = export_onnx(tiny_model.module, (tiny_model.example_input(2),), tmp_path)
    onnx.checker.check_model(str(exported.path), full_check=True)
    proto = onnx.load(str(exported.path))
    assert exported.exporter == "torchscript" and exported.fallback_reason is None
    assert exported.opset == OPSET == 18
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 18)}
    assert exported.input_names == tuple(i.name for i in proto.graph.input) == ("input",)
    assert exported.output_names == tuple(o.name for o in proto.graph.output)
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 10]  # static shapes from the example input
    assert exported.sha256 == hashlib.sha256(exported.path.read_bytes()).hexdigest()
    assert exported.export_s > 0


def test_several_inputs_and_outputs_are_named_in_order(tmp_path: Path) -> None:
    inputs = (torch.randn(2, 4), torch.randn(2, 3))
    exported = export_onnx(eval_mode(TwoInputs()), inputs, tmp_path)
    assert exported.input_names == ("input_0", "input_1")
    assert len(exported.output_names) == 2


def test_falls_back_to_dynamo_when_the_tracer_fails(
    tiny_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: nn.Module, inputs: object, path: Path, names: object) -> None:
        path.write_bytes(b"half a file")
        raise RuntimeError("tracer broke\nwith a long story")

    monkeypatch.setattr(_onnx, "_export_torchscript", broken)
    exported = export_onnx(tiny_model.module, (tiny_model.example_input(1),), tmp_path)
    assert exported.exporter == "dynamo"
    assert exported.fallback_reason == "torchscript: RuntimeError: tracer broke"
    onnx.checker.check_model(str(exported.path), full_check=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_an_input_specific_trace_is_replaced_by_dynamo(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = eval_mode(Attention())
    exported = export_onnx(model, (torch.randn(2, 8, 32),), tmp_path)
    assert exported.exporter == "dynamo"
    assert exported.fallback_reason is not None and "TracerWarning" in exported.fallback_reason


def test_outputs_match_eager_on_a_transformer_block(transformer_block: nn.Module) -> None:
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        expected = transformer_block(x)
    prepared = OnnxRuntime().prepare(transformer_block, (x,), CPU, Precision.FP32)
    assert relative_error(prepared.run(), expected) <= TOLERANCE[Precision.FP32]
    # the tracer cannot take this block in torch 2.14 (its attention fast path): dynamo does
    assert prepared.info["exporter"] == "dynamo"
    assert prepared.info["exporter_fallback"].startswith("torchscript: ")


def test_a_model_no_exporter_can_take_raises_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="kthvalue") as caught:
        export_onnx(eval_mode(KthValue()), (torch.randn(3, 4),), tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "torchscript: " in message and "dynamo: " in message
    with pytest.raises(ExportError, match="kthvalue"):
        OnnxRuntime().prepare(KthValue(), (torch.randn(3, 4),), CPU, Precision.FP32)


def test_a_trace_valid_for_one_branch_only_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"TracerWarning.*data-dependent"):
        export_onnx(eval_mode(Branchy()), (torch.ones(1, 4),), tmp_path)


def test_a_graph_onnx_cannot_type_is_refused_naming_the_op(tiny_model: Model) -> None:
    """Why the CPU target offers no bf16: Conv takes no bfloat16 at opset 18."""
    with pytest.raises(ExportError, match=r"Conv.*bfloat16"):
        OnnxRuntime().prepare(
            tiny_model.module, (tiny_model.example_input(1),), CPU, Precision.BF16
        )


def test_a_model_onnx_runtime_cannot_load_raises_export_error(
    tiny_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : no kernel\ndetails")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(ExportError) as caught:
        build_session(tiny_model.module, (tiny_model.example_input(1),), ["CPUExecutionProvider"])
    assert str(caught.value) == (
        "onnxruntime could not load the model: RuntimeError: [ONNXRuntimeError] : 1 : FAIL : "
        "no kernel"
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_session_uses_the_harness_thread_count(tiny_model: Model, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        session, info = build_session(
            tiny_model.module, (tiny_model.example_input(1),), ["CPUExecutionProvider"]
        )
    finally:
        torch.set_num_threads(before)
    options = session.get_session_options()
    assert options.intra_op_num_threads == info["intra_op_threads"] == threads
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
def test_cpu_outputs_match_eager_and_info_is_complete(
    tiny_model: Model, precision: Precision
) -> None:
    inputs = (tiny_model.example_input(2),)
    with torch.no_grad():
        expected = tiny_model.module(*inputs)
    prepared = OnnxRuntime().prepare(tiny_model.module, inputs, CPU, precision)
    actual = prepared.run()
    assert isinstance(actual, torch.Tensor) and actual.dtype == precision.dtype
    assert relative_error(actual, expected) <= TOLERANCE[precision]
    info = dict(prepared.info)
    json.dumps(info)
    assert info["engine"] == f"onnxruntime {ort.__version__}" == OnnxRuntime().version()
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert info["opset"] == 18 and info["onnx_model_bytes"] > 1000
    assert info["export_s"] > 0 and info["session_build_s"] > 0


def test_rebind_changes_the_outputs(tiny_model: Model) -> None:
    first, second = tiny_model.example_input(2, seed=1), tiny_model.example_input(2, seed=2)
    prepared = OnnxRuntime().prepare(tiny_model.module, (first,), CPU, Precision.FP32)
    before = prepared.run().clone()
    assert prepared.rebind is not None
    prepared.rebind((second,))
    after = prepared.run()
    with torch.no_grad():
        assert relative_error(after, tiny_model.module(second)) <= TOLERANCE[Precision.FP32]
    assert not torch.allclose(before, after)


def test_device_binding_runs_on_bound_memory(tiny_model: Model) -> None:
    """The CUDA target's IO binding, exercised on the CPU provider."""
    first, second = tiny_model.example_input(2, seed=1), tiny_model.example_input(2, seed=2)
    session, _ = build_session(tiny_model.module, (first,), ["CPUExecutionProvider"])
    binding = DeviceBinding(session, CPU, (first,), Precision.FP32)
    out = binding.run()
    assert out is binding.outputs[0]  # written in place, no allocation per run
    with torch.no_grad():
        assert relative_error(out.clone(), tiny_model.module(first)) <= 1e-5
        binding.rebind((second,))
        assert relative_error(binding.run(), tiny_model.module(second)) <= 1e-5


def test_missing_packages_are_reported_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert onnx_unavailable_reason() is None and ort_unavailable_reason() is None
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    assert onnx_unavailable_reason() == ("the onnx package is not installed: pip install onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    reason = OnnxRuntime().unavailable_reason()
    assert reason is not None and reason.startswith("the onnxruntime package is not installed")
    assert OnnxRuntime().version() is None


def test_importing_the_target_imports_no_backend() -> None:
    code = (
        "import sys, targets.onnx_runtime; "
        "print(sorted({'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]"


def test_cuda_target_says_why_it_cannot_run_here() -> None:
    target = TargetRegistry.from_entry_points().get("onnxruntime-cuda")
    assert isinstance(target, OnnxRuntimeCuda)
    has_provider = CUDA_PROVIDER in ort.get_available_providers()
    if has_provider and torch.cuda.is_available():
        pytest.skip("onnxruntime-gpu and a CUDA device are both here")
    reason = target.unavailable_reason()
    assert reason is not None and "\n" not in reason
    assert ("onnxruntime-gpu" in reason) if not has_provider else ("CUDA" in reason)
    with pytest.raises(TargetUnavailable, match="onnxruntime-cuda"):
        TargetRegistry.from_entry_points().require("onnxruntime-cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
def test_cuda_target_runs_on_device_memory(tiny_model: Model, precision: Precision) -> None:
    target = OnnxRuntimeCuda()
    reason = target.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    first, second = tiny_model.example_input(2, seed=1), tiny_model.example_input(2, seed=2)
    prepared = target.prepare(tiny_model.module, (first,), torch.device("cuda"), precision)
    out = prepared.run()
    prepared.synchronize()
    assert out.device.type == "cuda" and out.dtype == precision.dtype
    assert prepared.info["providers"][0] == CUDA_PROVIDER and prepared.info["io_binding"]
    with torch.no_grad():
        assert relative_error(out, tiny_model.module(first)) <= TOLERANCE[precision]
        assert prepared.rebind is not None
        prepared.rebind((second,))
        out = prepared.run()
        prepared.synchronize()
        assert relative_error(out, tiny_model.module(second)) <= TOLERANCE[precision]

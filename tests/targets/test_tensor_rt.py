"""The TensorRT target: everything up to the ONNX file here, the engine where TensorRT runs."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

from benchlib.errors import ConfigError, ExportError
from benchlib.harness.verify import TOLERANCE, relative_error
from benchlib.models import Model
from benchlib.pruning import prune
from benchlib.target import Precision, TargetRegistry
from targets import tensor_rt
from targets._tensorrt_build import (
    BuildOptions,
    build_plan,
    cache_key,
    capturing_logger,
    describe_parser_errors,
    engine_cache_dir,
    read_plan,
    write_plan,
)
from targets._tensorrt_checks import (
    MAX_ONNX_OPSET,
    TRT_ONNX_OPS,
    capability_problem,
    minimum_compute_capability,
    parse_version,
    torch_dtype,
    two_four_layers,
    two_four_sparse,
    unsupported_onnx,
    version_problem,
)
from targets._tensorrt_report import (
    SparsityLog,
    inspector_sparse_layers,
    log_sparsity,
    sparse_report,
)
from targets.tensor_rt import TensorRT

# -- 2:4 detection ---------------------------------------------------------------------------


def two_four_weight(*shape: int, groups_of: int = 4) -> torch.Tensor:
    """A random weight with exactly 2 nonzeros in every group of 4 input channels."""
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    moved = weight.movedim(1, -1)
    grouped = moved.reshape(-1, groups_of)
    grouped[:, 1::2] = 0  # keep positions 0 and 2 of each group
    return grouped.reshape(moved.shape).movedim(-1, 1).contiguous()


@pytest.mark.parametrize(
    "shape",
    [(8, 16), (16, 8, 3, 3), (4, 4, 1, 1), (8, 12, 5), (4, 8, 3, 3, 3)],
    ids=["linear", "conv2d", "conv1x1", "conv1d", "conv3d"],
)
def test_two_four_weights_are_detected(shape: tuple[int, ...]) -> None:
    weight = two_four_weight(*shape)
    assert two_four_sparse(weight)
    assert two_four_sparse(torch.zeros(shape))  # all zeros is 2:4 too
    dense = weight.clone()
    dense[(0, 1) + (0,) * (dense.dim() - 2)] = 1.0  # a third nonzero in the first group of 4
    assert not two_four_sparse(dense)


def test_two_four_groups_run_along_input_channels_not_the_flat_weight() -> None:
    # 2 nonzeros in every 4 consecutive *memory* elements of a 3x3 conv, but the input-channel
    # groups at one (out, kh, kw) position hold 4 nonzeros: not what sparse tensor cores read.
    weight = torch.zeros(4, 4, 3, 3)
    weight[:, :, 0, :2] = 1.0
    flat = weight.reshape(-1, 4)
    assert bool(((flat != 0).sum(dim=1) <= 2).all())
    assert not two_four_sparse(weight)
    # ... and the transposed pattern is 2:4 although memory groups hold 4 nonzeros.
    columnwise = torch.zeros(2, 4, 2, 2)
    columnwise[:, :2] = 1.0
    assert two_four_sparse(columnwise)


@pytest.mark.parametrize("shape", [(8, 6), (8, 3, 3, 3), (8, 1, 3, 3), (8,), (8, 0)], ids=str)
def test_input_dims_not_a_multiple_of_four_are_never_two_four(shape: tuple[int, ...]) -> None:
    assert not two_four_sparse(torch.zeros(shape))


class SmallNet(nn.Module):
    """stem (3 in) -> two 16/32-channel convs (one grouped) -> BN -> pool -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.grouped(torch.relu(self.body(x)))))
        x = torch.relu(self.depthwise(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_model() -> Model:
    torch.manual_seed(0)
    return Model(name="small", module=SmallNet().eval(), input_shape=(3, 16, 16), source="factory")


def test_two_four_layers_are_the_layers_the_nm_pruner_pruned() -> None:
    model = small_model()
    assert two_four_layers(model.module) == []
    variant = prune(model, "nm:2:4")
    pruned = [n for n in variant.recipe.layers if n not in variant.recipe.details["dense_layers"]]
    assert pruned == ["body", "grouped"]  # stem (3 in) and head are left dense, depthwise fits not
    assert two_four_layers(variant.module) == pruned


# -- versions, GPUs, dtypes ------------------------------------------------------------------


def test_versions_parse_to_their_numeric_prefix() -> None:
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("10.0.0b6") == (10, 0, 0)
    assert parse_version("dev") == ()


def test_only_tensorrt_10_is_supported() -> None:
    assert version_problem("10.0.1") is None
    assert version_problem("10.13.2.6") is None
    old, new = version_problem("8.6.1"), version_problem("11.2.0")
    assert old is not None and "needs TensorRT 10" in old
    assert new is not None and "TensorRT 11 removed" in new
    assert all("\n" not in line for line in (old, new))


def test_tensorrt_10_5_dropped_volta() -> None:
    assert minimum_compute_capability("10.4.0") == (7, 0)
    assert minimum_compute_capability("10.5.0") == (7, 5)
    assert capability_problem("10.4.0", (7, 0), "Tesla V100") is None
    assert capability_problem("10.5.0", (7, 0), "Tesla V100") == (
        "Tesla V100 has compute capability 7.0; TensorRT 10.5.0 needs 7.5 or newer"
    )
    assert capability_problem("10.5.0", (9, 0), "NVIDIA H100") is None


def test_engine_dtypes_map_to_torch_and_the_rest_is_refused() -> None:
    assert torch_dtype("HALF", "x") is torch.float16
    assert torch_dtype("BF16", "x") is torch.bfloat16
    assert torch_dtype("INT64", "x") is torch.int64
    with pytest.raises(ExportError, match="'logits' has type FP8"):
        torch_dtype("FP8", "logits")


# -- availability -----------------------------------------------------------------------------


def fake_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", module)


def test_missing_tensorrt_is_one_line_that_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    target = TensorRT()
    assert target.unavailable_reason() == (
        "the tensorrt package is not installed (pip install 'benchlib[tensorrt]')"
    )
    assert target.version() is None


def test_this_machine_reports_tensorrt_missing() -> None:
    target = TargetRegistry.from_entry_points().get("tensorrt")
    assert isinstance(target, TensorRT)
    reason = target.unavailable_reason()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert reason == "the tensorrt package is not installed (pip install 'benchlib[tensorrt]')"
    else:
        assert reason is None or "\n" not in reason


def test_each_missing_piece_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    target = TensorRT()
    fake_tensorrt(monkeypatch, "10.5.0")
    assert target.version() == "TensorRT 10.5.0"
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert target.unavailable_reason() == ("the onnx package is not installed (pip install onnx)")
    monkeypatch.setitem(sys.modules, "onnx", onnx)
    monkeypatch.setattr(tensor_rt, "cuda_unavailable_reason", lambda: "no CUDA device")
    assert target.unavailable_reason() == "no CUDA device"
    monkeypatch.setattr(tensor_rt, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100")
    assert target.unavailable_reason() == (
        "Tesla V100 has compute capability 7.0; TensorRT 10.5.0 needs 7.5 or newer"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    assert target.unavailable_reason() is None
    fake_tensorrt(monkeypatch, "11.0.0")
    reason = target.unavailable_reason()
    assert reason is not None and reason.startswith("TensorRT 11.0.0 is installed")


def test_the_target_declares_what_it_is() -> None:
    assert TensorRT.name == "tensorrt"
    assert TensorRT.exploits_sparsity
    assert TensorRT.precisions == frozenset(Precision)


# -- the engine cache -------------------------------------------------------------------------


def options(**changes: object) -> BuildOptions:
    fields: dict[str, object] = {
        "precision": Precision.FP16,
        "sparse_weights": True,
        "workspace_bytes": 1 << 30,
        "input_shapes": ((2, 3, 32, 32),),
    }
    return BuildOptions(**{**fields, **changes})  # type: ignore[arg-type]


KEY_INPUTS: dict[str, object] = {
    "onnx_sha256": "ab" * 32,
    "trt_version": "10.3.0",
    "gpu_name": "NVIDIA A100-SXM4-40GB",
    "compute_capability": (8, 0),
}


def key(**changes: object) -> str:
    fields = {**KEY_INPUTS, "options": options()}
    return cache_key(**{**fields, **changes})  # type: ignore[arg-type]


def test_cache_key_is_stable_across_processes() -> None:
    assert key() == key()
    assert key() == "db8e905340478ab6e6d8beb0610512723c7bde67f9267d1d6d7095ce15cdafad"


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "cd" * 32},
        {"trt_version": "10.3.1"},
        {"gpu_name": "NVIDIA H100 80GB HBM3"},
        {"compute_capability": (9, 0)},
        {"options": options(precision=Precision.FP32)},
        {"options": options(precision=Precision.BF16)},
        {"options": options(sparse_weights=False)},
        {"options": options(workspace_bytes=1 << 31)},
        {"options": options(input_shapes=((4, 3, 32, 32),))},
    ],
    ids=lambda change: next(iter(change)),
)
def test_cache_key_changes_with_every_input(change: dict[str, object]) -> None:
    assert key(**change) != key()


def test_build_options_name_the_builder_flags() -> None:
    assert options().flags == ("FP16", "SPARSE_WEIGHTS")
    assert options(precision=Precision.BF16, sparse_weights=False).flags == ("BF16",)
    fp32 = options(precision=Precision.FP32, sparse_weights=False)
    assert fp32.flags == ()
    assert fp32.cleared == ("TF32",)
    assert options().cleared == ()
    with pytest.raises(ConfigError, match="workspace"):
        options(workspace_bytes=0)


def test_cache_dir_comes_from_the_environment_else_the_home_cache(tmp_path: Path) -> None:
    assert engine_cache_dir({"BENCHLIB_CACHE_DIR": str(tmp_path)}) == tmp_path / "tensorrt"
    home = tmp_path / "home"
    expected = home / ".cache" / "benchlib" / "tensorrt"
    assert engine_cache_dir({}, home=home) == expected
    assert engine_cache_dir({"BENCHLIB_CACHE_DIR": " "}, home=home) == expected
    tilde = engine_cache_dir({"BENCHLIB_CACHE_DIR": "~/benchcache"})
    assert tilde == Path.home() / "benchcache" / "tensorrt"
    assert not expected.exists()


def test_plans_are_stored_atomically_and_read_back(tmp_path: Path) -> None:
    cache = tmp_path / "deep" / "tensorrt"
    assert read_plan(cache, "k1") is None
    path = write_plan(cache, "k1", b"plan one")
    assert path == cache / "k1.plan"
    assert read_plan(cache, "k1") == b"plan one"
    write_plan(cache, "k1", b"plan two")
    assert read_plan(cache, "k1") == b"plan two"
    assert sorted(p.name for p in cache.iterdir()) == ["k1.plan"]  # no temporary files left


def test_an_unwritable_cache_raises_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        write_plan(blocker / "tensorrt", "k", b"plan")


# -- what ran sparse: the builder log and the engine inspector --------------------------------

# Shaped like TensorRT 10's engine inspector output with ProfilingVerbosity.DETAILED, as posted
# in github.com/NVIDIA/TensorRT/issues/4020 and /4056 (keys, the Reformat layer without a
# TacticName, "HasSparseWeights"); the sparse kernel name follows the sm80_xmma_fprop_sparse_conv
# family those engines report.
INSPECTOR_JSON = json.dumps(
    {
        "Layers": [
            {
                "Name": "Reformatting CopyNode for Input Tensor 0 to /body/Conv + /Relu_1",
                "LayerType": "Reformat",
                "Inputs": [
                    {
                        "Name": "input",
                        "Location": "Device",
                        "Dimensions": [2, 3, 32, 32],
                        "Format/Datatype": "Row major linear FP32",
                    }
                ],
                "ParameterType": "Reformat",
                "Origin": "REFORMAT",
                "TacticValue": "0x00000000000003e8",
                "StreamId": 0,
                "Metadata": "",
            },
            {
                "Name": "/stem/Conv + /Relu",
                "LayerType": "CaskConvolution",
                "ParameterType": "Convolution",
                "HasSparseWeights": 0,
                "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc"
                "_tilesize64x64x64_stage4_warpsize2x2x1_g1_tensor16x8x16",
                "TacticValue": "0x8b5ef8f8a1a1b0c6",
                "StreamId": 0,
                "Metadata": "[ONNX Layer: /stem/Conv]\u001e[ONNX Layer: /Relu]",
            },
            {
                "Name": "/body/Conv + /Relu_1",
                "LayerType": "CaskConvolution",
                "ParameterType": "Convolution",
                "HasSparseWeights": 1,
                "TacticName": "sm80_xmma_fprop_sparse_conv_implicit_gemm_f16f16_f16f32_f32"
                "_nhwckrsc_nhwc_tilesize128x128x64_stage3_warpsize2x2x1_g1_sptensor16x8x32",
                "TacticValue": "0x1b5cd8b14a73a2f9",
                "StreamId": 0,
                "Metadata": "[ONNX Layer: /body/Conv]\u001e[ONNX Layer: /Relu_1]",
            },
        ],
        "Bindings": ["input", "output"],
    }
)

# The builder's INFO messages as an ILogger receives them (trtexec adds the "[I] [TRT]" prefix),
# wording from the TensorRT developer guide, "Structured Sparsity", and issue 4054 (TRT 10).
BUILD_LOG = [
    "Detected 1 inputs and 1 output network tensors.",
    "(Sparsity) Layers eligible for sparse math: /body/Conv + /Relu_1, /grouped/Conv",
    "(Sparsity) TRT inference plan picked sparse implementation for layers: /body/Conv + /Relu_1",
    "Total Activation Memory: 7864832 bytes",
]


def test_inspector_reports_the_layers_with_sparse_kernels() -> None:
    assert inspector_sparse_layers(INSPECTOR_JSON) == ["/body/Conv + /Relu_1"]


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"Layers": ["/stem/Conv + /Relu", "/body/Conv"], "Bindings": ["input"]}),
        json.dumps({"Layers": [{"Name": "a", "LayerType": "Reformat"}]}),
        json.dumps(["not", "the inspector"]),
        "",
        "{truncated",
    ],
    ids=["names-only", "no-tactics", "a-list", "empty", "broken"],
)
def test_inspector_that_cannot_tell_says_none(text: str) -> None:
    assert inspector_sparse_layers(text) is None


def test_builder_log_names_eligible_and_picked_layers() -> None:
    log = log_sparsity(BUILD_LOG)
    assert log == SparsityLog(
        eligible=["/body/Conv + /Relu_1", "/grouped/Conv"], picked=["/body/Conv + /Relu_1"]
    )
    trtexec = log_sparsity(
        ["[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2"]
    )
    assert trtexec == SparsityLog(eligible=["conv1", "conv2"], picked=None)
    none_picked = log_sparsity(
        [
            "(Sparsity) Layers eligible for sparse math: Conv_0",
            "(Sparsity) TRT inference plan picked sparse implementation for layers:",
        ]
    )
    assert none_picked == SparsityLog(eligible=["Conv_0"], picked=[])
    assert log_sparsity([]) == SparsityLog(eligible=None, picked=None)


def test_the_log_wins_then_the_inspector_then_unknown() -> None:
    log = log_sparsity(BUILD_LOG)
    assert sparse_report(log, ["other"]) == (["/body/Conv + /Relu_1"], "builder log")
    silent = SparsityLog(eligible=None, picked=None)
    inspected = inspector_sparse_layers(INSPECTOR_JSON)
    assert sparse_report(silent, inspected) == (["/body/Conv + /Relu_1"], "engine inspector")
    assert sparse_report(silent, []) == ([], "engine inspector")
    assert sparse_report(silent, None) == ("unknown", None)


def test_parser_errors_become_one_line_naming_the_node() -> None:
    message = describe_parser_errors(
        [("/det/Det", "Det", "No importer registered for op: Det.\n"), ("n2", "Det", "again")],
        ["Det"],
    )
    assert message == (
        "TensorRT could not parse the ONNX graph: node '/det/Det' (Det): No importer registered"
        " for op: Det. (+1 more errors); outside what TensorRT 10 parses: Det"
    )
    assert describe_parser_errors([], []) == "TensorRT could not parse the ONNX graph"


# -- the builder calls, against a stand-in for the tensorrt module ------------------------------


class FakeLogger:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self) -> None:
        pass


class FakeTensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


class FakeParserError:
    def desc(self) -> str:
        return "No importer registered for op: Det"

    def node_name(self) -> str:
        return "/det/Det"

    def node_operator(self) -> str:
        return "Det"


class FakeTensorRT:
    """What ``build_plan`` touches of TensorRT 10's API, recording the calls."""

    ILogger = FakeLogger
    BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16", SPARSE_WEIGHTS="SP", TF32="TF32")
    MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    ProfilingVerbosity = types.SimpleNamespace(DETAILED="detailed")

    def __init__(self, *, parses: bool, plan: bytes | None, input_shape: tuple[int, ...]) -> None:
        self.parses, self.plan, self.input_shape = parses, plan, input_shape
        self.calls: list[tuple[object, ...]] = []
        fake = self

        class Builder:
            def __init__(self, logger: object) -> None:
                fake.calls.append(("Builder",))

            def create_network(self, flags: int) -> object:
                fake.calls.append(("create_network", flags))
                return types.SimpleNamespace(
                    num_inputs=1, get_input=lambda i: FakeTensor("input", fake.input_shape)
                )

            def create_builder_config(self) -> object:
                return types.SimpleNamespace(
                    set_memory_pool_limit=lambda pool, n: fake.calls.append(("pool", pool, n)),
                    set_flag=lambda flag: fake.calls.append(("set", flag)),
                    clear_flag=lambda flag: fake.calls.append(("clear", flag)),
                    add_optimization_profile=lambda p: fake.calls.append(("profile",)),
                )

            def create_optimization_profile(self) -> object:
                return types.SimpleNamespace(
                    set_shape=lambda *args: fake.calls.append(("set_shape", *args))
                )

            def build_serialized_network(self, network: object, config: object) -> object:
                fake.calls.append(("verbosity", config.profiling_verbosity))  # type: ignore[attr-defined]
                return fake.plan

        class OnnxParser:
            def __init__(self, network: object, logger: object) -> None:
                self.num_errors = 0 if fake.parses else 2

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parse_from_file", Path(path).name))
                return fake.parses

            def get_error(self, index: int) -> FakeParserError:
                return FakeParserError()

        self.Builder, self.OnnxParser = Builder, OnnxParser


def det_onnx(path: Path) -> Path:
    node = onnx.helper.make_node("Det", ["input"], ["output"], name="/det/Det")
    graph = onnx.helper.make_graph(
        [node],
        "det",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [2, 4, 4])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [2])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def exported_stub(path: Path) -> object:
    return types.SimpleNamespace(path=path, input_names=["input"], output_names=["output"])


def test_builder_gets_the_flags_workspace_profile_and_detailed_verbosity(tmp_path: Path) -> None:
    trt = FakeTensorRT(parses=True, plan=b"serialized", input_shape=(-1, 4, 4))
    logger = capturing_logger(trt)
    plan = build_plan(trt, logger, exported_stub(det_onnx(tmp_path / "m.onnx")), options())  # type: ignore[arg-type]
    assert plan == b"serialized"
    assert trt.calls == [
        ("Builder",),
        ("create_network", 0),
        ("parse_from_file", "m.onnx"),
        ("pool", "workspace", 1 << 30),
        ("set", "FP16"),
        ("set", "SP"),
        ("set_shape", "input", (2, 3, 32, 32), (2, 3, 32, 32), (2, 3, 32, 32)),
        ("profile",),
        ("verbosity", "detailed"),
    ]
    fp32 = FakeTensorRT(parses=True, plan=b"p", input_shape=(2, 4, 4))
    exported = exported_stub(tmp_path / "m.onnx")
    build_plan(fp32, logger, exported, options(precision=Precision.FP32, sparse_weights=False))  # type: ignore[arg-type]
    assert ("clear", "TF32") in fp32.calls
    assert not [call for call in fp32.calls if call[0] in ("set", "profile")]


def test_parse_and_build_failures_raise_one_line_export_errors(tmp_path: Path) -> None:
    exported = exported_stub(det_onnx(tmp_path / "det.onnx"))
    rejects = FakeTensorRT(parses=False, plan=b"", input_shape=(2, 4, 4))
    with pytest.raises(ExportError) as parse_error:
        build_plan(rejects, capturing_logger(rejects), exported, options())  # type: ignore[arg-type]
    assert str(parse_error.value) == (
        "TensorRT could not parse the ONNX graph: node '/det/Det' (Det): No importer registered"
        " for op: Det (+1 more errors); outside what TensorRT 10 parses: Det"
    )
    fails = FakeTensorRT(parses=True, plan=None, input_shape=(2, 4, 4))
    logger = capturing_logger(fails)
    logger.log(FakeLogger.Severity.ERROR, "Error Code 10: Could not find any implementation\n")
    with pytest.raises(ExportError, match=r"^TensorRT could not build the engine: Error Code 10"):
        build_plan(fails, logger, exported, options())  # type: ignore[arg-type]


def test_the_logger_keeps_info_and_worse_and_collects_errors() -> None:
    trt = FakeTensorRT(parses=True, plan=b"", input_shape=())
    logger = capturing_logger(trt)
    severity = FakeLogger.Severity
    for level, text in [
        (severity.VERBOSE, "Autotuning format combination"),
        (severity.INFO, BUILD_LOG[1]),
        (severity.WARNING, "weights outside FP16 range"),
        (severity.ERROR, "out of memory"),
    ]:
        logger.log(level, text)
    assert logger.messages == [BUILD_LOG[1], "weights outside FP16 range", "out of memory"]
    assert logger.errors == ["out of memory"]
    assert log_sparsity(logger.messages).eligible == ["/body/Conv + /Relu_1", "/grouped/Conv"]


# -- the ONNX file TensorRT gets ---------------------------------------------------------------


def export(model: nn.Module, shape: tuple[int, ...], directory: Path) -> onnx.ModelProto:
    from targets._onnx import export_onnx

    exported = export_onnx(model, (torch.randn(*shape),), directory)
    onnx.checker.check_model(str(exported.path), full_check=True)
    assert exported.opset <= MAX_ONNX_OPSET
    return onnx.load(str(exported.path))


def test_resnet18_exports_to_onnx_tensorrt_10_parses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    graph = export(resnet, (1, 3, 32, 32), tmp_path)
    assert unsupported_onnx(graph) == []
    ops = {node.op_type for node in graph.graph.node}
    assert "Conv" in ops and ops <= TRT_ONNX_OPS


def test_two_four_weights_survive_the_export(tmp_path: Path) -> None:
    variant = prune(small_model(), "nm:2:4")
    graph = export(variant.module, (2, 3, 16, 16), tmp_path)
    assert unsupported_onnx(graph) == []
    weights = [numpy_helper.to_array(init) for init in graph.graph.initializer]
    four_d = [torch.from_numpy(w.copy()) for w in weights if w.ndim == 4]
    assert sum(two_four_sparse(w) for w in four_d) == len(two_four_layers(variant.module)) == 2


def test_unsupported_ops_and_opsets_are_named() -> None:
    node = onnx.helper.make_node("Det", ["x"], ["y"], name="det")
    custom = onnx.helper.make_node("Fancy", ["y"], ["z"], domain="com.example")
    graph = onnx.helper.make_graph(
        [node, custom],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [])],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", 21),
            onnx.helper.make_opsetid("com.example", 1),
        ],
    )
    assert unsupported_onnx(model) == [
        "Det",
        "com.example::Fancy",
        "opset 21 (TensorRT 10 parses 9 to 20)",
    ]


# -- the real thing, where TensorRT and a GPU are ------------------------------------------------


def cuda_prepare(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], precision: Precision
) -> tuple[object, dict[str, object]]:
    prepared = TensorRT().prepare(model, inputs, torch.device("cuda"), precision)
    outputs = prepared.run()
    prepared.synchronize()
    return outputs, dict(prepared.info)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BENCHLIB_CACHE_DIR", str(tmp_path))
    return tmp_path / "tensorrt"


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
def test_engine_matches_eager_and_is_cached(precision: Precision, cache_dir: Path) -> None:
    model = small_model()
    inputs = (model.example_input(2),)
    with torch.no_grad():
        expected = model.module(*inputs)
    outputs, info = cuda_prepare(model.module, inputs, precision)
    assert relative_error(outputs, expected) <= TOLERANCE[precision]
    assert info["cache_hit"] is False and isinstance(info["build_s"], float)
    assert (cache_dir / f"{info['cache_key']}.plan").is_file()
    assert json.loads(json.dumps(info)) == info
    again, hit = cuda_prepare(model.module, inputs, precision)
    assert hit["cache_hit"] is True and hit["build_s"] is None
    assert hit["cache_key"] == info["cache_key"]
    assert relative_error(again, expected) <= TOLERANCE[precision]


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_rebind_replaces_the_inputs(cache_dir: Path) -> None:
    model = small_model()
    prepared = TensorRT().prepare(
        model.module, (model.example_input(2),), torch.device("cuda"), Precision.FP32
    )
    other = model.example_input(2, seed=1)
    assert prepared.rebind is not None
    prepared.rebind((other.cuda(),))
    outputs = prepared.run()
    prepared.synchronize()
    with torch.no_grad():
        assert relative_error(outputs, model.module(other)) <= TOLERANCE[Precision.FP32]


class WideNet(nn.Module):
    """Wide 3x3 convs, where TensorRT's sparse kernels can win (C and K >= 256)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 256, 3, padding=1)
        self.a = nn.Conv2d(256, 256, 3, padding=1)
        self.b = nn.Conv2d(256, 256, 3, padding=1)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_two_four_model_reports_its_sparse_layers(cache_dir: Path) -> None:
    torch.manual_seed(0)
    model = Model(name="wide", module=WideNet().eval(), input_shape=(3, 32, 32), source="factory")
    variant = prune(model, "nm:2:4")
    inputs = (model.example_input(8),)
    with torch.no_grad():
        expected = variant.module(*inputs)
    outputs, info = cuda_prepare(variant.module, inputs, Precision.FP16)
    assert relative_error(outputs, expected) <= TOLERANCE[Precision.FP16]
    assert info["sparse_weights"] is True
    assert info["two_four_layers"] == ["a", "b"]
    assert info["sparse_source"] == "builder log"
    eligible = info["sparse_eligible_layers"]
    assert isinstance(eligible, list) and eligible
    assert isinstance(info["sparse_layers"], list)
    assert set(info["sparse_layers"]) <= set(eligible)
    _, hit = cuda_prepare(variant.module, inputs, Precision.FP16)
    assert hit["sparse_source"] == "engine inspector"
    assert set(hit["sparse_layers"]) == set(info["sparse_layers"])  # type: ignore[arg-type]

"""What TensorRT 10 can take, decided without TensorRT: versions, GPUs, ONNX ops, 2:4 weights.

Pure functions of their arguments, so the tests run them on machines without TensorRT.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from benchlib.errors import ExportError
from benchlib.pruning.masks import nm_violation

if TYPE_CHECKING:
    import onnx

SUPPORTED_MAJOR = 10
VOLTA_REMOVED = (10, 5)
"""TensorRT 10.5 removed Volta (compute capability 7.0); Turing (7.5) is the floor since
(TensorRT 10.5.0 release notes, "NVIDIA Volta Support Removed")."""

MIN_ONNX_OPSET, MAX_ONNX_OPSET = 9, 20
"""The opsets every TensorRT 10 release parses (10.0 documents 9 to 20; later 10.x more)."""

TRT_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv
    ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual
    Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND
    Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth
    Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
    Upsample Where Xor
    """.split()  # noqa: SIM905 (one name per line would take 150 lines)
)
"""ONNX ops marked supported ("Y") in onnx-tensorrt's docs/operators.md for TensorRT 10
(github.com/onnx/onnx-tensorrt, release/10.x), less the opset-23+ ops (Attention,
RMSNormalization, RotaryEmbedding, TensorScatter) that ``MAX_ONNX_OPSET`` excludes anyway."""

_DEFAULT_DOMAINS = ("", "ai.onnx")


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric part of a version: ``"10.3.0.26"`` -> ``(10, 3, 0, 26)``,
    ``"10.0.0b6"`` -> ``(10, 0, 0)``; ``()`` when there is none."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def version_problem(version: str) -> str | None:
    """None for a TensorRT 10.x ``version``, else one line saying what to install."""
    major = parse_version(version)[:1]
    if major == (SUPPORTED_MAJOR,):
        return None
    if major and major[0] > SUPPORTED_MAJOR:
        return (
            f"TensorRT {version} is installed; this target uses TensorRT 10's FP16/BF16 builder "
            f"flags, which TensorRT 11 removed (pip install 'tensorrt>=10,<11')"
        )
    return (
        f"TensorRT {version} is installed; this target needs TensorRT 10 "
        f"(pip install 'tensorrt>=10,<11')"
    )


def minimum_compute_capability(version: str) -> tuple[int, int]:
    """The oldest GPU architecture TensorRT ``version`` (10.x) builds for."""
    return (7, 5) if parse_version(version)[:2] >= VOLTA_REMOVED else (7, 0)


def capability_problem(version: str, capability: tuple[int, int], gpu: str) -> str | None:
    """None when TensorRT ``version`` supports a GPU of ``capability``, else one line."""
    floor = minimum_compute_capability(version)
    if tuple(capability) >= floor:
        return None
    return (
        f"{gpu} has compute capability {capability[0]}.{capability[1]}; TensorRT {version} "
        f"needs {floor[0]}.{floor[1]} or newer"
    )


def two_four_sparse(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is 2:4 sparse the way sparse tensor cores read it.

    ``weight`` is a conv weight (Cout, Cin/groups, k...) or a linear one (Cout, Cin): at each
    output channel and kernel position, every 4 consecutive input channels hold at most 2
    nonzeros (the check in TensorRT's developer guide, "Structured Sparsity"). Its input
    dimension must be a multiple of 4, as that check assumes and benchlib's ``nm`` pruner
    requires; anything else (a 1-d tensor, Cin = 3) is not 2:4.
    """
    if weight.dim() < 2 or weight.shape[1] == 0:
        return False
    return nm_violation(weight, 2, 4) is None


def two_four_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear layers of ``model`` whose weights are 2:4 sparse.

    A non-empty list is what makes ``prepare`` set ``BuilderFlag.SPARSE_WEIGHTS``: TensorRT
    then times sparse kernels for the layers that fit and keeps the faster ones.
    """
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, kinds) and two_four_sparse(module.weight)
    ]


def torch_dtype(trt_dtype: str, tensor: str) -> torch.dtype:
    """The torch dtype of a buffer for an engine I/O tensor of TensorRT type ``trt_dtype``
    (a ``trt.DataType`` member name). ExportError for types torch cannot hold (FP8, INT4)."""
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    if trt_dtype not in table:
        raise ExportError(f"TensorRT engine tensor {tensor!r} has type {trt_dtype}, not bindable")
    return table[trt_dtype]


def unsupported_onnx(model: onnx.ModelProto) -> list[str]:
    """What in ``model`` TensorRT 10's ONNX parser does not take: an opset outside
    ``MIN_ONNX_OPSET..MAX_ONNX_OPSET`` or ops outside ``TRT_ONNX_OPS`` (one entry each, sorted).

    Calls of the model's local functions are checked through the functions' bodies.
    """
    problems: set[str] = set()
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS and not (
            MIN_ONNX_OPSET <= entry.version <= MAX_ONNX_OPSET
        ):
            problems.add(f"opset {entry.version} (TensorRT 10 parses {MIN_ONNX_OPSET} to 20)")
    local = {(f.domain, f.name) for f in model.functions}
    bodies = [node for function in model.functions for node in function.node]
    for node in [*_nodes(model.graph), *bodies]:
        if (node.domain, node.op_type) in local:
            continue
        if node.domain not in _DEFAULT_DOMAINS:
            problems.add(f"{node.domain}::{node.op_type}")
        elif node.op_type not in TRT_ONNX_OPS:
            problems.add(node.op_type)
    return sorted(problems)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, including those of subgraphs (If and Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _nodes(subgraph)

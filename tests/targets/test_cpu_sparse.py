"""cpu-sparse: which layers convert, what info reports, block detection, and the target."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from benchlib.errors import ConfigError, ExportError
from benchlib.harness.verify import relative_error
from benchlib.models import Model
from benchlib.pruning import prune
from benchlib.pruning.masks import block_masks
from benchlib.sparse import (
    CANDIDATE_THRESHOLD,
    DEFAULT_THRESHOLD,
    NativeUnavailable,
    SparseConv2d,
    SparseLinear,
    TorchSparseMatrix,
    choose_kernel,
    choose_torch_kernel,
    detect_block,
    load_library,
    sparsify,
    totals,
)
from benchlib.sparse.tiling import tile_floats
from benchlib.target import DeviceKind, Precision, TargetRegistry
from targets.cpu_sparse import CpuSparse
from tests.test_sparse_kernels import torch_threads

EXACT = 1e-4
NATIVE = not isinstance(load_library(), NativeUnavailable)
"""The native kernels built here (else PyTorch's products run: the expected names differ)."""
CSR = "native-csr" if NATIVE else "torch-csr"


def blocked(rows: int, cols: int) -> str:
    """The kernel that runs an R x C block pattern by default."""
    if NATIVE:
        return f"native-bsr-{rows}x1" if rows > 1 else CSR
    return f"torch-bsr-{rows}x{cols}" if rows == cols else CSR


def with_density(layer: nn.Conv2d | nn.Linear, nonzeros: int) -> nn.Conv2d | nn.Linear:
    """``layer`` with exactly its first ``nonzeros`` weights (flat order) kept."""
    with torch.no_grad():
        flat = layer.weight.view(-1)
        flat.copy_(torch.arange(1, flat.numel() + 1, dtype=torch.float32) / flat.numel())
        flat[nonzeros:] = 0
    return layer


class Graded(nn.Module):
    """Four layers of weight density 0.05, 0.2, 0.6 and 1.0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = with_density(nn.Conv2d(4, 5, 2), 4)  # 4 / 80
        self.b = with_density(nn.Conv2d(5, 5, 1), 5)  # 5 / 25
        self.c = with_density(nn.Linear(5, 4), 12)  # 12 / 20
        self.d = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.b(self.a(x)).mean(dim=(2, 3))
        out: torch.Tensor = self.d(self.c(pooled))
        return out


@pytest.mark.parametrize(
    ("threshold", "sparse"),
    [(0.0, set()), (0.05, {"a"}), (0.1, {"a"}), (0.3, {"a", "b"}), (1.0, {"a", "b", "c", "d"})],
)
def test_the_threshold_decides_which_layers_run_sparse(threshold: float, sparse: set[str]) -> None:
    torch.manual_seed(0)
    model = Graded().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted, reports = sparsify(model, threshold)
    assert [r.name for r in reports] == ["a", "b", "c", "d"]
    assert [r.density for r in reports] == [0.05, 0.2, 0.6, 1.0]
    assert {r.name for r in reports if r.sparse} == sparse
    for name, module in converted.named_children():
        assert isinstance(module, (SparseConv2d, SparseLinear)) == (name in sparse)
    dense_reasons = {r.name: r.reason for r in reports if not r.sparse}
    if "c" in dense_reasons:
        assert dense_reasons["c"] == f"density 0.6 > threshold {threshold:g}"
    # the caller's model is untouched
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.children())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= EXACT


def test_the_report_counts_the_bytes_stored() -> None:
    model = nn.Sequential(with_density(nn.Linear(16, 8), 10), nn.Linear(8, 2))
    _, reports = sparsify(model, 0.5)
    sparse, dense = reports
    assert (sparse.format, sparse.kernel, sparse.sparse) == ("csr", CSR, True)
    # 10 nonzeros in the first row (flat order) of the 8 x 16 weight:
    # 9 int32 row pointers + 10 int32 column indices + 10 fp32 values
    assert sparse.stored_bytes == 9 * 4 + 10 * 4 + 10 * 4
    assert sparse.dense_bytes == 8 * 16 * 4
    assert (dense.format, dense.kernel, dense.stored_bytes) == ("dense", None, 8 * 2 * 4)
    assert totals(reports) == {
        "sparse_layers": 1,
        "dense_layers": 1,
        "weight_bytes_stored": 116 + 64,
        "weight_bytes_dense": 512 + 64,
    }
    row = sparse.to_dict()
    assert row["shape"] == [8, 16]
    assert json.loads(json.dumps(row)) == row


@pytest.mark.parametrize("block", [(8, 1), (4, 1), (2, 2), (4, 4), (1, 4)])
def test_block_pruned_weights_are_detected(block: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 1, 1)
    masked = weight * block_masks({"w": weight}, *block, 0.75)["w"]
    matrix = masked.reshape(16, 8)
    assert detect_block(matrix) == block


def test_unstructured_empty_and_full_matrices_have_no_block() -> None:
    torch.manual_seed(0)
    unstructured = torch.randn(16, 8) * (torch.rand(16, 8) < 0.5)
    assert detect_block(unstructured) is None
    assert detect_block(torch.zeros(16, 8)) is None
    assert detect_block(torch.randn(16, 8)) is None
    odd = torch.randn(5, 7)
    odd[1:3] = 0  # zero rows, but 5 x 7 is tiled by no candidate with more than one row
    assert detect_block(odd) is None


def test_torch_runs_square_blocks_as_bsr_and_others_as_csr() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 16)
    square = weight * block_masks({"w": weight}, 4, 4, 0.75)["w"]
    column = weight * block_masks({"w": weight}, 4, 1, 0.75)["w"]
    assert choose_torch_kernel(square).name == "torch-bsr-4x4"
    assert choose_torch_kernel(column).name == "torch-csr"
    x = torch.randn(16, 3)
    assert torch.allclose(choose_torch_kernel(square)(x), square @ x, atol=1e-5)
    assert torch.allclose(choose_kernel(square)(x), square @ x, atol=1e-5)
    conv = nn.Conv2d(16, 16, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(column.reshape(16, 16, 1, 1))
    [report] = sparsify(nn.Sequential(conv), 0.5)[1]
    expected = ("bsr", "native-bsr-4x1") if NATIVE else ("csr", "torch-csr")
    assert (report.block, report.format, report.kernel) == ("4x1", *expected)


@pytest.mark.parametrize("block", [(2, 2), (4, 4), (8, 8), (8, 1), (4, 1), (1, 4)])
def test_block_pruned_convs_are_exact_in_their_format(block: tuple[int, int]) -> None:
    kernel = blocked(*block)
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2)
    with torch.no_grad():
        conv.weight.mul_(block_masks({"w": conv.weight}, *block, 0.9)["w"])
    converted, [report] = sparsify(nn.Sequential(conv), 0.5)
    assert (report.block, report.kernel) == (f"{block[0]}x{block[1]}", kernel)
    x = torch.randn(2, 8, 13, 10)
    with torch.no_grad():
        assert relative_error(converted(x), conv(x)) <= EXACT


def test_what_stays_dense_and_why() -> None:
    attention = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass it reads directly
    reflect = with_density(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 1)
    model = nn.ModuleDict({"attention": attention, "reflect": reflect})
    with torch.no_grad():
        attention.out_proj.weight.zero_()
    _, reports = sparsify(model, 1.0)
    reasons = {r.name: r.reason for r in reports}
    assert reasons == {
        "attention.out_proj": "NonDynamicallyQuantizableLinear is not nn.Linear or nn.Conv2d",
        "reflect": "padding_mode 'reflect' (only 'zeros' runs sparse)",
    }
    assert not any(r.sparse for r in reports)


def test_a_shared_layer_is_converted_once_and_replaced_everywhere() -> None:
    shared = with_density(nn.Linear(4, 4), 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted, reports = sparsify(model, 0.5)
    assert [r.name for r in reports] == ["0"]
    assert isinstance(converted, nn.Sequential)
    assert isinstance(converted[0], SparseLinear)
    assert converted[0] is converted[2]


def test_bad_thresholds_and_failing_kernels() -> None:
    with pytest.raises(ConfigError, match=r"threshold 1.5 is outside \[0, 1\]"):
        sparsify(nn.Linear(2, 2), 1.5)
    with pytest.raises(ConfigError):
        CpuSparse(threshold=-0.1)

    def broken(matrix: torch.Tensor) -> TorchSparseMatrix:
        raise RuntimeError("no kernel for this shape")

    model = nn.Sequential(nn.Linear(3, 3), with_density(nn.Conv2d(2, 2, 3), 1))
    with pytest.raises(ExportError, match=r"layer '1' \(Conv2d, weight \(2, 2, 3, 3\)\)"):
        sparsify(model, 0.1, broken)


def test_registered_target_declares_what_it_is() -> None:
    target = TargetRegistry.from_entry_points().get("cpu-sparse")
    assert isinstance(target, CpuSparse)
    assert target.device_kind is DeviceKind.CPU
    assert target.precisions == frozenset({Precision.FP32})
    assert target.exploits_sparsity
    assert target.unavailable_reason() is None
    assert target.version() == f"torch {torch.__version__}"
    assert (target.threshold, target.timed, target.fuse) == (CANDIDATE_THRESHOLD, True, True)
    with pytest.raises(ConfigError, match="cpu-sparse option timed='yes' must be True or False"):
        CpuSparse(timed="yes")  # type: ignore[arg-type]


def test_the_target_times_its_candidates_and_fuses(tiny_model: Model) -> None:
    variant = prune(tiny_model, "magnitude:0.9[prune_first=true,prune_classifier=true]")
    target = TargetRegistry.from_entry_points().get("cpu-sparse")
    inputs = (variant.model.example_input(2),)
    prepared = target.prepare(variant.module, inputs, torch.device("cpu"), Precision.FP32)
    with torch.no_grad():
        assert relative_error(prepared.run(), variant.module(*inputs)) <= EXACT
    info = prepared.info
    # TinyNet: conv1 -> bn1 folded; conv2 -> relu fused when conv2 stays sparse
    assert info["fusion"]["batchnorm_folded"] == 1
    assert info["fusion"]["max_pools"] == 0
    candidates = [row for row in info["layers"] if row["density"] <= CANDIDATE_THRESHOLD]
    assert candidates
    for row in candidates:  # each one timed, the decision and both timings in the reason
        assert " ms vs dense " in row["reason"]
        assert row["sparse"] == (not row["reason"].startswith("not faster sparse"))
    assert info["timed"] is True


def test_a_magnitude_pruned_model_equals_eager(tiny_model: Model) -> None:
    variant = prune(tiny_model, "magnitude:0.9[prune_first=true,prune_classifier=true]")
    target = CpuSparse(DEFAULT_THRESHOLD, timed=False)
    inputs = (variant.model.example_input(2),)
    prepared = target.prepare(variant.module, inputs, torch.device("cpu"), Precision.FP32)
    with torch.no_grad():
        expected = variant.module(*inputs)
    assert relative_error(prepared.run(), expected) <= EXACT
    info = dict(prepared.info)
    assert json.loads(json.dumps(info)) == info
    densities = {row["name"]: row["density"] for row in info["layers"]}
    sparse = {row["name"] for row in info["layers"] if row["sparse"]}
    assert sparse == {name for name, d in densities.items() if d <= DEFAULT_THRESHOLD}
    assert sparse  # global 90% pruning leaves at least one layer under 10% density
    assert info["sparse_layers"] == len(sparse)
    assert info["dense_layers"] == 3 - len(sparse)
    assert info["sparse_kernel_used"] is True
    assert info["kernels"] == [CSR]
    if NATIVE:
        assert info["native"]["available"] is True
        assert info["engine"].startswith(f"benchlib native kernels ({info['native']['isa']}; ")
    else:
        assert info["engine"] == f"torch {torch.__version__} (sparse CSR)"
    assert info["weight_bytes_stored"] < info["weight_bytes_dense"]
    assert info["threads"] == torch.get_num_threads()
    assert info["convert_s"] >= 0
    # rebind: new inputs, same answer as eager on them
    other = variant.model.example_input(2, seed=1)
    assert prepared.rebind is not None
    prepared.rebind((other,))
    with torch.no_grad():
        assert relative_error(prepared.run(), variant.module(other)) <= EXACT


def test_every_layer_runs_sparse_at_threshold_one(tiny_model: Model) -> None:
    with torch_threads(2):
        prepared = CpuSparse(threshold=1.0, timed=False).prepare(
            tiny_model.module, (tiny_model.example_input(1),), torch.device("cpu"), Precision.FP32
        )
        with torch.no_grad():
            expected = tiny_model.module(tiny_model.example_input(1))
        for _ in range(3):  # the first call binds the chain of two convs, the next run it
            assert relative_error(prepared.run(), expected) <= EXACT  # natively
    assert prepared.info["sparse_layers"] == 3
    assert prepared.info["fusion"] == {
        "batchnorm_folded": 1,
        "residual_fused": 0,
        "relu_fused": 2,
        "max_pools": 0,
        "chained": 2,
        "avgpools_chained": 1,  # the tiny net's head pool joins its chain
        "linears_chained": 0,  # its classifier runs sparse too: not a dense nn.Linear
        # 16x16 images: two bands of 8 rows where 128 floats fit a tile (AVX-512, two
        # threads; see bands.HALVES_MIN_PIXELS), else one band (bands.BAND_MIN_PIXELS)
        "banded": int(tile_floats() >= 128),
        "padded_planes": 0,  # whose planes of 256 floats are aligned already
        "copies_fused": 0,
    }
    assert prepared.info["dense_layers"] == 0
    assert prepared.info["weight_bytes_plans"] > 0  # built in prepare: the entry offsets


@pytest.mark.parametrize(
    ("device", "precision", "message"),
    [
        ("cpu", Precision.BF16, "runs fp32 only, not bf16"),
        ("cuda", Precision.FP32, "runs on the CPU only, not on cuda"),
    ],
)
def test_prepare_refuses_what_it_cannot_run(
    device: str, precision: Precision, message: str, tiny_model: Model
) -> None:
    with pytest.raises(ExportError, match=message):
        CpuSparse().prepare(
            tiny_model.module, (tiny_model.example_input(1),), torch.device(device), precision
        )


def test_a_model_that_is_one_layer_becomes_the_sparse_layer() -> None:
    layer = with_density(nn.Conv2d(3, 4, 3, stride=2), 5)
    converted, [report] = sparsify(layer, 0.5)
    assert isinstance(converted, SparseConv2d) and report.name == ""
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        assert relative_error(converted(x), layer(x)) <= EXACT


def test_prepare_binds_the_chains_on_the_real_input(tiny_model: Model) -> None:
    """So that the harness's check against eager, its first call, already runs natively."""
    from benchlib.sparse.chain import NativeChain

    x = tiny_model.example_input(1)
    converted, _, fusion = CpuSparse(threshold=1.0, timed=False)._convert(
        copy.deepcopy(tiny_model.module).eval(), (x,)
    )
    [chain] = [m for m in converted.modules() if isinstance(m, NativeChain)]
    assert fusion["chained"] == len(chain.layers) == 2
    assert len(chain.bound_shapes()) == 1

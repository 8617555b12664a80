"""cuda-sparse24: the 2:4 detector, layer selection, the GEMM modules, and (on a GPU) the target.

Everything but the ``gpu``-marked tests runs on the CPU: the planning is pure, and the modules
take an injectable matmul, so a dense fp32 weight stands in for the compressed one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from benchlib.errors import ExportError
from benchlib.harness.verify import TOLERANCE, relative_error
from benchlib.models import Model
from benchlib.pruning import prune
from benchlib.pruning.masks import nm_masks
from benchlib.target import DeviceKind, Precision, TargetRegistry
from targets._common import cuda_unavailable_reason, place
from targets.cuda_sparse24 import (
    Backend,
    CudaSparse24,
    SemiStructuredConv1x1,
    SemiStructuredLinear,
    ShapeMinimum,
    Skip,
    availability_reason,
    choose_backend,
    convert,
    is_two_four,
    judge,
    plan_layers,
    semi_structured_compressor,
    shape_minimum,
    stored_bytes,
    two_four_violation,
)

CUSPARSELT_FP16 = ShapeMinimum(16, 16, "fp16 cuSPARSELt")
CUTLASS_FP16 = ShapeMinimum(32, 64, "fp16 CUTLASS")
PROTOTYPE = "ignore:The PyTorch API of SparseSemiStructuredTensor:UserWarning"


def make_two_four(*modules: nn.Module) -> None:
    """Zero all but the 2 largest |w| in every 4 consecutive input weights (benchlib's nm)."""
    with torch.no_grad():
        for module in modules:
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            weight.mul_(nm_masks({"w": weight}, 2, 4)["w"])


class ConvMlp(nn.Module):
    """3x3 stem, two 1x1 convs, pooled, two linears: the layer kinds the target tells apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 64, 1)
        self.project = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.project(torch.relu(self.expand(x))))
        logits: torch.Tensor = self.head(torch.relu(self.fc(x.mean(dim=(2, 3)))))
        return logits


# --- the 2:4 detector ---------------------------------------------------------------------


def test_two_four_violation_names_the_first_offending_group() -> None:
    matrix = torch.zeros(4, 24)
    matrix[3, 20:23] = 1.0  # row 3, group 5 (columns 20-23): 3 nonzeros
    matrix[1, 0:2] = 1.0  # 2 nonzeros: fine
    assert two_four_violation(matrix) == "row 3 group 5 has 3 nonzeros"
    matrix[2, 4:8] = -1.0  # an earlier row wins
    assert two_four_violation(matrix) == "row 2 group 1 has 4 nonzeros"


def test_two_four_accepts_fewer_than_two_nonzeros_per_group() -> None:
    matrix = torch.zeros(3, 8)
    matrix[0, [1, 3]] = 2.0
    matrix[1, 6] = -0.5
    assert two_four_violation(matrix) is None and is_two_four(matrix)
    assert is_two_four(torch.zeros(2, 4))
    assert not is_two_four(torch.ones(2, 4))


def test_two_four_needs_whole_groups_and_a_matrix() -> None:
    assert two_four_violation(torch.zeros(2, 6)) == "6 input columns do not split into groups of 4"
    with pytest.raises(ValueError, match="expected an \\(out, in\\) matrix"):
        two_four_violation(torch.zeros(16))


def test_benchlib_nm_masks_are_two_four_for_linear_and_1x1_convs() -> None:
    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 32), nn.Conv2d(32, 16, 1)
    assert two_four_violation(linear.weight) is not None  # dense to begin with
    make_two_four(linear, conv)
    assert two_four_violation(linear.weight) is None
    assert two_four_violation(conv.weight.reshape(16, 32)) is None


def test_a_model_pruned_with_the_nm_spec_has_its_linear_and_1x1_layers_converted() -> None:
    torch.manual_seed(0)
    model = Model(
        name="convmlp", module=ConvMlp().eval(), input_shape=(3, 16, 16), source="factory"
    )
    variant = prune(model, "nm:2:4")  # leaves the first and the last layer dense
    plan = plan_layers(variant.module, CUSPARSELT_FP16)
    assert plan.converted == ["expand", "project", "fc"]
    assert plan.dense == {
        "stem": "kernel 3x3, only 1x1 convs run as GEMMs",
        "head": "weight not 2:4 (row 0 group 0 has 4 nonzeros)",
    }
    cutlass = plan_layers(variant.module, CUTLASS_FP16)
    assert cutlass.converted == ["project"]
    assert (
        cutlass.dense["expand"] == "in_channels 32 is not a multiple of 64 (fp16 CUTLASS minimum)"
    )
    assert cutlass.dense["head"] == "out_features 16 is not a multiple of 32 (fp16 CUTLASS minimum)"


# --- layer selection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (nn.Conv2d(16, 16, 3), "kernel 3x3, only 1x1 convs run as GEMMs"),
        (nn.Conv2d(16, 16, (1, 3)), "kernel 1x3, only 1x1 convs run as GEMMs"),
        (nn.Conv2d(16, 16, 1, stride=2), "stride 2x2, only stride-1 convs run as GEMMs"),
        (nn.Conv2d(16, 16, 1, padding=1), "padding 1x1, only unpadded convs run as GEMMs"),
        (nn.Conv2d(16, 16, 1, groups=4), "groups 4, only groups=1 convs run as GEMMs"),
        (nn.Conv1d(16, 16, 1), "Conv1d, only Linear and 1x1 Conv2d run 2:4"),
        (nn.ConvTranspose2d(16, 16, 1), "ConvTranspose2d, only Linear and 1x1 Conv2d run 2:4"),
    ],
)
def test_layers_that_are_no_gemm_stay_dense(module: nn.Module, reason: str) -> None:
    assert judge(module, CUSPARSELT_FP16) == (Skip.KIND, reason)


@pytest.mark.parametrize(
    ("features", "minimum", "reason"),
    [
        ((50, 64), CUTLASS_FP16, "in_features 50 is not a multiple of 64 (fp16 CUTLASS minimum)"),
        ((64, 10), CUTLASS_FP16, "out_features 10 is not a multiple of 32 (fp16 CUTLASS minimum)"),
        ((16, 16), CUTLASS_FP16, "out_features 16 is not a multiple of 32 (fp16 CUTLASS minimum)"),
        pytest.param(
            (64, 0),
            CUSPARSELT_FP16,
            "out_features 0 is not at least 16 (fp16 cuSPARSELt minimum)",
            marks=pytest.mark.filterwarnings(
                "ignore:Initializing zero-element tensors is a no-op:UserWarning"
            ),
        ),
        (
            (24, 32),
            ShapeMinimum(16, 16, "bf16 cuSPARSELt"),
            "in_features 24 is not a multiple of 16 (bf16 cuSPARSELt minimum)",
        ),
    ],
)
def test_shapes_below_the_minimums_stay_dense(
    features: tuple[int, int], minimum: ShapeMinimum, reason: str
) -> None:
    assert judge(nn.Linear(*features), minimum) == (Skip.SHAPE, reason)


def test_two_four_layers_that_meet_the_minimums_convert() -> None:
    linear, conv = nn.Linear(64, 32), nn.Conv2d(64, 32, 1, padding="same")
    make_two_four(linear, conv)
    assert judge(linear, CUTLASS_FP16) is None
    assert judge(conv, CUTLASS_FP16) is None
    assert judge(nn.Linear(64, 32), CUTLASS_FP16) == (
        Skip.NOT_24,
        "weight not 2:4 (row 0 group 0 has 4 nonzeros)",
    )


def test_multihead_attention_linears_stay_dense() -> None:
    attention = nn.MultiheadAttention(32, 4)
    make_two_four(attention.out_proj)
    plan = plan_layers(nn.Sequential(attention), CUSPARSELT_FP16)
    assert plan.converted == []
    assert plan.dense == {"0.out_proj": "Linear of nn.MultiheadAttention, which reads its weight"}


@pytest.mark.parametrize(
    ("backend", "precision", "expected"),
    [
        (Backend.CUTLASS, Precision.FP16, (32, 64)),
        (Backend.CUTLASS, Precision.BF16, (32, 64)),
        (Backend.CUSPARSELT, Precision.FP16, (16, 16)),
        (Backend.CUSPARSELT, Precision.BF16, (16, 16)),
    ],
)
def test_shape_minimums_come_from_torch(
    backend: Backend, precision: Precision, expected: tuple[int, int]
) -> None:
    minimum = shape_minimum(backend, precision)
    assert (minimum.out_features, minimum.in_features) == expected
    assert minimum.label == f"{precision.value} {backend.label}"


def test_failure_names_the_commonest_reason_and_the_counts() -> None:
    torch.manual_seed(0)
    dense = plan_layers(ConvMlp(), CUSPARSELT_FP16)
    assert dense.converted == []
    assert dense.failure(CUSPARSELT_FP16) == (
        "no layer is 2:4: prune with nm:2:4: 4 of 5 Linear/conv layers"
        " (e.g. expand: weight not 2:4 (row 0 group 0 has 4 nonzeros))"
    )
    small = plan_layers(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), CUTLASS_FP16)
    assert small.failure(CUTLASS_FP16).startswith(
        "no layer meets the shape minimums (out a multiple of 32, in of 64: fp16 CUTLASS):"
        " 2 of 2 Linear/conv layers (e.g. 0: out_features 8"
    )
    assert plan_layers(nn.ReLU(), CUTLASS_FP16).failure(CUTLASS_FP16) == (
        "the model has no Linear or Conv2d layer"
    )


# --- the GEMM modules, with a dense stand-in for the compressed weight ----------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv1x1_as_a_gemm_equals_the_conv(channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 1)
    gemm = SemiStructuredConv1x1(conv.weight.detach().reshape(12, 8), conv.bias)
    x = torch.randn(2, 8, 5, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, actual = conv(x), gemm(x)
        unbatched = gemm(x[0])
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(unbatched, expected[0])
    # the output keeps the input's memory format, as nn.Conv2d's does
    assert actual.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert actual.is_contiguous() != channels_last


def test_linear_hands_the_matmul_contiguous_rows() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        seen.append(x)
        return nn.functional.linear(x, w, b)

    gemm = SemiStructuredLinear(linear.weight.detach(), linear.bias, linear=recording)
    tokens = torch.randn(2, 5, 32)[..., ::2]  # strided: not contiguous
    with torch.no_grad():
        torch.testing.assert_close(gemm(tokens), linear(tokens))
    assert seen[0].shape == (10, 16) and seen[0].is_contiguous()


def test_convert_swaps_the_chosen_layers_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    model = ConvMlp().eval()
    make_two_four(model.expand, model.project, model.fc)
    shared = nn.Sequential(model, model.fc)  # fc registered twice
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    root, weights = convert(shared, ["0.expand", "0.project", "0.fc"], lambda w: w.clone())
    assert root is shared
    assert isinstance(model.expand, SemiStructuredConv1x1)
    assert isinstance(model.fc, SemiStructuredLinear) and shared[1] is model.fc
    assert isinstance(model.stem, nn.Conv2d) and isinstance(model.head, nn.Linear)
    assert sorted(weights) == ["0.expand", "0.fc", "0.project"]
    assert weights["0.expand"].shape == (64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_convert_replaces_a_root_layer() -> None:
    linear = nn.Linear(16, 16)
    root, _ = convert(linear, [""], lambda w: w)
    assert isinstance(root, SemiStructuredLinear)


def test_a_failing_compression_is_an_export_error_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(16, 16))

    def refuse(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape not supported\nsecond line")

    with pytest.raises(ExportError, match=r"^0: 2:4 compression failed: shape not supported$"):
        convert(model, ["0"], refuse)


def test_the_compressor_restores_the_backend_flag() -> None:
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    compress = semi_structured_compressor(Backend.CUTLASS if not before else Backend.CUSPARSELT)
    with pytest.raises(RuntimeError, match="Only CUDA tensors"):  # a CPU weight: torch refuses
        compress(torch.zeros(32, 64, dtype=torch.float16))
    assert SparseSemiStructuredTensor._FORCE_CUTLASS is before


@pytest.mark.filterwarnings(PROTOTYPE)
def test_stored_bytes_counts_a_compressed_weights_values_and_metadata() -> None:
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
    )

    dense = torch.tensor([1.0, 0.0, 0.0, 2.0]).repeat(32, 16).half()  # 32 x 64
    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)  # type: ignore[no-untyped-call]
    compressed = SparseSemiStructuredTensorCUTLASS(dense.shape, packed, meta, None, None, None)
    assert stored_bytes(dense) == 32 * 64 * 2
    # values: half the weights in fp16; metadata: 2 bits per kept value, as int16
    assert stored_bytes(compressed) == 32 * 32 * 2 + 32 * 4 * 2


# --- the target on this machine -------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "cusparselt", "backend"),
    [
        ((7, 5), True, None),
        ((8, 0), True, Backend.CUSPARSELT),
        ((8, 6), False, Backend.CUTLASS),
        ((9, 0), True, Backend.CUSPARSELT),
        ((9, 0), False, None),
    ],
)
def test_backend_choice(
    capability: tuple[int, int], cusparselt: bool, backend: Backend | None
) -> None:
    assert choose_backend(capability, cusparselt) is backend
    reason = availability_reason("GPU X", capability, cusparselt)
    assert (reason is None) == (backend is not None)


def test_unavailable_reason_names_an_old_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    assert CudaSparse24().unavailable_reason() == (
        "2:4 sparse tensor cores need compute capability 8.0 or higher;"
        " Tesla T4 has compute capability 7.5"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert CudaSparse24().unavailable_reason() == (
        "this torch build has no cuSPARSELt and CUTLASS 2:4 kernels need 8.x;"
        " Tesla T4 has compute capability 9.0"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason where there is no GPU")
def test_unavailable_reason_without_a_gpu_is_the_cuda_reason() -> None:
    reason = CudaSparse24().unavailable_reason()
    assert reason is not None and reason == cuda_unavailable_reason() and "\n" not in reason


def test_registered_and_declared() -> None:
    target = TargetRegistry.from_entry_points().get("cuda-sparse24")
    assert isinstance(target, CudaSparse24)
    assert target.device_kind is DeviceKind.CUDA and target.exploits_sparsity
    assert target.precisions == {Precision.FP16, Precision.BF16}
    version = target.version()
    assert version is not None and version.startswith(f"torch {torch.__version__} semi-structured")


def test_prepare_refuses_fp32_and_the_cpu_before_touching_a_device() -> None:
    model, inputs = nn.Linear(16, 16), (torch.randn(2, 16),)
    with pytest.raises(ExportError, match="runs fp16 and bf16 only, not fp32"):
        CudaSparse24().prepare(model, inputs, torch.device("cuda"), Precision.FP32)
    with pytest.raises(ExportError, match="runs on a CUDA device, not cpu"):
        CudaSparse24().prepare(model, inputs, torch.device("cpu"), Precision.FP16)


# --- on a GPU -------------------------------------------------------------------------------


@pytest.fixture
def target() -> CudaSparse24:
    target = CudaSparse24()
    reason = target.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cuda-sparse24: {reason}")
    return target


class VitBlock(nn.Module):
    """Pre-norm transformer block: qkv, scaled-dot-product attention, proj, GELU MLP."""

    def __init__(self, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return out


def check_against_eager(
    target: CudaSparse24, model: nn.Module, x: torch.Tensor, precision: Precision
) -> dict[str, Any]:
    with torch.no_grad():
        expected = model(x)
    prepared = target.prepare(model, (x,), torch.device("cuda"), precision)
    actual = prepared.run()
    prepared.synchronize()
    assert relative_error(actual, expected) <= TOLERANCE[precision]
    info = dict(prepared.info)
    json.dumps(info)
    assert info["sparse_kernel_used"] is True
    assert 0 < info["weight_bytes_compressed"] < 0.7 * info["weight_bytes_dense"]
    return info


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [Precision.FP16, Precision.BF16])
def test_two_four_mlp_matches_eager(target: CudaSparse24, precision: Precision) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()
    make_two_four(mlp[0], mlp[2])
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    info = check_against_eager(target, mlp, torch.randn(3, 128), precision)  # 3 rows: padded
    assert info["converted_layers"] == ["0", "2"]
    assert "4" in info["dense_layers"]
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [Precision.FP16, Precision.BF16])
def test_two_four_vit_block_matches_eager(target: CudaSparse24, precision: Precision) -> None:
    torch.manual_seed(0)
    block = VitBlock().eval()
    make_two_four(block.qkv, block.proj, block.fc1, block.fc2)
    info = check_against_eager(target, block, torch.randn(2, 17, 128), precision)
    assert info["converted_layers"] == ["qkv", "proj", "fc1", "fc2"]


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_two_four_1x1_convs_match_eager(target: CudaSparse24, channels_last: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 1), nn.ReLU(),
        nn.Conv2d(128, 64, 1), nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    ).eval()  # fmt: skip
    make_two_four(net[2], net[4])
    x = torch.randn(2, 3, 8, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    info = check_against_eager(target, net, x, Precision.FP16)
    assert info["converted_layers"] == ["2", "4"]


@pytest.mark.gpu
def test_rebind_runs_the_new_inputs(target: CudaSparse24) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    make_two_four(mlp[0], mlp[2])
    first, second = torch.randn(4, 64), torch.randn(4, 64)
    prepared = target.prepare(mlp, (first,), torch.device("cuda"), Precision.FP16)
    assert prepared.rebind is not None
    prepared.rebind((second,))
    with torch.no_grad():
        expected = mlp(second)
    assert relative_error(prepared.run(), expected) <= TOLERANCE[Precision.FP16]


@pytest.mark.gpu
def test_a_dense_model_runs_dense_with_the_hint(target: CudaSparse24) -> None:
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(2, 64)
    prepared = target.prepare(mlp, (x,), torch.device("cuda"), Precision.FP16)
    assert prepared.info["sparse_kernel_used"] is False
    assert str(prepared.info["all_dense"]).startswith("no layer is 2:4: prune with nm:2:4: 2 of 2")
    with torch.no_grad():
        assert relative_error(prepared.run(), mlp(x)) <= TOLERANCE[Precision.FP16]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """An "8.6 GPU without cuSPARSELt" whose device is the CPU and whose compression is a copy:
    ``prepare``'s bookkeeping, without kernels."""
    import targets.cuda_sparse24 as module

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A10")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 6))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    cpu = torch.device("cpu")
    monkeypatch.setattr(module, "place", lambda m, i, d, p: place(m, i, cpu, p))
    monkeypatch.setattr(module, "semi_structured_compressor", lambda backend: torch.clone)


@pytest.mark.usefixtures("fake_gpu")
def test_prepare_bookkeeping_with_a_faked_device() -> None:
    torch.manual_seed(0)
    model = ConvMlp().eval()
    make_two_four(model.project)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    prepared = CudaSparse24().prepare(model, (x,), torch.device("cuda"), Precision.FP16)
    with torch.no_grad():
        expected = model(x)
    assert relative_error(prepared.run(), expected) <= TOLERANCE[Precision.FP16]
    info = dict(prepared.info)
    json.dumps(info)
    assert info["engine"] == f"torch {torch.__version__} semi-structured (CUTLASS)"
    assert info["backend"] == "cutlass" and info["backend_version"] is None
    assert info["device"] == "NVIDIA A10 (compute capability 8.6)"
    assert info["converted_layers"] == ["project"]
    assert info["dense_layers"]["fc"] == (
        "in_features 32 is not a multiple of 64 (fp16 CUTLASS minimum)"
    )
    assert info["weight_bytes_dense"] == info["weight_bytes_compressed"] == 32 * 64 * 2
    assert info["sparse_kernel_used"] is False  # a copy is no semi-structured tensor
    assert info["convert_s"] >= 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.project, nn.Conv2d)


@pytest.mark.usefixtures("fake_gpu")
def test_a_model_without_a_qualifying_layer_runs_dense_and_says_why() -> None:
    """The dense baseline of a 2:4 variant must run on this target, or no speedup exists."""
    layer = nn.Linear(64, 64).eval()
    x = torch.randn(2, 64)
    prepared = CudaSparse24().prepare(layer, (x,), torch.device("cuda"), Precision.BF16)
    assert prepared.info["converted_layers"] == []
    assert prepared.info["sparse_kernel_used"] is False
    assert str(prepared.info["all_dense"]).startswith("no layer is 2:4: prune with nm:2:4: 1 of 1 ")
    with torch.no_grad():
        assert relative_error(prepared.run(), layer(x)) <= TOLERANCE[Precision.BF16]

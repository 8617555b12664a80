"""SparseConv2d / SparseLinear equal their dense layers; kernels store what they claim."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from benchlib.harness.verify import relative_error
from benchlib.sparse import (
    MatrixKernel,
    SparseConv2d,
    SparseLinear,
    TorchSparseMatrix,
    conv_matrix,
)

EXACT = 1e-4
"""fp32: the sparse product sums the same terms in another order."""


def sparsify_weight(layer: nn.Conv2d | nn.Linear, sparsity: float, seed: int, zeros: str) -> None:
    """Zero ``round(sparsity * numel)`` random weights; ``zeros`` adds an all-zero output
    channel (``row``) or zeroes everything (``all``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = layer.weight
        flat = weight.view(-1)
        chosen = torch.randperm(flat.numel(), generator=generator)
        flat[chosen[: round(sparsity * flat.numel())]] = 0
        if zeros == "row":
            weight[weight.shape[0] // 2] = 0
        elif zeros == "all":
            weight.zero_()


@dataclass(frozen=True)
class ConvCase:
    conv: nn.Conv2d
    input: torch.Tensor


@st.composite
def conv_cases(draw: st.DrawFn) -> ConvCase:
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
    )
    sparsify_weight(
        conv,
        draw(st.floats(0.5, 0.99)),
        seed,
        draw(st.sampled_from(["none", "none", "row", "all"])),
    )
    # the smallest input with an output, plus up to 7 pixels (odd sizes included)
    size = [max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 7)) for k, d, p in
            zip(kernel, dilation, padding, strict=True)]  # fmt: skip
    batch = draw(st.integers(1, 3))
    x = torch.randn(batch, in_channels, *size, generator=torch.Generator().manual_seed(seed))
    return ConvCase(conv.eval(), x)


@settings(deadline=None, max_examples=50)
@given(conv_cases())
def test_sparse_conv_equals_the_dense_conv(case: ConvCase) -> None:
    sparse = SparseConv2d.from_dense(case.conv)
    with torch.no_grad():
        expected = case.conv(case.input)
        actual = sparse(case.input)
    assert actual.shape == expected.shape
    assert actual.is_contiguous()
    assert relative_error(actual, expected) <= EXACT


@settings(deadline=None, max_examples=50)
@given(
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    lead=st.sampled_from([(1,), (3,), (2, 3), ()]),
    bias=st.booleans(),
    sparsity=st.floats(0.5, 0.99),
    zeros=st.sampled_from(["none", "none", "row", "all"]),
    seed=st.integers(0, 2**16),
)
def test_sparse_linear_equals_the_dense_linear(
    in_features: int,
    out_features: int,
    lead: tuple[int, ...],
    bias: bool,
    sparsity: float,
    zeros: str,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    sparsify_weight(linear, sparsity, seed, zeros)
    x = torch.randn(*lead, in_features)
    with torch.no_grad():
        expected = linear(x)
        actual = SparseLinear.from_dense(linear)(x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= EXACT


# torch's own conv warns that it pads a copy of the input for these; expected, not ours
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize(
    ("kernel", "dilation", "padding"),
    [(4, 1, "same"), (2, 3, "same"), ((2, 3), 1, "same"), (3, 2, "same"), (3, 2, "valid")],
)
def test_string_padding_including_asymmetric_same(
    kernel: int | tuple[int, int], dilation: int, padding: str
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, padding=padding, dilation=dilation)
    sparsify_weight(conv, 0.8, 0, "none")
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        expected = conv(x)
        actual = SparseConv2d.from_dense(conv)(x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= EXACT


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_pointwise_conv_is_a_gemm_over_the_strided_view(stride: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 1, stride=stride)
    sparsify_weight(conv, 0.9, 0, "row")
    sparse = SparseConv2d.from_dense(conv)
    assert sparse.pointwise
    x = torch.randn(3, 8, 11, 7)
    with torch.no_grad():
        assert relative_error(sparse(x), conv(x)) <= EXACT
    assert not SparseConv2d.from_dense(nn.Conv2d(8, 4, 1, padding=1)).pointwise


def test_input_layout_does_not_matter() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    sparsify_weight(conv, 0.7, 0, "none")
    x = torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert relative_error(SparseConv2d.from_dense(conv)(x), conv(x)) <= EXACT


def test_conv_matrix_is_block_diagonal_over_groups() -> None:
    weight = torch.arange(1, 4 * 1 * 2 * 1 + 1, dtype=torch.float32).reshape(4, 1, 2, 1)
    matrix = conv_matrix(weight, groups=2)  # 2 out channels per group, 1 in channel each
    assert matrix.tolist() == [
        [1.0, 2.0, 0.0, 0.0],
        [3.0, 4.0, 0.0, 0.0],
        [0.0, 0.0, 5.0, 6.0],
        [0.0, 0.0, 7.0, 8.0],
    ]


def test_csr_kernel_stores_int32_indices_and_only_nonzeros() -> None:
    matrix = torch.zeros(4, 6)
    matrix[0, 1], matrix[0, 5], matrix[2, 0], matrix[3, 3], matrix[3, 4] = 1, 2, 3, 4, 5
    kernel = TorchSparseMatrix(matrix)
    assert (kernel.name, kernel.format, kernel.shape) == ("torch-csr", "csr", (4, 6))
    assert kernel.crow.tolist() == [0, 2, 2, 3, 5]
    assert kernel.col.tolist() == [1, 5, 0, 3, 4]
    # 5 row pointers + 5 column indices (int32) + 5 values (fp32)
    assert kernel.stored_bytes() == 5 * 4 + 5 * 4 + 5 * 4
    x = torch.randn(6, 3)
    assert torch.allclose(kernel(x), matrix @ x)


def test_bsr_kernel_stores_whole_blocks() -> None:
    matrix = torch.zeros(4, 8)
    matrix[0:2, 2:4] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    matrix[2:4, 6:8] = torch.tensor([[5.0, 0.0], [7.0, 8.0]])  # a zero inside a kept block
    kernel = TorchSparseMatrix(matrix, (2, 2))
    assert (kernel.name, kernel.format) == ("torch-bsr-2x2", "bsr")
    # 3 block-row pointers + 2 block columns (int32) + 2 blocks of 2x2 fp32
    assert kernel.stored_bytes() == 3 * 4 + 2 * 4 + 2 * 4 * 4
    x = torch.randn(8, 5)
    assert torch.allclose(kernel(x), matrix @ x)


def test_sparse_modules_deep_copy_and_move() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    sparsify_weight(conv, 0.8, 0, "none")
    sparse = SparseConv2d.from_dense(conv)
    # plain strided buffers: a torch sparse CSR buffer would make deepcopy raise
    assert {t.layout for t in sparse.state_dict().values()} == {torch.strided}
    copied = copy.deepcopy(sparse).to(torch.float64)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert relative_error(copied(x.double()), conv.double()(x.double())) <= EXACT


class DenseKernel(nn.Module):
    """A stand-in kernel: proves the layer modules take any ``MatrixKernel``."""

    name = "test-dense"
    format = "dense"

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.register_buffer("matrix", matrix.clone())

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.matrix) @ dense

    def stored_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4


def test_the_kernel_is_swappable() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, stride=2, groups=2)
    linear = nn.Linear(5, 3)
    sparse_conv = SparseConv2d.from_dense(conv, DenseKernel)
    sparse_linear = SparseLinear.from_dense(linear, DenseKernel)
    assert isinstance(sparse_conv.kernel, MatrixKernel)
    assert sparse_conv.kernel.name == "test-dense"
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        assert relative_error(sparse_conv(x), conv(x)) <= EXACT
        assert relative_error(sparse_linear(x[:, 0, 0, :5]), linear(x[:, 0, 0, :5])) <= EXACT


class PlainKernel:
    """Has the kernel's attributes but is no nn.Module: its tensors would not follow ``.to``."""

    name, format, shape = "plain", "dense", (2, 3)

    def __call__(self, dense: torch.Tensor) -> torch.Tensor:
        return dense[:2]

    def stored_bytes(self) -> int:
        return 0


def test_bad_kernels_and_padding_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"kernel shape \(2, 3\) != weight matrix \(2, 6\)"):
        SparseConv2d(
            TorchSparseMatrix(torch.zeros(2, 3)),
            None,
            in_channels=3,
            groups=1,
            kernel_size=(1, 2),
            stride=(1, 1),
            padding=(0, 0, 0, 0),
            dilation=(1, 1),
        )
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        SparseLinear(PlainKernel(), None)
    with pytest.raises(ValueError, match="2-D weight matrix"):
        TorchSparseMatrix(torch.zeros(2, 3, 4))

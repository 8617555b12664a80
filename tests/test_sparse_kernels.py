"""The native sparse kernels equal dense products; the build falls back cleanly."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import stat
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from benchlib.harness.verify import relative_error
from benchlib.models import Model
from benchlib.pruning.masks import block_masks
from benchlib.sparse import (
    ConvLayout,
    GatherKernel,
    LayerReport,
    NativeSparseMatrix,
    NativeUnavailable,
    SparseConv2d,
    SparseLinear,
    TorchSparseMatrix,
    choose_kernel,
    conv_matrix,
    load_library,
    native,
    sparsify,
)
from benchlib.sparse.bands import Bands, to_bands
from benchlib.sparse.build import build, cache_dir, compiler
from benchlib.sparse.direct import ALIGN, COPY_OUT, COPY_SOURCE, COPY_THREADS, RowParts
from benchlib.sparse.native import (
    GATHER_IN_ORDER,
    GATHER_OUT,
    GATHER_PARTS,
    GATHER_SHIFTS,
    GATHER_SOURCE,
    GATHER_THREADS,
)
from benchlib.sparse.operands import SHIFT_VECTOR, ColumnBlocks
from benchlib.sparse.tiling import (
    L2_FLOATS,
    STRIP_FLOATS,
    column_block,
    shift_groups,
    strip_budget,
    strip_floats,
    vector_floats,
)
from benchlib.target import Precision
from targets.cpu_sparse import CpuSparse
from tests.test_sparse_modules import ConvCase, conv_cases, sparsify_weight

EXACT = 1e-4
"""fp32: the kernels sum the same terms as a dense product, in another order."""


pytestmark = pytest.mark.usefixtures("native_kernels")


def random_matrix(rows: int, cols: int, sparsity: float, seed: int, zeros: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(rows, cols, generator=generator)
    matrix[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    if zeros == "rows":
        matrix[::3] = 0
    elif zeros == "all":
        matrix.zero_()
    return matrix


@settings(deadline=None, max_examples=60)
@given(
    block_rows=st.integers(1, 12),
    rows_per_block=st.sampled_from([1, 1, 2, 4, 8]),
    cols=st.integers(1, 70),
    columns=st.integers(0, 300),
    sparsity=st.floats(0.0, 1.0),
    zeros=st.sampled_from(["none", "none", "rows", "all"]),
    seed=st.integers(0, 2**16),
)
def test_the_matrix_product_equals_dense(
    block_rows: int,
    rows_per_block: int,
    cols: int,
    columns: int,
    sparsity: float,
    zeros: str,
    seed: int,
) -> None:
    matrix = random_matrix(block_rows * rows_per_block, cols, sparsity, seed, zeros)
    if rows_per_block > 1:  # an Rx1 block pattern, as block pruning leaves it
        keep = torch.rand(block_rows, 1, cols, generator=torch.Generator().manual_seed(seed)) < 0.4
        matrix = (matrix.reshape(block_rows, rows_per_block, cols) * keep).reshape(matrix.shape)
    kernel = NativeSparseMatrix(matrix, rows_per_block)
    dense = torch.randn(cols, columns)
    expected = matrix @ dense
    actual = kernel(dense)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= EXACT
    # the transposed row-major operand of a linear layer takes the rows / batch paths
    rows_major = torch.randn(columns, cols)
    assert relative_error(kernel(rows_major.t()), matrix @ rows_major.t()) <= EXACT


@pytest.mark.parametrize("rows_per_block", [1, 4])
def test_every_tail_of_a_column_tile_is_exact(rows_per_block: int) -> None:
    """Every column count up to two of the widest tiles (128 columns with AVX-512) and some:
    a tile's tail vector overlaps the full one before it, and a last tile narrower than a
    vector takes one from the tile before. Each equals the dense product, in one column block
    and in several with a residual and ReLU (also in place: the output overwrites it), and in
    the scatter form (pitch > row length). The widest counts have tiles enough for threads to
    claim them (at 2 threads or more)."""
    generator = torch.Generator().manual_seed(0)
    matrix = random_matrix(8, 40, 0.6, 3, "none")
    if rows_per_block > 1:
        matrix = matrix * (torch.rand(2, 1, 40, generator=generator) < 0.5).repeat_interleave(
            4, 0
        ).reshape(8, 40)
    kernel = NativeSparseMatrix(matrix, rows_per_block)
    ksplit = kernel.k_split(8)
    for columns in [*range(1, 2 * 128 + 12), 1500, 1537, 1601]:
        x = torch.randn(40, columns, generator=generator)
        source, offsets = x.reshape(1, -1), (kernel.col * columns).contiguous()
        out = torch.empty(1, 8, columns)
        kernel.gather(source, offsets, columns, columns, columns, out, None)
        assert relative_error(out[0], matrix @ x) <= EXACT, columns
        residual = torch.randn(1, 8, columns, generator=generator)
        kernel.gather(source, offsets, columns, columns, columns, out, None, True,
                      residual=residual, ksplit=ksplit)  # fmt: skip
        assert relative_error(out[0], (matrix @ x + residual[0]).clamp(min=0)) <= EXACT, columns
        for blocks in (None, ksplit):  # the residual overwritten in place
            in_place = residual.clone()
            kernel.gather(source, offsets, columns, columns, columns, in_place, None, True,
                          residual=in_place, ksplit=blocks)  # fmt: skip
            assert torch.equal(in_place, out) if blocks else relative_error(in_place, out) <= EXACT
        pitch = 5  # rows of 3 kept columns, computed 5 apart
        rows_out = -(-columns // pitch)
        scattered = torch.empty(1, 8, rows_out * 3)
        kernel.gather(source, offsets, columns, pitch, 3, scattered, None, ksplit=ksplit)
        keep = (torch.arange(columns) % pitch < 3).nonzero().squeeze(1)
        kept = scattered[0, :, : keep.numel()]
        assert relative_error(kept, (matrix @ x)[:, keep]) <= EXACT, columns


def test_the_kernel_stores_what_it_claims() -> None:
    matrix = torch.zeros(8, 6)
    matrix[0:4, 1] = torch.tensor([1.0, 0.0, 3.0, 4.0])  # a block with a zero inside is kept
    matrix[4:8, 5] = 2.0
    csr = NativeSparseMatrix(matrix)
    assert (csr.name, csr.format, csr.shape, csr.entries) == ("native-csr", "csr", (8, 6), 7)
    assert csr.rowptr.tolist() == [0, 1, 1, 2, 3, 4, 5, 6, 7]
    assert csr.stored_bytes() == 9 * 4 + 7 * 4 + 7 * 4
    bsr = NativeSparseMatrix(matrix, 4)
    assert (bsr.name, bsr.format, bsr.entries) == ("native-bsr-4x1", "bsr", 2)
    assert bsr.col.tolist() == [1, 5]
    assert bsr.values.tolist() == [[1.0, 0.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]]
    assert bsr.stored_bytes() == 3 * 4 + 2 * 4 + 8 * 4
    assert isinstance(csr, GatherKernel)


def test_gather_drops_the_padded_columns_and_applies_bias_and_relu() -> None:
    matrix = torch.tensor([[1.0, -2.0], [0.0, 0.0], [0.5, 0.0]])
    kernel = NativeSparseMatrix(matrix)
    source = torch.arange(24, dtype=torch.float32).reshape(1, 24) - 10
    offsets = torch.tensor([0, 7, 3], dtype=torch.int32)  # entry e reads source[offsets[e] + q]
    bias = torch.tensor([1.0, -1.0, 0.0])
    out = torch.empty(1, 3, 3, 2)  # 3 rows of 2 kept columns, computed 3 apart (pitch 3)
    kernel.gather(source, offsets, 8, 3, 2, out, bias, relu=True)
    q = torch.tensor([0, 1, 3, 4, 6, 7])  # the kept columns of q in [0, 8)
    x = source[0]
    expected = torch.stack([x[q] - 2 * x[7 + q] + 1, torch.full((6,), -1.0), 0.5 * x[3 + q]]).clamp(
        min=0
    )
    assert torch.equal(out.reshape(3, 6), expected)


def test_gather_refuses_operands_that_do_not_fit() -> None:
    kernel = NativeSparseMatrix(torch.eye(3))
    source, out = torch.zeros(1, 10), torch.empty(1, 3, 4)
    good = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"6 torch\.int32 offsets for 3 entries"):
        kernel.gather(source, torch.zeros(6, dtype=torch.int32), 4, 4, 4, out, None)
    with pytest.raises(ValueError, match=r"need \(1, 3, 5\)"):
        kernel.gather(source, good, 5, 5, 5, out, None)
    with pytest.raises(ValueError, match="bias must be 3 contiguous fp32 values"):
        kernel.gather(source, good, 4, 4, 4, out, torch.zeros(2))
    with pytest.raises(ValueError, match="block height 3 must be one of"):
        NativeSparseMatrix(torch.eye(6), 3)
    with pytest.raises(ValueError, match=r"block height 4 must be one of .* divide the 6 rows"):
        NativeSparseMatrix(torch.eye(6), 4)


@settings(deadline=None, max_examples=60)
@given(conv_cases(), st.sampled_from([1, 1, 2, 4]))
def test_the_direct_conv_equals_the_dense_conv(case: ConvCase, block: int) -> None:
    conv = case.conv
    if block > 1:  # block-prune along the output channels when they divide
        if conv.out_channels % block or conv.out_channels // conv.groups % block:
            block = 1
        else:
            with torch.no_grad():
                matrix = conv.weight.reshape(conv.out_channels, -1)
                conv.weight.mul_(
                    block_masks({"w": matrix}, block, 1, 0.6)["w"].view_as(conv.weight)
                )
    sparse = SparseConv2d.from_dense(conv, lambda m: NativeSparseMatrix(m, block))
    assert sparse.gathers
    with torch.no_grad():
        expected = conv(case.input)
        actual = sparse(case.input)
    assert actual.shape == expected.shape
    assert actual.is_contiguous()
    assert relative_error(actual, expected) <= EXACT


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "padding", "groups"),
    [
        (56, 1, 1, 1, 0, 1),  # in place
        (56, 1, 2, 1, 0, 1),  # a strided pointwise conv stores one phase
        (15, 3, 2, 1, 1, 1),  # odd size, polyphase
        (14, 3, 1, 2, 2, 1),  # dilated
        (13, 5, 3, 1, 2, 2),  # stride 3, groups
        (9, 3, 1, 1, 1, 8),  # depthwise
        (7, 3, 2, 2, 0, 1),  # no padding, stride and dilation
    ],
)
def test_direct_conv_layouts(
    size: int, kernel: int, stride: int, dilation: int, padding: int, groups: int
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, stride, padding, dilation, groups).eval()
    sparsify_weight(conv, 0.8, 0, "row")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    x = torch.randn(2, 8, size, size + 1)
    with torch.no_grad():
        assert relative_error(sparse(x), conv(x)) <= EXACT
        channels_last = x.to(memory_format=torch.channels_last)
        assert relative_error(sparse(channels_last), conv(x)) <= EXACT
    layout, offsets = sparse.layout(size, size + 1)
    phases = {
        (r * dilation % stride, s * dilation % stride) for r in range(kernel) for s in range(kernel)
    }
    assert set(layout.phases) == phases
    assert layout.in_place == (stride == 1 and padding == 0 and layout.plane == size * (size + 1))
    assert layout.plane % 16 == 0 or not sparse.reuse() >= 128 or kernel > 1
    assert int(offsets.max()) + layout.columns <= layout.floats


def test_the_layout_of_a_strided_conv_by_hand() -> None:
    # 3x3, stride 2, padding 1 on 1 channel of 4x4: padded 6x6, phases of 3x3, output 2x2
    layout = ConvLayout.of(1, (4, 4), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    assert (layout.out_h, layout.out_w, layout.phase_h, layout.phase_w) == (2, 2, 3, 3)
    assert layout.phases == ((0, 0), (0, 1), (1, 0), (1, 1))
    assert (layout.columns, layout.pitch, layout.floats) == (5, 3, 36)
    # column (r, s) reads phase (r % 2, s % 2) at row r // 2, col s // 2
    assert layout.column_offsets().tolist() == [0, 9, 1, 18, 27, 19, 3, 12, 4]
    x = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)
    source = layout.source(x).reshape(4, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1))[0, 0]
    for index, (a, b) in enumerate(layout.phases):
        assert torch.equal(source[index], padded[a::2, b::2])
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ConvLayout.of(1, (2, 2), (5, 5), (1, 1), (1, 1), (0, 0, 0, 0))


@settings(deadline=None, max_examples=40)
@given(
    in_features=st.integers(1, 60),
    out_features=st.integers(1, 24),
    batch=st.integers(1, 17),
    lead=st.sampled_from([(), (2,)]),
    bias=st.booleans(),
    rows_per_block=st.sampled_from([1, 1, 4, 8]),
    sparsity=st.floats(0.5, 1.0),
    seed=st.integers(0, 2**16),
)
def test_the_linear_layer_equals_dense_at_every_batch(
    in_features: int,
    out_features: int,
    batch: int,
    lead: tuple[int, ...],
    bias: bool,
    rows_per_block: int,
    sparsity: float,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features * rows_per_block, bias=bias)
    sparsify_weight(linear, sparsity, seed, "row")
    sparse = SparseLinear.from_dense(linear, lambda m: NativeSparseMatrix(m, rows_per_block))
    x = torch.randn(*lead, batch, in_features)
    with torch.no_grad():
        expected = linear(x)
        actual = sparse(x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= EXACT


def test_the_rows_kernel_sums_rows_of_every_length() -> None:
    """Rows of 0 to 100 entries: the vector loops (8 / 16 entries into one vector, four
    accumulators) and every tail, for one and two inputs."""
    torch.manual_seed(3)
    weight = torch.zeros(101, 150)
    for length in range(101):
        weight[length, torch.randperm(150)[:length]] = torch.randn(length)
    matrix, bias = NativeSparseMatrix(weight), torch.randn(101)
    for batch in (1, 2):
        x = torch.randn(batch, 150)
        expected = torch.relu(x @ weight.t() + bias)
        assert relative_error(matrix.rows(x, bias, relu=True), expected) <= EXACT


def test_other_dtypes_take_the_reference_product_and_copies_work() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    sparsify_weight(conv, 0.8, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert relative_error(copy.deepcopy(sparse)(x), conv(x)) <= EXACT
        doubled = copy.deepcopy(sparse).to(torch.float64)
        assert relative_error(doubled(x.double()), conv.double()(x.double())) <= EXACT
    linear = nn.Linear(5, 3)
    sparse_linear = SparseLinear.from_dense(linear, NativeSparseMatrix).to(torch.float64)
    with torch.no_grad():
        y = torch.randn(2, 5, dtype=torch.float64)
        assert relative_error(sparse_linear(y), linear.double()(y)) <= EXACT


@pytest.mark.parametrize("stride", [1, 2])
def test_the_bound_calls_follow_new_weights_copies_and_pickles(stride: int) -> None:
    """A layer binds its tensors' addresses on its first call (``gather_plan``, the rows
    kernel's packed call); replacing them (``.to``, a new kernel or bias) must rebind."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1)
    sparsify_weight(conv, 0.7, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    linear = nn.Linear(10, 7)
    sparsify_weight(linear, 0.7, 0, "none")
    sparse_linear = SparseLinear.from_dense(linear, NativeSparseMatrix)
    x, y = torch.randn(1, 4, 9, 9), torch.randn(1, 10)
    with torch.no_grad():
        assert sparse.gather_plan(x) is not None
        assert relative_error(sparse(x), conv(x)) <= EXACT
        assert relative_error(sparse_linear(y), linear(y)) <= EXACT
        for layer, dense in ((sparse, conv), (sparse_linear, linear)):
            layer.kernel.double()  # new tensors: values doubled, then fp32 (new tensors again)
            layer.kernel.values.mul_(2.0)
            layer.kernel.float()
            dense.weight.mul_(2.0)
        assert relative_error(sparse(x), conv(x)) <= EXACT
        assert relative_error(sparse_linear(y), linear(y)) <= EXACT
        sparse.bias = torch.randn(6)
        conv.bias.copy_(sparse.bias)
        assert relative_error(sparse(x), conv(x)) <= EXACT
        conv.weight.mul_(-1.0)
        sparse.kernel = NativeSparseMatrix(conv.weight.reshape(6, -1))
        assert relative_error(sparse(x), conv(x)) <= EXACT
        buffer = io.BytesIO()
        torch.save(sparse, buffer)
        buffer.seek(0)
        for twin in (copy.deepcopy(sparse), torch.load(buffer, weights_only=False)):
            assert relative_error(twin(x), conv(x)) <= EXACT
        assert relative_error(copy.deepcopy(sparse_linear)(y), linear(y)) <= EXACT


def test_threads_sharing_a_layer_each_get_their_own_result() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    sparsify_weight(conv, 0.8, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    inputs = [torch.randn(1, 8, 16, 16) for _ in range(4)]
    with torch.no_grad():
        expected = [conv(x) for x in inputs]

    def run(index: int) -> float:
        worst = 0.0
        with torch.no_grad():
            for _ in range(30):
                worst = max(worst, relative_error(sparse(inputs[index]), expected[index]))
        return worst

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: between setting arguments and calling
    try:
        with ThreadPoolExecutor(4) as pool:
            assert max(pool.map(run, range(4))) <= EXACT
    finally:
        sys.setswitchinterval(interval)


def test_the_default_kernel_is_native_with_its_block_format() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 16)
    assert choose_kernel(weight * (torch.rand(16, 16) < 0.2)).name == "native-csr"
    for rows, cols in ((4, 1), (8, 1), (4, 4), (2, 2), (1, 4)):
        blocked = weight * block_masks({"w": weight}, rows, cols, 0.75)["w"]
        expected = "native-csr" if rows == 1 else f"native-bsr-{rows}x1"
        assert choose_kernel(blocked).name == expected


def test_without_native_kernels_torch_runs_and_the_report_says_why(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Model
) -> None:
    reason = "no C++ compiler found (set CXX, or install g++ or clang++)"
    for where in ("benchlib.sparse.convert", "targets.cpu_sparse"):
        monkeypatch.setattr(f"{where}.load_library", lambda: NativeUnavailable(reason))
    layer = nn.Conv2d(4, 4, 3, padding=1)
    sparsify_weight(layer, 0.95, 0, "none")
    assert isinstance(choose_kernel(layer.weight.reshape(4, -1)), TorchSparseMatrix)
    converted, [report] = sparsify(layer, 0.5)
    assert report.kernel == "torch-csr"
    assert report.reason.endswith(f"torch-csr because the native kernels are unavailable: {reason}")
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert relative_error(converted(x), layer(x)) <= EXACT
    prepared = CpuSparse(threshold=1.0, timed=False).prepare(
        tiny_model.module, (tiny_model.example_input(1),), torch.device("cpu"), Precision.FP32
    )
    assert prepared.info["native"] == {"available": False, "reason": reason}
    assert prepared.info["kernels"] == ["torch-csr"]


def fake_compiler(directory: Path, exit_code: int) -> str:
    script = directory / "fake-c++"
    script.write_text(
        f"#!/bin/sh\necho 'fake 1.0'\necho 'spmm.cpp:1: error: boom' >&2\nexit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_build_failures_are_one_line_reasons(tmp_path: Path) -> None:
    with pytest.raises(NativeUnavailable, match="no C\\+\\+ compiler found"):
        build(tmp_path, None)
    with pytest.raises(NativeUnavailable, match="cannot run the C\\+\\+ compiler"):
        build(tmp_path, str(tmp_path / "missing-c++"))
    with pytest.raises(
        NativeUnavailable,
        match=r"could not compile spmm\.cpp layout\.cpp head\.cpp chain\.cpp: "
        r"spmm\.cpp:1: error: boom",
    ):
        build(tmp_path, fake_compiler(tmp_path, 1))
    assert not list(tmp_path.glob("*.so"))  # no half-written library is left


def test_the_library_is_cached_per_machine(tmp_path: Path) -> None:
    loaded = load_library()
    assert not isinstance(loaded, NativeUnavailable)
    assert loaded.isa in {"avx512", "avx2", "generic"}
    again = build(loaded.path.parent, compiler())
    assert (again.path, again.build_s) == (loaded.path, 0.0)
    assert cache_dir({"BENCHLIB_CACHE_DIR": str(tmp_path)}) == tmp_path / "extensions"
    assert cache_dir({}, home=tmp_path) == tmp_path / ".cache" / "benchlib" / "extensions"


class Block(nn.Module):
    """conv-bn-relu (a module ReLU), conv-bn then F.relu, a shared conv, a max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        return torch.relu(self.shared(self.shared(x)))


def _traced(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """``model`` traced by ``fuse.trace``, and its output on ``x`` (computed first)."""
    from benchlib.sparse.fuse import trace

    with torch.no_grad():
        expected = model(x)
    traced = trace(model)
    assert not isinstance(traced, str)
    return traced, expected


def test_batchnorm_folds_and_relus_fuse_exactly() -> None:
    from benchlib.sparse.fuse import fold_batchnorm, fuse_relu, trace
    from benchlib.sparse.pool import NativeMaxPool2d, replace_max_pools

    torch.manual_seed(0)
    model = Block().eval()
    for bn in (model.bn1, model.bn2):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
    for conv in (model.conv1, model.conv2, model.shared):
        sparsify_weight(conv, 0.7, 0, "none")
    x = torch.randn(2, 4, 9, 10)
    traced, expected = _traced(model, x)
    assert fold_batchnorm(traced) == 2
    assert replace_max_pools(traced) == 1
    assert isinstance(traced.get_submodule("pool"), NativeMaxPool2d)
    converted, reports = sparsify(traced, 1.0, NativeSparseMatrix, in_place=True)
    assert {r.name for r in reports} == {"conv1", "conv2", "shared"}
    assert isinstance(converted, torch.fx.GraphModule)
    assert fuse_relu(converted) == 2  # the shared conv, called twice, keeps its ReLU apart
    assert converted.get_submodule("conv1").relu and not converted.get_submodule("shared").relu
    with torch.no_grad():
        assert relative_error(converted(x), expected) <= EXACT
    assert "not traceable by torch.fx" in str(trace(Untraceable()))


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if bool(x.sum() > 0) else -x  # data-dependent control flow


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "size"),
    [
        (3, 2, 1, 1, (112, 112)),
        (3, 2, 1, 1, (5, 64)),  # 32 outputs a row: two whole vectors of the AVX-512 path
        (3, 2, 0, 1, (4, 67)),  # 33: two vectors and one output on its own
        (2, 2, 0, 1, (7, 9)),
        (3, 1, 1, 2, (10, 11)),
        (4, 3, 2, 1, (13, 6)),
    ],
)
def test_native_max_pool_equals_torch_nan_included(
    kernel: int, stride: int, padding: int, dilation: int, size: tuple[int, int]
) -> None:
    from benchlib.sparse.pool import NativeMaxPool2d

    pool = nn.MaxPool2d(kernel, stride, padding, dilation)
    native = NativeMaxPool2d.from_module(pool)
    assert native is not None
    x = torch.randn(2, 3, *size)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, :, 5::7] = float("nan")  # NaNs at every column phase of the windows
    expected, actual = pool(x), native(x)
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.nan_to_num(0.0), expected.nan_to_num(0.0))
    doubled = native(x.double())  # not fp32: F.max_pool2d
    assert torch.equal(doubled.nan_to_num(0.0), pool(x.double()).nan_to_num(0.0))
    assert NativeMaxPool2d.from_module(nn.MaxPool2d(2, ceil_mode=True)) is None
    native.relu = True  # the pool of relu(x), natively and by F.max_pool2d
    for operand in (x, x.double()):
        fused, reference = native(operand), pool(torch.relu(operand))
        assert torch.equal(fused.isnan(), reference.isnan())
        assert torch.equal(fused.nan_to_num(0.0), reference.nan_to_num(0.0))
        assert fused.nan_to_num(0.0).min() >= 0


class Stem(nn.Module):
    """A dense conv, its ReLU, a max pool (ResNet's stem); ``leak`` also returns the conv's
    output, which an in-place ReLU would change."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        pooled = self.pool(self.relu(y))
        return (pooled, y) if self.leak else pooled


@pytest.mark.parametrize("leak", [False, True])
def test_relu_before_a_native_pool_moves_into_it(leak: bool) -> None:
    from benchlib.sparse.fuse import fuse_relu
    from benchlib.sparse.pool import replace_max_pools

    torch.manual_seed(0)
    model = Stem(leak).eval()
    x = torch.randn(2, 3, 17, 16)
    traced, expected = _traced(model, x)
    assert replace_max_pools(traced) == 1
    assert fuse_relu(traced) == (0 if leak else 1)  # leaked: the ReLU's input has two users
    assert traced.get_submodule("pool").relu is not leak
    assert any(n.target == "relu" for n in traced.graph.nodes) is leak
    with torch.no_grad():
        actual = traced(x)
    for got, want in zip(
        actual if leak else [actual], expected if leak else [expected], strict=True
    ):
        assert torch.equal(got, want)


def test_plan_bytes_count_what_the_plans_hold_beside_the_weights() -> None:
    """A 1x1 conv's plan holds its entry offsets (int32 each); a column-blocked 3x3 conv's
    also the blocks (bounds, entry order) and block-major copies of offsets and values, its
    layout copy's phase table, and the block-major offsets into the row parts it reads when
    it runs alone. Nothing before the first call; nothing of the kernel's."""
    torch.manual_seed(0)
    pointwise, blocked = nn.Conv2d(16, 8, 1), nn.Conv2d(64, 64, 3, padding=1)
    for conv in (pointwise, blocked):
        sparsify_weight(conv, 0.5, 0, "none")
    layers = [SparseConv2d.from_dense(c, NativeSparseMatrix) for c in (pointwise, blocked)]
    inputs = [torch.randn(1, 16, 5, 5), torch.randn(1, 64, 32, 32)]
    assert [layer.plan_bytes() for layer in layers] == [0, 0]
    with torch.no_grad():
        for layer, x in zip(layers, inputs, strict=True):
            layer(x)
    entries = [layer.kernel.entries for layer in layers]
    assert layers[0].plan_bytes() == 4 * entries[0]
    blocks = layers[1]._ksplits[(32, 32)]
    assert blocks is not None and blocks.blocks > 1
    phases = layers[1].layout(32, 32)[0]._phase_table
    expected = 4 * entries[1] * 4 + 4 * blocks.bounds.numel() + 4 * phases.numel()
    plan = layers[1].gather_plan(inputs[1])
    assert plan is not None and plan.alone is not None  # run alone: the source in row parts
    expected += 4 * entries[1]  # the parts' block-major offsets (the values' copy is shared)
    assert layers[1].plan_bytes() == expected  # offsets, order, block-major offsets, values


def _split_weights(library_path: Path) -> Callable[[list[float] | None], list[float]]:
    """``benchlib_split_weights`` of the loaded library: sets the row split's two thread
    weights when given, returns them as they were."""
    function = ctypes.CDLL(str(library_path)).benchlib_split_weights
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def weights(new: list[float] | None) -> list[float]:
        read = (ctypes.c_float * 2)()
        write = None if new is None else (ctypes.c_float * 2)(*new)
        function(write, read, 2)
        return list(read)

    return weights


@pytest.mark.parametrize("weights", [[8.0, 1.0], [1.0, 8.0], [1e-3, 1.0], [1.0, 1e-3]])
def test_the_row_split_follows_the_thread_weights_and_learns_them(weights: list[float]) -> None:
    """A 1x1 conv over one column tile splits its rows between the threads by their learned
    weights: any weights give the dense result (no row skipped, even a share of no rows), and
    a call moves the weights toward the measured rates (a quarter of the way, the goal within
    [1/2, 2])."""
    loaded = load_library()
    assert not isinstance(loaded, NativeUnavailable)
    split_weights = _split_weights(loaded.path)
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 512, 1)
    sparsify_weight(conv, 0.7, 0, "none")
    layer = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    x = torch.randn(1, 256, 7, 7)
    threads = torch.get_num_threads()
    saved = split_weights(None)
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            expected = conv(x)
            for _ in range(3):
                split_weights(weights)
                assert relative_error(layer(x), expected) <= EXACT
                learned = split_weights(None)
                if min(weights) >= 1.0:  # both threads had rows: both rates measured
                    heavy = weights.index(8.0)
                    assert 6.125 <= learned[heavy] <= 6.5
    finally:
        torch.set_num_threads(threads)
        split_weights(saved)


def test_keep_faster_swaps_back_what_is_not_faster() -> None:
    from benchlib.sparse.tune import keep_faster

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 5)
    )
    for layer in (model[0], model[2], model[4]):
        sparsify_weight(layer, 0.9, 0, "none")
    dense = dict(model.named_modules())
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
    converted, reports = sparsify(copy.deepcopy(model), 1.0, NativeSparseMatrix)
    dense = dict(model.named_modules())
    sparse_is_faster = {"0": True, "2": False, "4": True}
    shapes: dict[str, tuple[int, ...]] = {}

    def compare(sparse: nn.Module, dense_layer: nn.Module, x: torch.Tensor) -> tuple[float, float]:
        # a fake clock: no timing here
        name = next(n for n, m in converted.named_children() if m is sparse)
        assert isinstance(sparse, (SparseConv2d, SparseLinear)) and dense_layer is dense[name]
        shapes[name] = tuple(x.shape)
        return (0.5, 1.0) if sparse_is_faster[name] else (1.0, 0.5)

    updated = keep_faster(converted, reports, dense, (x,), compare)
    assert [r.sparse for r in updated] == [True, False, True]
    assert (
        updated[1].reason
        == "not faster sparse: native-csr 1e+03 ms vs dense 500 ms on (1, 8, 6, 6)"
    )
    assert (updated[1].format, updated[1].kernel, updated[1].stored_bytes) == (
        "dense",
        None,
        8 * 8 * 4,
    )
    assert updated[0].reason.endswith("; native-csr 500 ms vs dense 1e+03 ms on (1, 4, 8, 8)")
    assert converted[2] is model[2] and isinstance(converted[0], SparseConv2d)
    assert shapes == {"0": (1, 4, 8, 8), "2": (1, 8, 6, 6), "4": (1, 288)}
    with torch.no_grad():
        assert relative_error(converted(x), expected) <= EXACT


class Residual(nn.Module):
    """conv1 -> ReLU -> conv2, plus the input, -> ReLU -> conv3 (nothing to fold after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        out += x
        return self.conv3(F.relu(out))


def _converted_residual() -> tuple[nn.Module, torch.fx.GraphModule, list[LayerReport]]:
    from benchlib.sparse.fuse import trace

    torch.manual_seed(0)
    model = Residual().eval()
    for conv in (model.conv1, model.conv2, model.conv3):
        sparsify_weight(conv, 0.8, 0, "none")
    traced = trace(model)
    assert not isinstance(traced, str)
    converted, reports = sparsify(traced, 1.0, NativeSparseMatrix, in_place=True)
    assert isinstance(converted, torch.fx.GraphModule)
    return model, converted, reports


def test_epilogues_predict_what_the_fusions_fold() -> None:
    from benchlib.sparse.fuse import Epilogue, epilogues, fuse_relu, fuse_residual

    model, converted, _ = _converted_residual()
    predicted = epilogues(converted)
    assert predicted == {"conv1": Epilogue(relu=True), "conv2": Epilogue(residual=True, relu=True)}
    assert str(predicted["conv2"]) == "add and ReLU" and not Epilogue()
    assert fuse_residual(converted) == 1 and fuse_relu(converted) == 2
    for name in ("conv1", "conv2", "conv3"):
        layer = converted.get_submodule(name)
        node = next(n for n in converted.graph.nodes if n.target == name)
        assert layer.relu is predicted.get(name, Epilogue()).relu
        assert (len(node.args) == 2) is predicted.get(name, Epilogue()).residual
    x = torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= EXACT


def test_keep_faster_times_both_sides_with_the_epilogue_and_close_calls_twice() -> None:
    from benchlib.sparse.fuse import Epilogue, epilogues
    from benchlib.sparse.tune import keep_faster

    model, converted, reports = _converted_residual()
    dense = dict(model.named_modules())
    predicted = epilogues(converted)
    # sparse / dense seconds: conv1 a close call and conv3 slower sparse (each timed twice),
    # conv2 clearly faster sparse (once)
    clock = {"conv1": (1.0, 1.05), "conv2": (0.5, 1.0), "conv3": (1.0, 0.5)}
    calls: dict[str, int] = {}

    def compare(sparse: nn.Module, dense_side: nn.Module, x: torch.Tensor) -> tuple[float, float]:
        layer = getattr(sparse, "layer", sparse)
        name = next(n for n, m in converted.named_children() if m is layer)
        calls[name] = calls.get(name, 0) + 1
        with torch.no_grad():  # both sides compute the same: the layer and what follows it
            fused, unfused = sparse(x), dense_side(x)
        assert relative_error(fused, unfused) <= EXACT
        assert layer.relu is predicted.get(name, Epilogue()).relu
        if predicted.get(name):
            assert fused.min() >= 0  # the ReLU is applied on both sides
        return clock[name]

    updated = keep_faster(converted, reports, dense, (torch.randn(1, 4, 6, 5),), compare, predicted)
    assert calls == {"conv1": 2, "conv2": 1, "conv3": 2}
    assert [r.sparse for r in updated] == [True, True, False]
    assert updated[0].reason.endswith(
        "; native-csr 1e+03 ms vs dense 1.05e+03 ms on (1, 4, 6, 5), each with the ReLU after"
    )
    assert "each with the add and ReLU after" in updated[1].reason
    assert not converted.get_submodule("conv1").relu  # set only while timed


def test_the_layers_are_timed_in_alternating_blocks() -> None:
    from benchlib.sparse.tune import interleaved_seconds

    calls: list[str] = []

    class Recorder(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.name)
            return x

    first, second = interleaved_seconds(Recorder("a"), Recorder("b"), torch.ones(1), 2, 3)
    assert calls == (["a"] * 4 + ["b"] * 4) * 2  # each block: one untimed call, three timed
    assert first > 0 and second > 0


def test_each_side_takes_its_fastest_blocks_median(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow phase (every call of a round slow) and one lucky call do not decide."""
    from benchlib.sparse import tune

    durations = iter(
        [
            # round 1: a's block of 3 (ns), then b's
            *(50, 51, 52), *(30, 31, 32),
            # round 2, slow for both: a slowed more
            *(400, 410, 420), *(60, 61, 62),
            # round 3: one lucky call of b
            *(40, 41, 42), *(1, 33, 34),
        ]
    )  # fmt: skip
    clock = {"now": 0, "start": True}

    def perf_counter_ns() -> int:  # start and stop alternate: each stop adds the next duration
        if not clock["start"]:
            clock["now"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["now"]

    monkeypatch.setattr(tune.time, "perf_counter_ns", perf_counter_ns)
    layer = nn.Identity()
    first, second = tune.interleaved_seconds(layer, layer, torch.ones(1), 3, 3)
    assert (first, second) == (41e-9, 31e-9)  # a: min(51, 410, 41); b: min(31, 61, 33)


def test_a_much_reused_pointwise_input_is_copied_into_aligned_planes_by_avx512_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 256, 1, bias=False).eval()  # 256 outputs: each input read ~200 times
    sparsify_weight(conv, 0.2, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    assert sparse.reuse() >= 128
    monkeypatch.setattr("benchlib.sparse.tiling.ALIGN_ISAS", frozenset())
    layout, _ = copy.deepcopy(sparse).layout(7, 7)
    assert (layout.plane, layout.in_place) == (49, True)  # AVX2: in place (aligned is slower)
    monkeypatch.setattr("benchlib.sparse.tiling.ALIGN_ISAS", frozenset({load_library().isa}))
    layout, _ = sparse.layout(7, 7)
    assert (layout.plane, layout.in_place, layout.floats) == (64, False, 8 * 64)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        assert relative_error(sparse(x), conv(x)) <= EXACT
    aligned = ConvLayout.of(3, (5, 5), (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), align=ALIGN)
    source = aligned.source(torch.arange(75, dtype=torch.float32).reshape(1, 3, 5, 5))
    assert source.reshape(3, 32)[:, 25:].abs().sum() == 0  # the padding of each plane is zero
    assert source.reshape(3, 32)[1, :25].tolist() == list(range(25, 50))


def test_a_strided_pointwise_conv_copies_its_input_into_vector_aligned_planes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1x1 conv whose input is copied anyway (stride 2, or padding) rounds the copy's planes
    up to a vector of the loaded kernels (8 floats on AVX2, 16 on AVX-512); a 3x3 conv and an
    in-place 1x1 conv keep theirs."""
    monkeypatch.setattr("benchlib.sparse.tiling.ALIGN_ISAS", frozenset())
    torch.manual_seed(0)
    vector = vector_floats()
    cases = [  # kernel, stride, padding: plane of a 14x14 input, read in place
        (1, 2, 0, -(-49 // vector) * vector, False),
        (1, 1, 1, 256, False),
        (1, 1, 0, 196, True),
        (3, 2, 1, 64, False),
        (3, 1, 1, 256, False),
    ]
    for kernel, stride, padding, plane, in_place in cases:
        conv = nn.Conv2d(8, 16, kernel, stride, padding).eval()
        sparsify_weight(conv, 0.5, kernel, "none")
        sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
        layout, _ = sparse.layout(14, 14)
        assert (layout.plane, layout.in_place) == (plane, in_place), (kernel, stride, padding)
        x = torch.randn(2, 8, 14, 14)
        with torch.no_grad():
            assert relative_error(sparse(x), conv(x)) <= EXACT


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding", "align"),
    [
        (3, 2, 1, 1, 1),
        (1, 1, 1, 0, 16),
        (3, 1, 2, 2, 1),
        (1, 2, 1, 0, 16),
        (1, 2, 1, 0, 8),
        (5, 3, 1, 2, 1),
    ],
)
def test_the_native_layout_copy_equals_the_torch_one(
    monkeypatch: pytest.MonkeyPatch,
    kernel: int,
    stride: int,
    dilation: int,
    padding: int,
    align: int,
) -> None:
    layout = ConvLayout.of(
        3,
        (9, 8),
        (kernel, kernel),
        (stride, stride),
        (dilation, dilation),
        (padding,) * 4,
        align=align,
    )
    x = torch.randn(2, 3, 9, 8)
    native = layout.source(x)
    monkeypatch.setattr("benchlib.sparse.direct.load_library", lambda: NativeUnavailable("test"))
    assert torch.equal(native, layout.source(x))
    assert native.shape == (2, layout.floats)


@settings(deadline=None, max_examples=80)
@given(
    channels=st.integers(1, 5),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.tuples(*[st.integers(0, 6)] * 4),
    align=st.sampled_from([1, 8, 16]),
    threads=st.sampled_from([1, 2]),
    band_pick=st.integers(0, 8),
    pad=st.integers(0, 9),
    row_align=st.sampled_from([1, 1, 8, 16]),
    row_parts=st.sampled_from([0, 0, 2, 3]),
)
# the last plane reads no input row while its rows have left padding (1 row, top padding 1,
# stride 2): zeroing "the rows above and the first row's left padding" would overrun it
@example(2, 1, 5, 1, 2, 1, (1, 0, 1, 0), 1, 1, 0, 0, 1, 0)
@example(3, 2, 7, 3, 3, 1, (5, 0, 4, 2), 16, 2, 0, 0, 1, 0)
@example(3, 12, 7, 3, 2, 1, (1, 1, 1, 1), 1, 2, 3, 0, 1, 0)  # bands of 3 rows
@example(3, 12, 7, 3, 2, 1, (1, 1, 1, 1), 8, 2, 3, 5, 1, 0)  # their strips 26 floats apart
@example(3, 12, 7, 3, 1, 1, (1, 1, 1, 1), 1, 2, 3, 0, 16, 0)  # stride 1, rows of 16 floats
@example(3, 12, 7, 3, 2, 1, (1, 1, 1, 1), 1, 2, 3, 0, 1, 2)  # split by rows, from bands
@example(2, 1, 5, 1, 2, 1, (1, 0, 1, 0), 1, 1, 0, 0, 1, 2)  # rows of no input, split
def test_the_native_layout_copy_of_any_shape_writes_exactly_its_planes(
    channels: int,
    height: int,
    width: int,
    kernel: int,
    stride: int,
    dilation: int,
    padding: tuple[int, int, int, int],
    align: int,
    threads: int,
    band_pick: int,
    pad: int,
    row_align: int,
    row_parts: int,
) -> None:
    """Every phase image, including those that read no input row (a padding wider than the
    input), with its rows aligned or not, equals the torch copy, and nothing past the last
    plane is written; from an NCHW input or one in bands of rows (``band_pick`` picks the rows
    among the height's divisors, 0: NCHW) whose channels' strips lie ``pad`` floats more apart
    than their rows take (the floats between are NaN: never read); split by channels or, with
    ``row_parts``, by parts of the phase rows."""
    try:
        layout = ConvLayout.of(
            channels, (height, width), (kernel, kernel), (stride, stride),
            (dilation, dilation), padding, align=align, row_align=row_align,
        )  # fmt: skip
    except ValueError:
        return  # the padded input is smaller than the kernel
    if layout.in_place:
        return  # no copy
    x = torch.randn(2, channels, height, width)
    divisors = [r for r in range(1, height + 1) if height % r == 0]
    band = 0 if band_pick == 0 else divisors[band_pick % len(divisors)]
    strip = 0 if band == 0 else band * width + pad  # floats from a channel's strip to the next
    source = x
    if band:
        source = to_bands(x, Bands(band, strip))
        source[..., band * width :] = float("nan")
    fits = row_parts and (layout.out_h % row_parts == 0 or row_parts == 2 <= layout.out_h)
    split = RowParts.of(layout, row_parts) if fits else None
    floats, plane = (layout.floats, layout.plane) if split is None else (split.floats, split.plane)
    guarded = torch.full((2 * floats + 64,), float("nan"))
    library = load_library()
    assert not isinstance(library, NativeUnavailable)
    library.conv_layout(
        source.data_ptr(), 2, channels, height, width, layout._phase_table.data_ptr(),
        len(layout.phases), stride, stride, padding[0], padding[2], layout.phase_h,
        layout.phase_w, plane, guarded.data_ptr(), threads, band, strip,
        *((0, 0, 0) if split is None else (split.step, split.count, split.span)),
    )  # fmt: skip
    with mock.patch("benchlib.sparse.direct.load_library", lambda: NativeUnavailable("test")):
        expected = layout.source(x)  # by torch ops
    if split is not None:
        expected = _row_parts_of(expected, split)
    assert torch.equal(guarded[: 2 * floats].reshape(2, -1), expected)
    assert guarded[2 * floats :].isnan().all()


def _row_parts_of(source: torch.Tensor, split: RowParts) -> torch.Tensor:
    """The (images, floats) source of ``split`` from the whole layout's ``source``: each
    part's ``span`` phase rows (zeros past the last), each plane zero-padded to its floats."""
    layout = split.layout
    images, phases, channels = source.shape[0], len(layout.phases), layout.channels
    planes = source.reshape(images, phases, channels, layout.plane)
    rows = planes[..., : layout.phase_h * layout.phase_w].reshape(
        images, phases, channels, layout.phase_h, layout.phase_w
    )
    step = split.step
    below = max(0, (split.count - 1) * step + split.span - layout.phase_h)
    rows = F.pad(rows, (0, 0, 0, below))
    parts = torch.stack(
        [rows[..., k * step : k * step + split.span, :] for k in range(split.count)], 1
    ).reshape(images, split.count, phases, channels, -1)
    return F.pad(parts, (0, split.plane - parts.shape[-1])).reshape(images, -1)


def _check_row_part_copy(split: RowParts, x: torch.Tensor) -> None:
    """The native copy of the one image ``x`` into ``split``, on two threads, equals the whole
    layout's rows per part (``_row_parts_of``, by torch ops)."""
    copy = split.copy_call(1)
    out = torch.full((split.floats,), float("nan"))
    copy[COPY_SOURCE], copy[COPY_OUT], copy[COPY_THREADS] = x.data_ptr(), out.data_ptr(), 2
    copy()
    with mock.patch("benchlib.sparse.direct.load_library", lambda: NativeUnavailable("test")):
        expected = _row_parts_of(split.layout.source(x), split)
    assert torch.equal(out.reshape(1, -1), expected)


def _check_plain_and_residual(
    sparse: SparseConv2d, conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor
) -> None:
    """``sparse`` equals ``conv`` on ``x`` without a ReLU, and with ``residual`` added before
    one (then left with ``relu`` set)."""
    with torch.no_grad():
        sparse.relu = False
        assert relative_error(sparse(x), conv(x)) <= EXACT
        sparse.relu = True
        got = sparse(x, residual)
        assert relative_error(got, (conv(x) + residual).relu()) <= EXACT


def test_row_parts_split_the_copy_between_two_threads_and_match_the_whole_conv() -> None:
    """A strided 3x3 conv large enough for two threads: its copy into two row parts equals
    the whole layout's rows per part (the halo row in both), and the conv, whose product then
    runs over the parts in order, equals the dense one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, 2, 1, bias=False).eval()
    sparsify_weight(conv, 0.8, 0, "row")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    x = torch.randn(1, 64, 28, 28)
    layout, _ = sparse.layout(28, 28)
    split = RowParts.of(layout, 2)
    assert (split.rows, split.span) == (7, 8)
    _check_row_part_copy(split, x)
    with torch.no_grad():
        assert relative_error(sparse(x), conv(x)) <= EXACT
        plan = sparse.gather_plan(x)
    assert plan is not None and plan.alone is not None
    assert plan.alone.source_floats == split.floats and plan.source_floats == layout.floats


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_a_strided_conv_of_odd_output_rows_runs_alone_in_two_parts_sharing_a_row(
    threads: int,
) -> None:
    """A strided 3x3 conv of 7 output rows (3x3/2 @14, 13) runs alone in two row parts of 4
    rows, 3 apart: both compute the middle row. Its copy equals the whole layout's rows per
    part, and the conv equals the dense one at batches 1 and 2, on any thread count, with a
    ReLU and a residual. A stride-1 conv of 7 rows is not split in row parts (it runs alone
    in copies: see the test below), and 3 parts of 7 rows are refused."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 20, 3, 2, 1).eval()
    sparsify_weight(conv, 0.8, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    with torch_threads(threads):
        for size in (14, 13):
            layout, _ = sparse.layout(size, size)
            split = RowParts.of(layout, 2)
            assert (split.rows, split.step, split.span) == (4, 3, 5)
            for batch in (1, 2):
                x = torch.randn(batch, 24, size, size)
                residual = torch.randn(batch, 20, 7, 7)
                _check_plain_and_residual(sparse, conv, x, residual)
                plan = sparse._plans[x.shape]
                assert plan.alone is not None and plan.alone.source_floats == split.floats
            _check_row_part_copy(split, torch.randn(1, 24, size, size))
    flat = SparseConv2d.from_dense(nn.Conv2d(24, 20, 3, 1, 1), NativeSparseMatrix)
    with torch_threads(threads):
        plan = flat.gather_plan(torch.randn(1, 24, 7, 7))
    assert plan is not None and (plan.alone is None or plan.alone.threads == 2)
    with pytest.raises(ValueError, match="7 output rows do not split into 3 parts"):
        RowParts.of(flat.layout(7, 7)[0], 3)


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "size"), [(24, 20, 3, 1, 7), (16, 24, 1, 2, 13)]
)
def test_a_conv_not_in_row_parts_runs_alone_in_one_copy_a_thread_on_two_threads(
    cin: int, cout: int, kernel: int, stride: int, size: int
) -> None:
    """A conv run by itself on a layout copy that is not split in row parts (a stride-1 3x3
    of 7 output rows, a strided 1x1) copies its input once a thread on two threads: the
    copies each equal the whole layout, and the conv equals the dense one at batches 1 and 2,
    with a ReLU and a residual. On one or three threads it reads the one layout."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2).eval()
    sparsify_weight(conv, 0.8, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    layout, _ = sparse.layout(size, size)
    copies = RowParts.copies(layout, 2)
    assert (copies.step, copies.rows, copies.columns) == (0, layout.out_h, layout.columns)
    _check_row_part_copy(copies, torch.randn(1, cin, size, size))
    for threads in (2, 1, 3):
        sparse._plans.clear()
        with torch_threads(threads):
            for batch in (1, 2):
                x = torch.randn(batch, cin, size, size)
                residual = torch.randn(batch, cout, layout.out_h, layout.out_w)
                _check_plain_and_residual(sparse, conv, x, residual)
                plan = sparse._plans[x.shape]
                if threads == 2:
                    assert plan.alone is not None and plan.alone.threads == 2
                    assert plan.alone.source_floats == 2 * copies.part_floats
                else:
                    assert plan.alone is None
    with pytest.raises(ValueError, match="0 copies: need at least 1"):
        RowParts.copies(layout, 0)


def test_each_thread_of_a_row_split_reads_its_own_copy() -> None:
    """With copies, thread t reads copy t: a source whose second copy is twice the first
    gives the first row (thread 0's) the product with the first copy and the last row (thread
    1's) twice that on two threads; on one thread every row reads the first copy."""
    torch.manual_seed(0)
    n = 64
    weight = torch.randn(64, 64)
    matrix = NativeSparseMatrix(weight)
    offsets = (matrix.col.long() * n).to(torch.int32)
    floats = 64 * n
    call = matrix.gather_call(offsets, 2 * floats, 1, n, n, n, None, copies=2, copy_floats=floats)
    x = torch.randn(64, n)
    source = torch.cat([x.flatten(), 2 * x.flatten()]).reshape(1, -1)
    expected = weight @ x
    for threads, last in ((2, 2.0), (1, 1.0)):
        out = torch.full((1, 64, n), float("nan"))
        call[GATHER_SOURCE], call[GATHER_OUT], call[GATHER_THREADS] = (
            source.data_ptr(), out.data_ptr(), threads,
        )  # fmt: skip
        assert call() == 0
        assert relative_error(out[0, 0], expected[0]) <= EXACT
        assert relative_error(out[0, -1], last * expected[-1]) <= EXACT


def test_gather_call_refuses_copies_that_leave_the_source() -> None:
    """``gather_call`` checks its copies: a copy the offsets read past, or copies that do not
    fit the source, are refused with the numbers."""
    matrix = NativeSparseMatrix(torch.eye(4))
    offsets = torch.tensor([0, 10, 20, 30], dtype=torch.int32)
    call = matrix.gather_call(offsets, 80, 1, 8, 8, 8, None, copies=2, copy_floats=40)
    assert call is not None
    with pytest.raises(ValueError, match="2 copies of 40 floats do not fit"):
        matrix.gather_call(offsets, 79, 1, 8, 8, 8, None, copies=2, copy_floats=40)
    with pytest.raises(ValueError, match="reading 38 floats of each"):
        matrix.gather_call(offsets, 80, 1, 8, 8, 8, None, copies=2, copy_floats=37)


def test_a_strided_kxk_conv_reads_vector_aligned_rows_where_that_widens_them_little(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the loaded kernels take aligned rows (AVX-512; here any ISA, patched), a strided
    3x3 conv's phase rows round up to a vector when that widens them by at most 1/8 (56x56:
    29 floats -> 32 on AVX-512), not where it would double them (14x14: 8 -> 16), and never
    for a 1x1 conv or a stride-1 conv without shift groups; the conv equals the dense one
    either way."""
    monkeypatch.setattr("benchlib.sparse.tiling.ALIGNED_ROWS_ISAS", frozenset({load_library().isa}))
    monkeypatch.setattr("benchlib.sparse.tiling.SHIFT_GROUP_ISAS", frozenset())
    vector = vector_floats()
    cases = [  # in channels, kernel, stride, size: phase_w; the plain layout's is its own
        (8, 3, 2, 56, -(-29 // vector) * vector),
        (8, 3, 2, 14, 8),
        (8, 3, 1, 28, 30),
        (8, 1, 2, 28, 14),
    ]
    for index, (channels, kernel, stride, size, phase_w) in enumerate(cases):
        torch.manual_seed(index)
        conv = nn.Conv2d(channels, 16, kernel, stride, kernel // 2, bias=False).eval()
        sparsify_weight(conv, 0.7, index, "none")
        sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
        layout, _ = sparse.layout(size, size)
        assert layout.phase_w == phase_w, (kernel, stride, size)
        assert layout.plane % vector == 0 or phase_w % vector  # aligned rows: aligned planes
        x = torch.randn(2, channels, size, size)
        with torch.no_grad():
            assert relative_error(sparse(x), conv(x)) <= EXACT
    monkeypatch.setattr("benchlib.sparse.tiling.ALIGNED_ROWS_ISAS", frozenset())
    plain = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, 2, 1), NativeSparseMatrix)
    assert plain.layout(56, 56)[0].phase_w == 29


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch (and so the native kernels) on ``threads`` threads for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_a_strided_kxk_conv_runs_its_product_in_halves_of_output_rows_in_order(
    threads: int,
) -> None:
    """A strided 3x3 conv whose output has an even number of rows (at least 8) runs its
    product in two parts of whole output rows, the threads taking the tiles in order; an odd
    one in one part. Either way, on any thread count, it equals the dense conv, with and
    without a ReLU."""
    # input size, stride, halves: 28, 14 and 10 output rows in halves; 7 (odd) and 6 (under
    # 8) in one part, and a stride-1 conv in one part
    cases = [(56, 2, True), (28, 2, True), (20, 2, True), (14, 2, False), (12, 2, False)]
    cases += [(16, 1, False)]
    with torch_threads(threads):
        for index, (size, stride, halves) in enumerate(cases):
            torch.manual_seed(index)
            conv = nn.Conv2d(24, 20, 3, stride, 1).eval()
            sparsify_weight(conv, 0.8, index, "none")
            sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
            x = torch.randn(2, 24, size, size)
            with torch.no_grad():
                assert relative_error(sparse(x), conv(x)) <= EXACT, (size, stride)
                sparse.relu = True
                assert relative_error(sparse(x), conv(x).relu()) <= EXACT, (size, stride)
            plan = sparse._plans[x.shape]
            parts, in_order = plan.product[GATHER_PARTS], plan.product[GATHER_IN_ORDER]
            assert (parts, in_order) == ((2, 1) if halves else (1, 0)), (size, stride)


def test_shift_groups_are_a_stride_1_kxk_convs_kernel_width_up_to_four(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("benchlib.sparse.tiling.SHIFT_GROUP_ISAS", frozenset({load_library().isa}))
    assert shift_groups((3, 3), (1, 1), (1, 1)) == 3
    assert shift_groups((1, 3), (1, 1), (1, 1)) == 3
    assert shift_groups((3, 4), (1, 1), (1, 1)) == 4
    assert shift_groups((3, 5), (1, 1), (1, 1)) == 1  # five shifts: more than the kernels take
    assert shift_groups((3, 1), (1, 1), (1, 1)) == 1  # one column: every tap aligned
    assert shift_groups((1, 1), (1, 1), (1, 1)) == 1
    assert shift_groups((3, 3), (2, 2), (1, 1)) == 1  # strided: measured slower
    assert shift_groups((3, 3), (1, 1), (1, 2)) == 1  # dilated columns: shifts 0, 2 and 4
    monkeypatch.setattr("benchlib.sparse.tiling.SHIFT_GROUP_ISAS", frozenset())
    assert shift_groups((3, 3), (1, 1), (1, 1)) == 1


@pytest.mark.parametrize("width", [None, 32])
def test_by_shift_sorts_each_segments_entries_by_shift_and_keeps_them(
    width: int | None,
) -> None:
    """Within each segment (a row, or a row's entries on one column block) the entries come
    sorted by offset modulo a vector, the bounds name each shift's run, and the segment keeps
    the same (offset, value) pairs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 24, 3, 1, 1, bias=False).eval()
    sparsify_weight(conv, 0.6, 0, "row")
    kernel = NativeSparseMatrix(conv_matrix(conv.weight, 1))
    kernel.isa = "avx512"  # the Python side runs anywhere
    layout = ConvLayout.of(64, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))  # rows of 16
    offsets = layout.entry_offsets(kernel.col)
    ksplit = None if width is None else kernel.k_split(width)
    values = kernel.values
    if ksplit is not None:
        offsets, values = offsets[ksplit.order.long()], values[ksplit.order.long()]
        segments = ksplit.bounds[:, :-1].reshape(-1), ksplit.bounds[:, 1:].reshape(-1)
    else:
        segments = kernel.rowptr[:-1], kernel.rowptr[1:]
    groups = kernel._by_shift(offsets, values, ksplit)
    assert groups is not None and groups.shifts == 3
    assert groups.bounds.shape == (segments[0].numel(), 4)
    for index, (begin, end) in enumerate(zip(*segments, strict=True)):
        bounds = groups.bounds[index].tolist()
        assert bounds[0] == int(begin) and bounds[-1] == int(end)
        for shift in range(3):
            got = groups.offsets[bounds[shift] : bounds[shift + 1]]
            assert bool((got % SHIFT_VECTOR == shift).all())
        before = (offsets[begin:end].tolist(), values[begin:end].flatten().tolist())
        after = (groups.offsets[begin:end].tolist(), groups.values[begin:end].flatten().tolist())
        assert sorted(zip(*after, strict=True)) == sorted(zip(*before, strict=True))
    assert kernel._by_shift(offsets - offsets % SHIFT_VECTOR, values, ksplit) is None  # aligned


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(1, 40),
    outputs=st.integers(1, 20),
    height=st.integers(3, 40),
    width=st.integers(3, 40),
    kernel=st.sampled_from([(3, 3), (1, 3), (3, 2), (2, 4)]),
    density=st.sampled_from([0.0, 0.03, 0.2, 0.6, 1.0]),
    images=st.integers(1, 2),
    strip=st.sampled_from([STRIP_FLOATS, 64]),
    threads=st.integers(1, 2),
)
@example(channels=64, outputs=16, height=56, width=56, kernel=(3, 3), density=0.1, images=1,
         strip=STRIP_FLOATS, threads=2)  # fmt: skip
def test_a_stride_1_conv_in_shift_groups_equals_the_dense_conv(
    channels: int,
    outputs: int,
    height: int,
    width: int,
    kernel: tuple[int, int],
    density: float,
    images: int,
    strip: int,
    threads: int,
) -> None:
    """With its rows aligned wherever possible (any widening, patched) and shift groups on
    for the loaded ISA, a stride-1 conv of any size, sparsity (empty rows included) and column
    blocks (small strips: many blocks) equals the dense conv, with and without a ReLU; its
    product runs in shift groups where the kernels have them."""
    isa = frozenset({load_library().isa})
    with (
        mock.patch("benchlib.sparse.tiling.SHIFT_GROUP_ISAS", isa),
        mock.patch("benchlib.sparse.tiling.ALIGNED_ROWS_ISAS", isa),
        mock.patch("benchlib.sparse.tiling.ALIGNED_ROWS_MAX_WIDENING", 64.0),
        mock.patch("benchlib.sparse.tiling.STRIP_FLOATS", strip),
        mock.patch("benchlib.sparse.tiling.STRIP_FLOATS_BY_ISA", {}),
        torch_threads(threads),
    ):
        torch.manual_seed(channels * 41 + height)
        padding = (kernel[0] // 2, kernel[1] // 2)
        conv = nn.Conv2d(channels, outputs, kernel, 1, padding).eval()
        sparsify_weight(conv, 1.0 - density, channels, "row" if density > 0.5 else "none")
        sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
        x = torch.randn(images, channels, height, width)
        with torch.no_grad():
            assert relative_error(sparse(x), conv(x)) <= EXACT
            sparse.relu = True
            assert relative_error(sparse(x), conv(x).relu()) <= EXACT
        layout, offsets = sparse.layout(height, width)
        assert layout.phase_w % vector_floats() == 0
        widest = int((offsets % SHIFT_VECTOR).max()) + 1 if offsets.numel() else 0
        expected = widest if load_library().isa in native.SHIFT_GROUP_ISAS else 0
        assert sparse._plans[x.shape].product[GATHER_SHIFTS] == (expected if expected > 1 else 0)
        assert widest <= kernel[1] or vector_floats() != SHIFT_VECTOR  # AVX2: rows of 8


def test_the_stride_2_copy_is_exact_for_every_row_length() -> None:
    """copy_even's paths: whole vectors, the last vector shifted back, two 4-float halves
    (rows of 5-8 floats), single floats; a phase row here holds about width / 2 floats."""
    torch.manual_seed(0)
    for width in range(1, 70):
        layout = ConvLayout.of(3, (5, width), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
        x = torch.randn(1, 3, 5, width)
        native = layout.source(x)
        with mock.patch("benchlib.sparse.direct.load_library", lambda: NativeUnavailable("t")):
            assert torch.equal(native, layout.source(x)), width


class Bottleneck(nn.Module):
    """torchvision's pattern: the downsample branch runs after conv3, then ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(4, 16, 1, bias=False)
        self.downsample = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        identity = self.downsample(x)
        out += identity
        return self.relu(out)


def test_a_residual_add_and_its_relu_fuse_into_the_pointwise_conv() -> None:
    from benchlib.sparse.fuse import fuse_relu, fuse_residual, trace

    torch.manual_seed(0)
    model = Bottleneck().eval()
    for conv in (model.conv1, model.conv2, model.conv3, model.downsample):
        sparsify_weight(conv, 0.6, 0, "none")
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = model(x)
    traced = trace(model)
    assert not isinstance(traced, str)
    converted, _ = sparsify(traced, 1.0, NativeSparseMatrix, in_place=True)
    assert isinstance(converted, torch.fx.GraphModule)
    assert fuse_residual(converted) == 1
    assert fuse_relu(converted) == 3  # conv1, conv2 and conv3 (after its residual)
    targets = [n.target for n in converted.graph.nodes if n.op == "call_module"]
    assert targets.index("downsample") < targets.index("conv3")
    with torch.no_grad():
        assert relative_error(converted(x), expected) <= EXACT


def test_a_residual_is_added_before_the_relu_on_every_path() -> None:
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1)):  # fused, then not
        sparsify_weight(conv, 0.5, 0, "none")
        sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
        sparse.relu = True
        x, residual = torch.randn(2, 4, 7, 5), torch.randn(2, 6, 7, 5)
        with torch.no_grad():
            expected = torch.relu(conv(x) + residual)
            assert relative_error(sparse(x, residual), expected) <= EXACT
            broadcast = residual[:, :1]  # not out's shape: added by torch after the kernel
            assert relative_error(sparse(x, broadcast), torch.relu(conv(x) + broadcast)) <= EXACT
    with pytest.raises(ValueError, match="a residual must be contiguous fp32 shaped as out"):
        kernel = NativeSparseMatrix(torch.eye(3))
        out = torch.empty(1, 3, 4)
        kernel.gather(
            torch.zeros(1, 12), kernel.col * 4, 4, 4, 4, out, None, residual=torch.zeros(3)
        )


@settings(deadline=None, max_examples=60)
@given(
    block_rows=st.integers(1, 9),
    rows_per_block=st.sampled_from([1, 1, 2, 4, 8]),
    cols=st.integers(1, 90),
    block_columns=st.integers(1, 40),
    columns=st.integers(1, 300),
    pitch_extra=st.sampled_from([0, 0, 1, 3]),
    images=st.integers(1, 2),
    sparsity=st.floats(0.0, 1.0),
    options=st.sampled_from(["none", "bias", "relu", "residual"]),
    seed=st.integers(0, 2**16),
)
def test_column_blocks_compute_the_same_product(
    block_rows: int,
    rows_per_block: int,
    cols: int,
    block_columns: int,
    columns: int,
    pitch_extra: int,
    images: int,
    sparsity: float,
    options: str,
    seed: int,
) -> None:
    """``ksplit`` (the matrix's columns in blocks, partial sums kept between them) gives the
    product of one block, in the direct form and the scatter form (pitch > row length)."""
    rows = block_rows * rows_per_block
    kernel = NativeSparseMatrix(random_matrix(rows, cols, sparsity, seed, "none"), rows_per_block)
    row_length = max(1, min(columns, 20))
    pitch = row_length + (0 if options == "residual" else pitch_extra)
    generator = torch.Generator().manual_seed(seed + 1)
    source = torch.randn(images, cols * columns, generator=generator)
    offsets = (kernel.col * columns).contiguous()
    rows_out = -(-columns // pitch)
    out = torch.zeros(images, rows, rows_out * row_length)  # a partial last row stays 0
    bias = torch.randn(rows, generator=generator) if options == "bias" else None
    residual = torch.randn(out.shape, generator=generator) if options == "residual" else None
    relu = options in ("relu", "residual")
    args = (source, offsets, columns, pitch, row_length)
    expected = kernel.gather(*args, torch.zeros_like(out), bias, relu, residual=residual)
    ksplit = kernel.k_split(block_columns)
    assert ksplit.bounds.shape == (-(-cols // block_columns), block_rows + 1)
    actual = kernel.gather(*args, out, bias, relu, residual=residual, ksplit=ksplit)
    truncated = ColumnBlocks(block_columns, ksplit.bounds[:, :1].contiguous(), ksplit.order)
    with pytest.raises(ValueError, match="ksplit must come from k_split"):
        kernel.gather(*args, out, bias, relu, residual=residual, ksplit=truncated)
    assert relative_error(actual, expected) <= EXACT
    if rows * columns:
        dense = kernel.reference(torch.eye(cols)).t()  # (cols, rows): W^T
        flat = source.reshape(images, cols, columns).transpose(1, 2) @ dense  # (img, q, rows)
        keep = torch.arange(columns) % pitch < row_length
        reference = flat[:, keep].transpose(1, 2) + (0 if bias is None else bias.unsqueeze(1))
        if residual is not None:
            reference = reference + residual[..., : int(keep.sum())]
        reference = reference.clamp(min=0) if relu else reference
        assert relative_error(actual[..., : int(keep.sum())], reference) <= EXACT


@pytest.mark.parametrize(("rows_per_block", "width"), [(1, 1), (1, 7), (4, 16), (2, 64)])
def test_column_blocks_order_the_entries_block_major(rows_per_block: int, width: int) -> None:
    """Block b's entries of block row i are exactly row i's entries on columns [b * width,
    (b + 1) * width), in column order, and the blocks follow one another (rows empty in a block
    included)."""
    kernel = NativeSparseMatrix(random_matrix(24, 50, 0.7, 5, "none"), rows_per_block)
    blocks = kernel.k_split(width)
    block_rows = 24 // rows_per_block
    assert blocks.bounds.shape == (blocks.blocks, block_rows + 1)
    assert blocks.blocks == -(-50 // width)
    assert sorted(blocks.order.tolist()) == list(range(kernel.entries))
    col, rowptr, bounds = kernel.col.tolist(), kernel.rowptr.tolist(), blocks.bounds.tolist()
    expected_start = 0
    for b in range(blocks.blocks):
        for i in range(block_rows):
            begin, end = bounds[b][i], bounds[b][i + 1]
            assert begin == expected_start
            mine = [j for j in range(rowptr[i], rowptr[i + 1]) if col[j] // width == b]
            assert blocks.order[begin:end].tolist() == mine, (b, i)
            expected_start = end
    assert expected_start == kernel.entries


@pytest.mark.parametrize(
    ("cin", "kernel", "stride", "size", "sparsity"),
    [(256, 1, 1, 16, 0.5), (256, 1, 2, 32, 0.7), (64, 3, 1, 16, 0.5), (48, 3, 2, 32, 0.8)],
)
def test_large_convs_run_in_column_blocks_and_equal_dense(
    cin: int, kernel: int, stride: int, size: int, sparsity: float
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 24, kernel, stride, kernel // 2).eval()
    sparsify_weight(conv, sparsity, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    sparse.relu = True
    x = torch.randn(2, cin, size, size)
    assert sparse.ksplit(size, size) is not None
    with torch.no_grad():
        assert relative_error(sparse(x), torch.relu(conv(x))) <= EXACT


def layout_of(channels: int, size: int, kernel: int, stride: int) -> ConvLayout:
    pad = kernel // 2
    return ConvLayout.of(
        channels, (size, size), (kernel, kernel), (stride, stride), (1, 1), (pad,) * 4
    )


@pytest.mark.parametrize("one_block", [True, False])
def test_a_narrow_kxk_conv_runs_in_one_block_where_its_source_fits_l2_on_such_an_isa(
    monkeypatch: pytest.MonkeyPatch, one_block: bool
) -> None:
    isas = frozenset({load_library().isa}) if one_block else frozenset()
    monkeypatch.setattr("benchlib.sparse.tiling.L2_ONE_BLOCK_ISAS", isas)
    monkeypatch.setattr("benchlib.sparse.tiling.STRIP_FLOATS_BY_ISA", {})
    torch.manual_seed(0)
    conv = nn.Conv2d(512, 32, 3, 2, 1).eval()  # ResNet-50's strided 3x3 at 14x14, fewer outputs
    sparsify_weight(conv, 0.9, 0, "none")
    sparse = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    layout, _ = sparse.layout(14, 14)
    assert layout.columns < 128 and layout.floats > L2_FLOATS  # one tile; four phase images
    assert sparse.ksplit(14, 14) is not None
    kernel: NativeSparseMatrix = sparse.kernel  # type: ignore[assignment]
    small = layout_of(512, 7, 3, 2)
    assert small.columns < 128 and small.floats <= L2_FLOATS
    if one_block:  # one tile, its source in L2: one block
        assert column_block(kernel, small) is None
    else:
        assert column_block(kernel, small) == 32 * 9  # as any other: 32 strips fit 4096 floats
    x = torch.randn(1, 512, 14, 14)
    with torch.no_grad():
        assert relative_error(sparse(x), conv(x)) <= EXACT


def test_the_strip_budget_follows_the_loaded_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    isa = load_library().isa
    monkeypatch.setattr("benchlib.sparse.tiling.STRIP_FLOATS_BY_ISA", {isa: 777})
    assert strip_budget() == 777
    monkeypatch.setattr("benchlib.sparse.tiling.STRIP_FLOATS_BY_ISA", {})
    assert strip_budget() == STRIP_FLOATS


def test_a_strip_holds_the_tile_and_the_rows_its_taps_reach_in_each_phase() -> None:
    assert strip_floats(layout_of(256, 14, 1, 1), 64) == 64
    assert strip_floats(layout_of(256, 14, 1, 1), 128) == 128  # AVX-512's tile
    assert strip_floats(layout_of(512, 7, 1, 1), 64) == 49  # the whole image
    assert strip_floats(layout_of(512, 14, 1, 2), 64) == 49  # one phase: the subsampled image
    assert strip_floats(layout_of(128, 28, 3, 1), 64) == 64 + 2 * 30  # two padded rows below
    assert strip_floats(layout_of(128, 56, 3, 2), 64) == 4 * (64 + 29)  # four phases, one row


@pytest.mark.parametrize(
    ("cin", "size", "kernel", "stride", "density", "channels"),
    [
        (256, 14, 1, 1, 0.13, 128),  # 64 channels fit, holding 8 entries a row: twice that
        (1024, 14, 1, 1, 0.45, 64),  # 64 channels fit and hold 29 entries a row
        (256, 14, 3, 1, 0.024, 64),  # 42 fit: 32 hold 7 entries a row, 64 hold 14
        (128, 28, 3, 1, 0.11, 32),  # 33 fit: 32 hold 32 entries
        (128, 56, 3, 2, 0.11, 16),  # 11 fit: 8 hold 8 entries, 16 hold 16
        (128, 28, 1, 1, 0.29, 64),  # 64 fit and hold 18 entries a row: two blocks
        (128, 28, 1, 1, 0.15, None),  # 64 hold 10 entries, and 128 are every channel
        (64, 56, 1, 1, 0.45, None),  # every channel fits
        (512, 14, 1, 1, 0.05, None),  # too sparse for a 1x1 conv
    ],
)
def test_column_blocks_fit_the_strip_budget_and_hold_enough_entries(
    monkeypatch: pytest.MonkeyPatch,
    cin: int,
    size: int,
    kernel: int,
    stride: int,
    density: float,
    channels: int | None,
) -> None:
    """The widest power of two channels whose strips fit ``STRIP_FLOATS`` (AVX2's budget and
    tile of 64 columns), doubled while a row holds fewer than ``KSPLIT_MIN_ENTRIES`` (12)
    entries."""
    monkeypatch.setattr("benchlib.sparse.tiling.STRIP_FLOATS_BY_ISA", {})
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 64, kernel, stride, kernel // 2, bias=False)
    sparsify_weight(conv, 1 - density, 0, "none")
    matrix = NativeSparseMatrix(conv_matrix(conv.weight, 1))
    layout = layout_of(cin, size, kernel, stride)
    assert STRIP_FLOATS == 4096
    expected = None if channels is None else channels * kernel * kernel
    assert column_block(matrix, layout, 64) == expected

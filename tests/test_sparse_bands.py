"""``benchlib.sparse.bands``: activations in bands of rows (or planes padded to an aligned
stride) inside a native chain."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from benchlib.harness.verify import relative_error
from benchlib.sparse import NativeSparseMatrix
from benchlib.sparse.bands import (
    Bands,
    ChainedConv,
    adds_residual,
    banded_product,
    bands_for,
    copies_as_is,
    copy_floats,
    from_bands,
    layer_calls,
    padded_product,
    padded_start,
    reads_in_place,
    thread_parts,
    to_bands,
    writes_padded,
)
from benchlib.sparse.binding import COPY_STEP, GATHER_STEP, Binding
from benchlib.sparse.build import load_library
from benchlib.sparse.chain import NativeChain
from benchlib.sparse.direct import (
    COPY_BAND,
    COPY_OUT,
    COPY_ROW_PARTS,
    COPY_SOURCE,
    COPY_STRIDE,
    COPY_THREADS,
)
from benchlib.sparse.modules import SparseConv2d
from benchlib.sparse.native import (
    GATHER_IN_ORDER,
    GATHER_OUT,
    GATHER_PARTS,
    GATHER_RELU,
    GATHER_RESIDUAL,
    GATHER_SOURCE,
    GATHER_THREADS,
)
from benchlib.sparse.operands import Parts
from benchlib.sparse.tiling import TILE_VECTORS, VECTOR_FLOATS, tile_floats, vector_floats
from tests.test_sparse_chain import chains, checked_chain, converted
from tests.test_sparse_kernels import torch_threads
from tests.test_sparse_modules import sparsify_weight

EXACT = 1e-4


pytestmark = pytest.mark.usefixtures("native_kernels")


def test_bands_are_whole_rows_of_at_most_a_tile_in_large_images_and_aligned() -> None:
    def avx2(height: int, width: int) -> Bands | None:  # tiles of 64 floats, vectors of 8
        return bands_for(height, width, band=64, align=8)

    assert avx2(56, 56) == Bands(1, 56)  # ResNet-50's layer1
    assert avx2(28, 28) == Bands(2, 56)  # layer2
    assert avx2(32, 32) == Bands(2, 64)
    assert avx2(30, 20) == Bands(3, 64)  # 60 floats (3 divides 30), 32-byte aligned
    assert avx2(64, 64) == Bands(1, 64)
    assert avx2(16, 32) == Bands(2, 64)  # 512 pixels: 8 bands
    assert avx2(600, 1) == Bands(60, 64)  # the most rows that fit and divide 600
    # one band: planes padded to a multiple of 8 floats, or plain NCHW where they are
    assert avx2(14, 14) == Bands(14, 200)  # layer3: 196 pixels
    assert avx2(7, 7) == Bands(7, 56)  # layer4
    assert avx2(16, 16) is None  # 256 pixels
    assert avx2(15, 32) is None  # 480 pixels
    assert avx2(100, 100) is None  # a row wider than a band, 10000 floats a plane
    assert avx2(99, 99) == Bands(99, 9808)


def test_avx512_bands_are_a_128_float_tile_wide_and_64_byte_aligned() -> None:
    def avx512(height: int, width: int) -> Bands | None:
        return bands_for(height, width, band=128, align=16)

    assert avx512(56, 56) == Bands(2, 112)
    # 7 bands of 4 rows (5 of 6) would not split between two threads: one band a thread
    assert avx512(28, 28) == Bands(14, 400)
    assert avx512(30, 20) == Bands(15, 304)
    assert avx512(32, 32) == Bands(4, 128)  # 8 bands
    assert avx512(14, 14) == Bands(7, 112)  # halves of 98 floats, one a thread
    assert avx512(7, 7) == Bands(7, 64)  # one band: 7 rows do not halve
    assert avx512(16, 16) == Bands(8, 128)
    assert avx512(12, 12) is None  # 144 pixels: one band of 144 floats, aligned already
    assert avx512(99, 99) == Bands(1, 112)  # 99 bands of a row: 99 rows do not halve
    assert avx512(150, 150) == Bands(150, 22512)  # a row wider than a band: one band


def test_bands_follow_the_loaded_kernels_tile_and_vector() -> None:
    tile, vector = tile_floats(), vector_floats()
    assert tile == TILE_VECTORS * vector
    assert vector == VECTOR_FLOATS[load_library().isa]  # type: ignore[union-attr]
    assert bands_for(56, 56) == bands_for(56, 56, band=tile, align=vector)
    assert bands_for(14, 14) == bands_for(14, 14, band=tile, align=vector)


def test_to_bands_and_back() -> None:
    x = torch.randn(2, 3, 6, 5)
    banded = to_bands(x, Bands(2, 10))
    assert banded.shape == (2, 3, 3, 10)
    assert torch.equal(banded[1, 2, 0], x[1, 0, 4:6].reshape(-1))  # band 2, channel 0
    assert torch.equal(from_bands(banded.reshape(-1), (2, 3, 6, 5), Bands(2, 10)), x)
    padded = to_bands(x, Bands(6, 32))
    assert padded.shape == (2, 1, 3, 32) and not padded[..., 30:].any()
    assert torch.equal(padded[1, 0, 2, :30], x[1, 2].reshape(-1))
    assert torch.equal(from_bands(padded, (2, 3, 6, 5), Bands(6, 32)), x)
    with pytest.raises(ValueError, match="bands of 4 rows must divide the height 6"):
        to_bands(x, Bands(4, 20))
    with pytest.raises(ValueError, match="stride of 9 floats must hold its 2 rows of 5"):
        to_bands(x, Bands(2, 9))


def sparse_conv(
    cin: int, cout: int, kernel: int, stride: int, seed: int, groups: int = 1, block: int = 1
) -> SparseConv2d:
    """A sparse conv with a bias, its ReLU set for even seeds, in blocks of ``block`` rows."""
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
    sparsify_weight(conv, 0.6, seed, "row" if seed % 3 == 0 else "none")
    with torch.no_grad():
        conv.bias.uniform_(-1, 1)
    layer = SparseConv2d.from_dense(conv, lambda w: NativeSparseMatrix(w, block))
    layer.relu = seed % 2 == 0
    return layer


def padded_with_nan(x: torch.Tensor, bands: Bands) -> torch.Tensor:
    """``x`` in ``bands``, the floats between the channels' strips NaN."""
    banded = to_bands(x, bands)
    banded[..., bands.rows * x.shape[3] :] = float("nan")
    return banded


def run_banded(
    layer: SparseConv2d,
    x: torch.Tensor,
    source_bands: Bands | None,
    out_bands: Bands | None,
    residual: torch.Tensor | None,
    threads: int,
) -> torch.Tensor:
    """``layer`` on ``x`` by ``banded_product`` (and its copy reading the bands), NCHW out;
    the padding of the input's and the residual's bands is NaN (never read) and the
    output's stays untouched."""
    plan = layer.gather_plan(x)
    assert plan is not None
    product = banded_product(layer, x.shape, source_bands, out_bands)
    source = x if source_bands is None else padded_with_nan(x, source_bands)
    if plan.copy is not None:
        copy_call = plan.copy.copy()
        scratch = x.new_empty(x.shape[0], plan.source_floats)
        copy_call[COPY_SOURCE], copy_call[COPY_OUT] = source.data_ptr(), scratch.data_ptr()
        copy_call[COPY_BAND] = 0 if source_bands is None else source_bands.rows
        copy_call[COPY_STRIDE] = 0 if source_bands is None else source_bands.stride
        copy_call[COPY_THREADS] = threads
        assert copy_call() == 0
        source = scratch
    if out_bands is None:
        out = torch.full(plan.out_shape, float("nan"))
    else:
        out = torch.full((out_bands.floats(plan.out_shape),), float("inf"))
        if residual is not None:
            residual = padded_with_nan(residual, out_bands)
    product[GATHER_SOURCE], product[GATHER_OUT] = source.data_ptr(), out.data_ptr()
    product[GATHER_RELU], product[GATHER_THREADS] = int(layer.relu), threads
    product[GATHER_RESIDUAL] = 0 if residual is None else residual.data_ptr()
    assert product() == 0
    if out_bands is None:
        return out
    n, m, ho, wo = plan.out_shape
    strips = out.reshape(n, ho // out_bands.rows, m, out_bands.stride)
    assert strips[..., out_bands.rows * wo :].isinf().all()  # no write outside the strips
    return from_bands(out, plan.out_shape, out_bands)


@settings(max_examples=60, deadline=None)
@given(
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    height=st.integers(2, 12),
    width=st.integers(1, 9),
    batch=st.integers(1, 2),
    pick=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    pads=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    residual=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 50),
    groups=st.sampled_from([1, 2]),
    block=st.sampled_from([1, 2, 4]),
)
def test_a_banded_product_equals_the_layer(
    kernel: int,
    stride: int,
    height: int,
    width: int,
    batch: int,
    pick: tuple[int, int],
    pads: tuple[int, int],
    residual: bool,
    threads: int,
    seed: int,
    groups: int,
    block: int,
) -> None:
    """Every combination of NCHW and banded input and output, bands of any height dividing
    the image's (one band: NCHW planes), their strips up to 9 floats more apart than their
    rows take, batches of 1 and 2, 1x1 and 3x3 convs at stride 1 and 2, grouped or not, CSR
    and 2x1 / 4x1 blocks: the same values as the layer's own (NCHW) forward, residual
    included where the layer can add it."""
    torch.manual_seed(seed)
    layer = sparse_conv(6, 8, kernel, stride, seed, groups, block)
    x = torch.randn(batch, 6, height, width)
    out_h, out_w = layer.output_size(height, width)
    in_place = kernel == 1 and stride == 1
    source_options = [None, *(r for r in range(1, height + 1) if height % r == 0)]
    out_options = [None, *(r for r in range(1, out_h + 1) if out_h % r == 0)]
    if in_place:  # one size: the same bands on either side (or NCHW)
        source_rows = source_options[pick[0] % len(source_options)]
        out_rows = out_options[pick[1] % len(out_options)]
        if source_rows is not None and out_rows is not None:
            out_rows = source_rows
        if source_rows is None and out_rows is None:
            out_rows = out_options[-1]
    else:
        source_rows = source_options[pick[0] % len(source_options)]
        out_rows = out_options[1 + pick[1] % (len(out_options) - 1)]
    source = None if source_rows is None else Bands(source_rows, source_rows * width + pads[0])
    out = None if out_rows is None else Bands(out_rows, out_rows * out_w + pads[1])
    adds = adds_residual(layer, x.shape, out or Bands(out_h, out_h * out_w))
    extra = torch.randn(batch, 8, out_h, out_w) if residual and adds else None
    with torch.inference_mode():
        expected = layer(x, extra)
    got = run_banded(layer, x, source, out, extra, threads)
    assert relative_error(got, expected) <= EXACT


@pytest.mark.parametrize("threads", [1, 2])
def test_a_copy_that_would_write_the_input_as_it_is_held_is_left_out(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """A much-reused 1x1 conv copies its input into 64-byte aligned planes (patched on for
    any ISA): at 14x14, planes of 208 floats. Held in one band of that stride, the input is
    that copy already (``copies_as_is``): the chain's calls leave the copy out and the product
    reads the bands (NaN between the planes: never read), equal to the layer. Other strides,
    several bands, NCHW planes of 196 floats and a padded 3x3 conv keep their copy."""
    monkeypatch.setattr("benchlib.sparse.tiling.ALIGN_ISAS", frozenset({load_library().isa}))
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 160, 1)  # 4608 weights of 32 inputs kept: each read 144 times
    sparsify_weight(conv, 0.1, 0, "none")
    layer = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    x = torch.randn(1, 32, 14, 14)
    layout, _ = layer.layout(14, 14)
    assert layout.plane == 208 and not layout.in_place
    held = Bands(14, 208)
    assert copies_as_is(layer, x.shape, held)
    assert not copies_as_is(layer, x.shape, Bands(14, 224))
    assert not copies_as_is(layer, x.shape, Bands(7, 208))
    assert not copies_as_is(layer, x.shape, None)
    assert not copies_as_is(sparse_conv(32, 8, 3, 1, 0), x.shape, held)
    plan = layer.gather_plan(x)
    assert plan is not None and plan.copy is not None
    copy, product = layer_calls(layer, plan, tuple(x.shape), held, None)
    assert copy is None
    source, out = padded_with_nan(x, held), torch.full(plan.out_shape, float("nan"))
    product[GATHER_SOURCE], product[GATHER_OUT] = source.data_ptr(), out.data_ptr()
    product[GATHER_RELU], product[GATHER_RESIDUAL], product[GATHER_THREADS] = 0, 0, threads
    assert product() == 0
    with torch.inference_mode():
        assert relative_error(out, layer(x)) <= EXACT


@pytest.mark.parametrize("threads", [1, 2])
def test_an_aligned_1x1_conv_reads_several_aligned_bands_in_place(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """The much-reused 1x1 conv above, its input in two bands of 7 rows (14x14 on AVX-512:
    strips of 98 floats, 112 apart, aligned to a vector): ``reads_in_place``, so the chain's
    calls leave the aligned copy out and the product reads the bands (NaN between the strips)
    into NCHW or into the same bands, in order (one band a thread), equal to the layer. Strips
    not a whole number of vectors apart, one band and NCHW keep the copy."""
    monkeypatch.setattr("benchlib.sparse.tiling.ALIGN_ISAS", frozenset({load_library().isa}))
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 160, 1)
    sparsify_weight(conv, 0.1, 0, "none")
    layer = SparseConv2d.from_dense(conv, NativeSparseMatrix)
    x = torch.randn(1, 32, 14, 14)
    assert not layer.layout(14, 14)[0].in_place
    vector = vector_floats()
    held = Bands(7, -(-98 // vector) * vector)
    assert reads_in_place(layer, x.shape, held)
    assert not reads_in_place(layer, x.shape, Bands(7, held.stride + 1))
    assert not reads_in_place(layer, x.shape, Bands(14, 208))  # one band: copies_as_is
    assert not reads_in_place(layer, x.shape, None)
    assert not reads_in_place(sparse_conv(32, 8, 3, 1, 0), x.shape, held)
    plan = layer.gather_plan(x)
    assert plan is not None and plan.copy is not None
    assert copy_floats(layer, plan, tuple(x.shape), held, held) == plan.source_floats
    with torch.inference_mode():
        expected = layer(x)
    for out_bands in (None, held):
        copy, product = layer_calls(layer, plan, tuple(x.shape), held, out_bands)
        assert copy is None
        assert product[GATHER_IN_ORDER] == 1
        source = padded_with_nan(x, held)
        shape = plan.out_shape
        out = torch.full(shape if out_bands is None else (out_bands.floats(shape),), 0.5)
        product[GATHER_SOURCE], product[GATHER_OUT] = source.data_ptr(), out.data_ptr()
        product[GATHER_RELU], product[GATHER_RESIDUAL], product[GATHER_THREADS] = 0, 0, threads
        assert product() == 0
        got = out if out_bands is None else from_bands(out, shape, out_bands)
        assert relative_error(got, expected) <= EXACT
    copy, _ = layer_calls(layer, plan, tuple(x.shape), Bands(7, held.stride + 1), None)
    assert copy is not None


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 9),
    batch=st.integers(1, 2),
    pick=st.integers(0, 5),
    pad=st.integers(0, 9),
    padding=st.integers(1, 2),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 50),
    block=st.sampled_from([1, 2, 4]),
)
def test_a_1x1_conv_writes_the_padded_copy_its_3x3_reader_would_make(
    height: int,
    width: int,
    batch: int,
    pick: int,
    pad: int,
    padding: int,
    threads: int,
    seed: int,
    block: int,
) -> None:
    """``padded_product`` from an NCHW or banded input (bands of any height dividing the
    image's, strips up to 9 floats apart): the buffer holds what the reader's layout copy of
    the layer's own output holds, and the padding is never written."""
    torch.manual_seed(seed)
    writer = sparse_conv(6, 8, 1, 1, seed, block=block)
    reader = sparse_conv(8, 4, 2 * padding + 1, 1, seed + 1)  # padded by kernel // 2
    x = torch.randn(batch, 6, height, width)
    target, _ = reader.layout(height, width)
    assert writes_padded(writer, x.shape, target)
    with torch.inference_mode():
        expected = target.source(writer(x)).reshape(batch, 8, target.plane)
    options = [None, *(r for r in range(1, height + 1) if height % r == 0)]
    rows = options[pick % len(options)]
    source_bands = None if rows is None else Bands(rows, rows * width + pad)
    source = x if source_bands is None else padded_with_nan(x, source_bands)
    out = torch.full((batch, 8, target.plane), float("nan"))
    product = padded_product(writer, x.shape, source_bands, target)
    product[GATHER_SOURCE] = source.data_ptr()
    product[GATHER_OUT] = out.data_ptr() + 4 * padded_start(target)
    product[GATHER_RELU], product[GATHER_THREADS] = int(writer.relu), threads
    assert product() == 0
    assert target.plane == target.phase_h * target.phase_w  # a kxk conv's planes: unaligned
    interior = torch.zeros(batch, 8, target.phase_h, target.phase_w, dtype=torch.bool)
    interior[:, :, padding : padding + height, padding : padding + width] = True
    interior = interior.reshape(batch, 8, target.plane)
    assert relative_error(out[interior], expected[interior]) <= EXACT
    assert out[~interior].isnan().all()  # the padding is never written


def test_a_3x3_conv_in_bands_of_one_row_adds_a_residual_and_of_two_does_not() -> None:
    layer = sparse_conv(4, 4, 3, 1, 1)
    x = torch.randn(1, 4, 8, 8)
    layer(x)
    one = banded_product(layer, (1, 4, 8, 8), None, Bands(1, 8))
    two = banded_product(layer, (1, 4, 8, 8), None, Bands(2, 16))
    assert one[10] == one[11] == 8 and two[10] == 10  # pitch: one row per band drops nothing
    assert adds_residual(layer, (1, 4, 8, 8), Bands(1, 8))
    assert not adds_residual(layer, (1, 4, 8, 8), Bands(2, 16))


def test_parts_that_leave_the_image_are_refused() -> None:
    kernel = NativeSparseMatrix(torch.eye(4))
    offsets = (kernel.col * 8).to(torch.int32)
    ok = Parts(count=4, source_step=32, out_step=32, out_row=8, out_image=128)
    kernel.gather_call(offsets, 128, 1, 8, 8, 8, None, parts=ok)
    two_rows = Parts(2, 16, 40, 10, 80, out_pitch=5)  # rows of 4 pixels, 5 floats apart
    kernel.gather_call(offsets, 128, 1, 8, 4, 4, None, parts=two_rows)
    too_close = Parts(2, 16, 40, 8, 80, out_pitch=5)  # a channel's 2 rows need 9 floats
    with pytest.raises(ValueError, match="gather parts do not fit"):
        kernel.gather_call(offsets, 128, 1, 8, 4, 4, None, parts=too_close)
    for bad in (
        Parts(count=5, source_step=32, out_step=32, out_row=8, out_image=128),  # reads past
        Parts(count=4, source_step=32, out_step=33, out_row=8, out_image=128),  # writes past
        Parts(count=4, source_step=32, out_step=32, out_row=4, out_image=128),  # rows overlap
        Parts(4, 32, 32, 8, 128, out_pitch=4),  # pixel rows overlap
    ):
        with pytest.raises(ValueError, match="gather parts do not fit"):
            kernel.gather_call(offsets, 128, 1, 8, 8, 8, None, parts=bad)


def bottleneck_chain(size: int) -> tuple[NativeChain, list[Binding]]:
    """``bottleneck_net``'s chain on size x size images, batches 1 and 2, each run twice (the
    layers one by one, then the bound chain) and equal to the model; its two bindings."""
    from tests.test_sparse_chain import bottleneck_net

    model = bottleneck_net()
    graph = converted(copy.deepcopy(model))
    [chain] = chains(graph)
    for batch in (1, 2):
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            expected = model(x)
            for _ in range(2):
                assert relative_error(graph(x), expected) <= EXACT
    assert chain.bound_shapes() == [(1, 64, size // 4, size // 4), (2, 64, size // 4, size // 4)]
    return chain, list(chain._bindings.values())


@pytest.fixture(params=["avx2", "avx512"])
def band_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The chain's bands as they are for the AVX2 kernels (bands of 64 floats, strips 8
    apart) or the AVX-512 ones (128, 16), whichever kernels run, on two threads (the bands
    ``thread_parts`` halves images for)."""
    tile, vector = {"avx2": (64, 8), "avx512": (128, 16)}[request.param]
    monkeypatch.setattr("benchlib.sparse.bands.tile_floats", lambda: tile)
    monkeypatch.setattr("benchlib.sparse.bands.vector_floats", lambda: vector)
    with torch_threads(2):
        yield str(request.param)


def test_bands_halve_images_for_two_threads_only() -> None:
    """``thread_parts``: two parts for two threads, one (the bands by the tile alone) for
    other counts; with one part 28x28 and 14x14 keep their tile-wide bands and one band."""
    assert [thread_parts(t) for t in (1, 2, 3, 4)] == [1, 2, 1, 1]
    with torch_threads(1):
        assert thread_parts() == 1
    assert bands_for(28, 28, band=128, align=16, parts=1) == Bands(4, 112)
    assert bands_for(14, 14, band=128, align=16, parts=1) == Bands(14, 208)
    assert bands_for(56, 56, band=128, align=16, parts=1) == Bands(2, 112)


def test_a_chain_bound_for_two_threads_is_bound_again_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bottleneck net at 224x224 (AVX-512's bands: whichever kernels run), bound on two
    threads with 28x28 in halves, then run on one: bound again with 28x28 in the bands of a
    tile, equal to the model either way; back on two threads, halves again."""
    from tests.test_sparse_chain import bottleneck_net

    monkeypatch.setattr("benchlib.sparse.bands.tile_floats", lambda: 128)
    monkeypatch.setattr("benchlib.sparse.bands.vector_floats", lambda: 16)

    model = bottleneck_net()
    graph = converted(copy.deepcopy(model))
    [chain] = chains(graph)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = model(x)
    seen = []
    for threads in (2, 1, 2):
        with torch_threads(threads), torch.inference_mode():
            for _ in range(2):
                assert relative_error(graph(x), expected) <= EXACT
        [binding] = chain._bindings.values()
        assert binding.parts == threads
        seen.append(binding.bands)
    assert seen[0] == seen[2] != seen[1]


def test_a_chain_at_32x32_runs_its_layers_in_bands_and_equals_the_model(band_isa: str) -> None:
    """ResNet bottlenecks at 32x32 (bands of two rows, four on AVX-512) then 16x16 (NCHW; on
    AVX-512 two bands of 8 rows, one a thread), batches 1 and 2: the chain keeps its output
    and the head's input NCHW, and equals the model."""
    chain, bindings = bottleneck_chain(128)
    bands = {"avx2": Bands(2, 64), "avx512": Bands(4, 128)}[band_isa]
    half = {"avx2": None, "avx512": Bands(8, 128)}[band_isa]
    for binding in bindings:
        # layer1 and layer2's first 1x1 conv write 32x32 outputs (but layer1's first, which
        # writes the padded input of its 3x3 conv), layer2's other steps 16x16 (but the 1x1
        # conv that writes the padded input of its 3x3 conv), the rest 8x8 and 4x4, whose
        # planes of 64 and 16 floats are aligned already
        expected = [None, *[bands] * 4, *[half] * 3, None, *[half] * 3, *[None] * 7]
        assert binding.bands == expected
        assert binding.fused_copies == 2  # and layer2's second block's first 1x1 conv
    assert chain.banded_layers() == {"avx2": 4, "avx512": 10}[band_isa]
    assert chain.padded_layers() == 0


def test_a_chains_products_over_bands_run_them_in_order_one_half_a_thread(
    band_isa: str,
) -> None:
    """At ResNet-50's sizes (56x56 into layer1, 28x28 in layer2), every product of the chain
    over an even number of bands runs them in order (each thread the same rows of every
    activation, step after step), 28x28 in two bands of 14 rows on AVX-512 (seven of 4 would
    not halve); the rest claim tiles or split rows as before; the chain equals the model."""
    _, bindings = bottleneck_chain(224)
    at_28 = {"avx2": Bands(2, 56), "avx512": Bands(14, 400)}[band_isa]
    for binding in bindings:
        assert at_28 in binding.bands
        products = [call for kind, call in binding.calls if kind == GATHER_STEP]
        ordered = [call[GATHER_IN_ORDER] for call in products]
        assert ordered == [
            int(call[GATHER_PARTS] >= 2 and call[GATHER_PARTS] % 2 == 0) for call in products
        ]
        assert sum(ordered) >= 6  # layer1's and layer2's products
        assert sum(ordered) < len(products)  # 7x7 (and 14x14 on AVX2): one band


def test_a_chains_copies_write_buffers_of_their_own_and_halves_by_row_parts(
    band_isa: str,
) -> None:
    """The bottleneck net at 224x224: layer2's and layer3's strided 3x3 convs and their
    downsamples write 28x28 and 14x14, on AVX-512 in two bands (of 14 and 7 rows), one a
    thread, so their layout copies go into row parts (each thread copies its rows; on AVX2
    the 28x28 bands are 14 of 2 rows, 14x14 one band, and every copy splits by planes), and
    every copy writes a buffer no other copy writes; the chain equals the model
    (``bottleneck_chain``)."""
    _, bindings = bottleneck_chain(224)
    for binding in bindings:
        copies = [call for kind, call in binding.calls if kind == COPY_STEP]
        assert len(copies) >= 4  # layer2's and layer3's strided convs
        assert len({call[COPY_OUT] for call in copies}) == len(copies)
        in_parts = [call for call in copies if call[COPY_ROW_PARTS]]
        assert len(in_parts) == {"avx2": 0, "avx512": 4}[band_isa]
        assert all(call[COPY_ROW_PARTS] == 2 for call in in_parts)


def test_a_chain_holds_planes_of_unaligned_sizes_padded_and_its_head_reads_them(
    band_isa: str,
) -> None:
    """The same net on 96x96: layer1 at 24x24 in bands of two rows (48 floats; AVX-512: four,
    96), layer2 at 12x12 NCHW (144 floats a plane), layer3 at 6x6 and layer4 at 3x3 in planes
    padded to 40 and 16 floats (48 and 16), read by the head's pool: the chain equals the
    model."""
    chain, bindings = bottleneck_chain(96)
    first, third = {
        "avx2": (Bands(2, 48), Bands(6, 40)),
        "avx512": (Bands(4, 96), Bands(6, 48)),
    }[band_isa]
    for binding in bindings:
        # layer1 and layer2's first 1x1 conv (24x24; but the writer of a padded copy),
        # layer2's others (12x12), layer3's four (6x6) and layer4's three (3x3, the head's)
        expected_bands = [None] + [first] * 4 + [None] * 7 + [third] * 4
        assert binding.bands == expected_bands + [Bands(3, 16)] * 3
    assert (chain.banded_layers(), chain.padded_layers()) == (4, 7)


class ResidualFromInput(nn.Module):
    """A block whose residual is the chain's input (NCHW), then one whose residual is a
    layer inside the chain, then a last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)  # the first conv stays dense
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.c, self.d, self.e = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.b(torch.relu(self.a(x))) + x)
        z = torch.relu(self.c(y))
        return self.e(torch.relu(self.d(z) + z))


def test_a_residual_and_the_output_it_joins_share_one_layout() -> None:
    model = ResidualFromInput().eval()
    for index, layer in enumerate((model.a, model.b, model.c, model.d, model.e)):
        sparsify_weight(layer, 0.7, index, "none")
    graph = converted(model)
    [chain] = chains(graph)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        for _ in range(2):
            assert relative_error(graph(x), model(x)) <= EXACT
    # a: bands; b adds the chain's (NCHW) input: NCHW; c, d (adds c's output): bands; e: last
    bands = bands_for(32, 32)  # two rows of 64 floats on AVX2, four of 128 on AVX-512
    assert chain._bindings[(1, 8, 32, 32)].bands == [bands, None, bands, bands, None]


@pytest.mark.parametrize(
    ("kernel", "stride", "residual"), [(1, 1, True), (3, 1, False), (3, 2, False)]
)
def test_a_chained_conv_twin_computes_the_layer_in_bands(
    kernel: int, stride: int, residual: bool
) -> None:
    """``ChainedConv`` (what ``keep_faster`` times for a chained layer): input and output in
    the bands of their sizes (32x32: two rows; 16x16: NCHW), the same values as the layer."""
    layer = sparse_conv(6, 5, kernel, stride, 4)
    x = torch.randn(1, 6, 32, 32)
    out_size = 32 // stride
    extra = torch.randn(1, 5, out_size, out_size) if residual else None
    with torch.inference_mode():
        expected = layer(x, extra)
        twin = ChainedConv(layer, x, extra, layer.relu)
        for _ in range(2):
            twin(x)
    assert twin.out_bands == bands_for(out_size, out_size)
    assert relative_error(twin.nchw(), expected) <= EXACT
    with pytest.raises(ValueError, match="runs on the input it was built for"):
        twin(x.clone())


def test_keep_faster_times_a_chained_layer_as_the_chain_runs_it() -> None:
    from benchlib.sparse import sparsify
    from benchlib.sparse.tune import keep_faster

    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1)).eval()
    for index, layer in enumerate(model):
        sparsify_weight(layer, 0.8, index, "none")
    dense = dict(model.named_modules())
    converted, reports = sparsify(copy.deepcopy(model), 1.0, NativeSparseMatrix)
    timed: dict[str, type] = {}

    def compare(sparse: nn.Module, dense_side: nn.Module, x: torch.Tensor) -> tuple[float, float]:
        name = "0" if x.shape[1] == 4 else "1"
        timed[name] = type(sparse)
        with torch.inference_mode():
            sparse(x)
        return 1.0, 2.0

    updated = keep_faster(
        converted, reports, dense, (torch.randn(1, 4, 32, 32),), compare, chained={"1"}
    )
    assert timed == {"0": SparseConv2d, "1": ChainedConv}
    assert updated[1].reason.endswith("on (1, 8, 32, 32), sparse as chained")
    assert not updated[0].reason.endswith("sparse as chained")


def test_column_blocked_calls_share_one_block_major_copy_of_the_values() -> None:
    """The chain's banded products read the same block-major values as the layers' plans,
    and a gather after an in-place change of the values uses the new ones."""
    from tests.test_sparse_chain import bottleneck_net

    graph = converted(bottleneck_net())
    [chain] = chains(graph)
    with torch.inference_mode():
        graph(torch.randn(1, 3, 128, 128))
    binding = chain._bindings[(1, 64, 32, 32)]
    products = [call for kind, call in binding.calls if kind == 0]
    blocked = 0
    for layer, call, bands in zip(chain.layers, products, binding.bands, strict=True):
        [plan] = layer._plans.values()
        assert call[2] == plan.product[2]  # the values' address
        blocked += bands is not None and plan.product[17] != 0  # a banded, column-blocked one
    assert blocked >= 1
    torch.manual_seed(0)
    kernel = NativeSparseMatrix(torch.randn(6, 40) * (torch.rand(6, 40) < 0.5))
    ksplit = kernel.k_split(8)
    source = torch.randn(1, 40 * 3)
    offsets = (kernel.col * 3).to(torch.int32)
    first, second = torch.empty(1, 6, 3), torch.empty(1, 6, 3)
    kernel.gather(source, offsets, 3, 3, 3, first, None, ksplit=ksplit)
    with torch.no_grad():
        kernel.values.mul_(2)
    kernel.gather(source, offsets, 3, 3, 3, second, None, ksplit=ksplit)
    assert torch.allclose(second, 2 * first, rtol=1e-5, atol=1e-6)


def test_the_writers_of_one_padded_layout_share_a_buffer_whose_padding_stays_zero() -> None:
    """Three bottlenecks at 32x32 (their first 1x1 convs write their 3x3 convs' padded input,
    one zeroed buffer for the three), run three times: each call equals the model."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = ResNet(Bottleneck, [3, 1, 1, 1], num_classes=10).eval()
    for index, module in enumerate(model.modules()):
        if isinstance(module, nn.Conv2d) and module is not model.conv1:
            sparsify_weight(module, 0.8, index, "none")
    chain = checked_chain(model, torch.randn(1, 3, 128, 128))
    binding = chain._bindings[(1, 64, 32, 32)]
    assert binding.fused_copies == 3  # layer1's blocks (the others' 3x3 convs are strided)
    products = [call for kind, call in binding.calls if kind == 0]
    # the first 1x1 conv of each block (layers 0, 4 and 7) writes at one address
    assert products[0][GATHER_OUT] == products[4][GATHER_OUT] == products[7][GATHER_OUT]
    assert len({call[GATHER_OUT] for call in products}) > 3


class PaddedThenSameSize(nn.Module):
    """A 1x1 conv writing its 3x3 reader's padded input (4 channels of 6x6 = 144 floats), then
    a 1x1 conv whose output has as many floats (9 channels of 4x4), then a last one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)  # the first conv stays dense
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.c, self.d = nn.Conv2d(4, 9, 1), nn.Conv2d(9, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_a_padded_buffer_is_never_handed_to_another_layer() -> None:
    """The padded images stay out of the pool of freed buffers: the next layer's output of the
    same size takes a buffer of its own, so the padding is still zero on the next call."""
    model = PaddedThenSameSize().eval()
    for index, layer in enumerate((model.a, model.b, model.c, model.d)):
        sparsify_weight(layer, 0.5, index, "none")
    chain = checked_chain(model, torch.randn(1, 3, 4, 4))
    assert chain._bindings[(1, 4, 4, 4)].fused_copies == 1

"""``benchlib.sparse.chain``: runs of sparse convs executed by one native call."""

from __future__ import annotations

import copy
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models.resnet import Bottleneck, ResNet

from benchlib.harness.verify import relative_error
from benchlib.sparse import NativeSparseMatrix, sparsify
from benchlib.sparse.binding import GATHER_STEP
from benchlib.sparse.chain import CHAIN_INPUT, NativeChain, chain_convs
from benchlib.sparse.fuse import fold_batchnorm, fuse_relu, fuse_residual, trace
from benchlib.sparse.modules import SparseConv2d
from benchlib.sparse.native import GATHER_OUT, GATHER_RESIDUAL
from tests.test_sparse_modules import sparsify_weight

EXACT = 1e-4


pytestmark = pytest.mark.usefixtures("native_kernels")


def bottleneck_net() -> nn.Module:
    """A small torchvision ResNet of bottlenecks (layer2 has an identity block), its convs
    but the first 80% sparse, BatchNorm statistics not the identity."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 2, 1, 1], num_classes=10).eval()
    for index, module in enumerate(model.modules()):
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
        elif isinstance(module, nn.Conv2d) and module is not model.conv1:
            sparsify_weight(module, 0.8, index, "none")
    return model


def converted(model: nn.Module, chain: bool = True) -> fx.GraphModule:
    """``cpu-sparse``'s pipeline with every conv but the first native and sparse."""
    traced = trace(model)
    assert not isinstance(traced, str)
    fold_batchnorm(traced)
    graph, _ = sparsify(traced, 0.5, NativeSparseMatrix, in_place=True)
    assert isinstance(graph, fx.GraphModule)
    fuse_residual(graph)
    fuse_relu(graph)
    if chain:
        chain_convs(graph)
    return graph


def chains(graph: nn.Module) -> list[NativeChain]:
    return [m for m in graph.modules() if isinstance(m, NativeChain)]


def checked_chain(model: nn.Module, x: torch.Tensor, calls: int = 3) -> NativeChain:
    """The one chain of ``model`` converted, after ``calls`` calls on ``x`` (the first runs
    the layers one by one and binds, the others run the bound chain), each equal to the
    model."""
    graph = converted(copy.deepcopy(model))
    [chain] = chains(graph)
    with torch.inference_mode():
        expected = model(x)
        for _ in range(calls):
            assert relative_error(graph(x), expected) <= EXACT
    return chain


def test_a_resnet_body_is_one_chain_equal_to_dense_on_every_call() -> None:
    model = bottleneck_net()
    graph = converted(copy.deepcopy(model), chain=False)
    sparse_layers = sum(isinstance(m, SparseConv2d) for m in graph.modules())
    assert chain_convs(graph) == sparse_layers == 19
    [chain] = chains(graph)
    assert chain.head is not None and chain.head.linear is graph.fc  # the head joined
    assert not {"avgpool", "fc"} & {n.target for n in graph.graph.nodes}
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        first, second, third = graph(x), graph(x), graph(x)
    assert chain.bound_shapes() == [(1, 64, 16, 16)]  # bound on the first call
    for out in (first, second, third):
        assert relative_error(out, expected) <= EXACT
    other = torch.randn(2, 3, 40, 48)
    with torch.inference_mode():
        assert relative_error(graph(other), model(other)) <= EXACT
        assert relative_error(graph(other), model(other)) <= EXACT
        assert relative_error(graph(x), expected) <= EXACT
    assert sorted(chain.bound_shapes()) == [(1, 64, 16, 16), (2, 64, 10, 12)]


def test_each_call_returns_a_new_tensor_and_no_layer_writes_what_it_reads() -> None:
    """Same-sized 1x1 convs in a row: a buffer goes back to the pool only after its last
    reader (a 1x1 conv reads its input in place, a kxk one a copy of it)."""
    layers = [
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 1),
    ]
    model = nn.Sequential(*layers).eval()
    for index, layer in enumerate(layers):
        sparsify_weight(layer, 0.7, index, "none")
    graph = converted(model)
    [chain] = chains(graph)
    x, y = torch.randn(1, 8, 12, 12), torch.randn(1, 8, 12, 12)
    with torch.inference_mode():
        graph(x)
        a, b = graph(x), graph(y)
        assert a.data_ptr() != b.data_ptr()
        assert relative_error(a, model(x)) <= EXACT and relative_error(b, model(y)) <= EXACT
    assert chain.bound_shapes() == [(1, 8, 12, 12)]


def test_hooked_layers_run_one_by_one_and_new_weights_rebind() -> None:
    model = bottleneck_net()
    graph = converted(copy.deepcopy(model))
    [chain] = chains(graph)
    x = torch.randn(1, 3, 32, 32)
    seen: list[str] = []
    layer = chain.layers[5]
    handle = layer.register_forward_hook(lambda *_: seen.append("called"))
    with torch.inference_mode():
        expected = model(x)
        for _ in range(2):
            assert relative_error(graph(x), expected) <= EXACT
    assert seen == ["called", "called"] and chain.bound_shapes() == []
    handle.remove()
    with torch.inference_mode():
        graph(x)
        assert relative_error(graph(x), expected) <= EXACT
    assert seen == ["called", "called"] and chain.bound_shapes() == [(1, 64, 8, 8)]
    kernel = layer.kernel
    assert isinstance(kernel, NativeSparseMatrix)
    kernel.values = kernel.values * 2  # another tensor: the binding is stale
    with torch.inference_mode():
        native = [graph(x) for _ in range(2)]
        handle = layer.register_forward_hook(lambda *_: None)
        one_by_one = graph(x)
        handle.remove()
    assert relative_error(native[0], expected) > 10 * EXACT  # the new weights count
    for out in native:
        assert relative_error(out, one_by_one) <= EXACT


def test_copies_pickles_and_threads_get_the_same_results() -> None:
    model = bottleneck_net()
    graph = converted(copy.deepcopy(model))
    inputs = [
        torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
        graph(inputs[0])
        clone = copy.deepcopy(graph)
        buffer = io.BytesIO()
        torch.save(graph, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (clone, loaded):
            [chain] = chains(other)
            assert chain.bound_shapes() == []  # bindings hold addresses: not copied
            for _ in range(2):
                assert relative_error(other(inputs[1]), expected[1]) <= EXACT

    def run(index: int) -> float:
        with torch.inference_mode():
            return relative_error(graph(inputs[index % 8]), expected[index % 8])

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(run, range(32))) <= EXACT


def test_a_residual_no_later_step_reads_is_overwritten_by_the_sum() -> None:
    """Each bottleneck's last conv writes its output over its residual (the block's input or
    its downsample's output): the same buffer, every call equal to the model."""
    chain = checked_chain(bottleneck_net(), torch.randn(1, 3, 64, 64))
    [binding] = chain._bindings.values()
    products = [call for kind, call in binding.calls if kind == GATHER_STEP]
    summed = [call for call in products if call[GATHER_RESIDUAL]]
    assert len(summed) == 5  # one per bottleneck
    assert all(call[GATHER_OUT] == call[GATHER_RESIDUAL] for call in summed)


class Reused(nn.Module):
    """1x1 convs whose sum's residual is its conv's own input (``source``) or is read again
    by a later conv (``later``): neither may be overwritten by the sum."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.d, self.e = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 8, 1)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.how == "source":
            return self.d(self.b(y) + y)
        return self.d(self.b(self.e(x)) + y) + self.c(y)


@pytest.mark.parametrize("how", ["source", "later"])
def test_a_residual_still_read_is_not_overwritten(how: str) -> None:
    model = Reused(how).eval()
    for index, layer in enumerate((model.a, model.b, model.c, model.d, model.e)):
        sparsify_weight(layer, 0.6, index, "none")
    chain = checked_chain(model, torch.randn(1, 4, 6, 6))
    [binding] = chain._bindings.values()
    summed = [call for kind, call in binding.calls if kind == GATHER_STEP and call[GATHER_RESIDUAL]]
    assert summed and summed[0][GATHER_OUT] != summed[0][GATHER_RESIDUAL]


def test_only_the_last_output_of_a_chain_leaves_it() -> None:
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.a(x)
            return self.c(self.b(y)), y

    model = TwoOutputs().eval()
    for index, layer in enumerate((model.a, model.b, model.c)):
        sparsify_weight(layer, 0.6, index, "none")
    graph = converted(model, chain=False)
    assert chain_convs(graph) == 2  # b and c: a's output is returned too
    [chain] = chains(graph)
    assert chain.layers == [graph.b, graph.c] and chain.arguments == [(CHAIN_INPUT,), (0,)]
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        for _ in range(2):
            for out, expected in zip(graph(x), model(x), strict=True):
                assert relative_error(out, expected) <= EXACT


class Classifier(nn.Module):
    """Two sparse 1x1 convs (to 70 channels: the native linear's 4-vector, 1-vector and tail
    loops), an average pool (``pool``: the module, ``F``, or ``F`` to 2 x 2), and, with a
    ``flatten`` (``torch.flatten`` or ``nn.Flatten``), a dense linear layer to 37; ``leak``
    also returns the convs' output."""

    def __init__(self, pool: str, flatten: str | None, bias: bool, leak: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 70, 1)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(70 * (4 if pool == "F 2x2" else 1), 37, bias=bias)
        self.how, self.flat, self.leak = pool, flatten, leak

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.b(self.a(x))
        if self.how == "module":
            out = self.pool(y)
        else:
            out = F.adaptive_avg_pool2d(y, 2 if self.how == "F 2x2" else 1)
        if self.flat is not None:
            out = self.fc(torch.flatten(out, 1) if self.flat == "torch" else self.flatten(out))
        return (out, y) if self.leak else out


@pytest.mark.parametrize(
    ("pool", "flatten", "bias", "leak", "joined"),
    [
        ("module", None, True, False, "pool"),
        ("F", None, True, False, "pool"),
        ("F 2x2", None, True, False, ""),
        ("module", None, True, True, ""),
        ("module", "torch", True, False, "pool linear"),
        ("F", "module", False, False, "pool linear"),
        ("F 2x2", "torch", True, False, ""),
        ("module", "torch", True, True, ""),
    ],
)
def test_the_classifier_head_read_only_by_the_run_joins_the_chain(
    pool: str, flatten: str | None, bias: bool, leak: bool, joined: str
) -> None:
    torch.manual_seed(0)
    model = Classifier(pool, flatten, bias, leak).eval()
    for index, layer in enumerate((model.a, model.b)):
        sparsify_weight(layer, 0.6, index, "none")
    graph = converted(model, chain=False)
    assert chain_convs(graph) == 2
    [chain] = chains(graph)
    head = chain.head
    assert ("pool" in joined) is (head is not None)
    fc = getattr(graph, "fc", None)  # traced away where the model does not call it
    assert ("linear" in joined) is (head is not None and head.linear is fc is not None)
    left = {str(n.target) for n in graph.graph.nodes if n.op != "placeholder"}
    assert ("fc" in left) is (flatten is not None and "linear" not in joined)
    x = torch.randn(3, 4, 7, 5)
    with torch.inference_mode():
        expected = model(x)
        for _ in range(3):  # one by one, then bound
            actual = graph(x)
            for got, want in zip(
                actual if leak else [actual], expected if leak else [expected], strict=True
            ):
                assert got.shape == want.shape and relative_error(got, want) <= EXACT
    assert chain.bound_shapes() == [(3, 4, 7, 5)]


def test_a_changed_or_hooked_head_linear_is_followed() -> None:
    """New weights (another tensor, or its data swapped in place) rebind; a hook runs the head
    by torch."""
    torch.manual_seed(0)
    model = Classifier("module", "torch", True, False).eval()
    for index, layer in enumerate((model.a, model.b)):
        sparsify_weight(layer, 0.6, index, "none")
    graph = converted(copy.deepcopy(model))
    [chain] = chains(graph)
    assert chain.head is not None and chain.head.linear is graph.fc
    x = torch.randn(1, 4, 6, 6)
    seen: list[int] = []
    with torch.inference_mode():
        graph(x)
        assert relative_error(graph(x), model(x)) <= EXACT
        graph.fc.weight = nn.Parameter(graph.fc.weight * 3)
        model.fc.weight = nn.Parameter(model.fc.weight * 3)
        assert relative_error(graph(x), model(x)) <= EXACT
        graph.fc.weight.data = graph.fc.weight.data * -1
        model.fc.weight.data = model.fc.weight.data * -1
        graph(x)
        assert relative_error(graph(x), model(x)) <= EXACT
        handle = graph.fc.register_forward_hook(lambda *_: seen.append(1))
        assert relative_error(graph(x), model(x)) <= EXACT
        handle.remove()
    assert seen == [1]


def test_other_dtypes_run_one_by_one() -> None:
    model = bottleneck_net()
    graph = converted(copy.deepcopy(model)).double()
    [chain] = chains(graph)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        expected = model.double()(x)
        for _ in range(2):
            assert relative_error(graph(x), expected) <= EXACT
    assert chain.bound_shapes() == []


def test_a_chain_refuses_arguments_that_are_not_earlier_layers() -> None:
    layer = SparseConv2d.from_dense(nn.Conv2d(2, 2, 1), NativeSparseMatrix)
    with pytest.raises(ValueError, match=r"layer 1's inputs \(1,\) must be earlier layers"):
        NativeChain([layer, layer], [(CHAIN_INPUT,), (1,)])
    with pytest.raises(ValueError, match="2 layers for 1 argument lists"):
        NativeChain([layer, layer], [(CHAIN_INPUT,)])


@pytest.mark.parametrize("size", [112, 224])
def test_strided_convs_in_a_chain_read_the_layout_their_writers_make(size: int) -> None:
    """At ResNet-50's sizes (224: 56x56 into layer2, strided 3x3 convs over even numbers of
    output rows, run in order over two parts when alone), a chain of the bottleneck net
    equals the dense model: its writers make the whole padded layout its strided convs read,
    not the row parts those convs copy into when they run by themselves."""
    model = bottleneck_net()
    checked_chain(model, torch.randn(1, 3, size, size), calls=2)

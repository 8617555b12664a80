"""Tests of benchlib.models and benchlib.cifar_nets: the zoo, input sizes, example inputs."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from benchlib.cifar_nets import PadShortcut
from benchlib.errors import ConfigError
from benchlib.loading import load_model
from benchlib.models import Model, build_model, native_input_size, zoo_names

CIFAR_PARAMS = {
    # Counted here (the papers give 0.27M, 0.46M, 0.85M, 1.7M and 15.0M).
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "vgg16_cifar": 14_987_722,
}
# torch.jit.trace and torch.jit.save warn that TorchScript is deprecated; the tests need them
# to write the archives that users bring. (benchlib itself only loads, and silences the load
# notice.)
JIT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(trace|trace_method|save)` is deprecated:FutureWarning"
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resnet20_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("resnet20").module.state_dict()


# -- the zoo ----------------------------------------------------------------------------------


def test_zoo_names_are_torchvision_classifiers_plus_cifar_nets() -> None:
    names = zoo_names()
    expected = torchvision.models.list_models(module=torchvision.models) + list(CIFAR_PARAMS)
    assert names == sorted(expected)
    assert len(set(names)) == len(names)
    assert "resnet50" in names and "vit_b_16" in names and "quantized_resnet18" not in names


@pytest.mark.parametrize(("name", "params"), CIFAR_PARAMS.items())
def test_cifar_nets_forward_and_param_counts(name: str, params: int) -> None:
    model = build_model(name)
    assert (model.source, model.input_shape) == ("cifar", (3, 32, 32))
    assert not any(m.training for m in model.module.modules())
    assert n_params(model.module) == params
    with torch.no_grad():
        assert model.module(model.example_input(2)).shape == (2, 10)


def test_resnet56_uses_option_a_shortcuts() -> None:
    module = build_model("resnet56").module
    shortcuts = [m for m in module.modules() if isinstance(m, PadShortcut)]
    assert [(s.in_channels, s.out_channels, s.stride) for s in shortcuts] == [
        (16, 32, 2),
        (32, 64, 2),
    ]
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55 and all(c.kernel_size == (3, 3) for c in convs)  # no projections
    x = torch.randn(1, 16, 8, 8)
    out = shortcuts[0](x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_cifar_resnet_traces_and_pickles() -> None:
    module = build_model("resnet20").module
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(module)
    copied = pickle.loads(pickle.dumps(module))
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(copied(x), expected)


def test_resnet50_param_count() -> None:
    assert n_params(build_model("resnet50", device="meta").module) == 25_557_032


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_model_builds_on_meta(name: str) -> None:
    # All ~85 together take about 10 s: the meta device allocates nothing.
    model = build_model(name, device="meta")
    size = native_input_size(name)
    assert model.input_shape == (3, size, size)
    tensors = [*model.module.parameters(), *model.module.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert not any(m.training for m in model.module.modules())
    if model.source == "torchvision" and name != "inception_v3":  # built without AuxLogits
        documented = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
        assert n_params(model.module) == documented


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet56", 32),
        ("resnet50", 224),
        ("inception_v3", 299),
        ("efficientnet_b3", 300),
        ("swin_v2_t", 256),
        ("vit_b_16", 224),
        ("vit_h_14", 518),
    ],
)
def test_native_input_size(name: str, size: int) -> None:
    assert native_input_size(name) == size


def test_input_size_override_resnet18() -> None:
    model = build_model("resnet18", input_size=64)
    assert model.input_shape == (3, 64, 64)
    with torch.no_grad():
        assert model.module(model.example_input(1)).shape == (1, 1000)


@pytest.mark.parametrize(("name", "size"), [("vit_b_16", 32), ("maxvit_t", 448)])
def test_input_size_override_rebuilds_fixed_size_models(name: str, size: int) -> None:
    model = build_model(name, input_size=size, device="meta")
    assert model.input_shape == (3, size, size)
    assert model.module(model.example_input(1)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("name", "size", "reason"),
    [
        ("vit_b_16", 40, "multiple of 16"),
        ("vit_l_32", 16, "multiple of 32"),
        ("maxvit_t", 100, "partition size 7"),
        ("inception_v3", 32, "smallest input is 75x75"),
        ("alexnet", 62, "smallest input is 63x63"),
        ("vgg16_cifar", 64, "32 to 63 pixels"),
        ("resnet18", 0, "positive"),
    ],
)
def test_bad_input_size_raises_config_error(name: str, size: int, reason: str) -> None:
    with pytest.raises(ConfigError, match=str(size)) as caught:
        build_model(name, input_size=size, device="meta")
    assert reason in str(caught.value)


@pytest.mark.parametrize("call", [build_model, load_model, native_input_size])
def test_unknown_name_lists_choices(call: Callable[[str], object]) -> None:
    with pytest.raises(ConfigError) as caught:
        call("resnet5")
    assert str(caught.value) == (
        "unknown model 'resnet5'; choose from: a zoo model (`bench models` lists them), "
        "a model file, or package.module:function (did you mean 'resnet56'?)"
    )


def test_vgg16_cifar_takes_32_to_63_pixels() -> None:
    module = build_model("vgg16_cifar", device="meta").module
    assert module(torch.empty(1, 3, 63, 63, device="meta")).shape == (1, 10)
    with pytest.raises(RuntimeError):
        module(torch.empty(1, 3, 64, 64, device="meta"))


def test_bad_device_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="bad device 'gpu0'"):
        build_model("resnet20", device="gpu0")


# -- Model and example inputs -------------------------------------------------------------------


def test_example_input_is_deterministic_and_private() -> None:
    model = build_model("resnet20")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = model.example_input(4, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert first.shape == (4, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, model.example_input(4, seed=7))
    assert not torch.equal(first, model.example_input(4, seed=8))
    half = model.example_input(4, seed=7, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, first.half())
    assert torch.equal(model.example_input(1, seed=7)[0], first[0])


def test_example_input_follows_the_module_device() -> None:
    model = build_model("resnet20", device="meta")
    assert model.example_input(2).device.type == "meta"
    assert model.example_input(2, device=torch.device("cpu")).device.type == "cpu"


def test_example_input_rejects_bad_arguments() -> None:
    model = build_model("resnet20", device="meta")
    with pytest.raises(ConfigError, match="batch size"):
        model.example_input(0)
    with pytest.raises(ConfigError, match="floating point"):
        model.example_input(1, dtype=torch.int64)


def test_model_validates_its_fields() -> None:
    with pytest.raises(ConfigError, match="model source"):
        Model(name="m", module=nn.Identity(), input_shape=(3,), source="onnx")
    with pytest.raises(ConfigError, match="positive ints"):
        Model(name="m", module=nn.Identity(), input_shape=(3, 0), source="factory")


# -- slow: every model for real ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_names())
def test_zoo_model_builds_on_cpu(name: str) -> None:
    model = build_model(name)  # warnings are errors: no builder may warn
    tensors = [*model.module.parameters(), *model.module.buffers()]
    assert {t.device.type for t in tensors} == {"cpu"}
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
    assert not model.module.training


def smallest_accepted_size(name: str) -> int:
    for size in range(1, 1000):
        try:
            build_model(name, input_size=size, device="meta")
        except ConfigError:
            continue  # refused before anything is built, so the scan is cheap
        return size
    raise AssertionError(f"{name} accepts no size below 1000")


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_names())
def test_size_rules_match_the_architecture(name: str) -> None:
    """The native and the smallest size build_model accepts run; the size below does not."""
    classes = 10 if name in CIFAR_PARAMS else 1000
    native = build_model(name, device="meta")
    with torch.no_grad():
        assert native.module(native.example_input(1)).shape == (1, classes)
    smallest = smallest_accepted_size(name)
    model = build_model(name, input_size=smallest, device="meta")
    with torch.no_grad():
        assert model.module(model.example_input(1)).shape == (1, classes)
    refused = (RuntimeError, AssertionError, ValueError)
    if name.startswith(("vit_", "maxvit")):
        # These are built for one size: torchvision itself must refuse the size below.
        key = "image_size" if name.startswith("vit_") else "input_size"
        value = smallest - 1 if key == "image_size" else (smallest - 1, smallest - 1)
        with pytest.raises(refused), torch.device("meta"):
            torchvision.models.get_model(name, weights=None, **{key: value})
    elif smallest > 1:
        below = torch.empty(1, 3, smallest - 1, smallest - 1, device="meta")
        with pytest.raises(refused), torch.no_grad():
            model.module(below)


def test_zoo_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("resnet20").module.state_dict()
    b = build_model("resnet20").module.state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model("resnet20", seed=1).module.state_dict()
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])

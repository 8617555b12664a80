"""Tests for benchlib.flops: exact MAC counts by hand, against torch's FlopCounterMode, and
against torchvision's published numbers (its ``_ops`` metadata, read without downloading)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchlib.errors import ConfigError
from benchlib.flops import DEFAULT_RULES, FlopReport, LayerCount, count, rule_for

META = torch.device("meta")


def torch_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs as torch's own aten-level counter sees them (it reports FLOPs = 2 x MACs)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(*inputs)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


def zoo(name: str, size: int, device: torch.device = META, **kwargs: Any) -> tuple[Any, Any]:
    """A torchvision model without weights and a 1x3xSIZExSIZE input, both on ``device``."""
    with device:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        return model, torch.randn(1, 3, size, size)


class Tiny(nn.Module):
    """conv -> depthwise conv -> linear, numbers small enough to check by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.dw(self.conv(x)))).flatten(1))


class Grouped(nn.Module):
    """Grouped, depthwise, strided, dilated and transposed convs, then a lazy and a plain linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, stride=2, padding=1),
            nn.Conv2d(12, 24, 3, padding=2, dilation=2, groups=4),
            nn.Conv2d(24, 24, 5, padding=2, groups=24, bias=False),
            nn.ConvTranspose2d(24, 8, 3, stride=2, groups=2),
            nn.Conv2d(8, 16, 1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_tiny_model_counts_by_hand() -> None:
    model = Tiny()
    report = count(model, torch.randn(1, 3, 8, 8))
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        ("conv", "Conv2d"),
        ("dw", "Conv2d"),
        ("fc", "Linear"),
    ]
    assert report.layer("conv").macs == 8 * 8 * 8 * 27
    assert report.layer("dw").macs == 8 * 8 * 8 * 9  # depthwise: 1 input channel per output
    assert report.layer("fc").macs == 512 * 10
    assert report.macs == 13824 + 4608 + 5120
    assert report.flops == 2 * report.macs
    assert report.layer("conv").params == 8 * 27 + 8
    assert report.layer("dw").params == 8 * 9 + 8
    assert report.params == 224 + 80 + 16 + 5130  # BatchNorm's weight and bias included
    with pytest.raises(KeyError):
        report.layer("bn")


def test_nonzero_counts_follow_the_weight_density() -> None:
    model = Tiny()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
        model.conv.weight.view(-1)[::2] = 0.0  # exactly half of its 216 weights
    report = count(model, torch.randn(1, 3, 8, 8))
    conv = report.layer("conv")
    assert conv.density == 0.5
    assert conv.nonzero_macs * 2 == conv.macs == 13824
    assert conv.nonzero_params == 224 - 108
    assert report.layer("fc").nonzero_macs == report.layer("fc").macs
    assert report.nonzero_macs == report.macs - 13824 // 2
    assert report.nonzero_flops == 2 * report.nonzero_macs
    assert report.nonzero_params == report.params - 108


def test_count_restores_training_flags_and_leaves_no_hooks() -> None:
    model = Tiny().train()
    model.bn.eval()
    before = model.bn.running_mean.clone()
    count(model, torch.randn(2, 3, 8, 8))
    assert model.training and model.conv.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, before)  # counted in eval mode: stats untouched
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_when_the_forward_raises() -> None:
    class Broken(Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv(x)
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        count(model, torch.randn(1, 3, 8, 8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())
    assert count(Tiny(), torch.randn(1, 3, 8, 8)).macs == 23552  # nothing left behind


def test_grouped_and_transposed_convs_by_hand() -> None:
    model = Grouped()
    report = count(model, torch.randn(2, 3, 16, 16))
    macs = [layer.macs for layer in report.layers]
    assert macs[0] == 2 * 12 * 8 * 8 * 3 * 9
    assert macs[1] == 2 * 24 * 8 * 8 * 3 * 9  # groups=4: 12/4 input channels per output
    assert macs[2] == 2 * 24 * 8 * 8 * 1 * 25  # depthwise
    assert macs[3] == 2 * 24 * 8 * 8 * 4 * 9  # transposed: each input meets 8/2 x 3x3 weights
    assert macs[4] == 2 * 16 * 17 * 17 * 8


@pytest.mark.parametrize(
    ("module", "shape", "macs"),
    [
        (nn.Conv1d(4, 6, 3, groups=2), (2, 4, 10), 2 * 6 * 8 * 2 * 3),
        (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (1, 2, 3, 5, 5), 4 * 3 * 5 * 5 * 2 * 9),
        (nn.ConvTranspose1d(4, 2, 3, stride=2), (1, 4, 5), 4 * 5 * 2 * 3),
        (nn.ConvTranspose3d(2, 4, 2, groups=2), (1, 2, 2, 2, 2), 2 * 8 * 2 * 8),
        (nn.Linear(6, 3), (2, 5, 6), 2 * 5 * 3 * 6),  # any leading dims
        (nn.Conv2d(3, 4, 3), (3, 6, 6), 4 * 4 * 4 * 3 * 9),  # unbatched input
    ],
    ids=["conv1d", "conv3d", "convtranspose1d", "convtranspose3d", "linear-3d", "unbatched"],
)
def test_single_layers_by_hand(module: nn.Module, shape: tuple[int, ...], macs: int) -> None:
    x = torch.randn(shape)
    assert count(module, x).macs == macs == torch_macs(module, x)


@pytest.mark.parametrize(
    ("build", "shape", "device"),
    [
        (Grouped, (2, 3, 16, 16), "cpu"),
        (Tiny, (3, 3, 8, 8), "cpu"),
        (lambda: torchvision.models.resnet18(weights=None), (1, 3, 64, 64), "cpu"),
        (lambda: torchvision.models.vgg11(weights=None), (1, 3, 32, 32), "meta"),
    ],
    ids=["grouped", "tiny", "resnet18-64", "vgg11-32"],
)
def test_conv_linear_models_agree_exactly_with_flop_counter_mode(
    build: Callable[[], nn.Module], shape: tuple[int, ...], device: str
) -> None:
    # FlopCounterMode counts aten convolution/mm/addmm as 2 x MACs and, like us, ignores bias
    # adds, norms, activations and pooling, so on conv/linear-only models the sets coincide.
    with torch.device(device):
        model, x = build(), torch.randn(shape)
    report = count(model, x)
    assert report.flops == 2 * torch_macs(model, x)


@pytest.mark.parametrize(
    ("name", "size", "macs", "published"),
    [
        ("resnet50", 224, 4_089_184_256, 4.089),
        ("vit_b_16", 224, 17_563_828_224, 17.564),
        ("swin_t", 224, 4_490_566_656, 4.491),
        ("swin_v2_t", 256, 5_939_690_496, 5.94),
        ("maxvit_t", 224, 5_558_046_720, 5.558),
        ("mobilenet_v3_small", 224, 56_510_400, 0.057),
        ("efficientnet_b0", 224, 385_814_752, 0.386),
    ],
)
def test_zoo_models_match_torchvision_and_flop_counter_mode(
    name: str, size: int, macs: int, published: float
) -> None:
    model, x = zoo(name, size)
    report = count(model, x)
    assert report.macs == macs
    # torchvision publishes these MACs as "GFLOPS" rounded to 3 decimals: 0.0565 -> 0.057.
    weights = torchvision.models.get_model_weights(name).DEFAULT
    assert weights.meta["_ops"] == published == round(macs / 1e9, 3)
    assert report.params == weights.meta["num_params"]
    assert report.nonzero_macs == report.macs  # meta tensors hold no values: dense
    # On meta, MHA takes its Python path, so torch's counter sees every matmul too.
    assert report.macs == torch_macs(model, x)


def test_resnet50_pins_the_design_numbers() -> None:
    model, x = zoo("resnet50", 224)
    report = count(model, x)
    assert report.macs == 4_089_184_256
    assert abs(report.macs / 4.09e9 - 1) < 0.005
    assert report.params == 25_557_032
    assert report.layer("layer1.0.conv1").macs == 56 * 56 * 64 * 64


def test_macs_scale_with_the_batch_and_do_not_depend_on_the_device() -> None:
    model, x = zoo("resnet18", 64)
    per_image = count(model, x)
    assert count(model, x.expand(4, -1, -1, -1)).macs == 4 * per_image.macs
    real, y = zoo("resnet18", 64, torch.device("cpu"))
    assert count(real, y).macs == per_image.macs
    assert count(real, y).params == per_image.params == 11_689_512


def test_multihead_attention_counts_projections_and_attention() -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    dense = 2 * 5 * 16 * 16 * 4 + 2 * (2 * 5 * 5 * 16)  # q, k, v, out + QK^T and AV
    report = count(mha, (x, x, x))
    (layer,) = report.layers
    assert (layer.name, layer.kind, layer.macs) == ("", "MultiheadAttention", dense)
    assert layer.params == 4 * (16 * 16 + 16)  # out_proj's parameters included
    # Eval-mode CPU MHA runs one fused kernel that FlopCounterMode does not count at all.
    assert torch_macs(mha, x, x, x) < dense
    # Keyword inputs are bound to their positions; cross-attention with other dims.
    cross = nn.MultiheadAttention(16, 2, kdim=6, vdim=10)
    q, k, v = torch.randn(3, 2, 16), torch.randn(7, 2, 6), torch.randn(7, 2, 10)
    expected = 2 * (3 * 16 * 16 + 7 * 6 * 16 + 7 * 10 * 16 + 3 * 16 * 16 + 2 * 3 * 7 * 16)
    report = count(_Kwargs(cross), (q, k, v))
    assert [(layer.name, layer.macs) for layer in report.layers] == [("attention", expected)]


class _Kwargs(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        return self.attention(query=q, value=v, key=k, need_weights=False)


def test_pruned_multihead_attention_scales_only_the_projections() -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight[:16].zero_()  # the whole query projection
    x = torch.randn(2, 5, 16)
    layer = count(mha, (x, x, x)).layers[0]
    assert layer.macs - layer.nonzero_macs == 2 * 5 * 16 * 16
    assert layer.density == 1 - 256 / (4 * 256)


class _Functional(nn.Module):
    """Calls its submodule's weight functionally, as torchvision's Swin does, then attends."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attention = (q @ k.transpose(-2, -1)).softmax(-1)
        return torch.einsum("bij,bjd->bid", attention, v)


def test_functional_matmuls_are_attributed_to_the_weight_owner_or_the_running_module() -> None:
    model = nn.Sequential(_Functional(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].qkv.weight[:, :4] = 0.0  # half of the weight
    x = torch.randn(2, 6, 8)
    report = count(model, x)
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        ("0.qkv", "Linear"),
        ("0", "matmul"),
        ("1", "Linear"),
    ]
    qkv, attention = report.layer("0.qkv"), report.layer("0")
    assert (qkv.macs, qkv.nonzero_macs) == (2 * 6 * 8 * 24, 2 * 6 * 4 * 24)
    assert qkv.density == 0.5
    assert attention.macs == attention.nonzero_macs == 2 * (2 * 6 * 6 * 8)
    assert (attention.params, attention.density) == (0, 1.0)
    assert report.macs == torch_macs(model, x)


@pytest.mark.parametrize(
    ("equation", "shapes", "macs"),
    [
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], 2 * 3 * 4 * 5),
        ("ij,jk", [(3, 4), (4, 5)], 3 * 4 * 5),  # implicit output
        ("...ij,...jk->...ik", [(6, 3, 4), (4, 5)], 6 * 3 * 4 * 5),  # broadcast
        ("B G I D, B G J D -> B G I J", [(2, 3, 4, 5), (2, 3, 6, 5)], 2 * 3 * 4 * 6 * 5),
        ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], 2 * 3 * 4 + 2 * 4 * 5),  # left to right
        ("ij,jk->i", [(2, 3), (3, 4)], 2 * 3),  # k is summed away first, no MACs
        ("ii->i", [(3, 3)], 0),  # one operand: no products
    ],
)
def test_einsum_macs(equation: str, shapes: list[tuple[int, ...]], macs: int) -> None:
    class Einsum(nn.Module):
        def forward(self, *operands: torch.Tensor) -> torch.Tensor:
            return torch.einsum(equation, *operands)

    operands = tuple(torch.randn(shape) for shape in shapes)
    assert count(Einsum(), operands).macs == macs
    if len(shapes) == 2:
        with FlopCounterMode(display=False) as counter:
            Einsum()(*operands)
        assert 2 * macs == counter.get_total_flops()


def test_scaled_dot_product_attention_and_batched_matmuls() -> None:
    class Ops(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = F.scaled_dot_product_attention(q, k, v)
            out = torch.baddbmm(out.flatten(0, 1), out.flatten(0, 1), torch.ones(6, 6, 6))
            return torch.matmul(out, torch.ones(6)).sum() + torch.mv(torch.ones(2, 6), v[0, 0, 0])

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    report = count(Ops(), (q, k, v))
    assert report.macs == 2 * 3 * 5 * 7 * (8 + 6) + 6 * 5 * 6 * 6 + 6 * 5 * 6 + 2 * 6
    # FlopCounterMode has no formula for aten.mv (matrix x vector), which both of the last
    # two products become; it agrees on the rest.
    assert report.macs - (6 * 5 * 6 + 2 * 6) == torch_macs(Ops(), q, k, v)


def test_shared_module_counts_macs_per_call_and_params_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.alias = self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.alias(self.fc(x))

    report = count(Twice(), torch.randn(3, 4))
    (layer,) = report.layers
    assert (layer.name, layer.macs, layer.params) == ("fc", 2 * 3 * 16, 20)
    assert report.params == 20


class Custom(nn.Module):
    """A module type no default rule knows, with a Linear inside."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_extra_rules_add_and_override_without_touching_the_defaults() -> None:
    defaults = dict(DEFAULT_RULES)
    model = nn.Sequential(Custom(), nn.Linear(4, 2))
    report = count(model, torch.randn(1, 4), extra_rules={Custom: lambda m, i, o: 123})
    assert [(layer.name, layer.kind, layer.macs) for layer in report.layers] == [
        ("0", "Custom", 123),  # counted whole: its inner Linear is not counted again
        ("1", "Linear", 8),
    ]
    assert report.layer("0").params == 20
    override = count(model, torch.randn(1, 4), extra_rules={nn.Linear: lambda m, i, o: 7})
    assert [layer.macs for layer in override.layers] == [7, 7]
    assert dict(DEFAULT_RULES) == defaults
    with pytest.raises(TypeError):
        DEFAULT_RULES[Custom] = lambda m, i, o: 0  # type: ignore[index]
    assert count(model, torch.randn(1, 4)).macs == 16 + 8


def test_rule_lookup_follows_the_mro() -> None:
    class MyConv(nn.Conv2d):
        pass

    mha = nn.MultiheadAttention(8, 2)
    assert rule_for(mha.out_proj, DEFAULT_RULES) is DEFAULT_RULES[nn.Linear]
    assert rule_for(MyConv(1, 1, 1), DEFAULT_RULES) is DEFAULT_RULES[nn.Conv2d]
    assert rule_for(nn.ReLU(), DEFAULT_RULES) is None
    rules = {nn.Conv2d: DEFAULT_RULES[nn.Conv2d], MyConv: DEFAULT_RULES[nn.Linear]}
    assert rule_for(MyConv(1, 1, 1), rules) is DEFAULT_RULES[nn.Linear]


def test_report_round_trips_through_json() -> None:
    model = Tiny()
    with torch.no_grad():
        model.fc.weight[:3] = 0.0
    report = count(model, torch.randn(1, 3, 8, 8))
    data = json.loads(json.dumps(report.to_dict()))
    assert FlopReport.from_dict(data) == report
    assert data["schema_version"] == 1


@pytest.mark.parametrize(
    "change",
    [
        {"schema_version": 2},
        {"params": 1, "nonzero_params": 2},
        {"layers": [{"name": "x"}]},
        {"layers": "nope"},
    ],
)
def test_from_dict_rejects_what_to_dict_never_writes(change: dict[str, Any]) -> None:
    data = count(Tiny(), torch.randn(1, 3, 8, 8)).to_dict() | change
    with pytest.raises(ConfigError):
        FlopReport.from_dict(data)


def test_layer_count_validates_its_numbers() -> None:
    with pytest.raises(ValueError, match="nonzero_macs"):
        LayerCount(name="x", kind="Linear", macs=1, nonzero_macs=2, params=0, nonzero_params=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_whole_classification_zoo(name: str) -> None:
    # At each model's published input size, every count matches FlopCounterMode exactly and
    # torchvision's "GFLOPS" to its 3 decimals; googlenet's published params exclude aux heads.
    weights = torchvision.models.get_model_weights(name).DEFAULT
    size = weights.transforms().crop_size[0]  # 518 for vit_h_14's default (SWAG) weights
    kwargs: dict[str, Any] = {"image_size": size} if name.startswith("vit") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"init_weights": False, "aux_logits": name == "inception_v3"}
    # RegNet computes its widths with tensor ops at build time, which meta cannot run.
    device = torch.device("cpu") if name.startswith("regnet") else META
    model, x = zoo(name, size, device, **kwargs)
    report = count(model, x)
    assert report.macs == torch_macs(model, x)
    assert round(report.macs / 1e9, 3) == weights.meta["_ops"]
    assert report.params == weights.meta["num_params"]

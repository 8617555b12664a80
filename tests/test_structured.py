"""The structured methods through ``benchlib.pruning.prune``: allocation (uniform, global,
per-layer, round_to, ignore, residual), the criteria (l1, slim, hrank, taylor, random), recipes
and replay, option errors, and export of pruned models (TorchScript, ONNX Runtime).

Expected values are computed here from the dense model (its dependency graph, its weights and
``importance``'s pure scorers), never read back from the recipe under test.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from benchlib.errors import ConfigError, PruningError
from benchlib.flops import count
from benchlib.models import Model, build_model
from benchlib.pruning import Recipe, Variant, prune, replay
from benchlib.pruning import resolve as resolve_spec
from benchlib.pruning.graph import DependencyGraph, Group, build_graph
from benchlib.pruning.importance import kept_after_pruning, l1_scores, slim_keep

JIT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(trace|trace_method|script)` is deprecated:FutureWarning"
)


@pytest.fixture(scope="module")
def resnet20() -> Model:
    return build_model("resnet20")


@pytest.fixture(scope="module")
def vgg() -> Model:
    return build_model("vgg16_cifar")


class TinyResidual(nn.Module):
    """stem -> (conv_a + stem) -> pool -> fc: one two-producer group, one single-producer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(16)
        self.mid = nn.Conv2d(16, 12, 3, padding=1)
        self.bn_mid = nn.BatchNorm2d(12)
        self.conv_a = nn.Conv2d(12, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_stem(self.stem(x)))
        y = self.bn_a(self.conv_a(torch.relu(self.bn_mid(self.mid(x)))))
        return self.fc(torch.relu(x + y).mean(dim=(2, 3)))


@pytest.fixture
def tiny_residual() -> Model:
    torch.manual_seed(0)
    module = TinyResidual().eval()
    return Model(name="tiny-residual", module=module, input_shape=(3, 16, 16), source="factory")


def graph_of(model: Model) -> DependencyGraph:
    return build_graph(model.module, model.example_input(1))


def kept_of(variant: Variant) -> dict[str, list[int]]:
    return {k: list(v) for k, v in variant.recipe.details["kept"].items()}


def pruned_counts(variant: Variant, graph: DependencyGraph) -> dict[str, int]:
    """Channels removed per group of the dense graph (0 for a group the recipe leaves whole)."""
    kept = kept_of(variant)
    return {g.key: g.size - len(kept.get(g.key, range(g.size))) for g in graph.groups}


def l1_of(model: Model, group: Group) -> torch.Tensor:
    weight = model.module.get_submodule(group.producers[0]).weight
    return l1_scores(weight)


def norm_after(group: Group) -> str:
    return next(m.target for m in group.members if m.kind == "norm")


def calibrated(model: Model, seed: int = 0) -> Model:
    """``model`` with BatchNorm statistics from a random batch, so activations are O(1) (random
    init at 32x32 otherwise shrinks mobilenet_v2's logits to ~1e-10, too small to compare)."""
    module = copy.deepcopy(model.module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    module.train()
    with torch.no_grad():
        module(model.example_input(16, seed=seed + 1))
    module.eval()
    return Model(name=model.name, module=module, input_shape=model.input_shape, source=model.source)


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert value.shape == sb[key].shape, key
        assert torch.equal(value, sb[key]), key


# -- uniform, round_to, global, ignore, residual, per-layer ----------------------------------


@pytest.mark.parametrize("name", ["resnet20", "vgg"])
def test_uniform_l1_prunes_int_ratio_of_each_group_lowest_norm_first(
    name: str, request: pytest.FixtureRequest
) -> None:
    model: Model = request.getfixturevalue(name)
    graph = graph_of(model)
    variant = prune(model, "l1:0.3")
    kept = kept_of(variant)
    assert variant.recipe.details["allocation"] == "uniform"
    assert set(kept) == {g.key for g in graph.groups}
    for group in graph.groups:
        n = int(0.3 * group.size)
        assert len(kept[group.key]) == group.size - n
        assert kept[group.key] == kept_after_pruning(l1_of(model, group), n), group.key
        producer = variant.module.get_submodule(group.producers[0])
        assert producer.weight.shape[0] == group.size - n
    dense = count(model.module, model.example_input(1))
    assert variant.flops.macs < dense.macs
    assert variant.flops.params < dense.params
    # the original is untouched
    assert model.module.get_submodule(graph.groups[0].producers[0]).weight.shape[0] == (
        graph.groups[0].size
    )


@pytest.mark.parametrize("name", ["resnet20", "vgg"])
def test_round_to_keeps_multiples_of_8_or_the_full_size(
    name: str, request: pytest.FixtureRequest
) -> None:
    model: Model = request.getfixturevalue(name)
    graph = graph_of(model)
    kept = kept_of(prune(model, "l1:0.3[round_to=8]"))
    for group in graph.groups:
        keep = len(kept[group.key])
        assert keep % 8 == 0 or keep == group.size, (group.key, keep)
        asked = group.size - int(0.3 * group.size)
        assert asked <= keep < asked + 8 or keep == group.size  # rounded up, never more pruning
    sizes = {len(kept[g.key]) for g in graph.groups if g.size == 64}
    assert sizes == {48}  # 64 - int(19.2) = 45 -> 48


def test_global_ranking_prunes_int_amount_of_all_within_the_cap(resnet20: Model) -> None:
    graph = graph_of(resnet20)
    variant = prune(resnet20, "l1:0.5[global=true]")
    assert variant.recipe.details["allocation"] == "global"
    pruned = pruned_counts(variant, graph)
    total = sum(g.size for g in graph.groups)
    assert sum(pruned.values()) == int(0.5 * total)
    assert len(set(pruned.values())) > 1  # not the same ratio everywhere
    kept = kept_of(variant)
    below_cap_kept, removed = [], []
    for group in graph.groups:
        cap = int(0.9 * group.size)
        assert pruned[group.key] <= cap
        scores = l1_of(resnet20, group)
        gone = sorted(set(range(group.size)) - set(kept[group.key]))
        removed.extend(scores[gone].tolist())
        if pruned[group.key] < cap:
            below_cap_kept.extend(scores[kept[group.key]].tolist())
    # one ranking: every removed channel scores at most any kept channel of an uncapped group
    assert max(removed) <= min(below_cap_kept)


def test_global_max_caps_every_group(resnet20: Model) -> None:
    graph = graph_of(resnet20)
    pruned = pruned_counts(prune(resnet20, "l1:0.5[global=true,max=0.3]"), graph)
    # the budget (168) exceeds what the caps allow, so every group sits at its cap
    assert pruned == {g.key: int(0.3 * g.size) for g in graph.groups}


def test_ignore_globs_leave_those_groups_whole(resnet20: Model) -> None:
    variant = prune(resnet20, "l1:0.5[ignore=layer3.*;layer1.0.conv1]")
    kept = kept_of(variant)
    assert sorted(kept) == [
        "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1",
    ]  # fmt: skip
    for name in ("layer3.0.conv1", "layer3.2.conv1", "layer1.0.conv1"):
        assert variant.module.get_submodule(name).out_channels == (
            resnet20.module.get_submodule(name).out_channels
        )
    assert variant.module.get_submodule("layer1.1.conv1").out_channels == 8


def test_residual_false_leaves_multi_producer_groups_whole(tiny_residual: Model) -> None:
    graph = graph_of(tiny_residual)
    assert [(g.key, g.producers) for g in graph.groups] == [
        ("stem", ("stem", "conv_a")),
        ("mid", ("mid",)),
    ]
    assert set(kept_of(prune(tiny_residual, "l1:0.5"))) == {"stem", "mid"}
    variant = prune(tiny_residual, "l1:0.5[residual=false]")
    assert set(kept_of(variant)) == {"mid"}
    assert variant.module.stem.out_channels == variant.module.conv_a.out_channels == 16
    assert variant.module.mid.out_channels == 6


def test_reduce_first_scores_the_defining_layer_and_mean_all_producers(
    tiny_residual: Model,
) -> None:
    module = tiny_residual.module
    first = l1_scores(module.stem.weight)
    mean = (first + l1_scores(module.conv_a.weight)) / 2
    assert kept_of(prune(tiny_residual, "l1:0.5"))["stem"] == kept_after_pruning(first, 8)
    got = kept_of(prune(tiny_residual, "l1:0.5[reduce=mean]"))["stem"]
    assert got == kept_after_pruning(mean, 8)
    assert kept_after_pruning(first, 8) != kept_after_pruning(mean, 8)  # the option matters


def test_per_layer_config_applies_its_ratios(resnet20: Model, tmp_path: Path) -> None:
    config = tmp_path / "ratios.json"
    config.write_text(json.dumps({"layer1.0.conv1": 0.25, "layer3.2.conv1": 0.75}))
    variant = prune(resnet20, f"l1:0.5[config={config}]")
    assert variant.recipe.details["allocation"] == "per-layer"
    sizes = {k: len(v) for k, v in kept_of(variant).items()}
    assert sizes["layer1.0.conv1"] == 16 - 4
    assert sizes["layer3.2.conv1"] == 64 - 48
    assert sizes["layer1.1.conv1"] == 8 and sizes["layer3.0.conv1"] == 32  # the others: AMOUNT


@pytest.mark.parametrize("layer", ["nope.conv", "fc", "layer1.0.conv2"])
def test_per_layer_config_naming_no_prunable_layer_raises(
    resnet20: Model, tmp_path: Path, layer: str
) -> None:
    # fc is the output, layer1.0.conv2 is pinned by the zero-padding shortcut
    config = tmp_path / "ratios.json"
    config.write_text(json.dumps({layer: 0.5}))
    with pytest.raises(PruningError, match=re.escape(f"names '{layer}'")):
        prune(resnet20, f"l1:0.5[config={config}]")


def test_shipped_hrank_resnet50_config_is_accepted() -> None:
    spec, _ = resolve_spec("l1:0.5[config=hrank-resnet50]")
    assert spec.options["config"] == "hrank-resnet50"
    from benchlib.pruning.structured import parse_options

    ratios = parse_options(spec).config
    assert len(ratios) == 53  # every conv of ResNet-50, downsample convs included
    assert ratios["conv1"] == 0.2 and ratios["layer4.2.conv2"] == 0.45
    assert ratios["layer4.2.conv3"] == 0.0  # the residual stream stays whole, as in HRank


# -- criteria -------------------------------------------------------------------------------


def with_gammas(model: Model, values: Iterator[float]) -> Model:
    module = copy.deepcopy(model.module)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.tensor([next(values) for _ in range(m.num_features)]))
    return Model(name=model.name, module=module, input_shape=model.input_shape, source="cifar")


def test_slim_with_distinct_gammas_keeps_the_global_threshold_masks(resnet20: Model) -> None:
    total = sum(m.num_features for m in resnet20.module.modules() if isinstance(m, nn.BatchNorm2d))
    order = torch.randperm(total, generator=torch.Generator().manual_seed(3))
    signs = torch.where(order % 3 == 0, -1.0, 1.0)  # |gamma| is what counts
    model = with_gammas(resnet20, iter(((order.double() + 1) / total * signs).tolist()))
    graph = graph_of(model)
    gammas = {
        g.key: model.module.get_submodule(norm_after(g)).weight.detach() for g in graph.groups
    }
    masks = slim_keep(gammas, 0.4)
    variant = prune(model, "slim:0.4")
    assert variant.recipe.details["allocation"] == "slim-global-threshold"
    expected = {key: torch.nonzero(mask).flatten().tolist() for key, mask in masks.items()}
    assert kept_of(variant) == expected
    counts = {len(v) for v in expected.values()}
    assert len(counts) > 1  # not uniform: one global threshold


def test_slim_with_equal_gammas_prunes_exactly_int_n_amount(resnet20: Model) -> None:
    graph = graph_of(resnet20)
    n = sum(g.size for g in graph.groups)
    for amount in (0.3, 0.5):
        pruned = pruned_counts(prune(resnet20, f"slim:{amount}"), graph)
        assert sum(pruned.values()) == int(n * amount)
        assert all(p < g.size for p, g in zip(pruned.values(), graph.groups, strict=True))


@pytest.mark.parametrize("criterion", ["hrank", "taylor"])
@pytest.mark.parametrize(("data", "synthetic"), [("synthetic", True), ("digits", False)])
def test_data_criteria_run_and_say_which_data(
    resnet20: Model, criterion: str, data: str, synthetic: bool
) -> None:
    graph = graph_of(resnet20)
    variant = prune(resnet20, f"{criterion}:0.5[data={data},batches=1,batch_size=4]")
    details = variant.recipe.details
    assert details["criterion"] == criterion
    assert details["synthetic"] is synthetic
    assert details["data"].startswith(data)
    assert details["calibration_images"] == 4
    assert pruned_counts(variant, graph) == {g.key: g.size // 2 for g in graph.groups}
    assert variant.module(resnet20.example_input(2)).shape == (2, 10)


def test_weight_criteria_record_no_data(resnet20: Model) -> None:
    details = prune(resnet20, "fpgm:0.5").recipe.details
    assert "data" not in details and "synthetic" not in details


def test_random_is_reproducible_by_seed(resnet20: Model) -> None:
    a = prune(resnet20, "random:0.5[seed=1]").recipe
    b = prune(resnet20, "random:0.5[seed=1]").recipe
    c = prune(resnet20, "random:0.5[seed=2]").recipe
    assert a.details["kept"] == b.details["kept"]
    assert a.to_json() == b.to_json()
    assert a.details["kept"] != c.details["kept"]
    l1 = prune(resnet20, "l1:0.5").recipe
    assert a.details["kept"] != l1.details["kept"]


# -- recipes and replay -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["l1:0.5[round_to=4]", "hrank:0.3[batch_size=4]", "slim:0.5"])
def test_recipe_json_round_trip_replays_the_identical_model(resnet20: Model, spec: str) -> None:
    variant = prune(resnet20, spec)
    recipe = Recipe.from_dict(json.loads(variant.recipe.to_json()))
    assert recipe == variant.recipe
    again = replay(resnet20, recipe)
    same_state(again.module, variant.module)
    assert again.flops.macs == variant.flops.macs
    x = resnet20.example_input(2)
    torch.testing.assert_close(again.module(x), variant.module(x), rtol=0, atol=0)


def test_replay_on_other_weights_is_refused(resnet20: Model) -> None:
    recipe = prune(resnet20, "l1:0.5").recipe
    with pytest.raises(PruningError, match="other weights"):
        replay(build_model("resnet20", seed=1), recipe)


def test_replay_needs_no_config_file(resnet20: Model, tmp_path: Path) -> None:
    config = tmp_path / "ratios.json"
    config.write_text(json.dumps({"layer1.0.conv1": 0.25}))
    variant = prune(resnet20, f"l1:0.5[config={config}]")
    config.unlink()  # e.g. a worker in another directory, or the file moved
    same_state(replay(resnet20, variant.recipe).module, variant.module)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("l1:0.5[foo=1]", "unknown option 'foo'"),
        ("l1:0.5[round_to=0]", "round_to='0'"),
        ("l1:0.5[max=1.5]", "max='1.5'"),
        ("l1:0.5[reduce=median]", "reduce 'median'"),
        ("l1:0.5[data=digits]", "option data"),
        ("l1:0.5[batches=2]", "option batches"),
        ("l1:0.5[config=/no/such/ratios.json]", "'/no/such/ratios.json'"),
        ("l1:0.5[global=maybe]", "global='maybe'"),
        ("l1:0.5[seed=-1]", "seed='-1'"),
        ("l1:1.5", "amount 1.5"),
        ("l1:0.5:0.2", "one amount"),
        ("l1:0.5[global=true,config=hrank-resnet50]", "exclude each other"),
        ("l1:0.5[max=0.5]", "only applies with global=true"),
        ("hrank:0.5[data=/no/such/folder]", "not a folder; choose from: digits, synthetic"),
    ],
)
def test_bad_options_raise_one_line_config_errors(
    resnet20: Model, spec: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        prune(resnet20, spec)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    with pytest.raises(ConfigError):
        resolve_spec(spec)  # caught at validation, before any model is touched


def test_a_config_file_that_is_not_ratios_is_a_config_error(
    resnet20: Model, tmp_path: Path
) -> None:
    for text in ("[1, 2]", '{"layer1.0.conv1": 1.5}', "{not json"):
        config = tmp_path / "bad.json"
        config.write_text(text)
        with pytest.raises(ConfigError, match=r"bad\.json"):
            prune(resnet20, f"l1:0.5[config={config}]")


def test_a_model_with_nothing_to_prune_raises(tiny_model: Model) -> None:
    flat = Model(
        name="linear",
        module=nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval(),
        input_shape=(3, 2, 2),
        source="factory",
    )
    with pytest.raises(PruningError, match="no prunable channel group"):
        prune(flat, "l1:0.5")
    # the conftest TinyNet: conv1 (with BN) and conv2 are prunable, fc is the output
    kept = kept_of(prune(tiny_model, "l1:0.5"))
    assert {k: len(v) for k, v in kept.items()} == {"conv1": 4, "conv2": 8}


# -- export -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_for_export() -> dict[str, tuple[Variant, torch.Tensor]]:
    out = {}
    for name in ("resnet20", "mobilenet_v2"):
        model = calibrated(build_model(name, input_size=32))
        variant = prune(model, "l1:0.5")
        x = model.example_input(2, seed=5)
        with torch.no_grad():
            assert variant.module(x).abs().max() > 1e-2  # outputs worth comparing
        out[name] = (variant, x)
    return out


EXPORTED = ["resnet20", "mobilenet_v2"]


@JIT_DEPRECATED
@pytest.mark.parametrize("name", EXPORTED)
def test_pruned_models_trace_and_script(
    pruned_for_export: dict[str, tuple[Variant, torch.Tensor]], name: str
) -> None:
    variant, x = pruned_for_export[name]
    module = variant.module
    with torch.no_grad():
        eager = module(x)
        traced = torch.jit.trace(module, (x,))
        torch.testing.assert_close(traced(x), eager, rtol=1e-5, atol=1e-5)
        scripted = torch.jit.script(module)
        torch.testing.assert_close(scripted(x), eager, rtol=1e-5, atol=1e-5)
        # a smaller model really is smaller in the archive
        assert any(p.shape != q.shape for p, q in zip(
            scripted.parameters(), build_model(name, input_size=32).module.parameters(),
            strict=True,
        ))  # fmt: skip


@pytest.mark.parametrize("name", EXPORTED)
def test_pruned_models_export_to_onnx_runtime(
    pruned_for_export: dict[str, tuple[Variant, torch.Tensor]], name: str, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    variant, x = pruned_for_export[name]
    path = tmp_path / f"{name}.onnx"
    # torch's default exporter since 2.9 (torch.export-based; the legacy one warns deprecated)
    torch.onnx.export(variant.module, (x,), str(path), dynamo=True, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        eager = variant.module(x)
    torch.testing.assert_close(torch.from_numpy(out), eager, rtol=1e-4, atol=1e-4)
    assert math.prod(out.shape) == math.prod(eager.shape)

"""Specs, magnitude pruning with exact counts, and recipes that replay exactly."""

from __future__ import annotations

import json

import pytest
import torch

from benchlib.errors import ConfigError, PruningError
from benchlib.models import Model
from benchlib.pruning import Recipe, parse_spec, prune, replay, split_specs
from benchlib.pruning.unstructured import weight_layers_in_order


def zeros(model: Model, name: str) -> int:
    weight = dict(model.module.named_modules())[name].weight
    return int((weight == 0).sum())


def test_parse_spec_and_canonical_text() -> None:
    spec = parse_spec(" Magnitude:0.9[prune_first=true, prune_classifier=false] ")
    assert spec.method == "magnitude"
    assert spec.args == ("0.9",)
    assert dict(spec.options) == {"prune_first": "true", "prune_classifier": "false"}
    assert str(spec) == "magnitude:0.9[prune_classifier=false,prune_first=true]"
    assert parse_spec("nm:2:4").args == ("2", "4")


def test_split_specs_keeps_commas_inside_options() -> None:
    assert split_specs("dense, l1:0.5[round_to=8,global=true],nm:2:4") == [
        "dense",
        "l1:0.5[round_to=8,global=true]",
        "nm:2:4",
    ]


@pytest.mark.parametrize("text", ["", ":0.5", "magnitude:", "magnitude:0.5[x]", "a[b=1"])
def test_malformed_specs(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_spec(text)


def test_execution_order_of_weight_layers(tiny_model: Model) -> None:
    order = weight_layers_in_order(tiny_model.module, tiny_model.example_input(1))
    assert order == ["conv1", "conv2", "fc"]


def test_global_magnitude_zeroes_exactly_the_expected_count(tiny_model: Model) -> None:
    variant = prune(tiny_model, "magnitude:0.7")
    # first conv and classifier are left dense by default: only conv2 is prunable
    assert variant.recipe.layers == ("conv2",)
    assert zeros(variant.model, "conv2") == round(0.7 * 16 * 8 * 9)
    assert zeros(variant.model, "conv1") == 0
    assert zeros(variant.model, "fc") == 0


def test_global_ranking_across_layers_keeps_the_largest(tiny_model: Model) -> None:
    variant = prune(tiny_model, "magnitude:0.6[prune_first=true,prune_classifier=true]")
    layers = ["conv1", "conv2", "fc"]
    assert variant.recipe.layers == tuple(layers)
    dense = dict(tiny_model.module.named_modules())
    pruned = dict(variant.module.named_modules())
    total = sum(dense[n].weight.numel() for n in layers)
    assert sum(zeros(variant.model, n) for n in layers) == round(0.6 * total)
    kept = torch.cat([dense[n].weight[pruned[n].weight != 0].abs().flatten() for n in layers])
    cut = torch.cat([dense[n].weight[pruned[n].weight == 0].abs().flatten() for n in layers])
    assert kept.min() >= cut.max()


def test_layerwise_magnitude_prunes_each_layer_by_the_same_ratio(tiny_model: Model) -> None:
    variant = prune(tiny_model, "magnitude-layer:0.5[prune_first=true,prune_classifier=true]")
    for name, numel in (("conv1", 8 * 3 * 9), ("conv2", 16 * 8 * 9), ("fc", 160)):
        assert zeros(variant.model, name) == round(0.5 * numel)


def test_pruning_leaves_the_original_untouched_and_counts_nonzero_macs(tiny_model: Model) -> None:
    before = {k: v.clone() for k, v in tiny_model.module.state_dict().items()}
    variant = prune(tiny_model, "magnitude:0.5")
    for key, value in tiny_model.module.state_dict().items():
        assert torch.equal(value, before[key])
    conv2 = variant.flops.layer("conv2")
    assert conv2.nonzero_macs == round(
        conv2.macs * (1 - zeros(variant.model, "conv2") / (16 * 8 * 9))
    )
    assert variant.flops.macs == prune(tiny_model, "dense").flops.macs


def test_recipe_round_trips_and_replays_to_the_identical_model(tiny_model: Model) -> None:
    variant = prune(tiny_model, "magnitude:0.8[prune_classifier=true]")
    recipe = Recipe.from_dict(json.loads(variant.recipe.to_json()))
    assert recipe == variant.recipe
    again = replay(tiny_model, recipe)
    expected = again.module.state_dict()
    for name, value in variant.module.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_replay_on_other_weights_is_refused(tiny_model: Model) -> None:
    recipe = prune(tiny_model, "magnitude:0.5").recipe
    with torch.no_grad():
        tiny_model.module.conv2.weight.add_(1.0)
    with pytest.raises(PruningError, match="other weights"):
        replay(tiny_model, recipe)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "magnitud:0.5",
            r"unknown pruning method 'magnitud'; choose from: block, dense, fpgm, hrank, l1, l2, "
            r"magnitude, magnitude-layer, nm, random, random-mask, slim, taylor "
            r"\(did you mean 'magnitude'\?\)",
        ),
        ("magnitude:1.5", r"amount 1.5 .* outside \(0, 1\)"),
        ("magnitude:0", r"amount 0 .* outside \(0, 1\)"),
        ("magnitude:1", r"outside \(0, 1\)"),
        ("magnitude:abc", r"'abc' .* not a number"),
        ("magnitude", r"needs an amount"),
        ("dense:0.5", r"takes no arguments"),
        ("magnitude:0.5[prune_first=maybe]", r"use true or false"),
    ],
)
def test_bad_specs_name_the_value_and_the_choices(
    tiny_model: Model, spec: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        prune(tiny_model, spec)

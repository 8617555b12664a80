"""Mask methods: N:M, blocks and the random control, exact counts and exact replays."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchlib.errors import ConfigError, PruningError
from benchlib.models import Model
from benchlib.pruning import Recipe, prune, replay
from benchlib.pruning.masks import (
    block_masks,
    block_norms,
    densities,
    magnitude_masks,
    nm_masks,
    nm_violation,
    random_masks_like,
)
from benchlib.pruning.unstructured import layer_weights

ALL_LAYERS = "[prune_classifier=true,prune_first=true]"


def weights_of(model: Model) -> dict[str, torch.Tensor]:
    return dict(layer_weights(model.module))


def zero_counts(model: Model) -> dict[str, int]:
    return {n: int((w == 0).sum()) for n, w in weights_of(model).items()}


def asp_groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """Rows of M consecutive input weights, input dim innermost (NVIDIA ASP's layout)."""
    return tensor.movedim(1, -1).reshape(-1, m)


@st.composite
def nm_weights(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    cin = m * draw(st.integers(1, 4))
    kernel = draw(st.sampled_from([(), (1, 1), (3, 3), (1, 3)]))
    shape = (draw(st.integers(1, 6)), cin, *kernel)
    seed = draw(st.integers(0, 2**16))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):  # many ties
        values = values.round()
    return values, n, m


@settings(deadline=None, max_examples=60)
@given(nm_weights())
def test_nm_keeps_the_n_largest_of_every_group_of_m_inputs(
    case: tuple[torch.Tensor, int, int],
) -> None:
    weight, n, m = case
    mask = nm_masks({"w": weight}, n, m)["w"]
    assert mask.shape == weight.shape
    groups, kept = asp_groups(weight.abs(), m), asp_groups(mask, m)
    assert (kept.sum(dim=1) == n).all()
    inf = torch.tensor(float("inf"))
    smallest_kept = torch.where(kept, groups, inf).min(dim=1).values
    largest_cut = torch.where(kept, -inf, groups).max(dim=1).values
    assert (smallest_kept >= largest_cut).all()


def test_two_four_on_a_conv_groups_input_channels_and_keeps_lower_indices_on_ties() -> None:
    weight = torch.zeros(1, 8, 1, 2)
    weight[0, :, 0, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0, -2.0, 2.0])
    weight[0, :, 0, 1] = torch.tensor([0.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0])
    mask = nm_masks({"w": weight}, 2, 4)["w"]
    assert mask[0, :, 0, 0].tolist() == [True, True, False, False, True, False, True, False]
    assert mask[0, :, 0, 1].tolist() == [False, True, False, True, True, True, False, False]


def test_nm_spec_leaves_layers_whose_inputs_do_not_fit_dense(tiny_model: Model) -> None:
    variant = prune(tiny_model, "nm:2:4" + ALL_LAYERS)
    # conv1 has 3 input channels: no group of 4
    assert variant.recipe.details["dense_layers"] == ["conv1"]
    assert zero_counts(variant.model) == {"conv1": 0, "conv2": 16 * 8 * 9 // 2, "fc": 16 * 10 // 2}
    assert variant.recipe.details["zeros"] == zero_counts(variant.model)
    assert (asp_groups(weights_of(variant.model)["conv2"] != 0, 4).sum(dim=1) == 2).all()


@settings(deadline=None, max_examples=40)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    kernel=st.sampled_from([(), (3, 3)]),
    amount=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
)
def test_block_masks_zero_the_smallest_whole_blocks(
    rows: int, cols: int, grid: tuple[int, int], kernel: tuple[int, ...], amount: float, seed: int
) -> None:
    cin = grid[1] * cols  # so Cin*kh*kw is a multiple of C
    weight = torch.randn(
        (grid[0] * rows, cin, *kernel), generator=torch.Generator().manual_seed(seed)
    )
    mask = block_masks({"w": weight}, rows, cols, amount)["w"]
    view = mask.reshape(weight.shape[0], -1)
    tiles = view.reshape(view.shape[0] // rows, rows, view.shape[1] // cols, cols)
    per_block = tiles.sum(dim=(1, 3))
    assert ((per_block == 0) | (per_block == rows * cols)).all()  # whole blocks only
    cut = per_block == 0
    assert int(cut.sum()) == round(amount * cut.numel())
    norms = block_norms(weight, rows, cols)
    if cut.any() and (~cut).any():
        assert norms[cut].max() <= norms[~cut].min()


def test_block_rows_run_along_output_channels(tiny_model: Model) -> None:
    weight = torch.ones(4, 2)
    weight[2:, 1] = 0.1  # the block (output channels 2-3, input 1) is the weakest 2x1 block
    mask = block_masks({"w": weight}, 2, 1, 0.25)["w"]
    assert mask.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    variant = prune(tiny_model, "block:3x1:0.5" + ALL_LAYERS)
    # 3 divides no output width here (8, 16, 10): every layer is left dense, none padded
    assert variant.recipe.details["dense_layers"] == ["conv1", "conv2", "fc"]
    assert set(variant.recipe.details["zeros"].values()) == {0}


def test_block_spec_zeroes_round_amount_of_the_blocks_per_layer(tiny_model: Model) -> None:
    variant = prune(tiny_model, "block:4x1:0.8" + ALL_LAYERS)
    assert variant.recipe.details["dense_layers"] == ["fc"]  # 10 output rows: no 4x1 tiling
    blocks = {"conv1": (8 // 4) * (3 * 9), "conv2": (16 // 4) * (8 * 9), "fc": 0}
    assert zero_counts(variant.model) == {n: round(0.8 * b) * 4 for n, b in blocks.items()}


def test_random_mask_matches_magnitude_density_per_layer_and_differs(tiny_model: Model) -> None:
    magnitude = prune(tiny_model, "magnitude:0.7" + ALL_LAYERS)
    random = prune(tiny_model, "random-mask:0.7" + ALL_LAYERS)
    assert zero_counts(random.model) == zero_counts(magnitude.model)
    assert len(set(zero_counts(random.model).values())) == 3  # global: not one ratio
    for name, weight in weights_of(random.model).items():
        assert not torch.equal(weight == 0, weights_of(magnitude.model)[name] == 0), name
    again = prune(tiny_model, "random-mask:0.7" + ALL_LAYERS)
    other_seed = prune(tiny_model, "random-mask:0.7[prune_classifier=true,prune_first=true,seed=1]")
    assert torch.equal(weights_of(again.model)["conv2"], weights_of(random.model)["conv2"])
    assert not torch.equal(weights_of(other_seed.model)["conv2"], weights_of(random.model)["conv2"])


def test_random_masks_like_keeps_the_given_densities() -> None:
    weights = {"a": torch.randn(10, 20), "b": torch.randn(7, 3, 3, 3)}
    target = densities(magnitude_masks(weights, 0.6, scope="global"))
    masks = random_masks_like(target, weights, seed=5)
    assert densities(masks) == target
    assert all(torch.equal(masks[n], random_masks_like(target, weights, 5)[n]) for n in weights)
    with pytest.raises(ConfigError, match="layer 'b' needs a density"):
        random_masks_like({"a": 0.5}, weights, seed=0)


@pytest.mark.parametrize(
    "spec",
    [
        "random-mask:0.6[prune_first=true,seed=4]",
        "nm:2:4" + ALL_LAYERS,
        "nm:1:8",
        "block:4x1:0.8" + ALL_LAYERS,
        "block:2x3:0.3[prune_classifier=true]",
    ],
)
def test_recipes_replay_exactly(tiny_model: Model, spec: str) -> None:
    variant = prune(tiny_model, spec)
    recipe = Recipe.from_dict(json.loads(variant.recipe.to_json()))
    assert recipe == variant.recipe
    again = replay(tiny_model, recipe).module.state_dict()
    for name, value in variant.module.state_dict().items():
        assert torch.equal(value, again[name]), name


def test_replay_refuses_other_weights_and_other_masks(tiny_model: Model) -> None:
    recipe = prune(tiny_model, "nm:2:4").recipe
    forged = Recipe.from_dict(
        {**recipe.to_dict(), "details": {**recipe.details, "masks_sha256": "0"}}
    )
    with pytest.raises(PruningError, match="other masks"):
        replay(tiny_model, forged)
    with torch.no_grad():
        weights_of(tiny_model)["conv2"].mul_(-1.5)
    with pytest.raises(PruningError, match="other weights"):
        replay(tiny_model, recipe)


def test_specs_are_canonical(tiny_model: Model) -> None:
    assert prune(tiny_model, "block:4X1:.8").label == "block:4x1:0.8"
    assert prune(tiny_model, "nm:02:4").label == "nm:2:4"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nm:4:2", r"spec 'nm:4:2' needs 0 < N < M; got N=4, M=2"),
        ("nm:2:2", r"got N=2, M=2"),
        ("nm:0:4", r"got N=0, M=4"),
        ("nm:2", r"spec 'nm:2' takes N and M, e.g. 'nm:2:4'"),
        ("nm:2:4:8", r"takes N and M"),
        ("nm:a:4", r"'a' in spec 'nm:a:4' is not a positive integer"),
        ("nm:2:4.0", r"'4.0' in spec 'nm:2:4.0' is not a positive integer"),
        ("block:4x:0.5", r"block size '4x' in spec 'block:4x:0.5' is not RxC"),
        ("block:0x1:0.5", r"block size '0x1'"),
        ("block:4x1:1.5", r"amount 1.5 in spec 'block:4x1:1.5' is outside \(0, 1\)"),
        ("block:4x1", r"spec 'block:4x1' takes a block size and an amount"),
        ("random-mask:0.5[seed=x]", r"option seed='x' .* use an integer >= 0"),
        ("random-mask:0.5[sed=1]", r"unknown option 'sed'.*did you mean 'seed'"),
        ("nm:2:4[seed=1]", r"unknown option 'seed'; choose from: prune_classifier, prune_first"),
        ("random-mask:1", r"outside \(0, 1\)"),
    ],
)
def test_bad_mask_specs_are_one_line_config_errors(
    tiny_model: Model, spec: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        prune(tiny_model, spec)
    assert "\n" not in str(caught.value)


def test_nm_violation_reads_the_layout_nm_masks_writes() -> None:
    torch.manual_seed(0)
    conv, linear = torch.randn(8, 16, 3, 3), torch.randn(6, 12)
    masks = nm_masks({"conv": conv, "linear": linear}, 2, 4)
    assert nm_violation(conv * masks["conv"], 2, 4) is None
    assert nm_violation(linear * masks["linear"], 2, 4) is None
    assert nm_violation(linear * masks["linear"], 1, 4) is not None
    broken = linear * masks["linear"]
    broken[3, 4:8] = 1.0  # row 3, group 1: four nonzeros
    assert nm_violation(broken, 2, 4) == "row 3 group 1 has 4 nonzeros"
    assert nm_violation(torch.zeros(4, 6), 2, 4) == "6 input columns do not split into groups of 4"
    assert nm_violation(torch.zeros(4), 2, 4) == "a 1-d tensor has no input dimension"

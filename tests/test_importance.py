"""Channel importance criteria against independent computations (numpy, scipy, by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist
from torch import nn

from benchlib.errors import ConfigError, PruningError
from benchlib.pruning.importance import (
    HRankAccumulator,
    SparsityRegularizer,
    default_sparsity,
    fpgm_scores,
    kept_after_pruning,
    l1_scores,
    l2_scores,
    random_scores,
    slim_keep,
    slim_scores,
    smallest,
    taylor_scores,
)


def weights(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 7), (4,), (3, 2, 5)])
def test_l1_l2_match_numpy_norms(shape: tuple[int, ...]) -> None:
    w = weights(0, shape)
    rows = w.numpy().astype(np.float64).reshape(shape[0], -1)
    for scores in (l1_scores(w), l2_scores(w)):
        assert scores.dtype == torch.float64
        assert scores.shape == (shape[0],)
    np.testing.assert_allclose(l1_scores(w).numpy(), np.abs(rows).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(l2_scores(w).numpy(), np.linalg.norm(rows, axis=1), rtol=1e-12)


def test_fpgm_matches_scipy_row_sums() -> None:
    w = weights(1, (8, 4, 3, 3))
    rows = w.numpy().astype(np.float64).reshape(8, -1)
    expected = cdist(rows, rows, "euclidean").sum(axis=1)
    scores = fpgm_scores(w)
    assert scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-12)


def test_fpgm_prunes_the_filter_at_the_geometric_median_first() -> None:
    # Distances are plain Euclidean: the centre filter is closest to all the others.
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    scores = fpgm_scores(w)
    assert smallest(scores, 1).tolist() == [1]
    assert scores[1].item() == pytest.approx(4.0)
    assert scores[0].item() == pytest.approx(1.0 + 2.0 + 2 * math.sqrt(2.0))
    twins = fpgm_scores(torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, -1.0]]))
    assert twins[0].item() == twins[1].item()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), perm=st.permutations(range(6)))
def test_scores_are_permutation_equivariant(seed: int, perm: list[int]) -> None:
    w = weights(seed, (6, 2, 3, 3))
    index = torch.tensor(perm)
    for score in (l1_scores, l2_scores, fpgm_scores):
        torch.testing.assert_close(score(w[index]), score(w)[index], rtol=1e-12, atol=1e-12)


def test_slim_scores_are_absolute_gammas() -> None:
    gamma = torch.tensor([0.5, -2.0, 0.0])
    assert slim_scores(gamma).tolist() == [0.5, 2.0, 0.0]
    with pytest.raises(PruningError, match=r"\(2, 2\)"):
        slim_scores(torch.ones(2, 2))


def test_slim_keep_one_global_threshold_and_never_empty() -> None:
    gammas = {
        "a": torch.tensor([0.1, -0.5, 0.3]),
        "b": torch.tensor([0.05, 0.02]),
        "c": torch.tensor([0.9, -0.2]),
    }
    # sorted |gamma| = .02 .05 .1 .2 .3 .5 .9; N=7, int(7 * 0.5) = 3 -> threshold 0.2
    keep = {name: mask.tolist() for name, mask in slim_keep(gammas, 0.5).items()}
    assert keep == {"a": [False, True, True], "b": [True, False], "c": [True, False]}
    # percent 0: the threshold is the smallest value, which is dropped (strict >)
    keep = {name: mask.tolist() for name, mask in slim_keep(gammas, 0.0).items()}
    assert keep == {"a": [True, True, True], "b": [True, False], "c": [True, True]}
    tied = slim_keep({"x": torch.tensor([0.05, 0.05]), "y": torch.tensor([1.0, 2.0])}, 0.5)
    assert tied["x"].tolist() == [True, False]
    assert tied["x"].dtype == torch.bool


@pytest.mark.parametrize("percent", [1.0, -0.1, math.nan])
def test_slim_keep_rejects_percent_outside_0_1(percent: float) -> None:
    with pytest.raises(ConfigError, match="percent"):
        slim_keep({"a": torch.ones(3)}, percent)


def test_slim_keep_needs_gammas() -> None:
    with pytest.raises(PruningError, match="BatchNorm"):
        slim_keep({}, 0.5)


def test_sparsity_regularizer_adds_exactly_s_sign_gamma_to_bn_grads() -> None:
    bn2d, bn1d, frozen = nn.BatchNorm2d(3), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bn2d, nn.Flatten(), nn.Linear(12, 4), bn1d, frozen)
    frozen.weight.requires_grad_(False)
    with torch.no_grad():
        bn2d.weight.copy_(torch.tensor([0.5, -1.0, 0.0]))
        bn1d.weight.copy_(torch.tensor([-0.3, 0.2, 1.0, -2.0]))
    model(weights(2, (5, 2, 2, 2))).square().sum().backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    s = 1e-4
    SparsityRegularizer(model, s).step()
    for name, param in model.named_parameters():
        if param.grad is None:
            assert name == "5.weight"
            continue
        if name in ("1.weight", "4.weight"):
            expected = before[name] + s * torch.sign(param.detach())
            torch.testing.assert_close(param.grad, expected, rtol=0, atol=0)
        else:
            assert torch.equal(param.grad, before[name]), name
    assert bn2d.weight.grad is not None
    assert bn2d.weight.grad[2] == before["1.weight"][2]  # sign(0) = 0


def test_sparsity_defaults_and_validation() -> None:
    assert default_sparsity("vgg16_cifar") == 1e-4
    assert default_sparsity("ResNet56") == 1e-5
    assert default_sparsity("densenet40") == 1e-5
    with pytest.raises(ConfigError, match=r"'mobilenet_v2'.*densenet, resnet, vgg"):
        default_sparsity("mobilenet_v2")
    with pytest.raises(ConfigError):
        SparsityRegularizer(nn.Linear(2, 2), -1.0)


def low_rank_map(rank: int, generator: torch.Generator) -> torch.Tensor:
    u = torch.randn(6, rank, generator=generator, dtype=torch.float64)
    v = torch.randn(rank, 6, generator=generator, dtype=torch.float64)
    return (u @ v).float()


def test_hrank_average_ranks_match_numpy() -> None:
    ranks = [[0, 1, 2, 6], [1, 1, 3, 5], [2, 1, 4, 6]]
    generator = torch.Generator().manual_seed(3)
    maps = torch.stack([torch.stack([low_rank_map(r, generator) for r in row]) for row in ranks])
    numpy_ranks = [[np.linalg.matrix_rank(m.numpy()) for m in image] for image in maps]
    assert numpy_ranks == ranks
    accumulator = HRankAccumulator()
    assert accumulator.channels == 0
    accumulator.update(maps[:2])
    accumulator.update(maps[2:])
    assert (accumulator.channels, accumulator.images) == (4, 3)
    scores = accumulator.scores()
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 3.0, 17 / 3], dtype=torch.float64))
    assert smallest(scores, 2).tolist() == [0, 1]


def test_hrank_errors_name_the_problem() -> None:
    accumulator = HRankAccumulator()
    with pytest.raises(PruningError, match="no feature maps"):
        accumulator.scores()
    with pytest.raises(PruningError, match=r"\(2, 3, 4\)"):
        accumulator.update(torch.zeros(2, 3, 4))
    accumulator.update(torch.zeros(1, 3, 4, 4))
    with pytest.raises(PruningError, match="3 channels to 5"):
        accumulator.update(torch.zeros(1, 5, 4, 4))


def test_taylor_sums_per_filter_then_takes_abs() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    g = torch.tensor([[1.0, -1.0], [2.0, 1.0]])
    assert taylor_scores(w, g).tolist() == [1.0, 2.0]  # |1 - 2|, |6 - 4|
    conv = weights(4, (3, 2, 2, 2))
    grad = weights(5, (3, 2, 2, 2))
    expected = np.abs((conv.numpy().astype(np.float64) * grad.numpy()).reshape(3, -1).sum(1))
    np.testing.assert_allclose(taylor_scores(conv, grad).numpy(), expected, rtol=1e-12)
    with pytest.raises(PruningError, match="shaped like"):
        taylor_scores(w, g[:1])


def test_random_scores_are_seeded_and_leave_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = random_scores(16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, random_scores(16, seed=7))
    assert not torch.equal(first, random_scores(16, seed=8))
    assert first.dtype == torch.float64
    assert bool(((first >= 0) & (first < 1)).all())


def test_smallest_breaks_ties_by_index() -> None:
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0])
    assert smallest(scores, 3).tolist() == [0, 1, 3]
    assert kept_after_pruning(scores, 3) == [2, 4]
    assert smallest(scores, 0).tolist() == []
    assert kept_after_pruning(scores, 5) == []
    with pytest.raises(PruningError, match="6 of 5"):
        smallest(scores, 6)
    with pytest.raises(PruningError, match="NaN"):
        smallest(torch.tensor([0.0, math.nan]), 1)

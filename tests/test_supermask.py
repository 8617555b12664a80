"""Supermasks: frozen weights, Bernoulli-sampled masks with a straight-through gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchlib.errors import PruningError
from benchlib.pruning.supermask import (
    attach_supermasks,
    bake_supermasks,
    supermask_density,
    supermask_logits,
)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def test_weights_freeze_and_only_the_logits_train() -> None:
    model = net()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks = attach_supermasks(model, ["0", "3"], seed=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in supermask_logits(model)}
    assert len(trainable) == 2 and set(masks) == {"0", "3"}
    assert torch.equal(model[0].parametrizations.weight.original, dense["0.weight"])


def test_training_samples_are_binary_and_seeded_eval_is_the_threshold() -> None:
    first, second = net(), net()
    a = attach_supermasks(first, ["3"], seed=7)["3"]
    b = attach_supermasks(second, ["3"], seed=7)["3"]
    first.train()
    second.train()
    sample_a, sample_b = a.mask(), b.mask()
    assert set(sample_a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(sample_a, sample_b)  # same seed, same masks
    assert 0 < int(sample_a.sum()) < sample_a.numel()  # p = 0.5: some kept, some not
    with torch.no_grad():
        a.logits.copy_(torch.linspace(-2.0, 2.0, a.logits.numel()).view_as(a.logits))
    first.eval()
    expected = (torch.sigmoid(a.logits) > 0.5).float()
    assert torch.equal(a.mask(), expected)
    assert torch.equal(first[3].weight, first[3].parametrizations.weight.original * expected)


def test_gradient_reaches_the_logits_straight_through() -> None:
    layer = nn.Linear(3, 2, bias=False)
    mask = attach_supermasks(nn.Sequential(layer), ["0"], init_logit=0.3)["0"]
    mask.train()
    x = torch.randn(5, 3)
    generator_state = mask.generator.get_state() if mask.generator is not None else None
    out = layer(x)
    out.square().sum().backward()
    # by hand: the same sample, dL/dm = dL/dW_eff * W, then through sigmoid'(logit)
    assert mask.generator is not None and generator_state is not None
    mask.generator.set_state(generator_state)
    sample = torch.bernoulli(torch.sigmoid(mask.logits.detach()), generator=mask.generator)
    weight = layer.parametrizations.weight.original
    effective = weight * sample
    grad_effective = (2 * (x @ effective.T)).T @ x
    sig = torch.sigmoid(torch.tensor(0.3))
    expected = grad_effective * weight * sig * (1 - sig)
    assert mask.logits.grad is not None
    torch.testing.assert_close(mask.logits.grad, expected)


def test_bake_leaves_a_plain_layer_with_the_eval_mask() -> None:
    model = net()
    masks = attach_supermasks(model, ["0", "3"], seed=3)
    with torch.no_grad():
        for mask in masks.values():
            mask.logits.copy_(
                torch.randn(mask.logits.shape, generator=torch.Generator().manual_seed(4))
            )
    model.eval()
    x = torch.randn(2, 2, 4, 4)
    expected = model(x)
    density = supermask_density(masks)
    kept = sum(int((torch.sigmoid(m.logits) > 0.5).sum()) for m in masks.values())
    assert density == pytest.approx(kept / (4 * 2 * 9 + 3 * 16))
    bake_supermasks(model, masks)
    assert not hasattr(model[0], "parametrizations") and isinstance(model[0].weight, nn.Parameter)
    torch.testing.assert_close(model(x), expected)
    zeros = sum(int((model[i].weight == 0).sum()) for i in (0, 3))
    assert zeros == (4 * 2 * 9 + 3 * 16) - kept


def test_a_layer_without_a_weight_is_refused() -> None:
    with pytest.raises(PruningError, match="no layer 'nope'"):
        attach_supermasks(net(), ["nope"])
    with pytest.raises(PruningError, match="layer '1' has no conv or linear weight"):
        attach_supermasks(net(), ["1"])

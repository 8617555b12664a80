"""Unstructured pruning: weights set to zero, shapes unchanged, masks baked into the weights.

Masks apply to the weights of conv and linear layers (never biases or norms). By default the
first layer and the classifier (the first and last weight layers in execution order) are left
dense, as the papers do; the options ``prune_first=true`` and ``prune_classifier=true`` include
them. Because the zeros are baked in, no mask multiply runs at inference: the dense backends
show the true cost of zeros.

Counts are exact: ``round(amount * N)`` weights are zeroed (Python's round, as
``torch.nn.utils.prune``), ties broken by a stable sort over the layers in execution order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from benchlib.errors import PruningError
from benchlib.flops import count
from benchlib.pruning.recipe import Recipe, weights_sha256
from benchlib.pruning.spec import PruneSpec

MASK_FLAGS = frozenset({"prune_first", "prune_classifier"})
"""The options every mask method takes."""


def weight_layers_in_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv and linear layers in the order a forward pass on ``example`` runs them.

    A layer is a name ``N`` with a parameter ``N.weight`` of two or more dimensions that a
    conv or matmul multiplies (from the FLOP counter, so TorchScript and ``torch.export``
    models work too). Attention's fused in-projection (``in_proj_weight``) is not among them.
    """
    weights = layer_weights(model)
    return [layer.name for layer in count(model, example).layers if layer.name in weights]


def layer_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Layer name -> its weight, for every parameter named ``*.weight`` with dim >= 2."""
    return {
        name.removesuffix(".weight"): param
        for name, param in model.named_parameters()
        if name.endswith(".weight") and param.dim() >= 2
    }


def prunable_layers(model: nn.Module, example: torch.Tensor, spec: PruneSpec) -> list[str]:
    """The layers ``spec`` masks: all weight layers less the first and last unless asked."""
    order = weight_layers_in_order(model, example)
    if not order:
        raise PruningError("the model has no conv or linear layer to prune")
    chosen = list(order)
    if not spec.flag("prune_classifier") and len(chosen) > 1:
        chosen.pop()
    if not spec.flag("prune_first") and len(chosen) > 1:
        chosen.pop(0)
    return chosen


def magnitude_masks(
    weights: Mapping[str, torch.Tensor], amount: float, *, scope: str
) -> dict[str, torch.Tensor]:
    """Keep-masks (True = keep) that zero the smallest |w|.

    ``scope="global"`` ranks all weights together (open_lth's ``sparse_global``) and zeroes
    ``round(amount * total)``; ``scope="layer"`` zeroes ``round(amount * numel)`` per layer.
    """
    if scope == "layer":
        return {
            name: _smallest_out(w.detach().abs().reshape(-1), amount).view_as(w)
            for name, w in weights.items()
        }
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    keep = _smallest_out(flat, amount)
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset : offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


def _smallest_out(values: torch.Tensor, amount: float) -> torch.Tensor:
    keep = torch.ones(values.numel(), dtype=torch.bool)
    count = round(amount * values.numel())
    if count:
        keep[torch.argsort(values, stable=True)[:count]] = False
    return keep


def bake(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Zero the masked weights in place; return the number of zeros per layer."""
    weights = layer_weights(model)
    zeros = {}
    with torch.no_grad():
        for name, mask in masks.items():
            weight = weights[name]
            weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))
            zeros[name] = int(mask.numel() - mask.sum())
    return zeros


def prune_magnitude(
    model: nn.Module, spec: PruneSpec, example: torch.Tensor, *, layers: list[str] | None = None
) -> Recipe:
    """``magnitude:A`` (global) or ``magnitude-layer:A`` on ``model`` in place; the recipe."""
    scope = "layer" if spec.method == "magnitude-layer" else "global"
    amount = spec.amount()
    names = layers if layers is not None else prunable_layers(model, example, spec)
    weights = layer_weights(model)
    chosen = {n: weights[n] for n in names}
    base = weights_sha256(chosen)
    masks = magnitude_masks(chosen, amount, scope=scope)
    zeros = bake(model, masks)
    return Recipe(
        spec=str(spec),
        layers=tuple(names),
        details={"scope": scope, "amount": amount, "zeros": zeros},
        base_sha256=base,
    )


def replay_magnitude(
    model: nn.Module, spec: PruneSpec, recipe: Recipe, example: torch.Tensor | None = None
) -> None:
    """Redo a magnitude recipe on ``model`` in place; PruningError if it does not match.
    (``example`` is unused: the recipe names the layers.)"""
    weights = layer_weights(model)
    missing = [n for n in recipe.layers if n not in weights]
    if missing:
        raise PruningError(f"recipe {recipe.spec!r} names layers the model lacks: {missing[:3]}")
    if weights_sha256({n: weights[n] for n in recipe.layers}) != recipe.base_sha256:
        raise PruningError(
            f"recipe {recipe.spec!r} was made from other weights (SHA-256 mismatch); "
            "load the dense weights it was computed from"
        )
    again = prune_magnitude(model, spec, torch.empty(0), layers=list(recipe.layers))
    if again.details.get("zeros") != recipe.details.get("zeros"):
        raise PruningError(f"replaying {recipe.spec!r} gave other per-layer zero counts")

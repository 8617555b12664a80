"""Unstructured and semi-structured pruning: weights set to zero, shapes unchanged, masks baked.

Masks apply to the weights of conv and linear layers (never biases or norms). By default the
first layer and the classifier (the first and last weight layers in execution order) are left
dense, as the papers do; the options ``prune_first=true`` and ``prune_classifier=true`` include
them. Because the zeros are baked in, no mask multiply runs at inference: the dense backends
show the true cost of zeros. The mask math lives in ``masks.py``; this module is the specs:

- ``magnitude:A`` / ``magnitude-layer:A``: the smallest |w|, one global ranking / per layer.
- ``random-mask:A[seed=N]``: seeded random masks at the per-layer density ``magnitude:A``
  gives on the same layers (the control; ``random:A`` is the structured channel control).
- ``nm:N:M``: N:M along the input dimension, NVIDIA ASP's layout (``masks.nm_masks``).
- ``block:RxC:A``: the fraction A of the R x C blocks of each layer's (Cout, Cin*kh*kw) view
  with least L2 norm, R along the output channels, C along the flattened input.

Counts are exact: ``round(amount * N)`` weights (or blocks) are zeroed (Python's round, as
``torch.nn.utils.prune``), ties broken by a stable sort over the layers in execution order.
A layer N:M or the blocks do not fit (input dim not a multiple of M, shape not a multiple of
the block) is left dense, never padded, and listed in the recipe's ``dense_layers``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from benchlib.errors import ConfigError, PruningError, unknown_choice
from benchlib.flops import count
from benchlib.pruning.masks import (
    block_fits,
    block_masks,
    densities,
    nm_fits,
    nm_masks,
    random_masks_like,
)
from benchlib.pruning.masks import magnitude_masks as magnitude_masks
from benchlib.pruning.recipe import Recipe, weights_sha256
from benchlib.pruning.spec import PruneSpec

MASK_FLAGS = frozenset({"prune_first", "prune_classifier"})
"""The options every mask method takes."""

NM_CONVENTION = "NVIDIA ASP: groups of M consecutive input channels at each (Cout, kh, kw)"


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


# --- the specs' arguments -------------------------------------------------------------------

_COUNT = re.compile(r"^[0-9]+$")
_BLOCK = re.compile(r"^(?P<rows>[0-9]+)x(?P<cols>[0-9]+)$", re.IGNORECASE)


def parse_nm_args(spec: PruneSpec) -> PruneSpec:
    """``Method.parse_args`` of ``nm:N:M``: two integers, 0 < N < M. Raises ConfigError."""
    if len(spec.args) != 2:
        raise ConfigError(f"spec {str(spec)!r} takes N and M, e.g. 'nm:2:4'")
    for text in spec.args:
        if not _COUNT.match(text):
            raise ConfigError(f"{text!r} in spec {str(spec)!r} is not a positive integer")
    n, m = (int(text) for text in spec.args)
    if not 0 < n < m:
        raise ConfigError(f"spec {str(spec)!r} needs 0 < N < M; got N={n}, M={m}, e.g. 'nm:2:4'")
    return replace(spec, args=(str(n), str(m)))


def parse_block_args(spec: PruneSpec) -> PruneSpec:
    """``Method.parse_args`` of ``block:RxC:A``: positive R and C, A in (0, 1)."""
    if len(spec.args) != 2:
        raise ConfigError(
            f"spec {str(spec)!r} takes a block size and an amount, e.g. 'block:4x1:0.8'"
        )
    match = _BLOCK.match(spec.args[0])
    if match is None or int(match["rows"]) < 1 or int(match["cols"]) < 1:
        raise ConfigError(
            f"block size {spec.args[0]!r} in spec {str(spec)!r} is not RxC with positive "
            "integers, e.g. 4x1"
        )
    size = f"{int(match['rows'])}x{int(match['cols'])}"
    return replace(spec, args=(size, repr(spec.amount(1))))


def validate_random_mask(spec: PruneSpec, read_files: bool = True) -> None:
    """``Method.validate`` of ``random-mask``: the mask flags and ``seed=N`` (N >= 0)."""
    for key in spec.options:
        if key not in MASK_FLAGS | {"seed"}:
            error = unknown_choice("option", key, MASK_FLAGS | {"seed"})
            raise ConfigError(f"{error} (in spec {str(spec)!r})")
        if key != "seed":
            spec.flag(key)
    _seed(spec)


def _seed(spec: PruneSpec) -> int:
    text = spec.options.get("seed", "0")
    if not _COUNT.match(text):
        raise ConfigError(f"option seed={text!r} in spec {str(spec)!r}: use an integer >= 0")
    return int(text)


# --- apply and replay -----------------------------------------------------------------------

Apply = Callable[..., Recipe]


def _chosen(
    model: nn.Module, spec: PruneSpec, example: torch.Tensor, layers: list[str] | None
) -> tuple[list[str], dict[str, torch.Tensor]]:
    names = layers if layers is not None else prunable_layers(model, example, spec)
    weights = layer_weights(model)
    return names, {n: weights[n] for n in names}


def prune_magnitude(
    model: nn.Module, spec: PruneSpec, example: torch.Tensor, *, layers: list[str] | None = None
) -> Recipe:
    """``magnitude:A`` (global) or ``magnitude-layer:A`` on ``model`` in place; the recipe."""
    scope = "layer" if spec.method == "magnitude-layer" else "global"
    amount = spec.amount()
    names, chosen = _chosen(model, spec, example, layers)
    base = weights_sha256(chosen)
    zeros = bake(model, magnitude_masks(chosen, amount, scope=scope))
    return Recipe(
        spec=str(spec),
        layers=tuple(names),
        details={"scope": scope, "amount": amount, "zeros": zeros},
        base_sha256=base,
    )


def prune_random_mask(
    model: nn.Module, spec: PruneSpec, example: torch.Tensor, *, layers: list[str] | None = None
) -> Recipe:
    """``random-mask:A[seed=N]`` in place: in each layer, as many random weights (seeded) as
    ``magnitude:A`` (global) zeroes there; the recipe."""
    amount, seed = spec.amount(), _seed(spec)
    names, chosen = _chosen(model, spec, example, layers)
    base = weights_sha256(chosen)
    target = densities(magnitude_masks(chosen, amount, scope="global"))
    masks = random_masks_like(target, chosen, seed)
    details = {"amount": amount, "seed": seed, "masks_sha256": weights_sha256(masks)}
    return _baked(model, spec, names, base, masks, details)


def prune_nm(
    model: nn.Module, spec: PruneSpec, example: torch.Tensor, *, layers: list[str] | None = None
) -> Recipe:
    """``nm:N:M`` in place (``masks.nm_masks``); the recipe lists the layers left dense."""
    n, m = (int(text) for text in parse_nm_args(spec).args)
    names, chosen = _chosen(model, spec, example, layers)
    base = weights_sha256(chosen)
    masks = nm_masks(chosen, n, m)
    details = {
        "n": n,
        "m": m,
        "convention": NM_CONVENTION,
        "dense_layers": [name for name, w in chosen.items() if not nm_fits(w, m)],
        "masks_sha256": weights_sha256(masks),
    }
    return _baked(model, spec, names, base, masks, details)


def prune_block(
    model: nn.Module, spec: PruneSpec, example: torch.Tensor, *, layers: list[str] | None = None
) -> Recipe:
    """``block:RxC:A`` in place (``masks.block_masks``); the recipe lists the layers left dense."""
    canonical = parse_block_args(spec)
    rows, cols = (int(text) for text in canonical.args[0].lower().split("x"))
    amount = canonical.amount(1)
    names, chosen = _chosen(model, spec, example, layers)
    base = weights_sha256(chosen)
    masks = block_masks(chosen, rows, cols, amount)
    details = {
        "rows": rows,
        "cols": cols,
        "amount": amount,
        "dense_layers": [name for name, w in chosen.items() if not block_fits(w, rows, cols)],
        "masks_sha256": weights_sha256(masks),
    }
    return _baked(model, spec, names, base, masks, details)


def _baked(
    model: nn.Module,
    spec: PruneSpec,
    names: list[str],
    base: str,
    masks: Mapping[str, torch.Tensor],
    details: dict[str, object],
) -> Recipe:
    zeros = bake(model, masks)
    return Recipe(
        spec=str(spec), layers=tuple(names), details={**details, "zeros": zeros}, base_sha256=base
    )


_APPLY: Mapping[str, Apply] = {
    "magnitude": prune_magnitude,
    "magnitude-layer": prune_magnitude,
    "random-mask": prune_random_mask,
    "nm": prune_nm,
    "block": prune_block,
}


def replay_masks(
    model: nn.Module, spec: PruneSpec, recipe: Recipe, example: torch.Tensor | None = None
) -> None:
    """Redo the recipe of any mask method on ``model`` in place; PruningError if the model is
    not the one it was made from (SHA-256 of the layers' weights) or the masks come out other
    (per-layer zero counts, and the masks' SHA-256 where recorded). ``example`` is unused."""
    apply = _APPLY.get(spec.method)
    if apply is None:
        raise PruningError(f"recipe {recipe.spec!r} is not a mask recipe")
    weights = layer_weights(model)
    missing = [n for n in recipe.layers if n not in weights]
    if missing:
        raise PruningError(f"recipe {recipe.spec!r} names layers the model lacks: {missing[:3]}")
    if weights_sha256({n: weights[n] for n in recipe.layers}) != recipe.base_sha256:
        raise PruningError(
            f"recipe {recipe.spec!r} was made from other weights (SHA-256 mismatch); "
            "load the dense weights it was computed from"
        )
    again = apply(model, spec, torch.empty(0), layers=list(recipe.layers))
    for key in ("zeros", "masks_sha256"):
        if key in recipe.details and again.details.get(key) != recipe.details[key]:
            raise PruningError(f"replaying {recipe.spec!r} gave other masks ({key} differ)")


def replay_magnitude(
    model: nn.Module, spec: PruneSpec, recipe: Recipe, example: torch.Tensor | None = None
) -> None:
    """Redo a magnitude recipe (``replay_masks``)."""
    replay_masks(model, spec, recipe, example)

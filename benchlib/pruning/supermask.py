"""Supermasks (Zhou et al., NeurIPS 2019, "Deconstructing Lottery Tickets"): train a mask over
frozen random weights.

Each masked layer keeps its weights frozen at initialisation and gets a learnable logit per
weight. In training mode the forward pass samples the mask ``m ~ Bernoulli(sigmoid(logit))``
and multiplies it into the weight; the gradient flows to the logits through a straight-through
estimator (the sample's gradient is taken as the gradient of its probability). In eval mode the
mask is deterministic, ``sigmoid(logit) > 0.5`` (the most likely mask), so evaluation is
repeatable and the mask can be baked into the weights with :func:`bake_supermasks`.

The mask is attached with ``torch.nn.utils.parametrize`` on ``weight``, so the model's forward
is untouched and the parameters of the mask are the only ones left trainable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from benchlib.errors import PruningError

__all__ = [
    "SupermaskParametrization",
    "attach_supermasks",
    "bake_supermasks",
    "supermask_density",
    "supermask_logits",
]


class _BernoulliStraightThrough(torch.autograd.Function):
    """Forward: a Bernoulli sample of ``probs``; backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx: Any, probs: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(probs, generator=generator)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        return grads[0], None


class SupermaskParametrization(nn.Module):
    """``weight -> weight * mask(logits)`` for one layer (see the module docstring).

    ``generator`` drives the training-mode samples (a seeded one makes training reproducible).
    """

    def __init__(
        self, shape: torch.Size, init_logit: float, generator: torch.Generator | None
    ) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full(shape, float(init_logit)))
        self.generator = generator

    def mask(self) -> Tensor:
        """The mask the next forward pass uses: a sample in training mode, else the threshold."""
        probs = torch.sigmoid(self.logits)
        if self.training:
            sample: Tensor = _BernoulliStraightThrough.apply(probs, self.generator)
            return sample
        return (probs > 0.5).to(probs.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask()


def attach_supermasks(
    model: nn.Module,
    layers: Iterable[str],
    *,
    init_logit: float = 0.0,
    seed: int = 0,
) -> dict[str, SupermaskParametrization]:
    """Freeze every parameter of ``model`` and give each named conv/linear layer a supermask.

    ``init_logit`` 0 starts every weight at keep-probability 0.5. Returns the
    parametrizations by layer name; their ``logits`` are the only trainable parameters.

    Raises:
        PruningError: a name that is not a layer with a ``weight`` of two or more dims.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    attached: dict[str, SupermaskParametrization] = {}
    for name in layers:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PruningError(f"supermask: the model has no layer {name!r}") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            raise PruningError(f"supermask: layer {name!r} has no conv or linear weight")
        mask = SupermaskParametrization(weight.shape, init_logit, generator).to(weight.device)
        parametrize.register_parametrization(module, "weight", mask)
        attached[name] = mask
    return attached


def supermask_logits(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable mask logits of ``model`` (give these to the optimizer)."""
    for module in model.modules():
        if isinstance(module, SupermaskParametrization):
            yield module.logits


def supermask_density(masks: dict[str, SupermaskParametrization]) -> float:
    """The share of weights the deterministic (eval) masks keep."""
    kept = total = 0
    for mask in masks.values():
        probs = torch.sigmoid(mask.logits.detach())
        kept += int((probs > 0.5).sum())
        total += probs.numel()
    return kept / total if total else 1.0


def bake_supermasks(model: nn.Module, masks: dict[str, SupermaskParametrization]) -> None:
    """Replace each supermasked weight by ``weight * (sigmoid(logit) > 0.5)`` and remove the
    parametrizations: a plain model with zeros, ready to benchmark like any masked variant."""
    for name, mask in masks.items():
        module = model.get_submodule(name)
        mask.eval()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

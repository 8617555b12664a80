"""Pruning: specs in, variants (module + recipe + FLOP report) out.

Methods are a table from name to a ``Method`` (how to prune, how to replay a recipe); an
unknown name raises ConfigError listing the known ones. The structured and lottery-ticket
families register here the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
from torch import nn

from benchlib.errors import ConfigError, unknown_choice
from benchlib.flops import FlopReport, count
from benchlib.models import Model
from benchlib.pruning.recipe import Recipe, weights_sha256
from benchlib.pruning.spec import PruneSpec, parse_spec, split_specs
from benchlib.pruning.structured import prune_structured, replay_structured
from benchlib.pruning.structured import validate as validate_structured
from benchlib.pruning.unstructured import (
    MASK_FLAGS,
    parse_block_args,
    parse_nm_args,
    prune_block,
    prune_magnitude,
    prune_nm,
    prune_random_mask,
    replay_magnitude,
    replay_masks,
    validate_random_mask,
)

__all__ = [
    "METHODS",
    "Method",
    "PruneSpec",
    "Recipe",
    "Variant",
    "parse_spec",
    "prune",
    "replay",
    "split_specs",
]


@dataclass(frozen=True)
class Method:
    """One pruning method: ``apply`` prunes a module in place and returns its recipe;
    ``replay`` redoes a recipe in place (given the batch-1 example input). ``takes_amount``
    says whether ``METHOD:AMOUNT``; ``flags`` are the boolean options it understands, or
    ``validate(spec, read_files)`` checks the options (raising ConfigError) where they take
    values (``read_files=False``: no files the options name are opened, as when replaying).
    ``parse_args`` checks and canonicalizes positional arguments other than one amount
    (``nm:2:4``, ``block:4x1:0.8``), raising ConfigError; ``takes_amount`` is then unused."""

    apply: Callable[[nn.Module, PruneSpec, torch.Tensor], Recipe]
    replay: Callable[[nn.Module, PruneSpec, Recipe, torch.Tensor], None]
    takes_amount: bool
    summary: str
    flags: frozenset[str] = frozenset()
    validate: Callable[[PruneSpec, bool], None] | None = None
    parse_args: Callable[[PruneSpec], PruneSpec] | None = None


def _dense(model: nn.Module, spec: PruneSpec, example: torch.Tensor) -> Recipe:
    return Recipe(spec="dense", base_sha256=weights_sha256(dict(model.named_parameters())))


def _replay_dense(model: nn.Module, spec: PruneSpec, recipe: Recipe, example: torch.Tensor) -> None:
    return None


STRUCTURED_SUMMARIES = {
    "l1": "remove the filters of least L1 norm (Li et al. 2017)",
    "l2": "remove the filters of least L2 norm",
    "fpgm": "remove the filters nearest the geometric median (He et al. 2019)",
    "slim": "Network Slimming: one global threshold on BN |gamma| (Liu et al. 2017)",
    "hrank": "remove the channels of lowest feature-map rank (Lin et al. 2020; needs data)",
    "taylor": "remove the filters of least |weight x gradient| (Molchanov et al. 2019; data)",
    "random": "remove random channels (seeded): the control",
}

METHODS: Mapping[str, Method] = MappingProxyType(
    {
        "dense": Method(_dense, _replay_dense, False, "the unpruned baseline"),
        "magnitude": Method(
            prune_magnitude,
            replay_magnitude,
            True,
            "global |w| ranking over conv/linear weights",
            MASK_FLAGS,
        ),
        "magnitude-layer": Method(
            prune_magnitude,
            replay_magnitude,
            True,
            "the same |w| ratio in every layer",
            MASK_FLAGS,
        ),
        "random-mask": Method(
            prune_random_mask,
            replay_masks,
            True,
            "random masks (seeded) at magnitude:A's per-layer density: the control "
            "(random:A is the channel control)",
            validate=validate_random_mask,
        ),
        "nm": Method(
            prune_nm,
            replay_masks,
            False,
            "N:M: the N largest |w| of every M input weights (NVIDIA sparse tensor cores)",
            MASK_FLAGS,
            parse_args=parse_nm_args,
        ),
        "block": Method(
            prune_block,
            replay_masks,
            False,
            "zero the R x C weight blocks of least L2 norm, the fraction A per layer",
            MASK_FLAGS,
            parse_args=parse_block_args,
        ),
        **{
            name: Method(
                prune_structured, replay_structured, True, summary, validate=validate_structured
            )
            for name, summary in STRUCTURED_SUMMARIES.items()
        },
    }
)


@dataclass(frozen=True, kw_only=True)
class Variant:
    """A model after a pruning spec: the pruned module, its recipe and its FLOP counts.

    ``dense_flops`` are the counts of the model it was pruned from (None for ``dense``): with
    structured pruning the layers themselves shrink, so the theoretical speedup of the pruned
    layers compares their dense MACs with their pruned ones.
    """

    model: Model
    spec: PruneSpec
    recipe: Recipe
    flops: FlopReport
    dense_flops: FlopReport | None = None

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def label(self) -> str:
        return str(self.spec)


def resolve(spec: str | PruneSpec, *, read_files: bool = True) -> tuple[PruneSpec, Method]:
    """Parse and validate a spec completely: a known method, its arguments and options
    (and the files options name, unless ``read_files`` is False: a recipe replays without them).

    Returns the canonical spec (amounts written as ``repr(float)``, so ``magnitude:.5`` and
    ``magnitude:0.50`` are one variant, ``magnitude:0.5``). Raises ConfigError.
    """
    if not isinstance(spec, (str, PruneSpec)):
        raise ConfigError(f"pruning spec {spec!r} is not text, e.g. 'magnitude:0.5'")
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    method = METHODS.get(parsed.method)
    if method is None:
        raise unknown_choice("pruning method", parsed.method, METHODS)
    if method.parse_args is not None:
        parsed = method.parse_args(parsed)
    elif method.takes_amount:
        if len(parsed.args) > 1:
            raise ConfigError(f"spec {str(parsed)!r} takes one amount, e.g. '{parsed.method}:0.5'")
        parsed = replace(parsed, args=(repr(parsed.amount()),))
    elif parsed.args:
        raise ConfigError(f"spec {str(parsed)!r} takes no arguments")
    if method.validate is not None:
        method.validate(parsed, read_files)
        return parsed, method
    for key in parsed.options:
        if key not in method.flags:
            error = unknown_choice("option", key, method.flags or ["(none)"])
            raise ConfigError(f"{error} (in spec {str(parsed)!r})")
        parsed.flag(key)
    return parsed, method


def prune(model: Model, spec: str | PruneSpec) -> Variant:
    """Prune a copy of ``model`` by ``spec``; the original is left untouched."""
    parsed, method = resolve(spec)
    module = copy.deepcopy(model.module)
    example = model.example_input(1)
    recipe = method.apply(module, parsed, example)
    pruned = Model(
        name=model.name, module=module, input_shape=model.input_shape, source=model.source
    )
    return Variant(
        model=pruned,
        spec=parsed,
        recipe=recipe,
        flops=count(module, example),
        dense_flops=_dense_counts(model, parsed, example),
    )


def replay(model: Model, recipe: Recipe) -> Variant:
    """Rebuild the variant ``recipe`` describes from the dense ``model`` it was made from."""
    parsed, method = resolve(recipe.spec, read_files=False)
    module = copy.deepcopy(model.module)
    method.replay(module, parsed, recipe, model.example_input(1))
    pruned = Model(
        name=model.name, module=module, input_shape=model.input_shape, source=model.source
    )
    example = model.example_input(1)
    return Variant(
        model=pruned,
        spec=parsed,
        recipe=recipe,
        flops=count(module, example),
        dense_flops=_dense_counts(model, parsed, example),
    )


def _dense_counts(model: Model, spec: PruneSpec, example: torch.Tensor) -> FlopReport | None:
    return None if spec.method == "dense" else count(model.module, example)

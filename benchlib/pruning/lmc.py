"""Linear mode connectivity and instability (Frankle et al., ICML 2020; METHODS.md).

From the state at iteration ``k`` two copies train to the end of the schedule with different
data orders (``data_order_seed`` 1 and 2, same ``config.seed``); the test error is evaluated
at evenly spaced ``alpha`` in [0, 1] on ``alpha W1 + (1 - alpha) W2``. Every floating-point
``state_dict`` entry is interpolated, BatchNorm running statistics included; integer buffers
(``num_batches_tracked``) are taken from ``W1``. At ``alpha`` 1 and 0 the interpolation is
exactly ``W1`` and ``W2`` (``1 x a + 0 x b == a`` in floating point), so the path's endpoints
are each copy's own error. Instability = max error on the path - mean of the two endpoint
errors; a network is stable below about 2%. With masks (sparse LMC), both copies keep the
masks, and so does every point of the path (zeros interpolate to zeros).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from benchlib.data import Dataset
from benchlib.errors import ConfigError
from benchlib.train import TrainConfig, evaluate, train

__all__ = ["STABLE_BELOW", "LmcResult", "instability", "interpolate", "linear_mode_connectivity"]

STABLE_BELOW = 0.02
"""Instability (in error, a fraction) below which a network counts as stable."""

StateDict = dict[str, Tensor]


def interpolate(
    first: Mapping[str, Tensor], second: Mapping[str, Tensor], alpha: float
) -> StateDict:
    """``alpha x first + (1 - alpha) x second`` for every floating entry; other entries
    (integer buffers) from ``first``.

    Raises:
        ConfigError: the two state dicts hold other keys or shapes.
    """
    if set(first) != set(second):
        raise ConfigError("cannot interpolate state dicts with different keys")
    mixed: StateDict = {}
    for name, a in first.items():
        b = second[name]
        if a.shape != b.shape:
            raise ConfigError(
                f"cannot interpolate {name!r}: shapes {tuple(a.shape)}, {tuple(b.shape)}"
            )
        if a.is_floating_point():
            mixed[name] = alpha * a + (1.0 - alpha) * b
        else:
            mixed[name] = a.clone()
    return mixed


def instability(errors: Sequence[float]) -> float:
    """Max error on the path minus the mean of the endpoint errors (``errors[0]``,
    ``errors[-1]``). Raises ConfigError for fewer than two points."""
    if len(errors) < 2:
        raise ConfigError(f"instability needs at least two points on the path; got {len(errors)}")
    return max(errors) - (errors[0] + errors[-1]) / 2.0


@dataclass(frozen=True, kw_only=True)
class LmcResult:
    """The path: ``alphas`` (the weight of copy 1), test ``errors`` (fractions) at each,
    the copies' own errors, and the instability."""

    k: int
    iterations: int
    alphas: tuple[float, ...]
    errors: tuple[float, ...]
    error_first: float
    error_second: float
    instability: float
    density: float

    @property
    def stable(self) -> bool:
        return self.instability < STABLE_BELOW

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "iterations": self.iterations,
            "alphas": list(self.alphas),
            "errors": list(self.errors),
            "error_first": self.error_first,
            "error_second": self.error_second,
            "instability": self.instability,
            "stable": self.stable,
            "stable_below": STABLE_BELOW,
            "density": self.density,
        }


def linear_mode_connectivity(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    config: TrainConfig,
    *,
    k: int,
    masks: Mapping[str, Tensor] | None = None,
    start_state: Mapping[str, Tensor] | None = None,
    points: int = 30,
    seeds: tuple[int, int] = (1, 2),
    progress: bool = False,
    console: Console | None = None,
) -> LmcResult:
    """The instability of ``model`` from iteration ``k``.

    Args:
        model: at theta_0 (trained to ``k`` with ``data_order_seed`` 0 first), or any model
            when ``start_state`` gives the state at iteration ``k``; it is left unchanged.
        masks: parameter name (``NAME.weight``) -> keep-mask, kept by both copies.
        points: alphas on the path, evenly spaced from 0 to 1 (>= 2).
        seeds: the two copies' ``data_order_seed``.

    Raises:
        ConfigError: ``k`` not below the run's iterations, fewer than two points, equal seeds.
    """
    total = config.total_iterations(len(train_set))
    if not 0 <= k < total:
        raise ConfigError(f"k must be in [0, {total}) (the run's iterations); got {k}")
    if points < 2:
        raise ConfigError(f"the path needs at least 2 points; got {points}")
    if seeds[0] == seeds[1]:
        raise ConfigError(f"the two copies need different data-order seeds; got {seeds}")
    base = copy.deepcopy(model)
    if start_state is not None:
        base.load_state_dict(dict(start_state))
    elif k > 0:
        train(
            base,
            train_set,
            config,
            end_iteration=k,
            masks=masks,
            progress=progress,
            console=console,
        )
    states = []
    errors_own = []
    for seed in seeds:
        copy_ = copy.deepcopy(base)
        train(
            copy_,
            train_set,
            config,
            start_iteration=k,
            masks=masks,
            data_order_seed=seed,
            progress=progress,
            console=console,
        )
        errors_own.append(1.0 - evaluate(copy_, test_set).top1)
        states.append({n: v.detach().clone() for n, v in copy_.state_dict().items()})
    alphas = tuple(float(a) for a in torch.linspace(0.0, 1.0, points).tolist())
    alphas = (0.0, *alphas[1:-1], 1.0)
    probe = copy.deepcopy(base)
    errors = []
    for alpha in alphas:
        probe.load_state_dict(interpolate(states[0], states[1], alpha))
        errors.append(1.0 - evaluate(probe, test_set).top1)
    kept = total_weights = 0
    for mask in (masks or {}).values():
        kept += int(mask.sum())
        total_weights += mask.numel()
    return LmcResult(
        k=k,
        iterations=total,
        alphas=alphas,
        errors=tuple(errors),
        error_first=errors_own[0],
        error_second=errors_own[1],
        instability=instability(errors),
        density=kept / total_weights if total_weights else 1.0,
    )

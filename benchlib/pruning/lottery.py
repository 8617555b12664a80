"""Lottery tickets (METHODS.md, "Lottery tickets and rewinding"): iterative magnitude pruning
with reset, weight rewinding, LR rewinding and fine-tuning; the mask criteria of Zhou et al.;
the random-reinitialisation control; and supermask training over frozen random weights.

**IMP** (Frankle & Carbin 2019): train the dense network for ``T`` iterations, then, at every
level, prune ``n = ceil(0.2 x remaining)`` of the weights still alive, globally over the
prunable layers (:func:`prune_remaining`), restart the survivors by the strategy and retrain
with the masks (``train(..., masks=...)`` keeps pruned weights at exactly 0). After ``L``
levels the density is ``0.8^L`` up to the rounding of each level's ``ceil``.

Strategies (:func:`parse_strategy`):

* ``reset``: every parameter and buffer back to theta_0 (iteration 0), retrain ``0 .. T``.
* ``rewind:K``: back to the weights (and BatchNorm buffers) the dense run had at iteration
  ``K``, and replay the schedule and data order from ``K`` (Frankle et al. 2019).
* ``lr-rewind:K``: keep the final weights, replay the learning-rate schedule from ``K``
  (Renda et al. 2020).
* ``finetune``: keep the final weights, train ``T`` iterations (the length of a full replay)
  at the constant rate ``lr x FINETUNE_LR_FACTOR`` (0.01: the last rate of a multistep
  schedule with two drops of 10x, the usual fine-tuning rate; a cosine schedule ends at 0,
  which would not train at all).

Pruning ranks a score per weight (:data:`CRITERIA`, Zhou et al. 2019): ``large_final``
``|w_f|``, ``magnitude_increase`` ``|w_f| - |w_i|``, ``large_init`` ``|w_i|`` (``w_i`` is
theta_0, the initialisation) and ``random`` (seeded per level). Ties: exactly ``n`` weights
are pruned; with no ties that is "keep the scores strictly above the n-th smallest", and
among equal scores a stable sort over the layers in order (then row-major) prunes the lower
index first, so the count never depends on ties.

The **random-reinitialisation control** trains the same masks from a fresh random
initialisation (another seed) from iteration 0 over the full schedule.

Momentum restarts from zero at every retraining (``train`` builds a fresh optimizer), as
OpenLTH does.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from benchlib.data import Dataset
from benchlib.errors import ConfigError, unknown_choice
from benchlib.flops import count
from benchlib.pruning.supermask import (
    SupermaskParametrization,
    attach_supermasks,
    supermask_density,
)
from benchlib.pruning.unstructured import layer_weights
from benchlib.train import Evaluation, TrainConfig, evaluate, train

__all__ = [
    "CRITERIA",
    "FINETUNE_LR_FACTOR",
    "PRUNE_FRACTION",
    "STRATEGIES",
    "ImpResult",
    "LevelResult",
    "Strategy",
    "apply_masks",
    "density",
    "mask_scores",
    "parse_strategy",
    "prune_remaining",
    "random_reinit",
    "recalibrate_batchnorm",
    "run_imp",
    "train_supermask",
]

StateDict = dict[str, Tensor]

STRATEGIES = ("reset", "rewind:K", "lr-rewind:K", "finetune")
"""The restart strategies between IMP levels (``K`` an iteration)."""

CRITERIA = ("large_final", "magnitude_increase", "large_init", "random")
"""Mask criteria (Zhou et al. 2019); ``large_final`` is the default."""

PRUNE_FRACTION = 0.2
"""The share of the remaining weights each IMP level prunes."""

FINETUNE_LR_FACTOR = 0.01
"""Fine-tuning runs at the constant rate ``config.lr x FINETUNE_LR_FACTOR``."""

_STRATEGY = re.compile(r"^(?P<kind>reset|finetune|rewind|lr-rewind)(?::(?P<k>[^:]*))?$")


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy: ``kind`` one of reset, rewind, lr-rewind, finetune; ``k`` the
    iteration rewound to (0 for reset and finetune)."""

    kind: str
    k: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in ("rewind", "lr-rewind") else self.kind


def parse_strategy(text: str) -> Strategy:
    """``reset``, ``rewind:K``, ``lr-rewind:K`` or ``finetune`` (``K`` an integer >= 0).

    Raises:
        ConfigError: anything else, naming the value and the choices.
    """
    match = _STRATEGY.match(text.strip())
    if match is None:
        raise unknown_choice("strategy", text, STRATEGIES)
    kind, k = match["kind"], match["k"]
    if kind in ("reset", "finetune"):
        if k is not None:
            raise ConfigError(f"strategy {text!r}: {kind} takes no iteration; use {kind!r}")
        return Strategy(kind)
    if k is None or not k.isdigit():
        raise ConfigError(
            f"strategy {text!r}: {kind} needs an iteration K >= 0, e.g. '{kind}:20'; "
            f"choose from: {', '.join(STRATEGIES)}"
        )
    return Strategy(kind, int(k))


def check_criterion(criterion: str) -> str:
    """``criterion`` if it is one of :data:`CRITERIA`; ConfigError naming the choices else."""
    if criterion not in CRITERIA:
        raise unknown_choice("mask criterion", criterion, CRITERIA)
    return criterion


# --- masks ------------------------------------------------------------------------------------


def mask_scores(
    criterion: str,
    final: Mapping[str, Tensor],
    initial: Mapping[str, Tensor],
    *,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The score of every weight under ``criterion``: the lowest scores are pruned first.

    ``final`` and ``initial`` map layer names to the weights after training and at theta_0.
    ``random`` draws uniform scores from a generator seeded with ``seed``, layer by layer in
    the order of ``final``.
    """
    check_criterion(criterion)
    scores: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    for name, weight in final.items():
        w_f = weight.detach().float().cpu()
        if criterion == "large_final":
            scores[name] = w_f.abs()
        elif criterion == "large_init":
            scores[name] = initial[name].detach().float().cpu().abs()
        elif criterion == "magnitude_increase":
            scores[name] = w_f.abs() - initial[name].detach().float().cpu().abs()
        else:
            scores[name] = torch.rand(w_f.shape, generator=generator)
    return scores


def prune_remaining(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    fraction: float = PRUNE_FRACTION,
) -> dict[str, Tensor]:
    """New keep-masks: prune ``ceil(fraction x remaining)`` of the weights ``masks`` keep,
    those of lowest score, in one global ranking over every layer of ``scores``.

    ``masks`` None starts dense. Pruned weights stay pruned. Exactly that many are pruned
    (ties: a stable sort, the lower index in layer order first; see the module docstring).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"the pruning fraction must be in [0, 1]; got {fraction}")
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().cpu().reshape(-1) for n in names])
    if masks is None:
        alive = torch.ones(flat.numel(), dtype=torch.bool)
    else:
        alive = torch.cat([masks[n].detach().cpu().reshape(-1) for n in names])
    where = alive.nonzero().squeeze(1)
    n = math.ceil(fraction * where.numel())
    keep = alive.clone()
    if n:
        order = torch.argsort(flat[where], stable=True)
        keep[where[order[:n]]] = False
    result: dict[str, Tensor] = {}
    offset = 0
    for name in names:
        size = scores[name].numel()
        result[name] = keep[offset : offset + size].view(scores[name].shape).clone()
        offset += size
    return result


def density(masks: Mapping[str, Tensor]) -> float:
    """The exact share of weights the keep-masks keep (1.0 for no masks)."""
    total = sum(mask.numel() for mask in masks.values())
    kept = sum(int(mask.sum()) for mask in masks.values())
    return kept / total if total else 1.0


def parameter_masks(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Layer-name keep-masks as ``train`` takes them (``NAME.weight``)."""
    return {f"{name}.weight": mask for name, mask in masks.items()}


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the weights the layer-name keep-masks prune, in place."""
    weights = layer_weights(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].masked_fill_(~mask.to(weights[name].device), 0.0)


def _copy_state(module: nn.Module) -> StateDict:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _weights(state: Mapping[str, Tensor], layers: Sequence[str]) -> dict[str, Tensor]:
    return {name: state[f"{name}.weight"] for name in layers}


def random_reinit(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with a fresh random initialisation: every submodule's
    ``reset_parameters`` (and BatchNorm's ``reset_running_stats``) under torch's generator
    seeded with ``seed``; the caller's random state is left as it was."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh


# --- IMP --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LevelResult:
    """One IMP level (level 0: the dense network).

    Attributes:
        density: kept / total weights of the pruned layers, exactly, from the masks.
        remaining: weights kept in the pruned layers; pruned: how many this level pruned.
        top1, top5: test accuracy (fractions) after retraining.
        macs, nonzero_macs: per image, of the masked model (``flops.count``).
        control_top1: the random-reinit control's test top-1 at these masks (None if not run).
        seconds: the level's wall time (training, control and evaluation).
    """

    level: int
    density: float
    remaining: int
    pruned: int
    top1: float
    top5: float
    macs: int
    nonzero_macs: int
    control_top1: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "density": self.density,
            "remaining": self.remaining,
            "pruned": self.pruned,
            "top1": self.top1,
            "top5": self.top5,
            "macs": self.macs,
            "nonzero_macs": self.nonzero_macs,
            "control_top1": self.control_top1,
            "seconds": self.seconds,
        }


@dataclass(kw_only=True)
class ImpResult:
    """What :func:`run_imp` did: the levels, the final masks (layer name -> keep-mask), and
    the states each level's retraining started from (``start_states``, when asked)."""

    strategy: str
    criterion: str
    layers: tuple[str, ...]
    iterations: int
    levels: list[LevelResult] = field(default_factory=list)
    masks: dict[str, Tensor] = field(default_factory=dict)
    rewind_state: StateDict | None = None
    start_states: list[StateDict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "criterion": self.criterion,
            "layers": list(self.layers),
            "iterations": self.iterations,
            "levels": [level.to_dict() for level in self.levels],
        }


def _retrain_plan(strategy: Strategy, config: TrainConfig, total: int) -> tuple[TrainConfig, int]:
    """The config and start iteration of a retraining under ``strategy``."""
    if strategy.kind == "finetune":
        constant = replace(
            config,
            lr=config.lr * FINETUNE_LR_FACTOR,
            schedule="constant",
            milestones=(),
            warmup=0,
            iterations=total,
            epochs=None,
        )
        return constant, 0
    return config, strategy.k if strategy.kind in ("rewind", "lr-rewind") else 0


def run_imp(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    config: TrainConfig,
    *,
    levels: int,
    strategy: Strategy | str,
    layers: Sequence[str],
    example: Tensor,
    criterion: str = "large_final",
    control: bool = False,
    fresh: Callable[[int], nn.Module] | None = None,
    seed: int = 0,
    keep_states: bool = False,
    on_level: Callable[[LevelResult], None] | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> ImpResult:
    """Iterative magnitude pruning of ``model`` (in place) over ``levels`` levels.

    Args:
        model: at its initialisation theta_0; it ends with the last level's weights, masked.
        layers: the layer names to prune (``prunable_layers``: first conv and classifier out).
        example: one input batch (batch 1) for counting the masked model's MACs.
        control: also train the random-reinit control at every pruned level.
        fresh: ``seed -> module`` with a fresh initialisation for the control (the model's
            own init scheme); None uses :func:`random_reinit`.
        seed: seeds the random criterion and the control's initialisations.
        keep_states: keep in ``start_states`` the state every retraining started from.
        on_level: called with each level's result as it is done.

    Raises:
        ConfigError: a bad level count, criterion or strategy, or a rewind iteration ``K``
            not below the run's iterations.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise ConfigError(f"levels must be an integer >= 0; got {levels!r}")
    plan = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    check_criterion(criterion)
    total = config.total_iterations(len(train_set))
    if plan.k >= total:
        raise ConfigError(
            f"strategy {str(plan)!r}: K={plan.k} must be below the {total} training iterations"
        )
    missing = [name for name in layers if name not in layer_weights(model)]
    if missing or not layers:
        raise ConfigError(f"no such weight layers to prune: {missing or 'none given'}")
    names = tuple(layers)
    initial = _copy_state(model)
    result = ImpResult(strategy=str(plan), criterion=criterion, layers=names, iterations=total)
    save = {plan.k} if plan.kind == "rewind" else set()
    started = time.perf_counter()
    dense = train(model, train_set, config, save_at=save, progress=progress, console=console)
    result.rewind_state = dense.snapshots.get(plan.k) if plan.kind == "rewind" else None
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in _weights(initial, names).items()}
    _finish_level(result, model, test_set, example, masks, 0, 0, None, started, on_level)
    retrain_config, start = _retrain_plan(plan, config, total)
    for level in range(1, levels + 1):
        started = time.perf_counter()
        final = _weights(_copy_state(model), names)
        scores = mask_scores(criterion, final, _weights(initial, names), seed=seed + level)
        before = sum(int(mask.sum()) for mask in masks.values())
        masks = prune_remaining(scores, masks)
        pruned = before - sum(int(mask.sum()) for mask in masks.values())
        if plan.kind == "reset":
            model.load_state_dict(initial)
        elif plan.kind == "rewind":
            assert result.rewind_state is not None
            model.load_state_dict(result.rewind_state)
        apply_masks(model, masks)
        if keep_states:
            result.start_states.append(_copy_state(model))
        train(
            model,
            train_set,
            retrain_config,
            start_iteration=start,
            masks=parameter_masks(masks),
            progress=progress,
            console=console,
        )
        control_top1 = None
        if control:
            twin = _control(model, fresh, seed + 1000 + level, masks, train_set, config)
            control_top1 = evaluate(twin, test_set).top1
        _finish_level(
            result, model, test_set, example, masks, level, pruned, control_top1, started, on_level
        )
    result.masks = masks
    return result


def _control(
    model: nn.Module,
    fresh: Callable[[int], nn.Module] | None,
    seed: int,
    masks: Mapping[str, Tensor],
    train_set: Dataset,
    config: TrainConfig,
) -> nn.Module:
    """The random-reinit control: the same masks on a fresh initialisation, trained from 0."""
    module = fresh(seed) if fresh is not None else random_reinit(model, seed)
    module.to(next(model.parameters()).device)
    apply_masks(module, masks)
    train(module, train_set, config, masks=parameter_masks(masks), progress=False)
    return module


def _finish_level(
    result: ImpResult,
    model: nn.Module,
    test_set: Dataset,
    example: Tensor,
    masks: Mapping[str, Tensor],
    level: int,
    pruned: int,
    control_top1: float | None,
    started: float,
    on_level: Callable[[LevelResult], None] | None,
) -> None:
    evaluation: Evaluation = evaluate(model, test_set)
    flops = count(model, example)
    entry = LevelResult(
        level=level,
        density=density(masks),
        remaining=sum(int(mask.sum()) for mask in masks.values()),
        pruned=pruned,
        top1=evaluation.top1,
        top5=evaluation.top5,
        macs=flops.macs,
        nonzero_macs=flops.nonzero_macs,
        control_top1=control_top1,
        seconds=time.perf_counter() - started,
    )
    result.levels.append(entry)
    if on_level is not None:
        on_level(entry)


# --- supermasks -------------------------------------------------------------------------------


SUPERMASK_CONFIG = TrainConfig(
    lr=100.0, momentum=0.9, weight_decay=0.0, batch_size=64, epochs=5, schedule="cosine"
)
"""SGD on the mask logits only (see :func:`train_supermask`)."""


def train_supermask(
    model: nn.Module,
    train_set: Dataset,
    *,
    layers: Sequence[str] | None = None,
    config: TrainConfig = SUPERMASK_CONFIG,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, SupermaskParametrization], float]:
    """Freeze ``model`` at its random weights and train supermask logits on ``layers`` (all
    conv and linear layers by default); returns the masks and their eval density.

    Only the logits train (``attach_supermasks`` freezes everything else; ``train`` optimizes
    only what requires grad). BatchNorm running statistics still track the batches, as in any
    training-mode forward pass. The large learning rate is needed because the straight-through
    gradient of a logit is ``sigmoid'(logit) x w x dL/dw``, tiny for small random weights
    (Zhou et al. use SGD at lr 100).
    """
    chosen = list(layers) if layers is not None else list(layer_weights(model))
    masks = attach_supermasks(model, chosen, seed=seed)
    train(model, train_set, config, progress=progress)
    recalibrate_batchnorm(model, train_set)
    return masks, supermask_density(masks)


def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running mean and variance over ``dataset`` with the rest of
    the model in eval mode (so supermasks use their deterministic mask), as a cumulative
    average; the module ends in eval mode.

    Training samples a new Bernoulli mask every step, so the running statistics training
    leaves describe sampled networks, not the thresholded one evaluation runs: on digits a
    resnet20 supermask scores chance (10%) without this, about 80% with it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    device = next(iter(model.parameters())).device
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                model(dataset.images[start : start + batch_size].to(device))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()


# --- reports ----------------------------------------------------------------------------------


def plot_accuracy_density(results: Sequence[Mapping[str, Any]], path: Any) -> bool:
    """Plot test top-1 against density, one line per strategy (and its random-reinit control
    where run), from ``ImpResult.to_dict()`` mappings, to the PNG ``path`` (matplotlib, Agg).

    Returns False, writing nothing, when matplotlib (the ``plots`` extra) is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return False
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for result in results:
        levels = result["levels"]
        xs = [100.0 * level["density"] for level in levels]
        label = f"{result['strategy']} ({result['criterion']})"
        axes.plot(xs, [100.0 * level["top1"] for level in levels], marker="o", label=label)
        control = [(x, lv["control_top1"]) for x, lv in zip(xs, levels, strict=True)]
        control = [(x, c) for x, c in control if c is not None]
        if control:
            axes.plot(
                [x for x, _ in control],
                [100.0 * c for _, c in control],
                marker="x",
                linestyle="--",
                label=f"{result['strategy']}: random reinit",
            )
    axes.set_xscale("log")
    densities = sorted({100.0 * lv["density"] for r in results for lv in r["levels"]})
    axes.set_xticks(densities, [f"{d:.3g}" for d in densities])
    axes.minorticks_off()
    axes.invert_xaxis()
    axes.set_xlabel("density of the pruned layers (%)")
    axes.set_ylabel("test top-1 (%)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return True

"""Training and evaluation loops for pruned networks (lottery tickets, rewinding, fine-tuning).

Training is counted in **iterations** (optimizer steps), because rewinding needs iteration
granularity: :class:`TrainConfig` gives ``iterations`` or ``epochs`` (converted with
:meth:`TrainConfig.iterations_per_epoch`), and :class:`LRSchedule` gives the learning rate of
every iteration, so that ``train(..., start_iteration=k)`` replays the schedule from ``k``.

An epoch is ``len(dataset) // batch_size`` full batches (the remainder is left out, a new
random part of it every epoch; a dataset smaller than one batch is one batch). Epoch ``e``
visits a permutation drawn from a generator seeded with ``(seed, data_order_seed, e)``, so the
batch of iteration ``t`` depends on ``t`` and the seeds only: a run resumed at ``k`` sees the
batches an uninterrupted run sees, and a copy with another ``data_order_seed`` sees another
order (linear mode connectivity). Ops that draw random numbers in the model (dropout) draw from
torch's global generator reseeded for every iteration inside ``torch.random.fork_rng``; the
caller's random state is left as it was.

Determinism: on the CPU, with the same thread count, the same seeds give bit-identical weights
(convolutions, BatchNorm, cross-entropy and SGD have deterministic CPU kernels, so
``torch.use_deterministic_algorithms`` is not needed). On CUDA, bit-identity needs that
process-wide setting (and ``CUBLAS_WORKSPACE_CONFIG``), which this module leaves to the caller.

Each call to :func:`train` builds a fresh SGD optimizer: momentum starts from zero, as when
OpenLTH rewinds. Masks (parameter name -> bool keep-mask) keep pruned weights at exactly zero:
they are applied before the first step, masked gradients are zeroed before each step, and the
mask is applied again after it, so that momentum and weight decay cannot revive a weight.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.nn import functional

from benchlib.data import Dataset
from benchlib.errors import ConfigError, unknown_choice
from benchlib.models import Model

__all__ = [
    "SCHEDULES",
    "Evaluation",
    "LRSchedule",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "small_net_config",
    "train",
]

SCHEDULES = ("constant", "cosine", "multistep")
"""Learning-rate schedule names; each takes an optional linear warm-up."""

StateDict = dict[str, Tensor]


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """The learning rate of every iteration of a run of ``total`` iterations.

    ``lr_at(t)`` is the rate of the step that takes the weights from iteration ``t`` to
    ``t + 1``: ``warm(t) * main(t)``, where ``warm(t) = (t + 1) / warmup`` for ``t < warmup``
    (the first step is not wasted at rate 0; step ``warmup - 1`` runs at the full rate) and 1
    after, and ``main(t)`` is

    * constant: ``lr``;
    * multistep: ``lr * gamma ** m``, ``m`` the number of milestones ``<= t``;
    * cosine: ``lr * (1 + cos(pi * p)) / 2`` with ``p = (t - warmup) / (total - warmup)``
      clipped to [0, 1]: ``lr`` at the end of warm-up, 0 at ``total``.

    Raises:
        ConfigError: an unknown name, ``total`` < 1, a milestone or warm-up that does not fit.
    """

    name: str
    lr: float
    total: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise unknown_choice("schedule", self.name, SCHEDULES)
        if self.total < 1:
            raise ConfigError(f"a schedule needs total >= 1 iterations; got {self.total}")
        if self.warmup >= self.total and self.warmup > 0:
            raise ConfigError(
                f"warmup {self.warmup} must be below the {self.total} training iterations"
            )
        late = [m for m in self.milestones if m >= self.total]
        if late:
            raise ConfigError(
                f"milestone {late[0]} is not below the {self.total} training iterations "
                "(milestones count iterations, not epochs)"
            )

    def lr_at(self, iteration: int) -> float:
        """The learning rate of step ``iteration`` (0-based; any ``iteration`` >= 0)."""
        if iteration < 0:
            raise ConfigError(f"iteration must be >= 0; got {iteration}")
        warm = (iteration + 1) / self.warmup if iteration < self.warmup else 1.0
        if self.name == "multistep":
            drops = sum(1 for milestone in self.milestones if milestone <= iteration)
            return warm * self.lr * self.gamma**drops
        if self.name == "cosine":
            span = self.total - self.warmup
            progress = min(1.0, max(0.0, (iteration - self.warmup) / span))
            return warm * self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * self.lr

    def replay(self, start: int, stop: int | None = None) -> tuple[float, ...]:
        """The rates of steps ``start`` to ``stop - 1`` (``stop`` None: ``total``): what a run
        rewound to ``start`` uses (LR rewinding replays the tail of the original schedule)."""
        end = self.total if stop is None else stop
        return tuple(self.lr_at(t) for t in range(start, end))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters of an SGD run. Give exactly one of ``iterations`` and ``epochs``.

    Attributes:
        lr: the peak learning rate. momentum, nesterov, weight_decay: as ``torch.optim.SGD``
            (weight decay on every parameter, BatchNorm and biases included).
        batch_size: images per step.
        iterations, epochs: the length of the run (epochs: :meth:`total_iterations`).
        schedule: one of :data:`SCHEDULES`; ``milestones`` (iterations, strictly increasing;
            multistep only) and ``gamma`` (the factor at each milestone) shape multistep.
        warmup: iterations of linear warm-up (0: none).
        seed: drives the data order (with ``train``'s ``data_order_seed``) and in-model RNG.

    Raises:
        ConfigError: a value out of range or an unknown schedule; the message names it.
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    batch_size: int = 128
    iterations: int | None = None
    epochs: int | None = None
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number; got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1); got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov=True needs momentum > 0; got momentum 0")
        _check_count("batch_size", self.batch_size, minimum=1)
        if (self.iterations is None) == (self.epochs is None):
            raise ConfigError(
                "give exactly one of iterations and epochs; "
                f"got iterations={self.iterations}, epochs={self.epochs}"
            )
        if self.iterations is not None:
            _check_count("iterations", self.iterations, minimum=1)
        if self.epochs is not None:
            _check_count("epochs", self.epochs, minimum=1)
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        for milestone in self.milestones:
            _check_count("milestone", milestone, minimum=1)
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"milestones must strictly increase; got {self.milestones}")
        if self.milestones and self.schedule != "multistep":
            raise ConfigError(
                f"milestones {self.milestones} need schedule 'multistep'; got {self.schedule!r}"
            )
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ConfigError(f"gamma must be a positive number; got {self.gamma}")
        _check_count("warmup", self.warmup, minimum=0)
        _check_count("seed", self.seed, minimum=0)

    def iterations_per_epoch(self, examples: int) -> int:
        """Full batches in one pass over ``examples`` images (1 if fewer than a batch)."""
        return max(1, examples // self.batch_size)

    def total_iterations(self, examples: int) -> int:
        """``iterations``, or ``epochs`` passes over ``examples`` images."""
        if self.iterations is not None:
            return self.iterations
        return cast(int, self.epochs) * self.iterations_per_epoch(examples)

    def lr_schedule(self, examples: int) -> LRSchedule:
        """The schedule of a run over ``examples`` images.

        Raises:
            ConfigError: a milestone or the warm-up not below the run's iterations.
        """
        return LRSchedule(
            name=self.schedule,
            lr=self.lr,
            total=self.total_iterations(examples),
            milestones=self.milestones,
            gamma=self.gamma,
            warmup=self.warmup,
        )


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What :func:`train` did.

    Attributes:
        start_iteration, end_iteration: the run covered steps ``start`` to ``end - 1``; the
            weights are now those of iteration ``end_iteration``.
        losses: the mean training cross-entropy of each step's batch, before the step.
        lrs: the learning rate of each step.
        snapshots: iteration -> a copy of the model's ``state_dict`` (buffers included) at that
            iteration, for each requested ``save_at`` within ``[start, end]``.
        seconds: wall time of the loop.
    """

    start_iteration: int
    end_iteration: int
    losses: tuple[float, ...]
    lrs: tuple[float, ...]
    snapshots: Mapping[int, StateDict]
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Accuracy and loss of a model over a dataset.

    Attributes:
        top1, top5: fractions in [0, 1] (not percent); ``top5`` is top-``k`` with
            ``k = min(5, num_classes)``, given in ``k``.
        loss: the mean cross-entropy per image.
        count: images evaluated.
        source, synthetic: the dataset's; results on synthetic data must say so.
    """

    top1: float
    top5: float
    k: int
    loss: float
    count: int
    source: str
    synthetic: bool


def train(
    model: nn.Module | Model,
    dataset: Dataset,
    config: TrainConfig,
    *,
    start_iteration: int = 0,
    end_iteration: int | None = None,
    masks: Mapping[str, Tensor] | None = None,
    save_at: Collection[int] = (),
    callback: Callable[[int, nn.Module], None] | None = None,
    data_order_seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> TrainResult:
    """Train ``model`` in place with SGD from ``start_iteration`` to ``end_iteration``.

    ``end_iteration`` None is the config's total. The schedule is the config's over the whole
    run, whatever the start, so a start of ``k`` replays the tail from ``k``. The module trains
    in train mode, on the device of its first parameter, and is put back in the mode it had.
    Only parameters that require grad are optimized (frozen weights, as under a supermask,
    stay as they are).

    Args:
        masks: parameter name -> bool keep-mask of the parameter's shape (module-level names,
            as ``named_parameters`` gives them); pruned weights are zeroed at once and stay 0.
        save_at: iterations whose weights to copy into ``TrainResult.snapshots``; ``start``
            itself is the weights before the first step (masks applied).
        callback: called after every step with the number of the iteration reached and the
            module (in train mode); it may evaluate (``evaluate`` restores the mode).
        data_order_seed: varies the data order while ``config.seed`` stays fixed.
        progress: draw a rich progress bar (on ``console``, default stderr).

    Raises:
        ConfigError: an empty dataset, no trainable parameter, iterations out of order, a
            mask for an unknown parameter or of the wrong shape or dtype, a model whose number
            of outputs is not the dataset's classes, or a loss that is not finite (diverged).
    """
    module = model.module if isinstance(model, Model) else model
    parameters = dict(module.named_parameters())
    trainable = [parameter for parameter in parameters.values() if parameter.requires_grad]
    if not trainable:
        raise ConfigError("the model has no parameters to train (none requires grad)")
    if len(dataset) == 0:
        raise ConfigError(f"cannot train on {dataset.source}: it holds no images")
    schedule = config.lr_schedule(len(dataset))
    end = schedule.total if end_iteration is None else end_iteration
    if not 0 <= start_iteration <= end:
        raise ConfigError(
            f"need 0 <= start_iteration <= end_iteration; got {start_iteration}, {end}"
        )
    device = next(iter(parameters.values())).device
    keep = _check_masks(masks or {}, parameters)
    saves = frozenset(save_at)
    optimizer = torch.optim.SGD(
        trainable,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    was_training = module.training
    losses: list[float] = []
    lrs: list[float] = []
    snapshots: dict[int, StateDict] = {}
    bar = _progress_bar(console) if progress else None
    started = time.perf_counter()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        if bar is not None:
            task = bar.add_task("training", total=end - start_iteration)
            bar.start()
        module.train()
        _apply_masks(keep)
        if start_iteration in saves:
            snapshots[start_iteration] = _copy_state(module)
        order = _batch_order(len(dataset), config, data_order_seed, start_iteration)
        with torch.random.fork_rng(devices=rng_devices):
            for iteration in range(start_iteration, end):
                _seed_model_rng(_mix(config.seed, data_order_seed, iteration, "model"), device)
                indices = next(order)
                images = dataset.images[indices].to(device)
                labels = dataset.labels[indices].to(device)
                logits = _logits(module, images, dataset)
                loss = functional.cross_entropy(logits, labels)
                value = float(loss.item())
                if not math.isfinite(value):
                    raise ConfigError(
                        f"training diverged: loss {value} at iteration {iteration} "
                        f"(lr {schedule.lr_at(iteration):g}); lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                lr = schedule.lr_at(iteration)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                _mask_gradients(keep)
                optimizer.step()
                _apply_masks(keep)
                losses.append(value)
                lrs.append(lr)
                if iteration + 1 in saves:
                    snapshots[iteration + 1] = _copy_state(module)
                if callback is not None:
                    callback(iteration + 1, module)
                if bar is not None:
                    bar.update(task, advance=1, description=f"loss {value:.3f} lr {lr:.4g}")
    finally:
        if bar is not None:
            bar.stop()
        module.train(was_training)
    return TrainResult(
        start_iteration=start_iteration,
        end_iteration=end,
        losses=tuple(losses),
        lrs=tuple(lrs),
        snapshots=snapshots,
        seconds=time.perf_counter() - started,
    )


def small_net_config(
    *, epochs: int | None = 3, iterations: int | None = None, seed: int = 0
) -> TrainConfig:
    """The recipe measured for small CIFAR-style nets on digits (resnet20: 97-99% top-1 in
    about a second): SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, batch 64, cosine to
    0, no warm-up. ``iterations`` replaces ``epochs`` when given."""
    return TrainConfig(
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        batch_size=64,
        epochs=None if iterations is not None else epochs,
        iterations=iterations,
        schedule="cosine",
        seed=seed,
    )


def evaluate(model: nn.Module | Model, dataset: Dataset, batch_size: int = 256) -> Evaluation:
    """Top-1, top-``min(5, classes)`` accuracy and mean cross-entropy of ``model`` on
    ``dataset``, in eval mode without gradients (the module's mode is restored).

    Raises:
        ConfigError: an empty dataset, ``batch_size`` < 1, or a model whose number of outputs
            is not the dataset's classes.
    """
    module = model.module if isinstance(model, Model) else model
    _check_count("batch_size", batch_size, minimum=1)
    if len(dataset) == 0:
        raise ConfigError(f"cannot evaluate on {dataset.source}: it holds no images")
    device = _module_device(module)
    k = min(5, dataset.num_classes)
    top1 = top5 = 0
    loss = 0.0
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                images = dataset.images[start : start + batch_size].to(device)
                labels = dataset.labels[start : start + batch_size].to(device)
                logits = _logits(module, images, dataset)
                loss += float(functional.cross_entropy(logits, labels, reduction="sum"))
                hits = logits.topk(k, dim=1).indices == labels.unsqueeze(1)
                top1 += int(hits[:, 0].sum())
                top5 += int(hits.any(dim=1).sum())
    finally:
        module.train(was_training)
    count = len(dataset)
    return Evaluation(
        top1=top1 / count,
        top5=top5 / count,
        k=k,
        loss=loss / count,
        count=count,
        source=dataset.source,
        synthetic=dataset.synthetic,
    )


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _mix(*parts: object) -> int:
    """A 64-bit seed from several values (no arithmetic collisions such as 1 + 2 == 2 + 1)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _batch_order(
    examples: int, config: TrainConfig, data_order_seed: int, start: int
) -> Iterator[Tensor]:
    """The image indices of iterations ``start``, ``start + 1``, ... (endless)."""
    per_epoch = config.iterations_per_epoch(examples)
    size = min(config.batch_size, examples)
    epoch, offset = divmod(start, per_epoch)
    while True:
        generator = torch.Generator().manual_seed(_mix(config.seed, data_order_seed, epoch))
        permutation = torch.randperm(examples, generator=generator)
        for batch in range(offset, per_epoch):
            yield permutation[batch * size : (batch + 1) * size]
        epoch, offset = epoch + 1, 0


def _seed_model_rng(seed: int, device: torch.device) -> None:
    """Reseed the generator that in-model random ops (dropout) on ``device`` draw from."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def _check_masks(
    masks: Mapping[str, Tensor], parameters: Mapping[str, nn.Parameter]
) -> list[tuple[nn.Parameter, Tensor]]:
    """(parameter, pruned-positions) pairs, the masks moved to the parameters' devices."""
    pairs = []
    for name, mask in masks.items():
        if name not in parameters:
            listing = "the names named_parameters() gives"
            raise unknown_choice("masked parameter", name, parameters, listing=listing)
        parameter = parameters[name]
        if mask.dtype != torch.bool or mask.shape != parameter.shape:
            raise ConfigError(
                f"the mask of {name!r} must be bool of shape {tuple(parameter.shape)}; "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        pairs.append((parameter, ~mask.to(parameter.device)))
    return pairs


def _apply_masks(pruned: list[tuple[nn.Parameter, Tensor]]) -> None:
    with torch.no_grad():
        for parameter, off in pruned:
            parameter.masked_fill_(off, 0.0)


def _mask_gradients(pruned: list[tuple[nn.Parameter, Tensor]]) -> None:
    for parameter, off in pruned:
        if parameter.grad is not None:
            parameter.grad.masked_fill_(off, 0.0)


def _logits(module: nn.Module, images: Tensor, dataset: Dataset) -> Tensor:
    logits = module(images)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ConfigError("the model must return logits of shape (batch, classes)")
    if logits.shape[1] != dataset.num_classes:
        raise ConfigError(
            f"the model gives {logits.shape[1]} logits; {dataset.source} has "
            f"{dataset.num_classes} classes"
        )
    return logits


def _copy_state(module: nn.Module) -> StateDict:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _progress_bar(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        transient=True,
    )

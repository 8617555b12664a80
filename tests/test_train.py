"""The training loop: schedules, masks, determinism, snapshots, evaluation and config errors."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import Tensor, nn

from benchlib.data import Dataset, load_dataset
from benchlib.errors import ConfigError
from benchlib.models import Model
from benchlib.train import LRSchedule, TrainConfig, evaluate, train


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny nets: a second intra-op thread costs more than it saves, and its spinning stalls
    the run for seconds when another process holds the other core. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallNet(nn.Module):
    """conv -> BN -> ReLU -> dropout -> pool -> linear: BN buffers and in-model RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(torch.relu(self.bn(self.conv(x))))
        logits: Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return logits


def small_net(seed: int = 0) -> SmallNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallNet().eval()  # as the zoo builds models


def data(count: int = 40) -> Dataset:
    return load_dataset("synthetic", input_shape=(3, 6, 6), limit=count)


def config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = {"lr": 0.05, "batch_size": 8, "iterations": 12, "weight_decay": 0.01}
    return TrainConfig(**{**base, **changes})


def same_state(first: dict[str, Tensor], second: dict[str, Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# -- schedules -----------------------------------------------------------------------------------


def test_constant_schedule_with_linear_warmup() -> None:
    schedule = LRSchedule(name="constant", lr=0.1, total=20, warmup=4)
    assert [schedule.lr_at(t) for t in range(6)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]
    )
    assert schedule.lr_at(19) == 0.1


def test_multistep_drops_at_each_milestone() -> None:
    schedule = LRSchedule(name="multistep", lr=1.0, total=10, milestones=(3, 6), gamma=0.1)
    assert [schedule.lr_at(t) for t in range(10)] == pytest.approx(
        [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01]
    )
    warm = LRSchedule(name="multistep", lr=1.0, total=10, milestones=(1,), gamma=0.5, warmup=2)
    assert [warm.lr_at(t) for t in range(3)] == pytest.approx([0.5, 0.5, 0.5])


def test_cosine_endpoints_and_midpoint() -> None:
    plain = LRSchedule(name="cosine", lr=1.0, total=10)
    assert plain.lr_at(0) == 1.0
    assert plain.lr_at(5) == pytest.approx(0.5)
    assert plain.lr_at(9) == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2)
    assert plain.lr_at(10) == pytest.approx(0.0)
    warm = LRSchedule(name="cosine", lr=1.0, total=10, warmup=2)
    assert [warm.lr_at(t) for t in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert warm.lr_at(10) == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["constant", "multistep", "cosine"])
def test_replay_from_k_is_the_original_tail(name: str) -> None:
    milestones = (5, 9) if name == "multistep" else ()
    schedule = LRSchedule(name=name, lr=0.1, total=12, milestones=milestones, warmup=3)
    full = schedule.replay(0)
    assert len(full) == 12
    for k in range(13):
        assert schedule.replay(k) == full[k:]


def test_epochs_become_iterations() -> None:
    cfg = config(iterations=None, epochs=3, schedule="multistep", milestones=(10,))
    assert cfg.iterations_per_epoch(40) == 5  # full batches only
    assert cfg.iterations_per_epoch(5) == 1  # smaller than a batch: one batch
    assert cfg.total_iterations(43) == 15
    assert cfg.lr_schedule(43).total == 15
    with pytest.raises(ConfigError, match="milestone 10 is not below the 6"):
        cfg.lr_schedule(16)


# -- training ------------------------------------------------------------------------------------


def test_masked_weights_stay_exactly_zero_with_momentum_and_weight_decay() -> None:
    model = small_net()
    generator = torch.Generator().manual_seed(1)
    masks = {
        name: torch.rand(param.shape, generator=generator) > 0.5
        for name, param in model.named_parameters()
        if name in ("conv.weight", "fc.weight")
    }
    before = copy.deepcopy(model.state_dict())
    train(model, data(), config(momentum=0.9, weight_decay=0.5, nesterov=True), masks=masks)
    for name, keep in masks.items():
        weight = model.get_parameter(name).detach()
        assert torch.all(weight[~keep] == 0)
        assert torch.all(weight[keep] != before[name][keep])  # the kept ones trained


def test_same_seed_is_bit_identical_and_data_order_seed_changes_it() -> None:
    rng_before = torch.get_rng_state()
    runs = [small_net() for _ in range(3)]
    train(runs[0], data(), config(momentum=0.9), progress=False)
    train(runs[1], data(), config(momentum=0.9), progress=False)
    train(runs[2], data(), config(momentum=0.9), progress=False, data_order_seed=1)
    assert same_state(runs[0].state_dict(), runs[1].state_dict())
    assert not torch.equal(runs[0].fc.weight, runs[2].fc.weight)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert not runs[0].training  # the mode it had


def test_snapshots_equal_the_weights_after_exactly_k_steps() -> None:
    model = small_net()
    result = train(model, data(), config(momentum=0.9), save_at={0, 5, 12}, progress=False)
    assert sorted(result.snapshots) == [0, 5, 12]
    assert same_state(result.snapshots[0], small_net().state_dict())
    short = small_net()
    train(short, data(), config(momentum=0.9), end_iteration=5, progress=False)
    assert same_state(result.snapshots[5], short.state_dict())
    assert same_state(result.snapshots[12], model.state_dict())
    assert (result.start_iteration, result.end_iteration, len(result.losses)) == (0, 12, 12)


def test_resuming_at_k_replays_the_data_and_the_schedule() -> None:
    # Without momentum a fresh optimizer has no state, so resuming is exact.
    cfg = config(momentum=0.0, schedule="cosine", warmup=3)
    whole, resumed = small_net(), small_net()
    full = train(whole, data(), cfg, progress=False)
    train(resumed, data(), cfg, end_iteration=7, progress=False)
    tail = train(resumed, data(), cfg, start_iteration=7, progress=False)
    assert same_state(whole.state_dict(), resumed.state_dict())
    assert tail.lrs == cfg.lr_schedule(len(data())).replay(7) == full.lrs[7:]
    assert tail.losses == full.losses[7:]


def test_frozen_parameters_stay_as_they_are() -> None:
    model = small_net()
    model.conv.weight.requires_grad_(False)
    before = model.conv.weight.detach().clone()
    train(model, data(), config(), progress=False)
    assert torch.equal(model.conv.weight, before)
    assert not torch.equal(model.fc.weight, small_net().fc.weight)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameters to train"):
        train(model, data(), config(), progress=False)


def test_callback_sees_every_iteration_and_may_evaluate() -> None:
    seen: list[tuple[int, bool]] = []

    def callback(iteration: int, module: nn.Module) -> None:
        evaluate(module, data(8))
        seen.append((iteration, module.training))

    train(small_net(), data(), config(iterations=4), start_iteration=1, callback=callback)
    assert seen == [(2, True), (3, True), (4, True)]


def test_progress_bar_goes_to_the_console_and_nothing_is_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = StringIO()
    console = Console(file=out, width=100, color_system=None, force_terminal=True)
    train(small_net(), data(), config(iterations=3), console=console)
    train(small_net(), data(), config(iterations=3), progress=False)
    assert "3/3" in out.getvalue()
    assert capsys.readouterr() == ("", "")


def test_training_accepts_a_model_and_errors_name_the_problem() -> None:
    model = Model(name="small", module=small_net(), input_shape=(3, 6, 6), source="factory")
    assert train(model, data(), config(iterations=2), progress=False).end_iteration == 2
    bad_masks: list[tuple[dict[str, Tensor], str]] = [
        ({"fc.wieght": torch.ones(10, 24, dtype=torch.bool)}, "did you mean 'fc.weight'"),
        ({"fc.weight": torch.ones(10, 24)}, "must be bool of shape"),
        ({"fc.weight": torch.ones(24, 10, dtype=torch.bool)}, r"\(10, 24\)"),
    ]
    for masks, message in bad_masks:
        with pytest.raises(ConfigError, match=message):
            train(small_net(), data(), config(), masks=masks, progress=False)
    with pytest.raises(ConfigError, match="start_iteration <= end_iteration; got 5, 3"):
        train(small_net(), data(), config(), start_iteration=5, end_iteration=3)
    three = Dataset(
        images=torch.zeros(4, 3, 6, 6),
        labels=torch.zeros(4, dtype=torch.int64),
        num_classes=3,
        source="three",
        synthetic=False,
    )
    with pytest.raises(ConfigError, match="gives 10 logits; three has 3 classes"):
        train(small_net(), three, config(), progress=False)
    with pytest.raises(ConfigError, match="diverged"):
        train(small_net(), data(), config(lr=1e30), progress=False)


# -- evaluation ----------------------------------------------------------------------------------


class Lookup(nn.Module):
    """Returns row ``i`` of ``table`` for an image whose pixel is ``i``."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = nn.Buffer(table)

    def forward(self, x: Tensor) -> Tensor:
        return self.table[x.flatten(1)[:, 0].long()]


def lookup_case(labels: list[int], classes: int) -> Dataset:
    return Dataset(
        images=torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1),
        labels=torch.tensor(labels),
        num_classes=classes,
        source="hand-built",
        synthetic=True,
    )


def test_evaluate_top1_top5_and_loss_by_hand() -> None:
    # Logits rank the classes 0 > 1 > ... > 6 for every image.
    table = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]]).repeat(4, 1)
    dataset = lookup_case([0, 3, 4, 6], classes=7)  # ranks 1, 4, 5, 7
    module = Lookup(table).train()
    result = evaluate(module, dataset, batch_size=3)
    log_z = math.log(sum(math.exp(v) for v in range(7)))
    expected_loss = sum(log_z - (6 - label) for label in (0, 3, 4, 6)) / 4
    assert (result.top1, result.top5, result.k, result.count) == (0.25, 0.75, 5, 4)
    assert result.loss == pytest.approx(expected_loss)
    assert result.synthetic and result.source == "hand-built"
    assert module.training  # the mode it had

    few = evaluate(Lookup(torch.tensor([[0.0, 1, 2]]).repeat(2, 1)), lookup_case([2, 0], 3))
    assert (few.top1, few.top5, few.k) == (0.5, 1.0, 3)


# -- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": 0.0}, "lr must be a positive number; got 0.0"),
        ({"lr": math.nan}, "lr must be a positive number; got nan"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\); got 1.0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0; got -0.0001"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov=True needs momentum > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
        ({"iterations": None}, "exactly one of iterations and epochs; got iterations=None"),
        ({"epochs": 2}, "exactly one of iterations and epochs; got iterations=12, epochs=2"),
        ({"iterations": 2.5}, "iterations must be an integer >= 1; got 2.5"),
        ({"schedule": "cosin"}, "unknown schedule 'cosin'; choose from: constant, cosine, mult"),
        ({"schedule": "multistep", "milestones": (6, 3)}, r"strictly increase; got \(6, 3\)"),
        ({"milestones": (3,)}, "need schedule 'multistep'; got 'constant'"),
        ({"gamma": 0.0}, "gamma must be a positive number; got 0.0"),
        ({"warmup": -1}, "warmup must be an integer >= 0; got -1"),
        ({"seed": True}, "seed must be an integer >= 0; got True"),
    ],
)
def test_bad_configs_raise_one_line_config_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config(**changes)
    assert "\n" not in str(caught.value)


def test_bad_schedules_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="warmup 12 must be below the 12 training iterations"):
        config(warmup=12).lr_schedule(40)
    with pytest.raises(ConfigError, match="iteration must be >= 0; got -1"):
        LRSchedule(name="constant", lr=0.1, total=3).lr_at(-1)
    with pytest.raises(ConfigError, match="unknown schedule 'step'"):
        LRSchedule(name="step", lr=0.1, total=3)
    with pytest.raises(ConfigError, match="cannot evaluate on empty: it holds no images"):
        empty = Dataset(
            images=torch.zeros(0, 3, 6, 6),
            labels=torch.zeros(0, dtype=torch.int64),
            num_classes=10,
            source="empty",
            synthetic=False,
        )
        evaluate(small_net(), empty)

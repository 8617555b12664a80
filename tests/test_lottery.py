"""Lottery tickets: exact IMP counts, restarts, criteria, the control, LMC, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchlib.cli import bench
from benchlib.data import load_dataset
from benchlib.errors import ConfigError
from benchlib.loading import load_model
from benchlib.pruning.lmc import instability, interpolate, linear_mode_connectivity
from benchlib.pruning.lottery import (
    ImpResult,
    mask_scores,
    parameter_masks,
    parse_strategy,
    prune_remaining,
    run_imp,
)
from benchlib.train import TrainConfig, evaluate
from tests.conftest import TinyNet

LAYERS = ["conv2"]  # TinyNet's prunable layer (first conv and classifier excluded)
CONFIG = TrainConfig(lr=0.05, momentum=0.9, batch_size=32, iterations=8, schedule="cosine")


def datasets() -> tuple[object, object]:
    shape = (3, 16, 16)
    train_set = load_dataset("synthetic", split="train", input_shape=shape, limit=64)
    test_set = load_dataset("synthetic", split="test", input_shape=shape, limit=32)
    return train_set, test_set


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def imp(strategy: str, levels: int = 2, **kwargs: object) -> tuple[TinyNet, ImpResult, dict]:
    model = tiny()
    theta0 = {n: v.clone() for n, v in model.state_dict().items()}
    train_set, test_set = datasets()
    result = run_imp(
        model,
        train_set,  # type: ignore[arg-type]
        test_set,  # type: ignore[arg-type]
        CONFIG,
        levels=levels,
        strategy=strategy,
        layers=LAYERS,
        example=torch.randn(1, 3, 16, 16),
        keep_states=True,
        **kwargs,  # type: ignore[arg-type]
    )
    return model, result, theta0


def test_prune_remaining_prunes_ceil_of_a_fifth_of_the_remaining_each_level() -> None:
    scores = {"a": torch.rand(7, 3), "b": torch.rand(13)}
    masks = None
    remaining = 34
    for _ in range(6):
        masks = prune_remaining(scores, masks)
        remaining -= math.ceil(0.2 * remaining)
        assert sum(int(m.sum()) for m in masks.values()) == remaining
    assert masks is not None and masks["a"].shape == (7, 3)


def test_prune_remaining_keeps_strictly_larger_scores_and_counts_exactly_under_ties() -> None:
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])}
    masks = prune_remaining(scores, None, 0.4)  # n = 2: both 1.0s go
    assert masks["a"].tolist() == [True, False, True, False, True]
    tied = prune_remaining({"a": torch.ones(5)}, None, 0.2)  # n = 1 among equal scores
    assert tied["a"].tolist() == [False, True, True, True, True]
    again = prune_remaining(scores, masks, 0.34)  # ceil(0.34 * 3) = 2 of the survivors
    assert again["a"].tolist() == [False, False, False, False, True]


def test_criteria_rank_as_defined() -> None:
    final = {"w": torch.tensor([0.5, -2.0, 1.0, 0.1])}
    initial = {"w": torch.tensor([0.1, -3.0, 0.2, 0.0])}
    lowest = {
        "large_final": 3,  # |w_f| = 0.1
        "large_init": 3,  # |w_i| = 0
        "magnitude_increase": 1,  # 2 - 3 = -1
    }
    for criterion, index in lowest.items():
        masks = prune_remaining(mask_scores(criterion, final, initial), None, 0.25)
        assert masks["w"].tolist() == [i != index for i in range(4)], criterion
    init_order = prune_remaining(mask_scores("large_init", final, initial), None, 0.5)
    assert init_order["w"].tolist() == [False, True, True, False]
    one = mask_scores("random", final, initial, seed=3)["w"]
    assert torch.equal(one, mask_scores("random", final, initial, seed=3)["w"])
    assert not torch.equal(one, mask_scores("random", final, initial, seed=4)["w"])
    with pytest.raises(ConfigError, match="large_final"):
        mask_scores("largest", final, initial)


def test_imp_density_after_levels_is_the_exact_ceil_count() -> None:
    model, result, _ = imp("reset", levels=3)
    total = model.conv2.weight.numel()
    remaining = total
    for entry in result.levels[1:]:
        pruned = math.ceil(0.2 * remaining)
        remaining -= pruned
        assert entry.pruned == pruned
        assert entry.remaining == remaining
        assert entry.density == remaining / total
    assert abs(result.levels[-1].density - 0.8**3) < 2 / total
    assert int((model.conv2.weight != 0).sum()) <= remaining  # masks stay applied
    assert not bool((model.conv2.weight[~result.masks["conv2"]] != 0).any())
    assert result.levels[-1].nonzero_macs < result.levels[0].nonzero_macs


def test_reset_restarts_the_survivors_at_theta_0_exactly() -> None:
    _, result, theta0 = imp("reset", levels=2)
    for start in result.start_states:
        weight = start["conv2.weight"]
        kept = weight != 0
        assert torch.equal(weight[kept], theta0["conv2.weight"][kept])
        assert torch.equal(start["conv1.weight"], theta0["conv1.weight"])
    first = result.start_states[0]["conv2.weight"]
    assert int((first != 0).sum()) == result.levels[1].remaining


def test_rewind_restarts_at_the_iteration_k_snapshot() -> None:
    _, result, theta0 = imp("rewind:3", levels=2)
    assert result.rewind_state is not None
    snapshot = result.rewind_state
    assert not torch.equal(snapshot["conv2.weight"], theta0["conv2.weight"])
    for start in result.start_states:
        for name, value in start.items():
            if name == "conv2.weight":
                kept = value != 0
                assert torch.equal(value[kept], snapshot[name][kept])
            else:
                assert torch.equal(value, snapshot[name]), name


def test_lr_rewind_and_finetune_keep_the_final_weights() -> None:
    for strategy in ("lr-rewind:2", "finetune"):
        _, result, theta0 = imp(strategy, levels=1)
        start = result.start_states[0]["conv1.weight"]
        assert not torch.equal(start, theta0["conv1.weight"]), strategy


def test_random_reinit_control_changes_the_survivors_but_keeps_the_masks() -> None:
    model, result, _ = imp("reset", levels=1, control=True)
    assert result.levels[1].control_top1 is not None
    assert result.levels[0].control_top1 is None
    from benchlib.pruning.lottery import _control

    train_set, _ = datasets()
    twin = _control(model, None, 7, result.masks, train_set, CONFIG)  # type: ignore[arg-type]
    weight = twin.get_submodule("conv2").weight
    assert torch.equal(weight != 0, result.masks["conv2"])
    assert not torch.equal(weight, model.conv2.weight)


def test_parse_strategy_and_its_errors() -> None:
    assert str(parse_strategy("rewind:20")) == "rewind:20"
    assert parse_strategy("lr-rewind:5").k == 5
    assert parse_strategy("finetune").kind == "finetune"
    for bad in ("rewind:x", "rewind", "reset:3", "warp"):
        with pytest.raises(ConfigError, match="reset"):
            parse_strategy(bad)


def test_instability_of_a_fake_error_curve() -> None:
    assert instability([0.10, 0.30, 0.50, 0.20]) == pytest.approx(0.50 - 0.15)
    assert instability([0.1, 0.05, 0.1]) == pytest.approx(0.0)
    with pytest.raises(ConfigError):
        instability([0.1])


def test_interpolate_mixes_floats_and_takes_integer_buffers_from_the_first() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    mixed = interpolate(a, b, 0.25)
    assert torch.equal(mixed["w"], torch.tensor([2.5, 5.0]))
    assert int(mixed["n"]) == 5
    assert torch.equal(interpolate(a, b, 1.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 0.0)["w"], b["w"])


@pytest.mark.parametrize("sparse", [False, True])
def test_lmc_endpoints_reproduce_each_copys_own_error(sparse: bool) -> None:
    model = tiny()
    train_set, test_set = datasets()
    masks = None
    if sparse:
        scores = {"conv2": model.conv2.weight.detach().abs()}
        masks = parameter_masks(prune_remaining(scores, None, 0.5))
    result = linear_mode_connectivity(
        model,
        train_set,  # type: ignore[arg-type]
        test_set,  # type: ignore[arg-type]
        CONFIG,
        k=2,
        masks=masks,
        points=5,
    )
    assert result.errors[-1] == result.error_first
    assert result.errors[0] == result.error_second
    assert len(result.alphas) == 5 and result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    assert result.instability == instability(result.errors)
    assert result.density == (0.5 if sparse else 1.0)
    assert evaluate(model, test_set).count == 32  # type: ignore[arg-type]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "160"}).invoke(bench, list(args))
    return result.exit_code, result.output


def test_cli_lottery_on_digits_writes_json(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    code, output = invoke(
        "lottery", "--model", "resnet20", "--input-size", "8", "--levels", "1",
        "--iterations", "4", "--strategy", "rewind:1", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, output
    assert "80.00%" in output and "nonzero MACs" in output
    (folder,) = tmp_path.iterdir()
    record = json.loads((folder / "lottery.json").read_text())
    # the last level's ticket, masks baked in, is a model bench run can measure
    ticket = load_model(str(folder / "ticket.pt"))
    assert ticket.input_shape == (3, 8, 8)
    weights = dict(ticket.module.named_parameters())
    pruned = [weights[f"{name}.weight"] for name in record["layers"]]
    kept = sum(int((w != 0).sum()) for w in pruned)
    total = sum(w.numel() for w in pruned)
    assert total - kept == math.ceil(0.2 * total)  # one level: 20% of them, globally


def test_cli_lmc_on_digits(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    code, output = invoke(
        "lmc", "--model", "resnet20", "--input-size", "8", "--iterations", "4", "--k", "1",
        "--points", "3", "--density", "0.5", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, output
    assert "instability" in output
    (folder,) = tmp_path.iterdir()
    assert (folder / "lmc.json").is_file()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("lottery", "--strategy", "rewind:x"), "rewind:x"),
        (("lottery", "--strategy", "warp"), "warp"),
        (("lottery", "--criterion", "biggest"), "biggest"),
        (("lmc", "--k", "-1", "--iterations", "4"), "-1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: tuple[str, ...], named: str) -> None:
    code, output = invoke(args[0], "--model", "resnet20", "--input-size", "8", *args[1:])
    assert code == 2
    lines = output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("error:")

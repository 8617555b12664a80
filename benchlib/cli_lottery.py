"""``bench lottery`` and ``bench lmc``: lottery tickets and linear mode connectivity from the
command line (the library side is :mod:`benchlib.pruning.lottery` and :mod:`benchlib.pruning.lmc`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from benchlib.archive import save_module
from benchlib.cli_common import OUT_ROOT, F, handle_errors, si_count
from benchlib.data import Dataset, load_dataset
from benchlib.errors import ConfigError
from benchlib.loading import load_model
from benchlib.models import Model, build_model, is_zoo_name
from benchlib.pruning.lmc import linear_mode_connectivity
from benchlib.pruning.lottery import (
    Strategy,
    check_criterion,
    parameter_masks,
    parse_strategy,
    plot_accuracy_density,
    prune_remaining,
    run_imp,
)
from benchlib.pruning.spec import parse_spec
from benchlib.pruning.unstructured import layer_weights, prunable_layers
from benchlib.train import TrainConfig, small_net_config, train

__all__ = ["lmc", "lottery"]


def _lottery_setup(
    model_ref: str,
    data: str,
    input_size: int | None,
    epochs: int,
    iterations: int | None,
    seed: int,
) -> tuple[Model, Dataset, Dataset, TrainConfig]:
    """The model (seeded), train and test splits, and the SGD config of the lottery commands
    (:func:`benchlib.train.small_net_config`)."""

    if epochs < 1 or (iterations is not None and iterations < 1):
        raise ConfigError(f"--epochs and --iterations must be >= 1; got {epochs}, {iterations}")
    if is_zoo_name(model_ref):
        model = build_model(model_ref, input_size=input_size, seed=seed)
    else:
        model = load_model(model_ref, input_size=input_size)
    shape = model.input_shape
    if len(shape) != 3:
        raise ConfigError(f"model {model_ref!r} takes input {shape}; images need (C, H, W)")
    train_set = load_dataset(data, split="train", input_shape=shape, seed=seed)
    test_set = load_dataset(data, split="test", input_shape=shape, seed=seed)
    config = small_net_config(epochs=epochs, iterations=iterations, seed=seed)
    return model, train_set, test_set, config


def _run_folder(out_root: Path, kind: str) -> Path:

    folder = out_root / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = out_root / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    folder.mkdir(parents=True)
    return folder


_LOTTERY_OPTIONS = [
    click.option("--model", "model_ref", required=True, help="A zoo name or module:function."),
    click.option("--data", default="digits", show_default=True, help="digits or a folder."),
    click.option("--input-size", type=int, help="Square input side (default: the model's)."),
    click.option("--epochs", type=int, default=3, show_default=True, help="Epochs per run."),
    click.option("--iterations", type=int, help="Iterations per run, instead of --epochs."),
    click.option("--seed", type=int, default=0, show_default=True, help="Init and data seed."),
    OUT_ROOT,
]


def _lottery_options(command: F) -> F:
    for option in reversed(_LOTTERY_OPTIONS):
        command = option(command)
    return command


@click.command()
@_lottery_options
@click.option("--levels", type=int, default=3, show_default=True, help="IMP levels (0.8^L).")
@click.option(
    "--strategy",
    default="rewind:10",
    show_default=True,
    help="reset, rewind:K, lr-rewind:K (K an iteration) or finetune.",
)
@click.option(
    "--criterion",
    default="large_final",
    show_default=True,
    help="large_final, magnitude_increase, large_init or random.",
)
@click.option("--control", is_flag=True, help="Also train the random-reinit control per level.")
@handle_errors
def lottery(
    model_ref: str,
    data: str,
    input_size: int | None,
    epochs: int,
    iterations: int | None,
    seed: int,
    out_root: Path,
    levels: int,
    strategy: str,
    criterion: str,
    control: bool,
) -> None:
    """Iterative magnitude pruning (lottery tickets): per level the density, test accuracy and
    nonzero MACs; lottery.json and an accuracy-density plot go to a run folder."""

    plan = parse_strategy(strategy)
    check_criterion(criterion)
    if levels < 0:
        raise ConfigError(f"--levels must be >= 0; got {levels}")
    model, train_set, test_set, config = _lottery_setup(
        model_ref, data, input_size, epochs, iterations, seed
    )
    total = config.total_iterations(len(train_set))
    if plan.k >= total:
        raise ConfigError(
            f"--strategy {strategy!r}: K={plan.k} must be below the {total} training iterations"
        )
    module = model.module
    example = model.example_input(1)
    layers = prunable_layers(module, example, parse_spec("magnitude:0.5"))
    fresh = None
    if is_zoo_name(model_ref):
        size = model.input_shape[-1]
        fresh = lambda s: build_model(model_ref, input_size=size, seed=s).module  # noqa: E731
    console = Console()
    table = Table(title=f"IMP {model.name} on {train_set.source}: {plan}, {criterion}")
    for column in ("level", "density", "test top-1", "nonzero MACs", "seconds"):
        table.add_column(column, justify="right")
    if control:
        table.add_column("random reinit top-1", justify="right")
    result = run_imp(
        module,
        train_set,
        test_set,
        config,
        levels=levels,
        strategy=plan,
        layers=layers,
        example=example,
        criterion=criterion,
        control=control,
        fresh=fresh,
        seed=seed,
        progress=True,
    )
    for entry in result.levels:
        row = [
            str(entry.level),
            f"{entry.density:.2%}",
            f"{entry.top1:.2%}",
            si_count(entry.nonzero_macs),
            f"{entry.seconds:.1f}",
        ]
        if control:
            row.append("-" if entry.control_top1 is None else f"{entry.control_top1:.2%}")
        table.add_row(*row)
    console.print(table)
    folder = _run_folder(out_root, "lottery")
    record = {
        "model": model.name,
        "data": train_set.source,
        "synthetic": train_set.synthetic,
        "input_shape": list(model.input_shape),
        "config": dataclasses.asdict(config),
        **result.to_dict(),
    }
    (folder / "lottery.json").write_text(json.dumps(record, indent=2))
    ticket = save_module(
        module,
        example,
        folder / "ticket.pt",
        {
            "input_shape": list(model.input_shape),
            "model": model.name,
            "spec": f"lottery:{plan}[criterion={criterion},levels={levels}]",
            "density": result.levels[-1].density if result.levels else 1.0,
            "data": train_set.source,
            "synthetic": train_set.synthetic,
        },
    )
    console.print(
        f"wrote the last level's ticket {ticket} (masks baked in); benchmark it: "
        f"bench run --models {ticket} --prune dense"
    )
    if plot_accuracy_density([record], folder / "lottery.png"):
        console.print(f"wrote {folder / 'lottery.json'} and {folder / 'lottery.png'}")
    else:
        console.print(
            f"wrote {folder / 'lottery.json'}; no plot: matplotlib is not installed "
            "(pip install 'benchlib[plots]')"
        )


@click.command()
@_lottery_options
@click.option("--k", "k", type=int, default=0, show_default=True, help="Iteration to fork at.")
@click.option("--levels", type=int, help="Sparse LMC: masks from IMP (rewind:K) at L levels.")
@click.option("--density", "target_density", type=float, help="Sparse LMC: one-shot density.")
@click.option("--points", type=int, default=30, show_default=True, help="Alphas on the path.")
@handle_errors
def lmc(
    model_ref: str,
    data: str,
    input_size: int | None,
    epochs: int,
    iterations: int | None,
    seed: int,
    out_root: Path,
    k: int,
    levels: int | None,
    target_density: float | None,
    points: int,
) -> None:
    """Linear mode connectivity: two copies from iteration --k with other data orders; the
    test error along the linear path and the instability; lmc.json goes to a run folder."""

    if levels is not None and target_density is not None:
        raise ConfigError("give --levels or --density, not both")
    if levels is not None and levels < 1:
        raise ConfigError(f"--levels must be >= 1; got {levels}")
    if target_density is not None and not 0.0 < target_density < 1.0:
        raise ConfigError(f"--density must be in (0, 1); got {target_density}")
    if points < 2:
        raise ConfigError(f"--points must be >= 2; got {points}")
    model, train_set, test_set, config = _lottery_setup(
        model_ref, data, input_size, epochs, iterations, seed
    )
    total = config.total_iterations(len(train_set))
    if not 0 <= k < total:
        raise ConfigError(f"--k must be in [0, {total}) (the run's iterations); got {k}")
    module = model.module
    masks = None
    start_state = None
    if levels is not None or target_density is not None:
        example = model.example_input(1)
        layers = prunable_layers(module, example, parse_spec("magnitude:0.5"))
        if levels is not None:
            imp = run_imp(
                module,
                train_set,
                test_set,
                config,
                levels=levels,
                strategy=Strategy("rewind", k),
                layers=layers,
                example=example,
                progress=True,
            )
            layer_masks = imp.masks
            start_state = imp.rewind_state
        else:
            assert target_density is not None
            dense = train(module, train_set, config, save_at={k}, progress=True)
            weights = layer_weights(module)
            scores = {name: weights[name].detach().abs() for name in layers}
            layer_masks = prune_remaining(scores, None, 1.0 - target_density)
            start_state = dense.snapshots[k]
        masks = parameter_masks(layer_masks)
    result = linear_mode_connectivity(
        module,
        train_set,
        test_set,
        config,
        k=k,
        masks=masks,
        start_state=start_state,
        points=points,
        progress=True,
    )
    console = Console()
    table = Table(title=f"LMC {model.name} on {train_set.source} from iteration {k}")
    table.add_column("alpha", justify="right")
    table.add_column("test error", justify="right")
    for alpha, error in zip(result.alphas, result.errors, strict=True):
        table.add_row(f"{alpha:.3f}", f"{error:.2%}")
    console.print(table)
    verdict = "stable" if result.stable else "unstable"
    console.print(
        f"density {result.density:.2%}; endpoint errors {result.error_first:.2%} / "
        f"{result.error_second:.2%}; instability {result.instability:.2%} ({verdict}, "
        "stable below 2%)"
    )
    folder = _run_folder(out_root, "lmc")
    record = {
        "model": model.name,
        "data": train_set.source,
        "synthetic": train_set.synthetic,
        "config": dataclasses.asdict(config),
        "levels": levels,
        "target_density": target_density,
        **result.to_dict(),
    }
    (folder / "lmc.json").write_text(json.dumps(record, indent=2))
    console.print(f"wrote {folder / 'lmc.json'}")

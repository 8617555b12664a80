"""A CIFAR-style net trained on scikit-learn's digits: test accuracy and wall time (issue 4).

Run ``python benchmarks/train_digits.py``; exit status 0 when every seed reaches at least
``--min-accuracy`` (default 95%) top-1 on the held-out test split within ``--limit`` seconds
(default 180), 1 otherwise.

Workload: ``resnet20`` (He et al.'s CIFAR ResNet, 0.27 M params, option-A shortcuts) built by
``build_model(..., input_size=8, seed=s)``; digits at their own 8x8 resolution, repeated to 3
channels (``load_dataset("digits", input_shape=(3, 8, 8))``: 1438 train, 359 test images;
the CIFAR ResNets take any size, and 8x8 trains fastest: upsampled to 16x16 or 32x32 the
same recipe reaches 96-99.7% too, about 2 and 6 times slower). SGD with Nesterov momentum
0.9, weight decay 5e-4, batch 64, lr 0.1, cosine to 0 over 3 epochs (66 iterations; 2 epochs
leave less margin, 1 epoch gives 84-94%), no warm-up. ``--seeds`` seed the model and the data
order. The wall time of a seed covers loading both splits, building the model,
training and evaluating.

The CPU time training got per wall second and thread is printed: under 90%, other
processes took the cores (two spinning intra-op threads on a shared core slow training many
times over) and the seed is flagged.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from benchlib.data import load_dataset
from benchlib.models import build_model
from benchlib.train import Evaluation, TrainConfig, evaluate, small_net_config, train

# The hyperparameters found for the acceptance (see the module docstring).
DEFAULTS = small_net_config()


@dataclass(frozen=True)
class DigitsRun:
    """One seed: test accuracy, the wall time of the whole run and of training alone, and the
    CPU time training got per wall second and thread."""

    seed: int
    evaluation: Evaluation
    iterations: int
    wall_s: float
    train_s: float
    cpu_share: float


def run_digits(
    *,
    model: str = "resnet20",
    input_size: int = 8,
    config: TrainConfig = DEFAULTS,
    seed: int = 0,
    progress: bool = False,
) -> DigitsRun:
    """Load digits, build ``model``, train it with ``config`` (reseeded with ``seed``), evaluate
    on the test split."""
    started = time.perf_counter()
    shape = (3, input_size, input_size)
    train_set = load_dataset("digits", split="train", input_shape=shape)
    test_set = load_dataset("digits", split="test", input_shape=shape)
    net = build_model(model, input_size=input_size, seed=seed)
    run_config = replace(config, seed=seed)
    cpu_started = time.process_time()
    result = train(net, train_set, run_config, progress=progress)
    cpu = time.process_time() - cpu_started
    evaluation = evaluate(net, test_set)
    wall = time.perf_counter() - started
    return DigitsRun(
        seed=seed,
        evaluation=evaluation,
        iterations=result.end_iteration,
        wall_s=wall,
        train_s=result.seconds,
        cpu_share=cpu / (result.seconds * torch.get_num_threads()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    parser.add_argument("--schedule", default=DEFAULTS.schedule)
    parser.add_argument("--warmup", type=int, default=DEFAULTS.warmup)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--min-accuracy", type=float, default=0.95)
    parser.add_argument("--limit", type=float, default=180.0, help="seconds per seed")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = replace(
        DEFAULTS,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup=args.warmup,
    )
    print(
        f"{args.model} at {args.input_size}x{args.input_size} on digits, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n{config}"
    )
    passed = True
    for seed in (int(part) for part in args.seeds.split(",")):
        run = run_digits(
            model=args.model,
            input_size=args.input_size,
            config=config,
            seed=seed,
            progress=args.progress,
        )
        ok = run.evaluation.top1 >= args.min_accuracy and run.wall_s <= args.limit
        passed = passed and ok
        busy = "" if run.cpu_share >= 0.9 else f"  BUSY MACHINE (cpu share {run.cpu_share:.0%})"
        print(
            f"seed {seed}: test top-1 {run.evaluation.top1:.2%}, "
            f"top-{run.evaluation.k} {run.evaluation.top5:.2%} "
            f"({run.evaluation.count} images), {run.iterations} iterations, "
            f"wall {run.wall_s:.1f} s (training {run.train_s:.1f} s) "
            f"{'PASS' if ok else 'FAIL'}{busy}"
        )
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

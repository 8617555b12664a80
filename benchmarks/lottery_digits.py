"""Lottery tickets on scikit-learn's digits: IMP with weight rewinding and the random-reinit
control, and a supermask over a frozen random network (issue 4's acceptance).

Run ``python benchmarks/lottery_digits.py``; exit status 0 when, for every seed, IMP with
weight rewinding at 3 levels (density 0.8^3 = 51.2% of the pruned layers) stays within 1 point
of the dense network's test top-1, and the supermask reaches at least 60%; 1 otherwise.

Workload: ``resnet20`` at 8x8 on digits (1438 train, 359 held-out test images), trained as
``benchmarks/train_digits.py`` does (SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 64,
lr 0.1, cosine over 3 epochs = 66 iterations). IMP prunes 20% of the remaining weights of the
prunable layers (first conv and classifier dense) per level by ``large_final`` and rewinds to
iteration ``K`` = 2 (3% of training, inside the 0.1-7% range of Frankle et al.), replaying
the schedule from there. The control trains the same masks from a fresh seeded init.
Supermask: every conv and linear layer of a frozen random resnet20 gets mask logits
(init 0: keep-probability 0.5), trained with SGD lr 100, momentum 0.9, no weight decay,
cosine over 5 epochs, then BatchNorm statistics are recalibrated under the thresholded mask.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from benchlib.data import load_dataset
from benchlib.models import build_model
from benchlib.pruning.lottery import run_imp, train_supermask
from benchlib.pruning.spec import parse_spec
from benchlib.pruning.unstructured import prunable_layers
from benchlib.train import evaluate, small_net_config

REWIND_K = 2
LEVELS = 3


def imp_digits(seed: int, *, levels: int = LEVELS, k: int = REWIND_K) -> dict[str, float]:
    """Dense and level-``levels`` test top-1 (and the control's) of one seed, with times."""
    started = time.perf_counter()
    shape = (3, 8, 8)
    train_set = load_dataset("digits", split="train", input_shape=shape)
    test_set = load_dataset("digits", split="test", input_shape=shape)
    model = build_model("resnet20", input_size=8, seed=seed)
    example = model.example_input(1)
    layers = prunable_layers(model.module, example, parse_spec("magnitude:0.5"))
    config = small_net_config(seed=seed)
    result = run_imp(
        model.module,
        train_set,
        test_set,
        config,
        levels=levels,
        strategy=f"rewind:{k}",
        layers=layers,
        example=example,
        control=True,
        fresh=lambda s: build_model("resnet20", input_size=8, seed=s).module,
        seed=seed,
    )
    dense, last = result.levels[0], result.levels[-1]
    return {
        "dense": dense.top1,
        "ticket": last.top1,
        "control": float(last.control_top1 or 0.0),
        "density": last.density,
        "macs_ratio": last.nonzero_macs / dense.nonzero_macs,
        "wall_s": time.perf_counter() - started,
    }


def supermask_digits(seed: int) -> dict[str, float]:
    """Test top-1 and density of a supermask over a frozen random resnet20, with the time."""
    started = time.perf_counter()
    shape = (3, 8, 8)
    train_set = load_dataset("digits", split="train", input_shape=shape)
    test_set = load_dataset("digits", split="test", input_shape=shape)
    model = build_model("resnet20", input_size=8, seed=seed).module
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, kept = train_supermask(model, train_set, seed=seed)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} moved"
    return {
        "top1": evaluate(model, test_set).top1,
        "density": kept,
        "wall_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"resnet20 at 8x8 on digits, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    passed = True
    for seed in (int(part) for part in args.seeds.split(",")):
        imp = imp_digits(seed)
        ok = imp["ticket"] >= imp["dense"] - 0.01
        print(
            f"seed {seed}: IMP rewind:{REWIND_K} x{LEVELS}: dense {imp['dense']:.2%}, "
            f"ticket {imp['ticket']:.2%} at density {imp['density']:.2%} "
            f"(nonzero MACs x{imp['macs_ratio']:.3f}), random reinit {imp['control']:.2%}; "
            f"wall {imp['wall_s']:.1f} s {'PASS' if ok else 'FAIL'}"
        )
        mask = supermask_digits(seed)
        ok_mask = mask["top1"] >= 0.60
        print(
            f"seed {seed}: supermask over frozen random weights: {mask['top1']:.2%} at "
            f"density {mask['density']:.2%}; wall {mask['wall_s']:.1f} s "
            f"{'PASS' if ok_mask else 'FAIL'}"
        )
        passed = passed and ok and ok_mask
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

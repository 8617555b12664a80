"""Speed of our structured pruner against Torch-Pruning's, on ResNet-50, in one run.

Run ``python benchmarks/prune_speed.py``; exit status 0 when ours takes at most ``--limit``
(default 2.0) times as long as Torch-Pruning, 1 otherwise.

Workload: torchvision ``resnet50`` (``weights=None``, seeded by ``build_model``), one 1x3x224x224
example input, FPGM at a pruning ratio of 0.5 per group, the classifier ``fc`` left whole.

* Torch-Pruning: ``tp.pruner.MetaPruner(module, example, importance=FPGMImportance(),
  pruning_ratio=0.5, ignored_layers=[fc])`` then one ``step()``; the timer covers both (the
  constructor builds the dependency graph). MetaPruner prunes in place, so every round gets a
  fresh ``copy.deepcopy`` of the dense module, made outside the timer.
* Ours: ``benchlib.pruning.prune(model, "fpgm:0.5")``, the public call: it deep-copies the
  model itself, builds the dependency graph, scores, cuts and counts the pruned model's FLOPs,
  all inside the timer (so this side carries a copy and a FLOP count the other does not).

Each side runs ``--repeats`` times, interleaved (ours then Torch-Pruning in even rounds, the
reverse in odd ones, so slow drift of the machine hits both alike); the verdict compares the
medians. The CPU time the process got per wall second and thread is printed too: under 90%,
other processes took the cores (oversubscribed intra-op threads slow a forward pass several
times over) and the run is flagged. The MACs and parameters of both pruned models are printed,
so a run in which one side pruned nothing shows it (the criteria differ, see METHODS.md: FPGM
on raw filters here, on squared magnitudes there; the counts need not match).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from benchlib.flops import count
from benchlib.models import Model, build_model
from benchlib.pruning import METHODS, prune

MODEL = "resnet50"
INPUT_SIZE = 224
RATIO = 0.5
SPEC = f"fpgm:{RATIO}"
LIMIT = 2.0
"""Ours may take at most this many times Torch-Pruning's median."""
BUSY_SHARE = 0.9
"""Below this share of CPU time per wall second and thread, the run is flagged as disturbed."""


def torch_pruning_once(model: Model) -> tuple[float, nn.Module]:
    """Seconds for MetaPruner's constructor and one ``step()`` on a fresh copy; the result."""
    module = copy.deepcopy(model.module)
    example = model.example_input(1)
    fc = module.get_submodule("fc")
    gc.collect()
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        module,
        example,
        importance=tp.importance.FPGMImportance(),
        pruning_ratio=RATIO,
        ignored_layers=[fc],
    )
    pruner.step()
    return time.perf_counter() - start, module


def ours_once(model: Model) -> tuple[float, nn.Module]:
    """Seconds for ``prune(model, SPEC)`` (copy, graph, scores, cuts, FLOP count); the result."""
    gc.collect()
    start = time.perf_counter()
    variant = prune(model, SPEC)
    return time.perf_counter() - start, variant.module


def interleave(
    rounds: int,
    ours: Callable[[], tuple[float, nn.Module]],
    theirs: Callable[[], tuple[float, nn.Module]],
) -> tuple[list[float], list[float], nn.Module, nn.Module]:
    """Run both once per round, swapping their order every round; times and the last results."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    last: dict[str, nn.Module] = {}
    sides = {"ours": ours, "theirs": theirs}
    for index in range(rounds):
        for key in ("ours", "theirs") if index % 2 == 0 else ("theirs", "ours"):
            seconds, last[key] = sides[key]()
            times[key].append(seconds)
        print(
            f"  round {index + 1}: ours {times['ours'][-1]:.2f} s, "
            f"Torch-Pruning {times['theirs'][-1]:.2f} s"
        )
    return times["ours"], times["theirs"], last["ours"], last["theirs"]


def describe(name: str, module: nn.Module, example: torch.Tensor, dense_macs: int) -> None:
    report = count(module, example)
    print(
        f"  {name}: {report.macs / 1e9:.3f} GMACs ({report.macs / dense_macs:.1%} of dense), "
        f"{report.params / 1e6:.2f} M params"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--limit", type=float, default=LIMIT, help="largest ours/TP ratio")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 0 or args.limit <= 0:
        parser.error("--repeats must be at least 1, --threads not negative, --limit positive")
    if "fpgm" not in METHODS:
        print("benchlib.pruning has no 'fpgm' method registered: nothing to compare")
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(MODEL, input_size=INPUT_SIZE)
    example = model.example_input(1)
    print(
        f"torch {torch.__version__}, torch-pruning {importlib.metadata.version('torch-pruning')}, "
        f"{torch.get_num_threads()} thread(s); {MODEL} 1x3x{INPUT_SIZE}x{INPUT_SIZE}, "
        f"FPGM ratio {RATIO}, {args.repeats} interleaved rounds"
    )
    start, cpu = time.perf_counter(), time.process_time()
    ours, theirs, our_module, their_module = interleave(
        args.repeats, lambda: ours_once(model), lambda: torch_pruning_once(model)
    )
    share = (time.process_time() - cpu) / (time.perf_counter() - start) / torch.get_num_threads()
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    ratio = ours_s / theirs_s
    passed = ratio <= args.limit
    dense_macs = count(model.module, example).macs
    print(f"pruned models (dense: {dense_macs / 1e9:.3f} GMACs):")
    describe(f"ours ({SPEC})", our_module, example, dense_macs)
    describe("Torch-Pruning (MetaPruner, FPGMImportance)", their_module, example, dense_macs)
    print(
        f"median ours: {ours_s:.2f} s, median Torch-Pruning: {theirs_s:.2f} s "
        f"(CPU share per thread: {share:.0%})"
    )
    print(
        f"ours / Torch-Pruning = {ratio:.2f} -> {'PASS' if passed else 'FAIL'} "
        f"(at most {args.limit:g}); {time.perf_counter() - start:.0f} s in all"
    )
    if share < BUSY_SHARE:
        print(
            f"warning: this process got {share:.0%} of its {torch.get_num_threads()} thread(s)' "
            "CPU time: other processes were running; rerun on an idle machine"
        )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

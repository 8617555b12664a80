"""Reproduction table: the paper suite's pruning set against the numbers the papers report.

Run ``python benchmarks/paper_table.py`` (``--suite`` another suite, ``--models`` a subset).
For each (model, spec) of the suite that a paper reports on, the model is built once, pruned
(no timing, no training: the zoo's random weights), and counted; the table prints, per pair:

* MACs per image, dense -> pruned (GMACs, as the papers), and the reduction;
* the reduction that counting **output channels only** would give (each conv/linear layer's
  dense MACs times the share of its output channels kept): the convention of papers that
  count a pruned layer without shrinking the next layer's inputs;
* params, dense -> pruned (M), and the reduction;
* the paper's reported FLOP and param reductions, where it gives them (FLOPs = 2 x MACs, so
  the shares compare directly), and notes on why they differ (printed under the table).

The papers' numbers: /work/shared/METHODS.md's table (FPGM ResNet-50 30%/40%, Network
Slimming VGG-19 CIFAR-10 70%), FPGM's CIFAR-10 table (ResNet-56 -52.6% and ResNet-110 -52.3%
FLOPs at 40%) and HRank's README for its published ResNet-50 rates (1.55 B FLOPs, 13.77 M
params: -62.1% and -46.0%). Methods that rank on data use the spec's data (default
synthetic, labelled in the notes). HRank on ResNet-50 takes up to a few minutes on two
cores (seconds on an idle machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from benchlib.flops import FlopReport, count
from benchlib.loading import load_model
from benchlib.pruning import Variant, prune, resolve
from benchlib.suite import load_suite


@dataclass(frozen=True)
class Reported:
    """What a paper reports for one setting: reductions in percent (None: not reported)."""

    flops: float | None
    params: float | None
    source: str
    notes: tuple[str, ...]


HRANK = "hrank:0.5[config=hrank-resnet50]"
REPORTED: Mapping[tuple[str, str], Reported] = {
    ("resnet56", "fpgm:0.4"): Reported(52.6, None, "FPGM, CIFAR-10, 40%", ("A", "P")),
    ("resnet110", "fpgm:0.4"): Reported(52.3, None, "FPGM, CIFAR-10, 40%", ("A", "P")),
    ("resnet50", "fpgm:0.3"): Reported(42.2, None, "FPGM, ImageNet, 30%", ("P", "G")),
    ("resnet50", "fpgm:0.4"): Reported(53.5, None, "FPGM, ImageNet, 40%", ("P", "G")),
    ("resnet50", HRANK): Reported(62.1, 46.0, "HRank README, 1.55 B FLOPs", ("P", "H")),
    ("vgg16_cifar", "slim:0.7"): Reported(
        None, 88.8, "Slimming, VGG-19 CIFAR-10, 20.04->2.25 M", ("P", "V", "T")
    ),
}

# Extra rows, not in the suite: the spec pruned the way closest to the paper's own code.
SUPPLEMENTS: Mapping[tuple[str, str], str] = {
    ("resnet50", "fpgm:0.3"): "fpgm:0.3[residual=false]",
    ("resnet50", "fpgm:0.4"): "fpgm:0.4[residual=false]",
}

NOTES: Mapping[str, str] = {
    "P": "Channels are removed physically: a pruned filter also takes the matching input "
    "channel of every consumer, so a conv whose inputs and outputs are both pruned by p "
    "keeps about (1-p)^2 of its MACs. Counting output channels only gives the 'outputs "
    "only' column.",
    "G": "FPGM's official code skips the downsample convs and the fc; benchlib's default "
    "prunes every coupled group, the channels shared through residual adds included, so "
    "ResNet-50 loses more MACs than the paper's (see R).",
    "R": "Not in the suite: the same spec with residual=false, which keeps whole the channels "
    "shared through residual adds (the closest physical counterpart of FPGM's code, which "
    "cannot remove them either as it skips the downsample convs). The paper's cut lies "
    "between this row's and the default's.",
    "A": "The CIFAR ResNets' option-A shortcuts zero-pad the residual stream along the "
    "channels (F.pad), which pins it: only each block's first conv (its outputs, and the "
    "second conv's inputs) is pruned, which at 40% cuts about 38% of the MACs; the paper's "
    "larger cut implies it also counts the filters of the convs that feed the residual "
    "stream, which its code masks like the others.",
    "H": "The shipped config applies HRank's published rates inside the bottlenecks (conv1, "
    "conv2; the stem conv at 0.2) and leaves conv3 and the downsample convs whole, as "
    "HRank's identity shortcuts keep the residual stream. The README's 1.55 B FLOPs / 13.77 M "
    "params are HRank's own count: it also counts the masked conv3 and downsample outputs as "
    "removed, but only output channels (so it misses the input channels that physical removal "
    "also takes from conv2 and conv3); the two differences pull in opposite directions. "
    "METHODS.md's -43.8% / -36.7% row is HRank's 2.30 B config, whose rates were never "
    "published.",
    "V": "Network Slimming reports VGG-19; the zoo has the VGG-16 of Li et al. (14.99 M "
    "params), so only the shares compare.",
    "T": "Untrained weights: every BN gamma is 0.5, so the global threshold ties and the 70% "
    "go by a seeded shuffle (structured.allocate), about 70% of every layer; a network "
    "trained with the sparsity penalty prunes mostly its wide late layers.",
    "S": "Ranked on SYNTHETIC calibration images (the spec's default data): the counts do "
    "not depend on them, the choice of channels does. Give data=FOLDER for a real ranking.",
}


@dataclass(frozen=True)
class Row:
    model: str
    spec: str
    dense: FlopReport
    pruned: FlopReport
    outputs_only: tuple[float, float]  # (MACs, params)
    seconds: float
    reported: Reported
    notes: tuple[str, ...]


def outputs_only(dense: nn.Module, pruned: nn.Module, report: FlopReport) -> tuple[float, float]:
    """(MACs, params) counted as if pruning shrank only output channels: each conv/linear
    layer's dense MACs and own params times the share of its output channels (``out_channels``,
    ``out_features``) that ``pruned`` keeps; the other layers and params as dense."""
    before, after = dict(dense.named_modules()), dict(pruned.named_modules())
    macs, params = 0.0, float(report.params - sum(layer.params for layer in report.layers))
    for layer in report.layers:
        a, b = before.get(layer.name), after.get(layer.name)
        share = 1.0
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.Conv2d):
            share = b.out_channels / a.out_channels
        elif isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
            share = b.out_features / a.out_features
        macs += layer.macs * share
        params += layer.params * share
    return macs, params


def build_rows(suite_name: str, only: Sequence[str] | None) -> tuple[list[Row], list[str]]:
    """Prune every reported pair of the suite; also returns the suite's unreported pairs."""
    suite = load_suite(suite_name)
    rows: list[Row] = []
    unreported: list[str] = []
    for name in suite.models:
        if only and name not in only:
            continue
        specs = [s for s in suite.specs_for(name) if resolve(s)[0].method != "dense"]
        pairs = [s for s in specs if (name, s) in REPORTED]
        unreported += [f"{name} {s}" for s in specs if (name, s) not in REPORTED]
        if not pairs:
            continue
        model = load_model(name, input_size=suite.input_size)
        dense = count(model.module, model.example_input(1))
        for spec in pairs:
            reported = REPORTED[(name, spec)]
            extra = SUPPLEMENTS.get((name, spec))
            for text, notes in ((spec, reported.notes), (extra, ("P", "R"))):
                if text is None:
                    continue
                print(f"pruning {name} by {text} ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                variant: Variant = prune(model, text)
                seconds = time.perf_counter() - start
                if variant.recipe.details.get("synthetic") is True:
                    notes = (*notes, "S")
                rows.append(
                    Row(
                        model=name,
                        spec=text,
                        dense=dense,
                        pruned=variant.flops,
                        outputs_only=outputs_only(model.module, variant.module, dense),
                        seconds=seconds,
                        reported=reported,
                        notes=notes,
                    )
                )
    return rows, unreported


def _cut(before: float, after: float) -> str:
    return f"-{100.0 * (before - after) / before:.1f}%"


def _paper(value: float | None) -> str:
    return "n/r" if value is None else f"-{value:.1f}%"


def markdown(rows: Sequence[Row], unreported: Sequence[str]) -> str:
    """The table, its notes and the suite's pairs the papers do not report."""
    header = (
        "| Model | Spec | GMACs dense -> pruned | MACs cut | outputs only "
        "| Params (M) dense -> pruned | Params cut | outputs only | Paper FLOPs cut "
        "| Paper params cut | Paper setting | Notes | Prune s |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        d, p = r.dense, r.pruned
        lines.append(
            f"| {r.model} | `{r.spec}` | {d.macs / 1e9:.3f} -> {p.macs / 1e9:.3f} "
            f"| {_cut(d.macs, p.macs)} | {_cut(d.macs, r.outputs_only[0])} "
            f"| {d.params / 1e6:.2f} -> {p.params / 1e6:.2f} | {_cut(d.params, p.params)} "
            f"| {_cut(d.params, r.outputs_only[1])} "
            f"| {_paper(r.reported.flops)} | {_paper(r.reported.params)} | {r.reported.source} "
            f"| {' '.join(r.notes)} | {r.seconds:.0f} |"
        )
    used = sorted({key for r in rows for key in r.notes}, key=list(NOTES).index)
    lines += ["", "MACs per image at the model's input size; n/r: not reported by the paper."]
    lines += [f"{key}: {NOTES[key]}" for key in used]
    if unreported:
        lines += ["", f"In the suite, not reported by the papers (not pruned here): "
                      f"{'; '.join(unreported)}."]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--suite", default="paper", help="suite name or TOML path (paper)")
    parser.add_argument("--models", help="comma-separated subset of the suite's models")
    args = parser.parse_args(argv)
    only = [m.strip() for m in args.models.split(",")] if args.models else None
    models = load_suite(args.suite).models
    unknown = [m for m in only or () if m not in models]
    if unknown:
        print(f"error: model {unknown[0]!r} is not in the suite; choose from: "
              f"{', '.join(models)}", file=sys.stderr)  # fmt: skip
        return 2
    rows, unreported = build_rows(args.suite, only)
    if not rows:
        print("no (model, spec) pair of the suite has a paper number", file=sys.stderr)
        return 1
    print(markdown(rows, unreported))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Structured pruning: remove whole channels, so the model really gets smaller.

``METHOD:AMOUNT[OPTIONS]`` with METHOD one of :data:`~benchlib.pruning.scoring.CRITERIA`.
AMOUNT is the share of channels pruned in each group (uniform, the papers' default), of all
prunable channels (``global=true``), or, for ``slim``, Network Slimming's global percent of
BatchNorm gammas. The options (``OPTIONS`` documents each): ``round_to``, ``global``, ``max``,
``ignore``, ``config``, ``reduce``, ``residual``, ``strict``, ``seed``, ``data``, ``batches``,
``batch_size``. Example: ``fpgm:0.4[round_to=8,ignore=layer4.*]``.

The recipe keeps, per group, the kept channel indices into the dense layers; replaying it
rebuilds the dependency graph of the dense model and cuts the same channels, with no data
and no scoring, so the worker that measures a variant gets the identical model.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from benchlib.data import DATA_SOURCES, load_dataset
from benchlib.errors import ConfigError, PruningError, unknown_choice
from benchlib.pruning import importance
from benchlib.pruning.graph import DependencyGraph, Group, build_graph
from benchlib.pruning.recipe import Recipe, weights_sha256
from benchlib.pruning.scoring import DATA_CRITERIA, Calibration, score_groups
from benchlib.pruning.spec import PruneSpec
from benchlib.pruning.surgery import apply_cuts

__all__ = [
    "OPTIONS",
    "StructuredOptions",
    "allocate",
    "parse_options",
    "prune_structured",
    "replay_structured",
]

OPTIONS: Mapping[str, str] = {
    "round_to": "keep a multiple of K channels in each group (integer, default 1)",
    "global": "one ranking across all groups instead of the same ratio in each (true/false)",
    "max": "with global: the largest share of one group that may go (in (0, 1), default 0.9)",
    "ignore": "layers never pruned: ';'-separated module names or globs (e.g. fc;layer4.*)",
    "config": "per-layer ratios: a JSON file {layer: ratio} or a shipped name (hrank-resnet50);"
    " the other layers take AMOUNT",
    "reduce": "a group's score: first (its defining layer, the papers' choice) or mean",
    "residual": "prune channels shared across residual adds (true, default) or not (false)",
    "seed": "random: the seed of the scores (integer, default 0)",
    "strict": "refuse a model with an op whose effect on channels is unknown (true/false;"
    " default false: such ops keep the channels they touch)",
    "data": "hrank/taylor: digits, synthetic (default) or an ImageFolder/CIFAR folder",
    "batches": "hrank/taylor: calibration batches (default 1; HRank's official run: 5)",
    "batch_size": "hrank/taylor: images per calibration batch (default 32; official: 128)",
}
_DATA_OPTIONS = frozenset({"data", "batches", "batch_size"})
_REDUCE = ("first", "mean")


@dataclass(frozen=True, kw_only=True)
class StructuredOptions:
    """A structured spec, checked: see :data:`OPTIONS` for each field's meaning."""

    criterion: str
    amount: float
    round_to: int = 1
    global_ranking: bool = False
    max_ratio: float = 0.9
    ignore: tuple[str, ...] = ()
    config: Mapping[str, float] = field(default_factory=dict)
    reduce: str = "first"
    residual: bool = True
    strict: bool = False
    seed: int = 0
    data: str = "synthetic"
    batches: int = 1
    batch_size: int = 32


def parse_options(spec: PruneSpec, *, read_files: bool = True) -> StructuredOptions:
    """Check a structured spec's amount and options; raises ConfigError naming the bad value.

    ``read_files=False`` neither reads the ``config`` file nor checks that a ``data`` folder
    exists (replay needs only the recipe).
    """
    options = dict(spec.options)
    for key in options:
        if key not in OPTIONS:
            raise ConfigError(f"{unknown_choice('option', key, OPTIONS)} (in spec {str(spec)!r})")
        if key in _DATA_OPTIONS and spec.method not in DATA_CRITERIA:
            raise ConfigError(
                f"option {key} in spec {str(spec)!r} only applies to: {', '.join(DATA_CRITERIA)}"
            )
    reduce = options.get("reduce", "first")
    if reduce not in _REDUCE:
        raise ConfigError(f"{unknown_choice('reduce', reduce, _REDUCE)} (in spec {str(spec)!r})")
    parsed = StructuredOptions(
        criterion=spec.method,
        amount=spec.amount(),
        round_to=_integer(spec, "round_to", 1),
        global_ranking=spec.flag("global"),
        max_ratio=_ratio(spec, "max", 0.9),
        ignore=tuple(p for p in options.get("ignore", "").split(";") if p),
        reduce=reduce,
        residual=spec.flag("residual", True),
        strict=spec.flag("strict"),
        seed=_integer(spec, "seed", 0, minimum=0),
        data=options.get("data", "synthetic"),
        batches=_integer(spec, "batches", 1),
        batch_size=_integer(spec, "batch_size", 32),
        config=_read_config(spec, options["config"]) if read_files and "config" in options else {},
    )
    if parsed.global_ranking and "config" in options:
        raise ConfigError(f"spec {str(spec)!r}: global=true and config= exclude each other")
    if "max" in options and not parsed.global_ranking:
        raise ConfigError(f"option max in spec {str(spec)!r} only applies with global=true")
    if read_files and parsed.data not in DATA_SOURCES and not Path(parsed.data).is_dir():
        raise ConfigError(
            f"data={parsed.data!r} in spec {str(spec)!r} is not a folder; choose from: "
            f"{', '.join(DATA_SOURCES)} or an ImageFolder / CIFAR python folder"
        )
    return parsed


def validate(spec: PruneSpec, read_files: bool = True) -> None:
    """``Method.validate`` for the structured methods."""
    parse_options(spec, read_files=read_files)


def _integer(spec: PruneSpec, key: str, default: int, *, minimum: int = 1) -> int:
    text = spec.options.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(
            f"option {key}={text!r} in spec {str(spec)!r}: use an integer >= {minimum}"
        )
    return value


def _ratio(spec: PruneSpec, key: str, default: float) -> float:
    text = spec.options.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise ConfigError(f"option {key}={text!r} in spec {str(spec)!r}: use a number in (0, 1)")
    return value


CONFIG_DIR = Path(__file__).with_name("configs")
"""The papers' published per-layer configurations, by name (``config=hrank-resnet50``)."""


def config_names() -> list[str]:
    """The names of the shipped per-layer configurations."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read_config(spec: PruneSpec, path: str) -> dict[str, float]:
    shipped = CONFIG_DIR / f"{path}.json"
    if path in config_names():
        path = str(shipped)
    elif not Path(path).exists():
        raise ConfigError(
            f"per-layer config {path!r} (spec {str(spec)!r}) is neither a file nor a shipped "
            f"config; choose from: {', '.join(config_names())} or a JSON file path"
        )
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read per-layer config {path!r} (spec {str(spec)!r}): {exc}"
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0
        for v in data.values()
    ):
        raise ConfigError(
            f"per-layer config {path!r} must be a JSON object of layer name -> ratio in [0, 1)"
        )
    return {str(k): float(v) for k, v in data.items()}


# -- allocation -------------------------------------------------------------------------------


def round_keep(keep: int, size: int, multiple: int) -> int:
    """``keep`` rounded up to a multiple of ``multiple`` (never more pruning than asked), at
    most ``size``; with ``multiple`` 1 just clamped to [1, size]."""
    if multiple > 1:
        keep = multiple * max(1, math.ceil(keep / multiple))
    return min(size, max(1, keep))


def allocate(
    groups: Sequence[Group],
    scores: Mapping[str, Tensor],
    options: StructuredOptions,
    ratios: Mapping[str, float],
) -> dict[str, list[int]]:
    """The kept channel indices of each scored group (low scores go first).

    Uniform: each group prunes ``int(ratio x size)`` (its ``ratios`` entry). Global: the
    ``int(amount x total)`` lowest scores over all groups, at most ``int(max x size)`` of a group.
    ``slim``: Network Slimming's global threshold ``sorted(|gamma|)[int(N x amount)]``; when
    several gammas equal the threshold (the all-ones gammas of an untrained network) the
    official ``|gamma| > thre`` would drop every tied channel, so exactly ``int(N x amount)``
    are pruned by rank instead, ties broken by a ``seed``-ed shuffle. Every group keeps at
    least one channel and, with ``round_to=k``, a multiple of k (rounded up); other ties go to
    the lower index.
    """
    scored = [g for g in groups if g.key in scores]
    masks: dict[str, Tensor] = {}
    if options.criterion == "slim" and not _tied_threshold(scored, scores, options.amount):
        masks = importance.slim_keep({g.key: scores[g.key] for g in scored}, options.amount)
        counts = {g.key: int(masks[g.key].sum()) for g in scored}
    elif options.criterion == "slim":
        counts = _global_counts(scored, scores, options, cap=1.0, seed=options.seed)
    elif options.global_ranking:
        counts = _global_counts(scored, scores, options, cap=options.max_ratio)
    else:
        counts = {g.key: g.size - int(ratios[g.key] * g.size) for g in scored}
    kept: dict[str, list[int]] = {}
    for group in scored:
        keep = round_keep(counts[group.key], group.size, options.round_to)
        if masks and keep == counts[group.key]:
            kept[group.key] = torch.nonzero(masks[group.key]).flatten().tolist()
        else:
            kept[group.key] = importance.kept_after_pruning(scores[group.key], group.size - keep)
    return kept


def _tied_threshold(groups: Sequence[Group], scores: Mapping[str, Tensor], amount: float) -> bool:
    """Whether Network Slimming's threshold value occurs more than once."""
    flat = torch.cat([torch.zeros(0, dtype=torch.float64), *(scores[g.key] for g in groups)])
    if flat.numel() == 0:
        return False
    threshold = torch.sort(flat).values[int(flat.numel() * amount)]
    return int((flat == threshold).sum()) > 1


def _global_counts(
    groups: Sequence[Group],
    scores: Mapping[str, Tensor],
    options: StructuredOptions,
    *,
    cap: float,
    seed: int | None = None,
) -> dict[str, int]:
    """Per group, the channels kept when the ``int(amount x total)`` lowest scores go (at most
    ``int(cap x size)`` and never all of a group). Ties: by position, or shuffled by ``seed``."""
    total = sum(g.size for g in groups)
    budget = int(options.amount * total)
    caps = {g.key: min(int(cap * g.size), g.size - 1) for g in groups}
    shuffle = torch.Generator().manual_seed(seed) if seed is not None else None
    tiebreak = (
        torch.randperm(total, generator=shuffle).tolist() if shuffle is not None else range(total)
    )
    flat = [(g.key, float(v)) for g in groups for v in scores[g.key].tolist()]
    pool = sorted((value, tiebreak[i], key) for i, (key, value) in enumerate(flat))
    pruned = dict.fromkeys(caps, 0)
    for _, _, key in pool:
        if budget == 0:
            break
        if pruned[key] < caps[key]:
            pruned[key] += 1
            budget -= 1
    return {g.key: g.size - pruned[g.key] for g in groups}


# -- prune and replay -------------------------------------------------------------------------


def eligible(
    graph: DependencyGraph, options: StructuredOptions
) -> tuple[list[Group], dict[str, float]]:
    """The groups the options let us prune, and each one's ratio.

    Raises:
        PruningError: a ``config`` layer that is no prunable group's producer.
    """
    producers = {p: g for g in graph.groups for p in g.producers}
    unknown = [name for name in options.config if name not in producers]
    if unknown:
        sample = ", ".join(list(producers)[:6])
        raise PruningError(
            f"per-layer config names {unknown[0]!r}, which is not a prunable layer "
            f"(pinned or absent); prunable layers include: {sample}"
        )
    chosen: list[Group] = []
    ratios: dict[str, float] = {}
    for group in graph.groups:
        if not options.residual and len(group.producers) > 1:
            continue
        if any(fnmatch.fnmatchcase(p, pat) for p in group.producers for pat in options.ignore):
            continue
        ratio = next(
            (options.config[p] for p in group.producers if p in options.config), options.amount
        )
        if ratio > 0.0:
            chosen.append(group)
            ratios[group.key] = ratio
    return chosen, ratios


def prune_structured(model: nn.Module, spec: PruneSpec, example: Tensor) -> Recipe:
    """Prune ``model`` in place by a structured spec; returns the recipe.

    Raises:
        ConfigError: a bad option or data source.
        PruningError: the model cannot be traced, has no prunable group, or (a bug) came out
            with another output shape.
    """
    options = parse_options(spec)
    base = weights_sha256(dict(model.named_parameters()))
    graph = build_graph(model, example)
    if options.strict and graph.unknown:
        raise PruningError(
            f"strict: {graph.unknown[0]} has an effect on channels the pruner does not know "
            f"({len(graph.unknown)} such op(s)); without strict=true it keeps their channels"
        )
    groups, ratios = eligible(graph, options)
    if not groups:
        why = "; ".join(graph.blocked[:4]) or "no conv or linear layer with free output channels"
        raise PruningError(f"{type(model).__name__} has no prunable channel group ({why})")
    calibration = _calibration(options, example)
    scores = score_groups(
        model,
        graph,
        groups,
        options.criterion,
        reduce=options.reduce,
        seed=options.seed,
        calibration=calibration,
    )
    if not scores:
        raise PruningError(
            f"{options.criterion} could score no layer of {type(model).__name__} "
            f"(slim needs a BatchNorm right after a layer; hrank, 4-D conv feature maps)"
        )
    kept = allocate(groups, scores, options, ratios)
    sizes = {g.key: g.size for g in graph.groups}
    layers = _cut_checked(model, graph, kept, example)
    details: dict[str, object] = {
        "criterion": options.criterion,
        "allocation": _allocation_name(options),
        "kept": kept,
        "sizes": {key: sizes[key] for key in kept},
        "pinned": list(graph.blocked),
    }  # fmt: skip
    if calibration is not None:
        details["data"] = calibration.dataset.source
        details["synthetic"] = calibration.dataset.synthetic
        details["calibration_images"] = min(
            len(calibration.dataset), calibration.batch_size * calibration.num_batches
        )
    return Recipe(spec=str(spec), layers=layers, details=details, base_sha256=base)


def replay_structured(model: nn.Module, spec: PruneSpec, recipe: Recipe, example: Tensor) -> None:
    """Cut ``model`` (the dense weights the recipe was made from) as ``recipe`` says.

    Raises:
        PruningError: other weights, or a model whose groups differ from the recipe's.
    """
    parse_options(spec, read_files=False)
    if weights_sha256(dict(model.named_parameters())) != recipe.base_sha256:
        raise PruningError(
            f"recipe {recipe.spec!r} was made from other weights (SHA-256 mismatch); "
            "load the dense weights it was computed from"
        )
    kept = {str(k): [int(i) for i in v] for k, v in dict(recipe.details.get("kept", {})).items()}
    sizes = dict(recipe.details.get("sizes", {}))
    graph = build_graph(model, example)
    have = {g.key: g.size for g in graph.groups}
    for key in kept:
        if have.get(key) != sizes.get(key):
            raise PruningError(
                f"recipe {recipe.spec!r} cuts group {key!r} of {sizes.get(key)} channels; "
                f"this model has {have.get(key, 'no such group')}"
            )
    _cut_checked(model, graph, kept, example)


def _allocation_name(options: StructuredOptions) -> str:
    if options.criterion == "slim":
        return "slim-global-threshold"
    if options.global_ranking:
        return "global"
    return "per-layer" if options.config else "uniform"


def _calibration(options: StructuredOptions, example: Tensor) -> Calibration | None:
    if options.criterion not in DATA_CRITERIA:
        return None
    shape = tuple(int(s) for s in example.shape[1:])
    if len(shape) != 3:
        raise PruningError(f"{options.criterion} needs image inputs (C, H, W); got {shape}")
    limit = options.batches * options.batch_size
    dataset = load_dataset(
        options.data, split="train", input_shape=(shape[0], shape[1], shape[2]),
        seed=options.seed, limit=limit,
    )  # fmt: skip
    return Calibration(dataset, options.batch_size, options.batches)


def _cut_checked(
    model: nn.Module, graph: DependencyGraph, kept: Mapping[str, list[int]], example: Tensor
) -> tuple[str, ...]:
    """Apply the cuts and check the model still runs with the same output shape; returns the
    names of the modules it changed."""
    before = _output_shape(model, example)
    touched = sorted({m.target.rpartition(".")[0] if m.kind == "param" else m.target
                      for m, _, _ in graph.cuts(dict(kept))})  # fmt: skip
    apply_cuts(model, graph, dict(kept))
    try:
        after = _output_shape(model, example)
    except Exception as exc:
        raise PruningError(f"the pruned {type(model).__name__} does not run: {exc}") from exc
    if after != before:
        raise PruningError(
            f"pruning changed the output of {type(model).__name__} from {before} to {after}"
        )
    return tuple(touched)


def _output_shape(model: nn.Module, example: Tensor) -> object:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        model.train(training)
    return tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__

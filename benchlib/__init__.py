"""benchlib: hardware-aware benchmarking of pruned neural networks.

Prune a model, run it on every target of this machine, and set FLOP counts against measured
latency: how much of the theoretical speedup became real, per target.

    >>> import benchlib
    >>> model = benchlib.load_model("resnet20")
    >>> variant = benchlib.prune(model, "magnitude:0.9")
    >>> round(variant.flops.macs / 1e6, 1)
    40.6

``save_pruned(variant, "r20.pt")`` writes the variant as a TorchScript archive (and its recipe
as ``r20.recipe.json``) that ``bench run --models r20.pt`` measures.
"""

from benchlib.analysis import Row, realization, summarize_records
from benchlib.archive import save_pruned
from benchlib.errors import (
    BenchError,
    ConfigError,
    ExportError,
    ModelLoadError,
    PruningError,
    TargetUnavailable,
    VerificationError,
    WorkerError,
)
from benchlib.flops import FlopReport, LayerCount, count
from benchlib.harness.runner import RunResult, resume_run, run_suite
from benchlib.harness.stats import Summary, summarize
from benchlib.harness.timing import Timing, TimingConfig, measure
from benchlib.loading import load_model
from benchlib.models import Model, build_model, zoo_names
from benchlib.pruning import PruneSpec, Recipe, Variant, parse_spec, prune, replay
from benchlib.suite import Suite, load_suite
from benchlib.target import DeviceKind, Precision, Prepared, Target, TargetRegistry

__all__ = [
    "BenchError",
    "ConfigError",
    "DeviceKind",
    "ExportError",
    "FlopReport",
    "LayerCount",
    "Model",
    "ModelLoadError",
    "Precision",
    "Prepared",
    "PruneSpec",
    "PruningError",
    "Recipe",
    "Row",
    "RunResult",
    "Suite",
    "Summary",
    "Target",
    "TargetRegistry",
    "TargetUnavailable",
    "Timing",
    "TimingConfig",
    "Variant",
    "VerificationError",
    "WorkerError",
    "build_model",
    "count",
    "load_model",
    "load_suite",
    "measure",
    "parse_spec",
    "prune",
    "realization",
    "replay",
    "resume_run",
    "run_suite",
    "save_pruned",
    "summarize",
    "summarize_records",
    "zoo_names",
]

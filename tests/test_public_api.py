"""The public surface is small and deliberate: this test pins it."""

from __future__ import annotations

import benchlib

EXPECTED = {
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
    "save_pruned",
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
    "summarize",
    "summarize_records",
    "zoo_names",
}


def test_exported_members() -> None:
    assert set(benchlib.__all__) == EXPECTED
    assert all(hasattr(benchlib, name) for name in benchlib.__all__)


def test_error_tree() -> None:
    for name in (
        "ConfigError",
        "ModelLoadError",
        "PruningError",
        "TargetUnavailable",
        "ExportError",
        "VerificationError",
        "WorkerError",
    ):
        assert issubclass(getattr(benchlib, name), benchlib.BenchError)

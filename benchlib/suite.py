"""Suites: named sweeps of models x pruning specs x targets x batch sizes x precisions.

A suite is a TOML file; ``load_suite("quick")`` finds ``benchmarks/suites/quick.toml`` in the
current directory or in the benchlib checkout, and a path loads that file. Keys:

    name, description, models, specs, targets, batch_sizes, precisions, input_size, threads,
    cell_timeout_s (the time limit of one cell's worker, seconds), profile_layers (true: also
    profile each cell of a target that runs the module as written, per layer; see
    ``benchlib.layer_profile``)
    [timing]  any field of ``TimingConfig``
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from benchlib.errors import ConfigError
from benchlib.harness.timing import TimingConfig
from benchlib.pruning import resolve
from benchlib.target import Precision

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def suite_dirs() -> tuple[Path, ...]:
    """Where named suites are looked up: ./benchmarks/suites, then the benchlib checkout's."""
    return (
        Path.cwd() / "benchmarks" / "suites",
        Path(__file__).resolve().parents[1] / "benchmarks" / "suites",
    )


@dataclass(frozen=True, kw_only=True)
class Suite:
    """What one ``bench run`` measures. Validated on construction, without side effects."""

    name: str
    models: tuple[str, ...]
    specs: tuple[str, ...] = ("dense",)
    model_specs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    targets: tuple[str, ...] = ("cpu",)
    batch_sizes: tuple[int, ...] = (1,)
    precisions: tuple[str, ...] = ("fp32",)
    input_size: int | None = None
    threads: int | None = None
    weights: str | None = None
    trust: bool = False
    description: str = ""
    cell_timeout_s: float = 900.0
    profile_layers: bool = False
    timing: TimingConfig = field(default_factory=TimingConfig)

    def __post_init__(self) -> None:
        for name in ("models", "specs", "targets", "precisions"):
            _check_names(self.name, name, getattr(self, name))
        if not self.batch_sizes or not isinstance(self.batch_sizes, tuple):
            raise ConfigError(f"suite {self.name!r}: batch_sizes must be a non-empty list")
        for size in self.batch_sizes:
            _check_positive("batch size", size)
        for label, value in (("input size", self.input_size), ("threads", self.threads)):
            if value is not None:
                _check_positive(label, value)
        if self.weights is not None and len(self.models) != 1:
            raise ConfigError("--weights applies to exactly one model; name one with --models")
        if (
            isinstance(self.cell_timeout_s, bool)
            or not isinstance(self.cell_timeout_s, (int, float))
            or self.cell_timeout_s <= 0
        ):
            raise ConfigError(
                f"cell timeout {self.cell_timeout_s!r} must be a positive number of seconds"
            )
        if not isinstance(self.profile_layers, bool):
            raise ConfigError(
                f"suite {self.name!r}: profile_layers {self.profile_layers!r} must be true or false"
            )
        if not isinstance(self.timing, TimingConfig):
            raise ConfigError(f"suite {self.name!r}: [timing] must be a table of timing options")
        if not isinstance(self.model_specs, Mapping):
            raise ConfigError(f"suite {self.name!r}: [model_specs] must be a table model = [specs]")
        normalized = {}
        for model, specs in self.model_specs.items():
            if model not in self.models:
                raise ConfigError(
                    f"suite {self.name!r}: [model_specs] names {model!r}, which is not in models; "
                    f"choose from: {', '.join(self.models)}"
                )
            normalized[model] = tuple(specs) if isinstance(specs, (list, tuple)) else specs
            _check_names(self.name, f"model_specs.{model}", normalized[model])
        object.__setattr__(self, "model_specs", normalized)
        for spec in (*self.specs, *(s for specs in normalized.values() for s in specs)):
            resolve(spec)
        for precision in self.precisions:
            Precision.parse(precision)

    @property
    def variant_specs(self) -> tuple[str, ...]:
        """The specs to build, ``dense`` first: every pruned cell needs its dense baseline."""
        return self.specs_for(None)

    def specs_for(self, model: str | None) -> tuple[str, ...]:
        """The specs of ``model`` (its ``[model_specs]`` entry, else ``specs``), canonical,
        ``dense`` first."""
        chosen = self.model_specs.get(model, self.specs) if model is not None else self.specs
        canonical = [str(resolve(s)[0]) for s in chosen]
        return tuple(dict.fromkeys(["dense", *canonical]))


def _check_names(suite: str, key: str, values: object) -> None:
    """A non-empty tuple of distinct, non-empty strings."""
    if not isinstance(values, tuple) or not values:
        raise ConfigError(f"suite {suite!r}: {key} must be a non-empty list of names")
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"suite {suite!r}: {key} holds {value!r}, which is not a name")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"suite {suite!r}: {key} names {repeated[0]!r} twice")


def _check_positive(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{label} {value!r} must be a positive integer")


def suite_names() -> list[str]:
    """The built-in suites that can be found from here."""
    return sorted({p.stem for d in suite_dirs() if d.is_dir() for p in d.glob("*.toml")})


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``quick``) or by TOML path. Raises ConfigError."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        found = [d / f"{name_or_path}.toml" for d in suite_dirs()]
        found = [p for p in found if p.is_file()]
        if not found:
            choices = suite_names() or ["(none found: no benchmarks/suites folder)"]
            raise ConfigError(
                f"unknown suite {name_or_path!r}; choose from: {', '.join(choices)} "
                "or give a path to a .toml file"
            )
        path = found[0]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read suite {str(path)!r}: {exc}") from exc
    return suite_from_dict(data, default_name=path.stem)


def suite_from_dict(data: dict[str, Any], *, default_name: str) -> Suite:
    """Build a Suite from parsed TOML; unknown keys are errors that list the known ones."""
    known = {f.name for f in fields(Suite)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown suite key {unknown[0]!r}; choose from: {', '.join(sorted(known))}"
        )
    data = dict(data)
    timing_raw = data.pop("timing", {})
    if not isinstance(timing_raw, dict):
        raise ConfigError(f"suite {default_name!r}: [timing] must be a table of timing options")
    timing_data = dict(timing_raw)
    timing_known = {f.name for f in fields(TimingConfig)}
    bad = sorted(set(timing_data) - timing_known)
    if bad:
        raise ConfigError(
            f"unknown timing key {bad[0]!r}; choose from: {', '.join(sorted(timing_known))}"
        )
    converted: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    converted.setdefault("name", default_name)
    try:
        return Suite(**converted, timing=TimingConfig(**timing_data))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad suite {default_name!r}: {exc}") from exc

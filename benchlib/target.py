"""The Target protocol, what ``prepare`` returns, and the registry that finds targets.

Vocabulary (DESIGN section 2): a **target** is a backend on a device kind (``torch-eager``,
``torchscript-cuda``, ...). ``cpu`` and ``gpu`` are *selectors* that expand to every available
target of that device kind. Targets are registered through the entry-point group
``benchlib.targets`` (built-ins included, in pyproject.toml); the registry imports a target's
module only when that target is looked at. Expanding a selector looks at every target (to
read its ``device_kind``), so a target module must import its backend (TensorRT, ONNX
Runtime) lazily, inside ``unavailable_reason`` and ``prepare``: then ``bench run --targets
cpu`` never imports TensorRT.

A backend that runs on both the CPU and a GPU registers one target per device kind; the CUDA
one carries the ``-cuda`` suffix (``torch-eager`` / ``torch-eager-cuda``), so that a target name
alone says where a cell ran. The harness owns all timing and never branches on a target's name.

A target may offer build options (``Configurable``): ``--targets torch-compile:max-autotune``
names the target ``torch-compile`` built with its option ``max-autotune``; the whole word is the
cell's target, so a report tells the two builds apart.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from benchlib.errors import ConfigError, TargetUnavailable, unknown_choice

ENTRY_POINT_GROUP = "benchlib.targets"


class DeviceKind(str, enum.Enum):
    """Where a target runs; also the name of the selector that expands to such targets."""

    CPU = "cpu"
    CUDA = "cuda"

    @property
    def selector(self) -> str:
        """The ``--targets`` word that expands to the available targets of this kind."""
        return "gpu" if self is DeviceKind.CUDA else "cpu"


class Precision(str, enum.Enum):
    """Numeric precision of a cell; each has its own verification tolerance."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @classmethod
    def parse(cls, text: str) -> Precision:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise unknown_choice("precision", text, [p.value for p in cls]) from None


@dataclass(frozen=True)
class Prepared:
    """A model built for one target and bound to fixed, device-resident example inputs.

    Attributes:
        run: one inference on the bound inputs; returns the outputs. May return before the
            device has finished (CUDA): the harness calls ``synchronize`` when it needs that.
        synchronize: block until all work queued by ``run`` has finished.
        info: facts about the build for the report (engine version, kernels, whether a sparse
            kernel ran, build time in seconds). Values must be JSON-serializable.
        rebind: when the target can, replaces the bound inputs with others of the same shape
            and dtype (as ``prepare`` received them: fp32, on the CPU); the harness uses it to
            rotate input buffers so that no input stays cache-resident across samples.
    """

    run: Callable[[], Any]
    synchronize: Callable[[], None]
    info: Mapping[str, Any] = field(default_factory=dict)
    rebind: Callable[[tuple[torch.Tensor, ...]], None] | None = None


@runtime_checkable
class Target(Protocol):
    """A backend on a device kind. Implementations live in ``targets/``, one file each.

    Class attributes declare what the target is; the harness reads them and never its name.
    """

    name: ClassVar[str]
    device_kind: ClassVar[DeviceKind]
    precisions: ClassVar[frozenset[Precision]]
    exploits_sparsity: ClassVar[bool]

    def unavailable_reason(self) -> str | None:
        """None when this target can run here, else one line saying what is missing."""
        ...

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        """Build ``model`` (fp32, eval mode, on the CPU) for this target.

        ``inputs`` are fp32 example inputs on the CPU; the target moves and casts them as it
        needs and binds them to the returned ``Prepared``. Must not modify ``model``.
        Raises ExportError when the backend cannot build the model.
        """
        ...


@runtime_checkable
class Configurable(Protocol):
    """A target with named build options, chosen as ``NAME:OPTION`` in ``--targets``."""

    options: ClassVar[Mapping[str, str]]
    """Option name -> one line saying what it changes."""

    def with_option(self, option: str) -> Target:
        """This target built with ``option`` (one of ``options``)."""
        ...


OPTION_SEPARATOR = ":"


def target_version(target: Target) -> str | None:
    """The backend's version as the target reports it (``version()``), else None."""
    version = getattr(target, "version", None)
    return version() if callable(version) else None


@dataclass(frozen=True)
class Selection:
    """The outcome of expanding ``--targets``: what runs, and what was skipped and why."""

    targets: tuple[str, ...]
    skipped: Mapping[str, str]


class TargetRegistry:
    """Name -> target, loaded lazily from ``"module:attr"`` references.

    ``TargetRegistry.from_entry_points()`` reads the installed entry points; tests build one
    from an explicit mapping. Loaded targets are cached per registry instance.
    """

    def __init__(self, references: Mapping[str, str | type[Target]]) -> None:
        self._references = dict(references)
        self._loaded: dict[str, Target] = {}

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> TargetRegistry:
        return cls({ep.name: ep.value for ep in entry_points(group=group)})

    @property
    def references(self) -> Mapping[str, str | type[Target]]:
        """Name -> ``"module:attr"`` (or class): enough to rebuild the registry in a worker."""
        return dict(self._references)

    def names(self) -> list[str]:
        return sorted(self._references)

    def get(self, name: str) -> Target:
        """The target registered as ``name``, or ``NAME:OPTION`` built with that option.

        ConfigError listing the known names (or the target's options) when there is none.
        """
        base, separator, option = name.partition(OPTION_SEPARATOR)
        if base not in self._references:
            raise unknown_choice("target", base, [*self._references, "cpu", "gpu"])
        if base not in self._loaded:
            self._loaded[base] = _instantiate(base, self._references[base])
        target = self._loaded[base]
        if not separator:
            return target
        if not isinstance(target, Configurable) or not target.options:
            raise ConfigError(f"target {base!r} has no build options (got {option!r})")
        if option not in target.options:
            raise unknown_choice(f"option of target {base}", option, target.options)
        if name not in self._loaded:
            self._loaded[name] = target.with_option(option)
        return self._loaded[name]

    def require(self, name: str) -> Target:
        """Like ``get`` but raises TargetUnavailable when the target cannot run here."""
        target = self.get(name)
        reason = target.unavailable_reason()
        if reason is not None:
            raise TargetUnavailable(name, reason)
        return target

    def select(self, words: Iterable[str]) -> Selection:
        """Expand selectors (``cpu``, ``gpu``) and names into the targets to run.

        A selector expands to the available targets of its device kind; the unavailable ones
        go to ``skipped`` with their reason. A target named explicitly must be available, else
        TargetUnavailable. Order follows the words; duplicates are dropped.
        """
        chosen: list[str] = []
        skipped: dict[str, str] = {}
        selectors = {kind.selector: kind for kind in DeviceKind}
        for word in (w.strip() for w in words):
            if not word:
                continue
            if word in selectors:
                for name in self.names():
                    try:
                        target = self.get(name)
                    except TargetUnavailable as exc:  # its module does not even import here
                        skipped[name] = exc.reason
                        continue
                    if target.device_kind is not selectors[word]:
                        continue
                    reason = target.unavailable_reason()
                    if reason is None:
                        chosen.append(name)
                    else:
                        skipped[name] = reason
            else:
                self.require(word)
                chosen.append(word)
        unique = tuple(dict.fromkeys(chosen))
        if not unique:
            raise ConfigError(
                "no target to run: "
                + ("; ".join(f"{n}: {r}" for n, r in skipped.items()) or "none selected")
            )
        return Selection(unique, skipped)


def _instantiate(name: str, reference: str | type[Target]) -> Target:
    if isinstance(reference, str):
        module_name, _, attr = reference.partition(":")
        try:
            module = __import__(module_name, fromlist=[attr])
            factory = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise TargetUnavailable(name, f"cannot load {reference!r}: {exc}") from exc
    else:
        factory = reference
    try:
        target = factory()
    except Exception as exc:  # a broken third-party target must not break the others
        raise TargetUnavailable(name, f"{reference!r} failed to start: {exc}") from exc
    if not isinstance(target, Target):
        raise TargetUnavailable(name, f"{reference!r} does not implement the Target protocol")
    return target

"""The exception tree of benchlib.

Library code raises these; only ``benchlib.cli`` catches them, prints one line and exits
non-zero. Messages name the offending value and, where there is a fixed set, the valid choices.

* BenchError
  + ConfigError          bad user input: unknown name, amount out of range, bad file
  + ModelLoadError       a model file that cannot be read or is not what it claims
  + PruningError         a model the pruner cannot handle; names the layer and why
  + TargetUnavailable    missing library or device; ``.reason`` is what ``bench targets`` prints
  + ExportError          a target could not build the model
  + VerificationError    a target's outputs differ from eager beyond tolerance
  + WorkerError          a worker failed; carries its traceback
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """Base class of every error benchlib raises on purpose."""


class ConfigError(BenchError):
    """Bad user input: an unknown name, a value out of range, an unreadable config file."""


class ModelLoadError(BenchError):
    """A model file that cannot be read, or is not what it claims to be."""


class PruningError(BenchError):
    """A model the pruner cannot handle; the message names the layer and why."""


class TargetUnavailable(BenchError):
    """A target cannot run here: a missing library or device.

    Attributes:
        target: the target's registered name.
        reason: one line, as ``bench targets`` prints it.
    """

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"target {target!r} is unavailable: {reason}")
        self.target = target
        self.reason = reason


class ExportError(BenchError):
    """A target could not build (export, compile, trace) the model."""


class VerificationError(BenchError):
    """A target's outputs differ from eager fp32 beyond the precision's tolerance."""


class WorkerError(BenchError):
    """A worker failed; ``traceback`` holds the worker's formatted traceback."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


def unknown_choice(
    kind: str, value: str, choices: Iterable[str], *, listing: str | None = None
) -> ConfigError:
    """Build the standard one-line error for an unknown name.

    ``listing`` replaces the list of choices where it would be too long for one line (the
    model zoo); the closest match is suggested either way.

    >>> str(unknown_choice("target", "trt", ["tensorrt", "torch-eager"]))
    "unknown target 'trt'; choose from: tensorrt, torch-eager (did you mean 'tensorrt'?)"
    """
    known = sorted(choices)
    message = f"unknown {kind} {value!r}; choose from: {listing or ', '.join(known)}"
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return ConfigError(message)

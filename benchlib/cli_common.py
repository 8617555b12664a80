"""What every ``bench`` command shares: turning a BenchError into one line and an exit code."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from benchlib.errors import BenchError, ConfigError, ModelLoadError, TargetUnavailable

F = TypeVar("F", bound=Callable[..., Any])
BAD_INPUT = (ConfigError, ModelLoadError, TargetUnavailable)

# Options several commands take, written once.
INPUT_SIZE = click.option(
    "--input-size", type=int, help="Square input side, overriding the model's own."
)
WEIGHTS = click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="A state dict for the model (loaded with weights_only=True).",
)
TRUST = click.option("--trust", is_flag=True, help="Allow loading a pickled whole module.")
OUT_ROOT = click.option(
    "--out",
    "out_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Folder for run folders.",
)


def handle_errors(command: F) -> F:
    """Turn a BenchError into one line on stderr and an exit code (traceback with -v)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BenchError as exc:
            ctx = click.get_current_context()
            if ctx.find_root().params.get("verbose"):
                click.echo(traceback.format_exc(), err=True)
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2 if isinstance(exc, BAD_INPUT) else 1)

    return wrapper  # type: ignore[return-value]


def si_count(value: int) -> str:
    """A count with an SI prefix, four significant digits: ``1.052 G``, ``6.92 M``, ``512``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {unit}"
    return str(value)

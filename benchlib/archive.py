"""Pruned variants as files: a TorchScript archive anyone can benchmark, its recipe beside it.

:func:`save_pruned` traces the pruned module (``torch.jit.trace``), checks the trace against
eager on two inputs (batch 1 and batch 3, so a batch size frozen into the graph is caught),
and writes

* ``FILE``: the TorchScript archive, carrying the extra file ``benchlib.json`` (the input
  shape, as :func:`benchlib.loading.load_model` reads it, plus the spec, the recipe's hash and
  the calibration data) and ``recipe.json`` (the full recipe, so the archive stands alone);
* ``FILE`` with the suffix ``.recipe.json`` (``r56.pt`` -> ``r56.recipe.json``): the recipe,
  :meth:`Recipe.to_json`, which replays the pruning on the dense weights.

``bench run --models FILE`` then measures the archive as a model of its own.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.jit._trace import TracerWarning

from benchlib.errors import ConfigError, ExportError, VerificationError
from benchlib.harness.verify import verify
from benchlib.loading import SHAPE_FILE
from benchlib.pruning import Recipe, Variant
from benchlib.target import Precision

__all__ = [
    "RECIPE_FILE",
    "RECIPE_SUFFIX",
    "archive_metadata",
    "recipe_path",
    "save_module",
    "save_pruned",
    "trace_checked",
]

RECIPE_SUFFIX = ".recipe.json"
RECIPE_FILE = "recipe.json"  # the archive's own copy of the recipe (an extra file)
_JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"  # trace, trace_method, save, ...
_CHECK_BATCH = 3  # a second batch size for the trace check, other than 1 and the usual 8


def recipe_path(path: str | Path) -> Path:
    """Where :func:`save_pruned` writes the recipe of ``path``: its suffix replaced by
    ``.recipe.json`` (``out/r56.pt`` -> ``out/r56.recipe.json``; ``r56`` -> ``r56.recipe.json``)."""
    path = Path(path)
    return path.with_name(path.stem + RECIPE_SUFFIX) if path.suffix else Path(f"{path}.recipe.json")


def trace_checked(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``module`` in eval mode, checked against eager fp32.

    The trace is compared with eager on ``example`` and on a batch of 3 other inputs
    (relative error within :data:`benchlib.harness.verify.TOLERANCE` for fp32). The module is
    left in eval mode.

    Raises:
        ExportError: the module cannot be traced.
        VerificationError: the trace's outputs differ from eager (data-dependent control flow,
            or a batch size frozen into the graph).
    """
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The deprecation notice speaks to authors of torch code; tracer warnings are judged
        # by the comparison below, which catches a trace that does not match eager.
        warnings.filterwarnings("ignore", _JIT_DEPRECATED, FutureWarning)
        warnings.filterwarnings("ignore", category=TracerWarning)
        try:
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]  # torch leaves it bare
                module, example, check_trace=False
            )
        except Exception as exc:  # the JIT raises many unrelated types
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise ExportError(f"cannot trace the pruned {type(module).__name__}: {first}") from exc
        generator = torch.Generator().manual_seed(1)
        other = torch.randn((_CHECK_BATCH, *example.shape[1:]), generator=generator)
        for inputs in (example, other.to(example.device, example.dtype)):
            try:
                verify(traced(inputs), module(inputs), Precision.FP32)
            except VerificationError as exc:
                raise VerificationError(
                    f"the traced {type(module).__name__} differs from eager at batch "
                    f"{inputs.shape[0]}: {exc}; nothing was saved"
                ) from exc
    if not isinstance(traced, torch.jit.ScriptModule):
        raise ExportError(f"torch.jit.trace returned a {type(traced).__name__}, not a module")
    return traced


def save_pruned(variant: Variant, path: str | Path) -> tuple[Path, Path]:
    """Write ``variant`` as a TorchScript archive at ``path`` and its recipe beside it.

    The archive is the trace of the pruned module in eval mode on its batch-1 example input
    (checked by :func:`trace_checked` before anything is written); its ``benchlib.json`` holds
    ``input_shape`` (so ``load_model(path)`` gets the variant's input shape back), ``model``,
    ``spec``, ``recipe_sha256`` and, for methods that ranked channels on data,
    ``calibration_data`` and ``synthetic``. Missing parent folders are created; existing
    files are replaced (each written to a temporary name first, then renamed).

    Returns:
        (archive path, recipe path); the recipe path is :func:`recipe_path` of ``path``.

    Raises:
        ConfigError: ``path`` is a folder or cannot be written.
        ExportError, VerificationError: see :func:`trace_checked`.
    """
    archive = Path(path)
    recipe_file = recipe_path(archive)
    save_module(
        variant.module,
        variant.model.example_input(1),
        archive,
        _metadata(variant),
        extra={RECIPE_FILE: variant.recipe.to_json()},
    )
    try:
        partial = recipe_file.with_name(f".{recipe_file.name}.partial")
        partial.write_text(variant.recipe.to_json() + "\n", encoding="utf-8")
        os.replace(partial, recipe_file)
    except OSError as exc:
        raise ConfigError(f"cannot write {str(recipe_file)!r}: {exc}") from exc
    return archive, recipe_file


def save_module(
    module: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    metadata: Mapping[str, Any],
    *,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``module`` as a TorchScript archive at ``path`` that ``bench run --models`` reads:
    traced and checked by :func:`trace_checked`, with ``metadata`` (which must hold
    ``input_shape``) as its ``benchlib.json`` and ``extra`` as further extra files. Written to
    a temporary name first, then renamed; missing parent folders are created.

    Raises:
        ConfigError: ``path`` is a folder or cannot be written.
        ExportError, VerificationError: see :func:`trace_checked`.
    """
    archive = Path(path)
    if archive.is_dir():
        raise ConfigError(f"output {str(archive)!r} is a folder; give a file name, e.g. model.pt")
    traced = trace_checked(module, example)
    files = {SHAPE_FILE: json.dumps(dict(metadata), sort_keys=True), **(extra or {})}
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(f".{archive.name}.partial")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _JIT_DEPRECATED, FutureWarning)
            torch.jit.save(traced, str(partial), _extra_files=files)
        os.replace(partial, archive)
    except (OSError, RuntimeError) as exc:  # torch.jit.save reports OS failures as RuntimeError
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ConfigError(f"cannot write {str(archive)!r}: {first}") from exc
    return archive


def _metadata(variant: Variant) -> dict[str, Any]:
    recipe: Recipe = variant.recipe
    data: dict[str, Any] = {
        "input_shape": list(variant.model.input_shape),
        "model": variant.model.name,
        "spec": recipe.spec,
        "recipe_sha256": recipe.sha256,
    }
    if "data" in recipe.details:
        data["calibration_data"] = str(recipe.details["data"])
        data["synthetic"] = bool(recipe.details.get("synthetic", False))
    return data


def archive_metadata(path: str | Path) -> Mapping[str, Any] | None:
    """The ``benchlib.json`` of a TorchScript archive, read from the zip without loading any
    code; None when ``path`` is no such archive or holds no readable ``benchlib.json``."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{SHAPE_FILE}")), None)
            if name is None:
                return None
            data = json.loads(archive.read(name))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return data if isinstance(data, dict) else None

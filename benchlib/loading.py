"""Loading models from what users name: a zoo name, a file, or a factory.

* A zoo name: :func:`benchlib.models.build_model`.
* An existing file, told apart by its contents, not its extension: a TorchScript archive, a
  ``torch.export`` archive, or (only when trusted) a pickled whole module.
* ``package.module:function``: imported from the current directory and called.

Nothing here runs code from a file unless asked: state dicts load with ``weights_only=True``,
archives load as what they are, and a pickle needs ``trust=True``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchlib.errors import ConfigError, ModelLoadError
from benchlib.models import (
    Model,
    build_model,
    check_shape,
    is_zoo_name,
    unknown_model,
    valid_size,
)

__all__ = ["load_model"]

SHAPE_FILE = "benchlib.json"  # an archive's extra file: {"input_shape": [3, 32, 32]}
DEFAULT_INPUT_SIZE = 224  # for files and factories that store no shape
# Zip members that mark a torch.export archive (current format, and torch < 2.6's).
_EXPORT_MEMBERS = frozenset(
    {"archive_format", "models/model.json", "serialized_exported_program.json"}
)


def load_model(
    ref: str,
    *,
    input_size: int | None = None,
    weights: str | Path | None = None,
    trust: bool = False,
) -> Model:
    """Load a model from a zoo name, a file or a ``package.module:function`` factory, on cpu.

    * A zoo name: :func:`build_model`.
    * An existing file, told apart by its contents, not its extension: a TorchScript archive
      (``torch.jit.load``), a ``torch.export`` archive (``torch.export.load(path).module()``;
      its train/eval behaviour was fixed at export, so export a model in eval mode), or a
      pickled whole module (``torch.load(weights_only=False)``) only when ``trust`` is True,
      since unpickling can run arbitrary code.
    * ``package.module:function``: imported (the current directory is importable), called with
      no arguments, returning an nn.Module or a ``(module, input_shape)`` tuple.

    The input shape is the one the source stores (``benchlib.json`` in an archive's extra
    files, a torch.export archive's example input, a factory's tuple), else ``(3, S, S)`` with
    ``S = input_size or 224``. A given ``input_size`` replaces a stored shape's last two dims.

    ``weights``: a state dict file (``torch.load(weights_only=True)``; a dict with a top-level
    ``"state_dict"`` entry is accepted), loaded strictly into the module.

    Raises:
        ConfigError: an unknown name (listing the zoo), a missing file, a factory that cannot
            be found, an input size the model cannot take (for a torch.export archive: one
            exported with a static size, asked for another).
        ModelLoadError: an unreadable or corrupt file (naming it and what was tried), a pickle
            without ``trust``, a factory that fails, weights that do not fit (naming the keys).
    """
    size = None if input_size is None else valid_size(input_size)
    path = Path(ref)
    if is_zoo_name(ref):
        model = build_model(ref, input_size=size)
    elif path.is_file():
        model = _load_file(path, size, trust)
    elif path.exists():
        raise ConfigError(f"model path {ref!r} is not a file")
    elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", ref):
        model = _load_factory(ref, size)
    elif "/" in ref or os.sep in ref or path.suffix:
        raise ConfigError(f"model file {ref!r} does not exist")
    else:
        raise unknown_model(ref)
    if weights is not None:
        _load_weights(model, Path(weights))
    return model


def _with_size(stored: tuple[int, ...] | None, input_size: int | None) -> tuple[int, ...]:
    if stored is None:
        size = DEFAULT_INPUT_SIZE if input_size is None else input_size
        return (3, size, size)
    if input_size is None:
        return stored
    if len(stored) < 2:
        raise ConfigError(f"input size {input_size} does not apply to input shape {stored}")
    return (*stored[:-2], input_size, input_size)


# -- files -----------------------------------------------------------------------------------------


def _archive_kind(path: Path) -> str:
    """Which loader a file needs, "torchscript", "export" or "pickle": from the zip member
    names (all three are zip archives), or for a legacy ``torch.save`` file its first byte."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = {name.split("/", 1)[-1] for name in archive.namelist()}
            if "constants.pkl" in members or any(m.startswith("code/") for m in members):
                return "torchscript"
            if members & _EXPORT_MEMBERS:
                return "export"
            if "data.pkl" in members:
                return "pickle"
        else:
            with path.open("rb") as file:
                if file.read(1) == b"\x80":  # pickle's PROTO opcode (protocol >= 2)
                    return "pickle"
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc
    raise ModelLoadError(
        f"cannot read model file {path}: not a model archive (looked for a TorchScript, "
        "torch.export or torch.save zip archive, or a pickle)"
    )


def _load_file(path: Path, input_size: int | None, trust: bool) -> Model:
    kind = _archive_kind(path)
    extra: dict[str, Any] = {SHAPE_FILE: ""}
    exported: tuple[int, ...] | None = None
    if kind == "torchscript":
        module = _guarded(path, "torch.jit.load", partial(_jit_load, path, extra))
    elif kind == "export":
        program = _guarded(
            path, "torch.export.load", partial(torch.export.load, path, extra_files=extra)
        )
        module = _guarded(path, "ExportedProgram.module()", program.module)
        exported = _export_shape(program, path, input_size)
    elif trust:
        load = partial(torch.load, path, map_location="cpu", weights_only=False)
        module = _guarded(path, "torch.load(weights_only=False)", load)
    else:
        raise _refuse_pickle(path)
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}, not an nn.Module")
    module = module.to(dtype=torch.float32)
    if kind == "export":
        # An exported module refuses .eval(): its graph's behaviour was fixed at export. Only
        # the flags are set, through the base class.
        nn.Module.train(module, False)
    else:
        module.eval()
    raw = extra[SHAPE_FILE]
    try:
        stored = json.loads(raw)["input_shape"] if raw else exported
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: {SHAPE_FILE} holds no input_shape: {exc}") from exc
    if stored is not None:
        stored = check_shape(stored, f"{path}: input shape", ModelLoadError)
    shape = _with_size(stored, input_size)
    return Model(name=str(path), module=module, input_shape=shape, source=kind)


def _guarded(path: Path, what: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as exc:
        raise ModelLoadError(f"cannot load model file {path} with {what}: {exc}") from exc


def _jit_load(path: Path, extra: dict[str, Any]) -> Any:
    # The deprecation notice is for authors of torch code, not for someone benchmarking a
    # TorchScript archive they already have.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
        return torch.jit.load(  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            str(path), map_location="cpu", _extra_files=extra
        )


def _export_shape(
    program: torch.export.ExportedProgram, path: Path, input_size: int | None
) -> tuple[int, ...] | None:
    """The example input's shape without the batch dim. Raises ConfigError when a program
    exported with a static height and width is asked for another ``input_size``."""
    user_inputs = set(program.graph_signature.user_inputs)
    nodes = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    dims = tuple(getattr(nodes[0].meta.get("val"), "shape", ())) if nodes else ()
    static = len(dims) >= 3 and all(type(d) is int for d in dims)
    if static and input_size is not None and dims[-2:] != (input_size, input_size):
        raise ConfigError(
            f"{path} was exported for inputs of shape {dims}; it cannot take input size "
            f"{input_size} (export it with a dynamic height and width to vary it)"
        )
    inputs = program.example_inputs
    if inputs and inputs[0] and isinstance(inputs[0][0], torch.Tensor):
        return tuple(inputs[0][0].shape[1:])
    return tuple(int(d) for d in dims[1:]) if static else None


def _refuse_pickle(path: Path) -> ModelLoadError:
    try:  # weights_only runs no code, so it is safe to look for a state dict
        is_state_dict = isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
    except Exception:
        is_state_dict = False
    if is_state_dict:
        return ModelLoadError(f"{path} is a state dict, not a model: pass it as weights")
    return ModelLoadError(
        f"{path} is a pickled Python object; benchlib will not unpickle it, since that can run "
        "arbitrary code. Pass --trust (trust=True) if the file is trusted, or save the model "
        "as a TorchScript or torch.export archive."
    )


# -- factories and weights -----------------------------------------------------------------------


def _load_factory(ref: str, input_size: int | None) -> Model:
    module_name, function_name = ref.split(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        namespace = importlib.import_module(module_name)
    except Exception as exc:
        name = getattr(exc, "name", None)  # set on ModuleNotFoundError
        if isinstance(exc, ModuleNotFoundError) and f"{module_name}.".startswith(f"{name}."):
            raise ConfigError(f"factory {ref!r}: no module named {name!r}") from exc
        raise ModelLoadError(f"factory {ref!r}: importing {module_name} failed: {exc}") from exc
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(namespace, function_name, None)
    if not callable(factory):
        raise ConfigError(f"factory {ref!r}: {module_name} has no function {function_name!r}")
    try:
        # Seeded like the zoo: the same factory gives the same weights in every process, so a
        # recipe made in the runner replays in a worker.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            result = factory()
    except Exception as exc:
        raise ModelLoadError(f"factory {ref!r} raised {type(exc).__name__}: {exc}") from exc
    stored = None
    if isinstance(result, tuple) and len(result) == 2:
        result, shape = result
        stored = check_shape(shape, f"factory {ref!r} input shape", ModelLoadError)
    if not isinstance(result, nn.Module):
        raise ModelLoadError(
            f"factory {ref!r} returned a {type(result).__name__}, "
            "not an nn.Module or a (module, input_shape) tuple"
        )
    module = result.to(dtype=torch.float32).eval()
    shape = _with_size(stored, input_size)
    return Model(name=ref, module=module, input_shape=shape, source="factory")


def _load_weights(model: Model, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelLoadError(
            f"cannot load weights {path} with torch.load(weights_only=True): {first_line}"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"weights {path} are not a state dict of tensors")
    expected = model.module.state_dict()
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        for label, keys in (
            ("missing", [k for k in expected if k not in state]),
            ("unexpected", [k for k in state if k not in expected]),
            ("shape", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise ModelLoadError(
            f"weights {path} do not fit model {model.name!r}: {'; '.join(problems)}"
        )
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights {path} do not fit model {model.name!r}: {exc}") from exc

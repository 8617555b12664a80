"""The model zoo and model loading.

A :class:`Model` is an ``nn.Module`` in eval mode plus the shape of one example input. It comes
from the zoo (:func:`build_model`: every torchvision classification builder and the CIFAR nets
of :mod:`benchlib.cifar_nets`, randomly initialised, never downloaded) or from a reference
(:func:`load_model`: a zoo name, a TorchScript or ``torch.export`` archive, a
``package.module:function`` factory, or a pickled module when trusted).

Input sizes are checked from rules, without a forward pass:

* CIFAR ResNets take any size; ``vgg16_cifar`` takes 32 to 63 pixels (its classifier needs
  exactly 512 features after four 2x2 max-pools and ``AvgPool2d(2)``).
* ViTs take multiples of their patch size (built for that ``image_size``); MaxViT needs every
  block's input to be a multiple of its partition size 7 (221-224, 445-448, ...; built for that
  ``input_size``).
* other torchvision models take sizes from the smallest their weights document
  (``meta["min_size"]``), except where that is the weights' size, not the architecture's
  minimum (EfficientNetV2: 1, Swin: 4). The slow tests check every rule with a forward pass.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from benchlib import cifar_nets
from benchlib.errors import ConfigError, ModelLoadError, unknown_choice

__all__ = ["Model", "build_model", "load_model", "native_input_size", "zoo_names"]

SOURCES = frozenset({"torchvision", "cifar", "torchscript", "export", "factory", "pickle"})
SHAPE_FILE = "benchlib.json"  # an archive's extra file: {"input_shape": [3, 32, 32]}
DEFAULT_INPUT_SIZE = 224  # for files and factories that store no shape

_CIFAR_BUILDERS: Mapping[str, Callable[[], nn.Module]] = MappingProxyType({
    "resnet20": cifar_nets.resnet20,
    "resnet32": cifar_nets.resnet32,
    "resnet56": cifar_nets.resnet56,
    "resnet110": cifar_nets.resnet110,
    "vgg16_cifar": cifar_nets.vgg16_cifar,
})  # fmt: skip
# init_weights=True: left unset, the builders warn; aux_logits=False: eval output is a tensor.
_INCEPTION = MappingProxyType({"init_weights": True, "aux_logits": False})
_BUILDER_KWARGS: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {"googlenet": _INCEPTION, "inception_v3": _INCEPTION}
)
# Where weights.meta["min_size"] is the weights' size rather than the architecture's minimum.
_MIN_SIZE_OVERRIDES: Mapping[str, int] = MappingProxyType({
    **{f"efficientnet_v2_{v}": 1 for v in "sml"},
    **{f"swin_{v}": 4 for v in ("t", "s", "b", "v2_t", "v2_s", "v2_b")},
})  # fmt: skip
# Zip members that mark a torch.export archive (current format, and torch < 2.6's).
_EXPORT_MEMBERS = frozenset(
    {"archive_format", "models/model.json", "serialized_exported_program.json"}
)
# Factories whose results builders read back on the host (RegNet computes its stage widths
# with torch.arange(...).tolist()); a meta build keeps them on the CPU, see _HostIndexTensors.
_HOST_FACTORIES = frozenset({torch.arange, torch.tensor, torch.as_tensor, torch.linspace})


@dataclass(frozen=True, kw_only=True)
class Model:
    """An nn.Module plus the shape of one example input (no batch dim).

    Attributes:
        name: the zoo name, or the file path / ``module:function`` reference it came from.
        module: in eval mode, fp32, on the device it was built on (cpu by default).
        input_shape: one example without the batch dim, e.g. ``(3, 224, 224)``.
        source: "torchvision", "cifar", "torchscript", "export", "factory" or "pickle".

    Raises:
        ConfigError: an empty name, a shape that is not positive ints, an unknown source.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a model needs a non-empty name")
        _check_shape(self.input_shape, f"input_shape of model {self.name!r}", ConfigError)
        if self.source not in SOURCES:
            raise unknown_choice("model source", self.source, SOURCES)

    def example_input(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Deterministic standard-normal input of shape (batch_size, *input_shape).

        Drawn from a private torch.Generator seeded with ``seed`` (the global RNG is untouched),
        in fp32 on the CPU, then moved to ``device`` and cast to ``dtype``: the same values on
        every device. ``device=None`` is the device of the module's first parameter or buffer
        (cpu if it has none), so a model built on "meta" gets a meta tensor.

        Raises:
            ConfigError: a batch size below 1, or a dtype that is not floating point.
        """
        if isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        if not dtype.is_floating_point:
            raise ConfigError(f"example inputs are floating point, got dtype {dtype}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (batch_size, *self.input_shape)
        values = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
        target = _module_device(self.module) if device is None else torch.device(device)
        return values.to(device=target, dtype=dtype)


def zoo_names() -> list[str]:
    """Every name :func:`build_model` takes, sorted: the CIFAR nets and torchvision's
    classification builders (``torchvision.models.list_models(module=torchvision.models)``)."""
    return sorted([*_torchvision_names(), *_CIFAR_BUILDERS])


def native_input_size(name: str) -> int:
    """The input height and width in pixels a zoo model is built for when none is given.

    32 for the CIFAR nets. For torchvision, the crop size of the builder's DEFAULT weights'
    transforms (inception_v3 299, efficientnet_b3 300, swin_v2_t 256, vit_h_14 518, ...) when
    the randomly initialised model can take it, else 224.

    Raises:
        ConfigError: an unknown name (the message lists the zoo).
    """
    if name in _CIFAR_BUILDERS:
        return 32
    crop = int(_default_weights(name).transforms().crop_size[0])
    return crop if _size_problem(name, crop) is None else 224


def build_model(
    name: str, *, input_size: int | None = None, device: torch.device | str = "cpu"
) -> Model:
    """Build a zoo model with random weights (torchvision's ``weights=None``), eval mode, fp32.

    Args:
        name: one of :func:`zoo_names`.
        input_size: input height and width in pixels; None is :func:`native_input_size`.
        device: where parameters are created: the builder runs under ``with torch.device``, so
            ``"meta"`` allocates nothing (for counting the FLOPs of the whole zoo).

    Raises:
        ConfigError: an unknown name (listing the zoo), a bad device, or an input size the
            model cannot take (naming the size and why; the rules are in the module docstring).
    """
    if name not in _CIFAR_BUILDERS and name not in _torchvision_names():
        raise unknown_choice("model", name, zoo_names())
    size = native_input_size(name) if input_size is None else _valid_size(input_size)
    problem = _size_problem(name, size)
    if problem is not None:
        raise ConfigError(f"model {name!r} cannot take input size {size}: {problem}")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"bad device {device!r}: {exc}") from exc
    with torch.device(target), _HostIndexTensors() if target.type == "meta" else nullcontext():
        if name in _CIFAR_BUILDERS:
            module = _CIFAR_BUILDERS[name]()
        else:
            kwargs = dict(_BUILDER_KWARGS.get(name, {}))
            if name.startswith("vit_"):
                kwargs["image_size"] = size
            elif name.startswith("maxvit"):
                kwargs["input_size"] = (size, size)
            module = torchvision.models.get_model(name, weights=None, **kwargs)
    module = module.to(device=target, dtype=torch.float32).eval()
    source = "cifar" if name in _CIFAR_BUILDERS else "torchvision"
    return Model(name=name, module=module, input_shape=(3, size, size), source=source)


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
    size = None if input_size is None else _valid_size(input_size)
    path = Path(ref)
    if ref in _CIFAR_BUILDERS or ref in _torchvision_names():
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
        raise unknown_choice("model", ref, zoo_names())
    if weights is not None:
        _load_weights(model, Path(weights))
    return model


# -- the zoo -------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    names: list[str] = torchvision.models.list_models(module=torchvision.models)
    return names


def _default_weights(name: str) -> Any:
    if name not in _torchvision_names():
        raise unknown_choice("model", name, zoo_names())
    return torchvision.models.get_model_weights(name).DEFAULT


def _valid_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"input size must be a positive number of pixels, got {size!r}")
    return size


def _size_problem(name: str, size: int) -> str | None:
    """Why zoo model ``name`` cannot take ``size`` x ``size`` inputs, or None when it can."""
    if name == "vgg16_cifar" and not 32 <= size <= 63:
        return "its classifier takes 512 features, which its pools give only for 32 to 63 pixels"
    if name in _CIFAR_BUILDERS:
        return None
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return f"its {patch}x{patch} patches need a multiple of {patch}" if size % patch else None
    if name.startswith("maxvit"):
        blocks = [(size - 1) // 2 + 1]  # the stride-2 stem, then four stride-2 blocks
        for _ in range(4):
            blocks.append((blocks[-1] - 1) // 2 + 1)
        if any(block % 7 for block in blocks[1:]):
            return f"its block inputs {blocks[1:]} must be multiples of its partition size 7"
        return None
    minimum = _MIN_SIZE_OVERRIDES.get(name) or int(_default_weights(name).meta["min_size"][0])
    return f"its smallest input is {minimum}x{minimum}" if size < minimum else None


class _HostIndexTensors(TorchFunctionMode):
    """Under ``torch.device("meta")``, create index-like tensors (arange, tensor) on the CPU.

    Meta tensors hold no data, so a builder that reads values back (``.tolist()``) fails on
    them; the few small tensors made here move to the meta device with the module.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        call_kwargs = dict(kwargs or {})
        if func in _HOST_FACTORIES and call_kwargs.get("device") is None:
            call_kwargs["device"] = "cpu"
        return func(*args, **call_kwargs)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_shape(shape: object, what: str, error: type[Exception]) -> tuple[int, ...]:
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise error(f"{what} must be a non-empty sequence of positive ints, got {shape!r}")
    return tuple(shape)


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
        stored = _check_shape(stored, f"{path}: input shape", ModelLoadError)
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
        result = factory()
    except Exception as exc:
        raise ModelLoadError(f"factory {ref!r} raised {type(exc).__name__}: {exc}") from exc
    stored = None
    if isinstance(result, tuple) and len(result) == 2:
        result, shape = result
        stored = _check_shape(shape, f"factory {ref!r} input shape", ModelLoadError)
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

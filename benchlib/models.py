"""The model zoo and model loading.

A :class:`Model` is an ``nn.Module`` in eval mode plus the shape of one example input. It comes
from the zoo (:func:`build_model`: every torchvision classification builder and the CIFAR nets
of :mod:`benchlib.cifar_nets`, randomly initialised, never downloaded) or from a reference
(:func:`benchlib.loading.load_model`: a zoo name, a file or a factory).

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

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from benchlib import cifar_nets
from benchlib.errors import ConfigError, unknown_choice

__all__ = [
    "Model",
    "build_model",
    "is_zoo_name",
    "native_input_size",
    "unknown_model",
    "zoo_names",
]

SOURCES = frozenset({"torchvision", "cifar", "torchscript", "export", "factory", "pickle"})

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
        check_shape(self.input_shape, f"input_shape of model {self.name!r}", ConfigError)
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


ZOO_LISTING = "a zoo model (`bench models` lists them), a model file, or package.module:function"


def unknown_model(name: str) -> ConfigError:
    """The error for a name that is neither a zoo model nor a file nor a factory."""
    return unknown_choice("model", name, zoo_names(), listing=ZOO_LISTING)


def is_zoo_name(name: str) -> bool:
    """Whether :func:`build_model` knows ``name``."""
    return name in _CIFAR_BUILDERS or name in _torchvision_names()


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
    name: str,
    *,
    input_size: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Model:
    """Build a zoo model with random weights (torchvision's ``weights=None``), eval mode, fp32.

    The weights are drawn from torch's generator seeded with ``seed`` inside
    ``torch.random.fork_rng``: the same name and seed give the same model every time (so
    recipes replay and runs compare), and the caller's random state is left as it was.

    Args:
        name: one of :func:`zoo_names`.
        input_size: input height and width in pixels; None is :func:`native_input_size`.
        device: where parameters are created: the builder runs under ``with torch.device``, so
            ``"meta"`` allocates nothing (for counting the FLOPs of the whole zoo).

    Raises:
        ConfigError: an unknown name (listing the zoo), a bad device, or an input size the
            model cannot take (naming the size and why; the rules are in the module docstring).
    """
    if not is_zoo_name(name):
        raise unknown_model(name)
    size = native_input_size(name) if input_size is None else valid_size(input_size)
    problem = _size_problem(name, size)
    if problem is not None:
        raise ConfigError(f"model {name!r} cannot take input size {size}: {problem}")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"bad device {device!r}: {exc}") from exc
    host_index = _HostIndexTensors() if target.type == "meta" else nullcontext()
    with torch.random.fork_rng(devices=[]), torch.device(target), host_index:
        torch.manual_seed(seed)
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


# -- the zoo -------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    names: list[str] = torchvision.models.list_models(module=torchvision.models)
    return names


def _default_weights(name: str) -> Any:
    if name not in _torchvision_names():
        raise unknown_model(name)
    return torchvision.models.get_model_weights(name).DEFAULT


def valid_size(size: object) -> int:
    """``size`` if it is a positive int, else ConfigError."""
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


def check_shape(shape: object, what: str, error: type[Exception]) -> tuple[int, ...]:
    """``shape`` as a tuple if it is a non-empty sequence of positive ints, else ``error``."""
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise error(f"{what} must be a non-empty sequence of positive ints, got {shape!r}")
    return tuple(shape)

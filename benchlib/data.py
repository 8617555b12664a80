"""Labelled images for pruning criteria (HRank calibration, Taylor gradients) and training.

A source is one of:

* ``digits``: scikit-learn's 8x8 grayscale digits (10 classes, no network). A fixed shuffle
  (seed 0, whatever ``seed`` is) puts the last 20% in ``test``. Pixels are scaled to [0, 1],
  resized bilinearly and normalized with mean 0.5, std 0.5.
* ``synthetic``: ``torch.randn`` images and uniform labels over 10 classes, seeded (train and
  test draw from different seeds); marked ``synthetic=True`` so that reports can say so.
* a CIFAR-10 / CIFAR-100 "python version" folder (or a folder holding ``cifar-10-batches-py``
  or ``cifar-100-python``), normalized with that dataset's usual per-channel mean and std.
* an ImageFolder directory (class subfolders of images), optionally with ``train/`` and
  ``test/`` (or ``val/``) subfolders; the ImageNet evaluation transform (resize the shorter side
  to size / 0.875, center-crop) and ImageNet mean and std.

Grayscale sources repeat to any channel count; RGB sources give 3 channels or their mean for 1.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional

from benchlib.errors import ConfigError, unknown_choice

DATA_SOURCES = ("digits", "synthetic")
"""The named sources; any other source is a path."""

SPLITS = ("train", "test")
SYNTHETIC_SIZE = 256
"""Images in a synthetic split when no ``limit`` is given."""

_PATHS = "an ImageFolder directory or a CIFAR-10/100 python folder"
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FILES = {
    10: ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels"),
    100: ({"train": ["train"], "test": ["test"]}, b"fine_labels"),
}


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """Images in memory, ready for a model.

    Attributes:
        images: float32, (N, C, H, W), normalized.
        labels: int64, (N,), in [0, num_classes).
        num_classes: the number of classes of the source.
        source: what it was loaded from, for reports ("digits", "synthetic (seed 0)", a path).
        synthetic: True for random data; reports must label results built from it.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    source: str
    synthetic: bool

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.float32:
            got = f"{self.images.dtype} {tuple(self.images.shape)}"
            raise ConfigError(f"dataset images must be float32 (N, C, H, W); got {got}")
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise ConfigError("dataset labels must be int64 with one label per image")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1; got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_dataset(
    source: str,
    *,
    split: str = "train",
    input_shape: tuple[int, int, int],
    seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """Load ``split`` of ``source`` as ``input_shape`` (C, H, W) images.

    ``limit`` caps the number of images (CIFAR: the first ones, which are in random order;
    ImageFolder: a ``seed``-ed random subset; only those are decoded). ``seed`` also drives
    synthetic data.

    Raises:
        ConfigError: an unknown source or split, a folder of neither layout, a bad shape/limit.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(f"input_shape must be three positive ints (C, H, W); got {input_shape}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1; got {limit}")
    if source == "synthetic":
        return _synthetic(split, input_shape, seed, limit or SYNTHETIC_SIZE)
    if source == "digits":
        pixels, labels = _digits(split)
        return _finish(pixels[:limit], labels[:limit], 10, "digits", input_shape, (0.5,), (0.5,))
    path = Path(source).expanduser()
    cifar = _cifar_folder(path) if path.is_dir() else None
    if cifar is not None:
        folder, classes = cifar
        pixels, labels = _cifar(folder, classes, split, limit)
        mean, std = _CIFAR_STATS[classes]
        return _finish(pixels, labels, classes, str(path), input_shape, mean, std)
    if path.is_dir():
        return _image_folder(path, split, input_shape, seed, limit)
    raise _bad_source(source)


def batches(
    dataset: Dataset,
    batch_size: int,
    num_batches: int | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches of ``batch_size`` (the last one may be smaller), lazily.

    At most ``num_batches`` batches (all when None; fewer when the data runs out). ``shuffle``
    draws one permutation from a generator seeded with ``seed``; the global RNG is untouched.

    Raises:
        ConfigError: ``batch_size`` < 1 or ``num_batches`` < 0 (at the call).
    """
    if batch_size < 1 or (num_batches is not None and num_batches < 0):
        raise ConfigError(
            f"need batch_size >= 1, num_batches >= 0; got {batch_size}, {num_batches}"
        )
    count = len(dataset)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    starts = range(0, count, batch_size)[:num_batches]
    return (
        (dataset.images[order[i : i + batch_size]], dataset.labels[order[i : i + batch_size]])
        for i in starts
    )


def _finish(
    pixels: Tensor,
    labels: Tensor,
    classes: int,
    source: str,
    shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> Dataset:
    """[0, 1] pixels (N, c, h, w) -> resized, channel-matched, normalized Dataset."""
    channels, height, width = shape
    pixels = pixels.to(torch.float32)
    if tuple(pixels.shape[2:]) != (height, width):
        pixels = functional.interpolate(
            pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    stats = torch.tensor([mean, std], dtype=torch.float32)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, channels, -1, -1)
        stats = stats.expand(-1, channels)
    elif channels == 1:
        pixels = pixels.mean(dim=1, keepdim=True)
        stats = stats.mean(dim=1, keepdim=True)
    elif channels != pixels.shape[1]:
        raise ConfigError(
            f"{source} has {pixels.shape[1]}-channel images; input_shape asks for {channels} "
            f"channels (use {pixels.shape[1]} or 1)"
        )
    images = (pixels - stats[0].view(1, -1, 1, 1)) / stats[1].view(1, -1, 1, 1)
    return Dataset(
        images=images.contiguous(),
        labels=labels.to(torch.int64),
        num_classes=classes,
        source=source,
        synthetic=False,
    )


def _synthetic(split: str, shape: tuple[int, int, int], seed: int, count: int) -> Dataset:
    generator = torch.Generator().manual_seed(2 * seed + SPLITS.index(split))
    images = torch.randn(count, *shape, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    source = f"synthetic (seed {seed})"
    return Dataset(images=images, labels=labels, num_classes=10, source=source, synthetic=True)


def _digits(split: str) -> tuple[Tensor, Tensor]:
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError:
        raise ConfigError(
            "the digits source needs scikit-learn: pip install 'benchlib[data]'"
        ) from None
    bunch = datasets.load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = len(labels) - len(labels) // 5
    chosen = order[:cut] if split == "train" else order[cut:]
    return pixels[chosen], labels[chosen]


def _cifar_folder(path: Path) -> tuple[Path, int] | None:
    """(the python folder, 10 or 100) if ``path`` is or holds one, else None."""
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (folder / "data_batch_1").is_file() or (folder / "batches.meta").is_file():
            return folder, 10
        if (folder / "meta").is_file() and (folder / "train").is_file():
            return folder, 100
    return None


def _cifar(folder: Path, classes: int, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    """Read CIFAR pickles, stopping once ``limit`` images are in.

    These are pickles, the official format: unpickling runs code chosen by whoever wrote the
    file, so only folders the user pointed at are read.
    """
    files, label_key = _CIFAR_FILES[classes]
    pixels, labels, have = [], [], 0
    for name in files[split]:
        if limit is not None and have >= limit:
            break
        try:
            with open(folder / name, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            targets = batch[label_key]
            take = len(targets) if limit is None else min(len(targets), limit - have)
            pixels.append(torch.as_tensor(batch[b"data"][:take]).reshape(take, 3, 32, 32))
            labels.append(torch.as_tensor(targets[:take], dtype=torch.int64))
        except Exception as error:  # a damaged pickle can raise almost anything
            raise ConfigError(f"cannot read CIFAR file {str(folder / name)!r}: {error!r}") from None
        have += take
    return torch.cat(pixels).to(torch.float32) / 255.0, torch.cat(labels)


def _image_folder(
    path: Path, split: str, shape: tuple[int, int, int], seed: int, limit: int | None
) -> Dataset:
    from torchvision import datasets, transforms

    folder = _split_folder(path, split)
    # The ImageNet evaluation transform: shorter side to size / 0.875, then a center crop.
    resize = transforms.Resize(round(max(shape[1:]) / 0.875))
    transform = transforms.Compose(
        [resize, transforms.CenterCrop(shape[1:]), transforms.ToTensor()]
    )
    try:
        data = datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise _bad_source(str(path), f"{error}".strip()) from None
    indices = list(range(len(data)))
    if limit is not None and limit < len(indices):
        chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
        indices = sorted(chosen[:limit].tolist())
    samples = [data[i] for i in indices]
    pixels = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return _finish(pixels, labels, len(data.classes), str(path), shape, *_IMAGENET)


def _split_folder(path: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (path / name).is_dir():
            return path / name
    if any((path / name).is_dir() for name in ("train", "test", "val")):
        raise ConfigError(f"{str(path)!r} has split subfolders but none for split {split!r}")
    return path


def _bad_source(source: str, why: str = "") -> ConfigError:
    listing = f"{', '.join(DATA_SOURCES)}, {_PATHS}"
    error = unknown_choice("data source", source, DATA_SOURCES, listing=listing)
    return ConfigError(f"{error} ({why})") if why else error

"""Datasets for pruning criteria: digits, synthetic, ImageFolder and CIFAR python folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchlib.data import DATA_SOURCES, Dataset, batches, load_dataset
from benchlib.errors import ConfigError


def test_digits_shapes_classes_and_splits() -> None:
    train = load_dataset("digits", input_shape=(3, 16, 16))
    test = load_dataset("digits", split="test", input_shape=(1, 8, 8))
    assert train.images.shape == (1438, 3, 16, 16)
    assert test.images.shape == (359, 1, 8, 8)
    assert train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert (train.num_classes, train.source, train.synthetic) == (10, "digits", False)
    assert set(train.labels.tolist()) == set(range(10))
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # gray repeated
    assert float(test.images.abs().max()) <= 1.0
    assert len(load_dataset("digits", input_shape=(1, 8, 8), limit=50)) == 50


def test_synthetic_is_labelled_and_seeded() -> None:
    first = load_dataset("synthetic", input_shape=(3, 8, 8), seed=1, limit=12)
    assert first.synthetic
    assert first.source == "synthetic (seed 1)"
    assert first.images.shape == (12, 3, 8, 8)
    again = load_dataset("synthetic", input_shape=(3, 8, 8), seed=1, limit=12)
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.labels, again.labels)
    other = load_dataset("synthetic", input_shape=(3, 8, 8), seed=2, limit=12)
    test = load_dataset("synthetic", split="test", input_shape=(3, 8, 8), seed=1, limit=12)
    assert not torch.equal(first.images, other.images)
    assert not torch.equal(first.images, test.images)


def write_png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def test_image_folder_with_split_subfolders(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "train" / "cat" / f"{i}.png", (255, 0, 0))
        write_png(tmp_path / "train" / "dog" / f"{i}.png", (0, 0, 255))
    write_png(tmp_path / "val" / "cat" / "0.png", (255, 0, 0))
    write_png(tmp_path / "val" / "dog" / "0.png", (0, 0, 255))
    train = load_dataset(str(tmp_path), input_shape=(3, 8, 8))
    assert train.images.shape == (6, 3, 8, 8)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (train.num_classes, train.source, train.synthetic) == (2, str(tmp_path), False)
    red = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    torch.testing.assert_close(train.images[0].mean(dim=(1, 2)), red)
    test = load_dataset(str(tmp_path), split="test", input_shape=(1, 8, 8))
    assert test.images.shape == (2, 1, 8, 8)
    assert len(load_dataset(str(tmp_path), input_shape=(3, 8, 8), limit=2)) == 2
    with pytest.raises(ConfigError, match="3-channel"):
        load_dataset(str(tmp_path), input_shape=(2, 8, 8))


def test_image_folder_without_split_uses_the_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "x.png", (0, 255, 0))
    data = load_dataset(str(tmp_path), split="test", input_shape=(3, 4, 4))
    assert data.images.shape == (1, 3, 4, 4)


def cifar_rows(count: int, offset: int) -> np.ndarray:
    """Rows in the official layout: R plane (value = row), G plane (= column), B plane (= n)."""
    grid_h, grid_w = np.mgrid[0:32, 0:32]
    planes = [
        np.stack([grid_h, grid_w, np.full((32, 32), offset + n)]).reshape(-1) for n in range(count)
    ]
    return np.stack(planes).astype(np.uint8)


def write_pickle(path: Path, content: object) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle)


def test_cifar10_python_folder_pixel_order_and_limit(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", {b"data": cifar_rows(2, 2 * i), b"labels": [i, 9]})
    write_pickle(folder / "test_batch", {b"data": cifar_rows(1, 100), b"labels": [3]})
    data = load_dataset(str(tmp_path), input_shape=(3, 32, 32))
    assert data.images.shape == (10, 3, 32, 32)
    assert data.labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    assert data.num_classes == 10
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    raw = ((data.images[3] * std + mean) * 255).round()
    assert torch.equal(raw[0], torch.arange(32.0).view(32, 1).expand(32, 32))  # R = row
    assert torch.equal(raw[1], torch.arange(32.0).view(1, 32).expand(32, 32))  # G = column
    assert bool((raw[2] == 5).all())  # B = image number (batch 2, second image)
    test = load_dataset(str(folder), split="test", input_shape=(1, 16, 16))
    assert (test.images.shape, test.labels.tolist()) == ((1, 1, 16, 16), [3])
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    assert len(load_dataset(str(folder), input_shape=(3, 32, 32), limit=3)) == 3
    with pytest.raises(ConfigError, match="data_batch_3"):
        load_dataset(str(folder), input_shape=(3, 32, 32))


def test_cifar100_python_folder(tmp_path: Path) -> None:
    write_pickle(tmp_path / "meta", {b"fine_label_names": [b"x"] * 100})
    content = {b"data": cifar_rows(2, 0), b"fine_labels": [42, 99], b"coarse_labels": [1, 2]}
    write_pickle(tmp_path / "train", content)
    data = load_dataset(str(tmp_path), input_shape=(3, 32, 32))
    assert (data.num_classes, data.labels.tolist()) == (100, [42, 99])


@pytest.mark.parametrize("source", ["imagenet", "digit", "/no/such/folder"])
def test_bad_source_is_one_line_naming_value_and_choices(source: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_dataset(source, input_shape=(3, 8, 8))
    message = str(error.value)
    assert "\n" not in message
    assert repr(source) in message
    assert all(name in message for name in DATA_SOURCES)
    assert "ImageFolder directory or a CIFAR-10/100 python folder" in message


def test_folder_of_neither_layout(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="ImageFolder") as error:
        load_dataset(str(tmp_path), input_shape=(3, 8, 8))
    assert "\n" not in str(error.value)
    assert repr(str(tmp_path)) in str(error.value)


def test_bad_split_and_arguments() -> None:
    with pytest.raises(ConfigError, match=r"'val'.*train, test"):
        load_dataset("digits", split="val", input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="limit"):
        load_dataset("digits", input_shape=(1, 8, 8), limit=0)
    with pytest.raises(ConfigError, match="input_shape"):
        load_dataset("digits", input_shape=(0, 8, 8))


def test_batches_sizes_limits_and_shuffle() -> None:
    data = Dataset(
        images=torch.arange(10.0).view(10, 1, 1, 1),
        labels=torch.arange(10),
        num_classes=10,
        source="test",
        synthetic=False,
    )
    assert [len(y) for _, y in batches(data, 4)] == [4, 4, 2]
    assert [y.tolist() for _, y in batches(data, 4, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shuffled = [y.tolist() for _, y in batches(data, 5, shuffle=True, seed=3)]
    assert shuffled == [y.tolist() for _, y in batches(data, 5, shuffle=True, seed=3)]
    assert sorted(shuffled[0] + shuffled[1]) == list(range(10))
    for images, labels in batches(data, 3, shuffle=True):
        assert images.view(-1).tolist() == [float(label) for label in labels]
    with pytest.raises(ConfigError, match="batch_size"):
        batches(data, 0)

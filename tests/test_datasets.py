"""Data sets on small fake data files (no network): finding, reading and splitting them, and their errors; and the
system Fashion-MNIST where it is installed."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import pytest
import torch
from datagen import (CIFAR10_CLASSES, fake_images, image_ids, write_fake_cifar10, write_fake_mnist,
                     write_idx, write_image_folder)

from nnbackprop import datasets
from nnbackprop.datasets import (MNIST_FILES, SYSTEM_FASHION_MNIST, DatasetNotFoundError, ImageFolderData, TensorData,
                                 load_dataset, read_idx)
from nnbackprop.loaders import make_loader

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


# --- idx files and MNIST-like data sets ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = fake_images(7, (5, 3))
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz)
    assert path.name.endswith(".gz") == gz
    out = read_idx(path)
    assert out.dtype == torch.uint8 and torch.equal(out, array)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("name, subdir", [("fashion-mnist", "FashionMNIST/raw"), ("mnist", "MNIST/raw")])
def test_load_mnist_like(tmp_path, gz, layout, name, subdir):
    directory = tmp_path / subdir if layout == "torchvision" else tmp_path
    written = write_fake_mnist(directory, gz=gz)
    splits = load_dataset(name, data_dir=tmp_path, val_size=0, search_dirs=[])
    assert splits.source == str(directory)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10 and len(splits.classes) == 10
    assert (splits.classes == FASHION_CLASSES) == (name == "fashion-mnist")
    for split, (images, labels) in ((splits.train, MNIST_FILES[:2]), (splits.test, MNIST_FILES[2:])):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert torch.equal(split.images, written[images].unsqueeze(1))
        assert torch.equal(split.labels, written[labels].long())
    assert len(splits.val) == 0 and splits.val.images.shape == (0, 1, 28, 28)


def test_mnist_found_in_cache_dir(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "cache" / "MNIST" / "raw")
    monkeypatch.setenv("NNBACKPROP_DATA", str(tmp_path / "cache"))
    splits = load_dataset("mnist", val_size=10)
    assert splits.source == str(tmp_path / "cache" / "MNIST" / "raw")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (290, 10, 50)


def test_data_dir_comes_before_search_dirs(tmp_path):
    write_fake_mnist(tmp_path / "first", n_train=40)
    write_fake_mnist(tmp_path / "second", n_train=60)
    splits = load_dataset("mnist", data_dir=tmp_path / "first", val_size=0, search_dirs=[tmp_path / "second"])
    assert len(splits.train) == 40 and splits.source == str(tmp_path / "first")


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_file_names_the_file(tmp_path, gz):
    write_fake_mnist(tmp_path, gz=gz)
    path = tmp_path / (MNIST_FILES[0] + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=path.name):
        load_dataset("mnist", data_dir=tmp_path, search_dirs=[])


def test_idx_file_with_bad_header(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + bytes(8))  # type code 0x0d is float32
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="header is cut off"):
        read_idx(path)


def test_mismatched_images_and_labels(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES[1], torch.zeros(299, dtype=torch.uint8), gz=True)
    with pytest.raises(ValueError, match="not N images and N labels"):
        load_dataset("mnist", data_dir=tmp_path, search_dirs=[])


def test_missing_data_set_lists_the_places_searched(tmp_path):
    partial = tmp_path / "partial"
    write_fake_mnist(partial)
    (partial / (MNIST_FILES[3] + ".gz")).unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere", search_dirs=[partial])
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for place in (tmp_path / "nowhere", tmp_path / "nowhere" / "FashionMNIST" / "raw", partial):
        assert f"  {place} (" in message
    assert f"missing {MNIST_FILES[3]}" in message
    for hint in ("apt-get install dataset-fashion-mnist", "--download", "--data-dir"):
        assert hint in message
    assert str(SYSTEM_FASHION_MNIST) not in message.split("To get it")[0]


def test_unknown_name():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("fashion_mnist", search_dirs=[])


# --- CIFAR-10 cat vs dog -------------------------------------------------------------------------------------------


def test_cifar10_catdog(tmp_path):
    written = write_fake_cifar10(tmp_path)
    splits = load_dataset("cifar10-catdog", data_dir=tmp_path, val_size=4, search_dirs=[])
    assert splits.classes == ["cat", "dog"] and splits.input_shape == (3, 32, 32)
    assert splits.source == str(tmp_path / "cifar-10-batches-py")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 4, 8)  # 200 train, 40 test, 2 of 10 classes
    for part, source in ((splits.train, "train"), (splits.val, "train"), (splits.test, "test")):
        data, labels = written[source]
        ids = image_ids(part.images)
        assert torch.equal(part.labels, (labels[ids] == CIFAR10_CLASSES.index("dog")).long())
        assert set(labels[ids].tolist()) == {3, 5}
        assert torch.equal(part.images, data[ids].view(-1, 3, 32, 32))
        # row layout: 1024 red, then 1024 green, then 1024 blue values, each 32 x 32 row-major
        assert torch.equal(part.images[:, 1, 0, 5], data[ids, 1024 + 5])
        assert torch.equal(part.images[:, 2, 3, 4], data[ids, 2048 + 3 * 32 + 4])


def test_corrupt_cifar_pickle_names_the_file(tmp_path):
    write_fake_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10-catdog", data_dir=tmp_path, search_dirs=[])


class _RunsCode:
    """Unpickling this calls os.system: what a crafted batches.meta would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_runs_no_code(tmp_path):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": _RunsCode(marker)}))
    with pytest.raises(ValueError, match=r"batches.meta: not a readable CIFAR-10 pickle .*posix.system") as info:
        load_dataset("cifar10-catdog", data_dir=tmp_path, search_dirs=[])
    assert not marker.exists() and "\n" not in str(info.value)


def test_cifar_batch_with_wrong_shape(tmp_path):
    write_fake_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": fake_images(4, (3000,)).numpy(), b"labels": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match="test_batch: expected uint8 data"):
        load_dataset("cifar10-catdog", data_dir=tmp_path, search_dirs=[])


# --- validation split and statistics -------------------------------------------------------------------------------


def test_val_split_is_seeded_and_disjoint(tmp_path):
    write_fake_mnist(tmp_path)
    a = load_dataset("mnist", data_dir=tmp_path, val_size=50, seed=3, search_dirs=[])
    b = load_dataset("mnist", data_dir=tmp_path, val_size=50, seed=3, search_dirs=[])
    c = load_dataset("mnist", data_dir=tmp_path, val_size=50, seed=4, search_dirs=[])
    train, val = image_ids(a.train.images), image_ids(a.val.images)
    assert (len(train), len(val)) == (250, 50)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(300))
    assert torch.equal(val, image_ids(b.val.images)) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(val, image_ids(c.val.images))


@pytest.mark.parametrize("val_size", [300, 301, -1])
def test_val_size_out_of_range(tmp_path, val_size):
    write_fake_mnist(tmp_path)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", data_dir=tmp_path, val_size=val_size, search_dirs=[])


def test_mean_std_from_the_train_split_only(tmp_path):
    write_fake_cifar10(tmp_path)
    splits = load_dataset("cifar10-catdog", data_dir=tmp_path, val_size=10, search_dirs=[])
    pixels = splits.train.images.double() / 255
    assert splits.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert splits.std == pytest.approx(pixels.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-12)
    everything = torch.cat([splits.train.images, splits.val.images]).double() / 255
    assert splits.mean != pytest.approx(everything.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)


# --- image folders -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_memory", [True, False], ids=["read-into-memory", "read-during-training"])
def test_image_folder_carves_val_and_test(tmp_path, monkeypatch, in_memory):
    if not in_memory:
        monkeypatch.setattr(datasets, "IN_MEMORY_BYTES", 0)
    write_image_folder(tmp_path, per_class=6)
    splits = load_dataset(f"imagefolder:{tmp_path}", val_size=2, seed=0, image_size=8)
    assert splits.classes == ["cat", "dog"] and splits.input_shape == (3, 8, 8) and splits.source == str(tmp_path)
    kind = TensorData if in_memory else ImageFolderData
    assert all(isinstance(part, kind) for part in (splits.train, splits.val, splits.test))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 2)
    if not in_memory:
        paths = [path for part in (splits.train, splits.val, splits.test) for path, _ in part.samples]
        assert len(set(paths)) == 12
    # cats are black and dogs gray 100, in every channel: the statistics follow the train split's class balance
    dogs = splits.train.labels.double().mean().item()
    assert splits.mean == pytest.approx((100 / 255 * dogs,) * 3)
    assert splits.std == pytest.approx((100 / 255 * (dogs * (1 - dogs)) ** 0.5,) * 3)
    again = load_dataset(f"imagefolder:{tmp_path}", val_size=2, seed=0, image_size=8)
    assert torch.equal(again.val.labels, splits.val.labels) and torch.equal(again.test.labels, splits.test.labels)
    grey = load_dataset(f"imagefolder:{tmp_path}", val_size=2, seed=0, image_size=8, grayscale=True)
    assert grey.input_shape == (1, 8, 8) and len(grey.mean) == 1


@pytest.mark.parametrize("damage", ["truncated", "text"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_broken_image_in_any_split_is_named_before_training(tmp_path, damage, split):
    write_image_folder(tmp_path / "train", per_class=4)
    write_image_folder(tmp_path / "test", per_class=2)
    broken = tmp_path / split / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40] if damage == "truncated" else b"this is no image\n")
    with pytest.raises(ValueError, match=r"dog/1.png: cannot read this image") as info:
        load_dataset(f"imagefolder:{tmp_path}", val_size=1, image_size=8)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the stopped worker's pipe
def test_a_broken_image_met_while_streaming_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "IN_MEMORY_BYTES", 0)
    write_image_folder(tmp_path, per_class=6)
    splits = load_dataset(f"imagefolder:{tmp_path}", val_size=2, image_size=8)
    path = splits.train.samples[0][0]
    Path(path).write_bytes(b"garbage")
    loader = make_loader(splits.train, 4, mean=splits.mean, std=splits.std, num_workers=1)
    with pytest.raises(ValueError, match="cannot read this image") as info:
        list(loader)
    assert str(info.value).startswith(path) and "\n" not in str(info.value)


def test_an_image_folder_needs_two_classes(tmp_path):
    write_image_folder(tmp_path, per_class=5, classes=("cat",))
    with pytest.raises(ValueError, match="has 1 class subfolder .cat.; a classifier needs at least two"):
        load_dataset(f"imagefolder:{tmp_path}", val_size=1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    write_image_folder(tmp_path / "few", per_class=2)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset(f"imagefolder:{tmp_path / 'few'}", val_size=2)
    write_image_folder(tmp_path / "split" / "train", per_class=3)
    write_image_folder(tmp_path / "split" / "test", per_class=1, classes=("cat", "cow"))
    with pytest.raises(ValueError, match="same class subdirectories"):
        load_dataset(f"imagefolder:{tmp_path / 'split'}", val_size=1)
    broken = tmp_path / "few" / "dog" / "0.png"
    broken.write_bytes(broken.read_bytes()[:30])
    with pytest.raises(ValueError, match="0.png: cannot read this image"):
        ImageFolderData([(str(broken), 1)], 8)[0]


# --- the real Fashion-MNIST ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not SYSTEM_FASHION_MNIST.is_dir(),
                    reason=f"{SYSTEM_FASHION_MNIST} not installed (apt-get install dataset-fashion-mnist)")
def test_system_fashion_mnist():
    splits = load_dataset("fashion-mnist", search_dirs=[SYSTEM_FASHION_MNIST])
    assert splits.source == str(SYSTEM_FASHION_MNIST)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert splits.train.images.shape == (55000, 1, 28, 28) and splits.input_shape == (1, 28, 28)
    assert splits.classes == FASHION_CLASSES and splits.num_classes == 10
    assert torch.equal(torch.bincount(splits.test.labels), torch.full((10,), 1000))
    assert torch.equal(torch.bincount(torch.cat([splits.train.labels, splits.val.labels])), torch.full((10,), 6000))
    assert splits.mean[0] == pytest.approx(0.2860, abs=2e-3) and splits.std[0] == pytest.approx(0.3530, abs=2e-3)
    with gzip.open(SYSTEM_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as file:
        assert splits.test.labels[:5].tolist() == list(file.read()[8:13])

"""Data sets on small fake data files (no network): finding, reading and splitting them, and their errors; and the
system Fashion-MNIST where it is installed."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torchvision
from datagen import (CIFAR10_CLASSES, fake_images, image_ids, write_fake_cifar10, write_fake_mnist,
                     write_idx, write_image_folder)
from PIL import Image, JpegImagePlugin

from nnbackprop import datasets
from nnbackprop.datasets import (MNIST_FILES, SYSTEM_FASHION_MNIST, DatasetNotFoundError, ImageFolderData, TensorData,
                                 load_dataset, read_idx, read_image, scan_image_folder)
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
    assert splits.augmentation == {"flip": True}  # photos: flips unless the settings say otherwise
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


# --- faults: links, 16-bit images, huge images, gzip bombs ---------------------------------------------------------


def test_a_symlink_loop_in_an_image_folder_is_refused(tmp_path):
    """``cat/loop -> ..`` turned 24 files into 984 samples, test images among the training ones."""
    write_image_folder(tmp_path, per_class=12)
    (tmp_path / "cat" / "loop").symlink_to("..")
    with pytest.raises(ValueError) as info:
        load_dataset(f"imagefolder:{tmp_path}", val_size=2, image_size=8)
    assert str(info.value) == (f"image folder: {tmp_path / 'cat' / 'loop'} links to {tmp_path}, a folder that holds "
                               "it, so its images would be listed over and over; remove the link")


def test_each_image_file_counts_once_however_many_links_lead_to_it(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root, per_class=6)
    (root / "cat" / "again.png").symlink_to(root / "cat" / "0.png")
    (tmp_path / "more").mkdir()
    Image.new("L", (9, 9), 0).save(tmp_path / "more" / "extra.png")
    (root / "cat" / "more").symlink_to(tmp_path / "more")  # a folder of cats kept elsewhere, linked twice
    (root / "cat" / "more-again").symlink_to(tmp_path / "more")
    samples, classes = scan_image_folder(root)
    assert classes == ["cat", "dog"] and len(samples) == 13
    files = [Path(path).name for path, label in samples if label == 0]
    assert sorted(files) == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png", "extra.png"]
    assert len({os.path.realpath(path) for path, _ in samples}) == len(samples)


def test_one_file_in_two_classes_or_in_train_and_test_is_refused(tmp_path):
    write_image_folder(tmp_path / "classes", per_class=3)
    (tmp_path / "classes" / "dog" / "cat-0.png").symlink_to(tmp_path / "classes" / "cat" / "0.png")
    with pytest.raises(ValueError, match=r"cat/0.png \(class cat\) and .*dog/cat-0.png \(class dog\) are one file"):
        scan_image_folder(tmp_path / "classes")
    write_image_folder(tmp_path / "split" / "train", per_class=4)
    write_image_folder(tmp_path / "split" / "test", per_class=2)
    (tmp_path / "split" / "train" / "dog" / "seen").symlink_to(tmp_path / "split" / "test" / "dog")
    with pytest.raises(ValueError, match=r"test/dog/0.png is also in train/, as .*train/dog/seen/0.png .*a test image "
                                         "must not be trained on"):
        load_dataset(f"imagefolder:{tmp_path / 'split'}", val_size=1, image_size=8)


def test_an_image_folder_is_listed_as_torchvision_lists_it(tmp_path):
    """The order of the files decides the validation and test splits: it must stay torchvision's."""
    write_image_folder(tmp_path, per_class=4, classes=("b", "a", "c-d"))
    for name in ("a/x", "a/x/y", "a/x-z", "a/X"):
        (tmp_path / name).mkdir()
        Image.new("L", (3, 3)).save(tmp_path / name / "i.PNG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found = torchvision.datasets.ImageFolder(str(tmp_path))
    assert scan_image_folder(tmp_path) == (found.samples, found.classes)


def _gradient_16_bit(path: Path) -> Path:
    """A 256 x 4 grey PNG of 16 bits, column ``v`` holding ``257 v``: full range, 0 to 65535."""
    Image.fromarray((torch.arange(256, dtype=torch.int32) * 257).repeat(4, 1).numpy().astype("uint16")).save(path)
    return path


def test_16_bit_images_are_read_at_full_range(tmp_path):
    """A full-range 16-bit gradient read with 255 of its 256 columns at 255."""
    png = _gradient_16_bit(tmp_path / "gradient.png")
    assert Image.open(png).mode == "I;16"
    pgm = tmp_path / "gradient.pgm"  # PIL reads 16-bit PGM as mode I
    pgm.write_bytes(b"P5 256 4 65535\n" + (torch.arange(256) * 257).repeat(4, 1).numpy().astype(">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    for path in (png, pgm):
        for channels in (1, 3):
            image = read_image(path, (channels, 4, 256))
            assert torch.equal(image, torch.arange(256, dtype=torch.uint8).expand(channels, 4, 256)), path
    odd = tmp_path / "odd.png"  # v -> round(v * 255 / 65535)
    Image.fromarray(torch.tensor([[0, 128, 129, 385, 386, 65407, 65535]]).numpy().astype("uint16")).save(odd)
    assert read_image(odd, (1, 1, 7)).flatten().tolist() == [0, 0, 1, 1, 2, 255, 255]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header promises ``width x height`` grey pixels, with almost no data (cheap to write, costly to
    decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side, pixels", [(12000, "12000x12000 pixels (144 megapixels)"), (20000, "400 megapixels")],
                         ids=["above-our-limit", "above-PIL's-own-limit"])
def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path, side, pixels):
    path = _png_header_only(tmp_path / "huge.png", side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as info:
            read_image(path, (3, 32, 32))
    assert str(info.value) == (f"{path}: {pixels} is more than the 120 megapixels an image may have "
                               "(datasets.MAX_IMAGE_PIXELS); downscale the file, or remove it")
    assert [str(w.message) for w in caught] == []


def test_a_camera_photo_is_decoded_reduced(tmp_path, monkeypatch):
    """24 megapixels (6000 x 4000), left half red, right half blue: read at 1/8 of its size, then resized."""
    photo = Image.new("RGB", (6000, 4000), (255, 0, 0))
    photo.paste((0, 0, 255), (3000, 0, 6000, 4000))
    photo.save(tmp_path / "photo.jpg", quality=90)
    reduced = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        result = real_draft(self, mode, size)
        reduced.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(tmp_path / "photo.jpg", (3, 32, 32)).int()
    assert reduced == [(750, 500)]
    assert (image[0, :, :14] > 240).all() and (image[2, :, :14] < 15).all()
    assert (image[2, :, 18:] > 240).all() and (image[0, :, 18:] < 15).all()


class _CountingGzipFile(gzip.GzipFile):
    """Counts the bytes it hands out, so a test can tell how much of a file was unpacked."""

    unpacked = 0

    def read(self, size=-1):
        data = super().read(size)
        _CountingGzipFile.unpacked += len(data)
        return data


@pytest.mark.parametrize("header", [b"", struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28),
                                    struct.pack(">BBBBIII", 0, 0, 8, 3, 100_000, 1000, 1000)],
                         ids=["zeros", "a valid header, then far more", "a header promising 100 GB"])
def test_a_gzip_bomb_is_never_unpacked(tmp_path, monkeypatch, header):
    """64 MiB of zeros after the header (the testers' bomb was 4 GiB) compress to 64 kB; only what the header
    promises, and one byte more, may be read."""
    member = gzip.compress(bytes(2**20), compresslevel=9)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header) + member * 64)
    monkeypatch.setattr(datasets.gzip, "open", lambda name, mode: _CountingGzipFile(name, mode))
    _CountingGzipFile.unpacked = 0
    with pytest.raises(ValueError) as info:
        read_idx(path)
    assert _CountingGzipFile.unpacked <= 4 + 12 + 10 * 28 * 28 + 1
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert {b"": "not an idx file", header[:4] + b"\x00\x00\x00\x0a": "the file has more",
            header[:4] + b"\x00\x01\x86\xa0": "more than the 2,147,483,648 an idx file may hold"}[header[:8]] in message


def test_a_cifar_batch_larger_than_any_is_refused(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    monkeypatch.setattr(datasets, "MAX_DATA_FILE_BYTES", 10_000)
    with pytest.raises(ValueError, match=r"data_batch_1: holds more than 10,000 bytes, more than a data file of its "
                                         "kind"):
        load_dataset("cifar10-catdog", data_dir=tmp_path, search_dirs=[])

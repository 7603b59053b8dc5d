"""Tests of nnbackprop.data on small fake data files (no network), and on the system Fashion-MNIST where installed."""

from __future__ import annotations

import gzip
import pickle

import pytest
import torch
from datagen import (CIFAR10_CLASSES, fake_images, image_ids, write_fake_cifar10, write_fake_mnist,
                     write_idx, write_image_folder)

from nnbackprop.data import (MNIST_FILES, SYSTEM_FASHION_MNIST, DatasetNotFoundError, DeviceLoader, ImageFolderData,
                             ShardedBatchSampler, StreamingLoader, TensorData, load_dataset, make_loader, normalize,
                             read_idx)

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


# --- batches -------------------------------------------------------------------------------------------------------


def indexed_data(n: int, channels: int = 1) -> TensorData:
    """Fake images whose labels are their indices, so batches can be traced back."""
    return TensorData(fake_images(n, (channels, 4, 4)), torch.arange(n))


def epoch_labels(loader) -> list[torch.Tensor]:
    return [y for _, y in loader]


def test_each_epoch_visits_every_example_once():
    loader = DeviceLoader(indexed_data(103), 10, mean=0.5, std=0.25, shuffle=True, seed=1)
    assert len(loader) == 11 and loader.num_samples == 103
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = epoch_labels(loader)
        assert len(batches) == len(loader) and [len(y) for y in batches] == [10] * 10 + [3]
        order = torch.cat(batches)
        assert torch.equal(order.sort().values, torch.arange(103))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    again = DeviceLoader(indexed_data(103), 10, mean=0.5, std=0.25, shuffle=True, seed=1)
    again.set_epoch(1)
    assert torch.equal(torch.cat(epoch_labels(again)), orders[1])
    assert torch.equal(torch.cat(epoch_labels(loader)), orders[2])  # the epoch stays until set_epoch
    other_seed = DeviceLoader(indexed_data(103), 10, mean=0.5, std=0.25, shuffle=True, seed=2)
    other_seed.set_epoch(1)
    assert not torch.equal(torch.cat(epoch_labels(other_seed)), orders[1])


def test_no_shuffle_keeps_order_and_drop_last_drops_the_partial_batch():
    loader = DeviceLoader(indexed_data(25), 8, mean=0.0, std=1.0)
    assert torch.equal(torch.cat(epoch_labels(loader)), torch.arange(25))
    dropping = DeviceLoader(indexed_data(25), 8, mean=0.0, std=1.0, shuffle=True, drop_last=True)
    assert len(dropping) == 3 and dropping.num_samples == 24
    assert [len(y) for y in epoch_labels(dropping)] == [8, 8, 8]
    empty = DeviceLoader(indexed_data(0), 8, mean=0.0, std=1.0)
    assert len(empty) == 0 and epoch_labels(empty) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_batches_are_normalised(dtype):
    data = indexed_data(20, channels=3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    loader = DeviceLoader(data, 6, mean=mean, std=std, dtype=dtype, shuffle=True)
    for x, y in loader:
        assert x.dtype == dtype and x.shape == (len(y), 3, 4, 4) and y.dtype == torch.int64
        pixels = data.images[y].double() / 255
        expected = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        tolerance = 1e-2 * expected.abs().max().item() if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(x.double(), expected, atol=tolerance, rtol=0)
    torch.testing.assert_close(normalize(data.images, mean, std, torch.float64),
                               (data.images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1))
                               / torch.tensor(std).view(1, 3, 1, 1))


def test_bad_mean_std():
    with pytest.raises(ValueError, match="3 channels"):
        DeviceLoader(indexed_data(4, channels=3), 2, mean=(0.1, 0.2), std=1.0)
    with pytest.raises(ValueError, match="std must be positive"):
        DeviceLoader(indexed_data(4), 2, mean=0.1, std=0.0)


@pytest.mark.parametrize("n, drop_last", [(64, False), (70, False), (71, False), (68, True), (5, False)])
def test_rank_shards_make_up_the_global_batch(n, drop_last):
    options = dict(mean=0.5, std=0.5, shuffle=True, seed=7, drop_last=drop_last)
    single = DeviceLoader(indexed_data(n), 8, **options)
    shards = [DeviceLoader(indexed_data(n), 8, rank=r, world_size=2, **options) for r in range(2)]
    for loader in (single, *shards):
        loader.set_epoch(5)
    whole, parts = epoch_labels(single), [epoch_labels(shard) for shard in shards]
    assert len(shards[0]) == len(shards[1]) == len(parts[0]) == len(parts[1])
    assert shards[0].num_samples == shards[1].num_samples == sum(len(y) for y in parts[0])
    for i, (y0, y1) in enumerate(zip(*parts)):
        assert len(y0) == len(y1) == len(whole[i]) // 2
        assert torch.equal(torch.cat([y0, y1]), whole[i][: 2 * len(y0)])
    # a last global batch of m examples keeps its first 2 * (m // 2); one of m = 1 disappears on both ranks
    assert 2 * shards[0].num_samples == (n // 8 * 8 if drop_last else n - n % 8 % 2)


def test_sharding_arguments_are_checked():
    with pytest.raises(ValueError, match="not divisible by world_size"):
        ShardedBatchSampler(100, 10, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        ShardedBatchSampler(100, 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="positive"):
        ShardedBatchSampler(100, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_loader_on_cuda_matches_cpu():
    data = indexed_data(50, channels=3)
    options = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), shuffle=True, seed=3, rank=1, world_size=2)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(DeviceLoader(data, 16, **options),
                                              DeviceLoader(data, 16, device="cuda", **options)):
        assert x_gpu.is_cuda and y_gpu.is_cuda
        torch.testing.assert_close(x_gpu.cpu(), x_cpu)
        assert torch.equal(y_gpu.cpu(), y_cpu)


# --- image folders -------------------------------------------------------------------------------------------------


def test_image_folder_carves_val_and_test(tmp_path):
    write_image_folder(tmp_path, per_class=6)
    splits = load_dataset(f"imagefolder:{tmp_path}", val_size=2, seed=0, image_size=8)
    assert splits.classes == ["cat", "dog"] and splits.input_shape == (3, 8, 8) and splits.source == str(tmp_path)
    assert all(isinstance(part, ImageFolderData) for part in (splits.train, splits.val, splits.test))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 2)
    paths = [path for part in (splits.train, splits.val, splits.test) for path, _ in part.samples]
    assert len(set(paths)) == 12
    # cats are black and dogs gray 100, in every channel: the statistics follow the train split's class balance
    dogs = splits.train.labels.double().mean().item()
    assert splits.mean == pytest.approx((100 / 255 * dogs,) * 3)
    assert splits.std == pytest.approx((100 / 255 * (dogs * (1 - dogs)) ** 0.5,) * 3)
    again = load_dataset(f"imagefolder:{tmp_path}", val_size=2, seed=0, image_size=8)
    assert again.val.samples == splits.val.samples and again.test.samples == splits.test.samples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_loader_batches(tmp_path, num_workers):
    write_image_folder(tmp_path / "train", per_class=5)
    write_image_folder(tmp_path / "test", per_class=2)
    splits = load_dataset(f"imagefolder:{tmp_path}", val_size=3, image_size=6)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 3, 4)
    assert splits.source == str(tmp_path)
    loader = make_loader(splits.train, 4, mean=splits.mean, std=splits.std, shuffle=True, seed=1,
                         num_workers=num_workers)
    assert isinstance(loader, StreamingLoader) and len(loader) == 2 and loader.num_samples == 7
    labels = splits.train.labels
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [len(y) for _, y in batches] == [4, 3]
        order = ShardedBatchSampler(7, 4, shuffle=True, seed=1)
        order.set_epoch(epoch)
        assert torch.equal(torch.cat([y for _, y in batches]), labels[order.order()])
        for x, y in batches:
            assert x.shape == (len(y), 3, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
            pixels = torch.where(y == 1, 100 / 255, 0.0).view(-1, 1, 1, 1).expand(-1, 3, 6, 6)
            expected = (pixels - torch.tensor(splits.mean).view(1, 3, 1, 1)) / torch.tensor(splits.std).view(1, 3, 1, 1)
            torch.testing.assert_close(x, expected.float())


def test_make_loader_picks_the_device_loader_for_tensors():
    assert isinstance(make_loader(indexed_data(10), 4, mean=0.5, std=0.5), DeviceLoader)


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

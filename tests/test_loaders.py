"""Batches on the device: every example once per epoch in a seeded order, normalisation, sharding across ranks, the
streaming loader of image folders."""

from __future__ import annotations

import pytest
import torch
from datagen import fake_images, write_image_folder

from nnbackprop import datasets
from nnbackprop.datasets import TensorData, load_dataset
from nnbackprop.loaders import DeviceLoader, ShardedBatchSampler, StreamingLoader, make_loader, normalize


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_loader_on_cuda_matches_cpu():
    data = indexed_data(50, channels=3)
    options = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), shuffle=True, seed=3, rank=1, world_size=2)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(DeviceLoader(data, 16, **options),
                                              DeviceLoader(data, 16, device="cuda", **options)):
        assert x_gpu.is_cuda and y_gpu.is_cuda
        torch.testing.assert_close(x_gpu.cpu(), x_cpu)
        assert torch.equal(y_gpu.cpu(), y_cpu)




@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_loader_batches(tmp_path, num_workers, monkeypatch):
    monkeypatch.setattr(datasets, "IN_MEMORY_BYTES", 0)  # a folder too large to read into memory
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

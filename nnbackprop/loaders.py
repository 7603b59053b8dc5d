"""Mini-batches of a data set's split on the training device, in a reproducible order, sharded across ranks.

:func:`make_loader` turns a split into batches ``(x, y)`` on the device: ``x`` float ``(B, C, H, W)`` normalised as
``(pixel / 255 - mean) / std`` per channel, ``y`` int64 ``(B,)``. A :class:`DeviceLoader` moves the whole split to the
device once and cuts batches by indexing; a :class:`StreamingLoader` decodes image files in ``DataLoader`` workers.
Both draw their order from a :class:`ShardedBatchSampler`, which also shards each batch across data-parallel ranks.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from nnbackprop.datasets import (ImageFolderData, SplitData, TensorData, default_num_workers, permutation,
                                 worker_error)



def normalize(images: Tensor, mean: Tensor | Sequence[float], std: Tensor | Sequence[float],
              dtype: torch.dtype = torch.float32) -> Tensor:
    """``(images / 255 - mean) / std`` per channel.

    Args:
        images: ``uint8`` tensor of shape ``(N, C, H, W)``.
        mean, std: length ``C`` (or 1).

    Returns:
        Tensor of shape ``(N, C, H, W)`` and dtype ``dtype``, on the device of ``images``; computed in at least
        float32.
    """
    work = torch.promote_types(dtype, torch.float32)
    mean = torch.as_tensor(mean, dtype=work, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=work, device=images.device).view(1, -1, 1, 1)
    return images.to(work).div_(255).sub_(mean).div_(std).to(dtype)


def _per_channel(values: float | Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """``values`` as ``channels`` floats; a single value is repeated."""
    values = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values but the images have {channels} channels")
    return values


def _mean_std_per_channel(mean: float | Sequence[float], std: float | Sequence[float],
                          channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


class ShardedBatchSampler(Sampler[list[int]]):
    """The index batches of one data-parallel rank; every rank draws the same global order.

    Each epoch the order of the ``num_examples`` examples is ``torch.randperm`` from a CPU generator seeded with
    ``seed + epoch`` (file order if not ``shuffle``), so it is reproducible from the seed and :meth:`set_epoch`, as
    with ``DistributedSampler``. The order is cut into global batches of ``batch_size``; rank ``r`` takes rows
    ``[r * b, (r + 1) * b)`` of each, ``b = batch_size // world_size``. The last global batch, of ``m < batch_size``
    examples, is dropped if ``drop_last``; otherwise its first ``(m // world_size) * world_size`` examples are shared
    the same way and the other ``m % world_size < world_size`` are left out this epoch (with ``world_size == 1``,
    none). So every rank yields the same number of batches, all ranks' batch ``i`` together form global batch ``i``,
    and with one rank and ``drop_last=False`` each epoch visits every example exactly once.

    Attributes:
        bounds: ``[start, stop)`` of each of this rank's batches in the epoch's order.
        num_samples: examples this rank sees per epoch.
    """

    def __init__(self, num_examples: int, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by world_size {world_size}; "
                             "pass a multiple of the number of ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        self.num_examples, self.shuffle, self.seed, self.epoch = num_examples, shuffle, seed, 0
        full, rest = divmod(num_examples, batch_size)
        sizes = [batch_size] * full + ([rest] if rest and not drop_last else [])
        self.bounds: list[tuple[int, int]] = []
        for i, size in enumerate(sizes):
            local = size // world_size
            if local:
                start = i * batch_size + rank * local
                self.bounds.append((start, start + local))
        self.num_samples = sum(stop - start for start, stop in self.bounds)

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of epoch ``epoch`` from now on; call it before each epoch, on every rank."""
        self.epoch = epoch

    def order(self) -> Tensor:
        """This epoch's order of all examples: ``int64`` CPU tensor of shape ``(num_examples,)``."""
        if self.shuffle:
            return permutation(self.num_examples, self.seed + self.epoch)
        return torch.arange(self.num_examples)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for start, stop in self.bounds:
            yield order[start:stop].tolist()

    def __len__(self) -> int:
        return len(self.bounds)


class _SampledLoader:
    """What both loaders share: the :class:`ShardedBatchSampler` that orders, batches and shards each epoch."""

    sampler: ShardedBatchSampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    def __len__(self) -> int:
        return len(self.sampler)


class DeviceLoader(_SampledLoader):
    """Mini-batches of an in-memory split, kept on ``device`` as normalised floats.

    On construction the ``uint8`` images are moved to ``device`` and normalised once (:func:`normalize`); iterating
    yields ``(x, y)``: ``x`` of shape ``(B, C, H, W)`` and dtype ``dtype``, ``y`` int64 ``(B,)``, both on ``device``,
    gathered with one index per batch, in the order of a :class:`ShardedBatchSampler` (see it for shuffling, the last
    batch and sharding; ``batch_size`` is the global batch). Call :meth:`set_epoch` before each epoch.

    Attributes:
        images: the whole split, normalised, on ``device``: ``(N, C, H, W)`` of dtype ``dtype``.
        labels: ``int64`` ``(N,)`` on ``device``.
        mean, std: the per-channel statistics used, length ``C``.
    """

    def __init__(self, data: TensorData, batch_size: int, *, mean: float | Sequence[float],
                 std: float | Sequence[float], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        self.sampler = ShardedBatchSampler(len(data), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                           rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.mean, self.std = _mean_std_per_channel(mean, std, data.images.shape[1])
        self.images = normalize(data.images.to(self.device), self.mean, self.std, dtype)  # (N, C, H, W)
        self.labels = data.labels.to(self.device)  # (N,)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.sampler.order().to(self.device)
        for start, stop in self.sampler.bounds:
            index = order[start:stop]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)


class StreamingLoader(_SampledLoader):
    """Mini-batches of an :class:`ImageFolderData`, decoded by ``DataLoader`` workers and normalised on ``device``.

    Same interface and batch order as :class:`DeviceLoader`: workers read and resize the images of each batch of the
    :class:`ShardedBatchSampler` and return them as ``uint8``; the batch is moved to ``device`` (from pinned memory
    when it is a GPU) and normalised there. Workers persist across epochs.
    """

    def __init__(self, data: ImageFolderData, batch_size: int, *, mean: float | Sequence[float],
                 std: float | Sequence[float], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None) -> None:
        self.sampler = ShardedBatchSampler(len(data), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                           rank=rank, world_size=world_size)
        self.device, self.dtype = torch.device(device), dtype
        self.mean, self.std = _mean_std_per_channel(mean, std, data.channels)
        self._mean, self._std = torch.tensor(self.mean, device=self.device), torch.tensor(self.std, device=self.device)
        num_workers = default_num_workers() if num_workers is None else num_workers
        self.loader = DataLoader(data, batch_sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = iter(self.loader)
        while True:
            try:
                images, labels = next(batches)  # (B, C, S, S) uint8, (B,) int64
            except StopIteration:
                return
            except ValueError as error:  # an unreadable image, named by the worker that met it
                raise ValueError(worker_error(error)) from None
            images = images.to(self.device, non_blocking=True)
            yield normalize(images, self._mean, self._std, self.dtype), labels.to(self.device, non_blocking=True)


Loader = Union[DeviceLoader, StreamingLoader]


def make_loader(data: SplitData, batch_size: int, *, mean: float | Sequence[float], std: float | Sequence[float],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                num_workers: int | None = None) -> Loader:
    """A :class:`DeviceLoader` for a :class:`TensorData`, a :class:`StreamingLoader` (``num_workers`` workers,
    default ``min(8, cpu count)``) for an :class:`ImageFolderData`; see them for the arguments."""
    options = dict(mean=mean, std=std, device=device, dtype=dtype, shuffle=shuffle, seed=seed, drop_last=drop_last,
                   rank=rank, world_size=world_size)
    if isinstance(data, TensorData):
        return DeviceLoader(data, batch_size, **options)
    if isinstance(data, ImageFolderData):
        return StreamingLoader(data, batch_size, num_workers=num_workers, **options)
    raise TypeError(f"make_loader takes TensorData or ImageFolderData, got {type(data).__name__}")

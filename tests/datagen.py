"""Small fake data sets in the real on-disk formats, so that tests never need the network.

Every fake image carries its index in its first two pixels (:func:`image_ids` reads it back), so a test can tell
which examples ended up where.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from nnbackprop.datasets import MNIST_FILES


def fake_images(n: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Random ``uint8`` images of ``shape`` whose first two values are the index ``i`` (low byte, high byte)."""
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    flat = images.view(n, math.prod(shape))
    flat[:, 0], flat[:, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    return images


def image_ids(images: Tensor) -> Tensor:
    """The indices written by :func:`fake_images`: ``(N, ...)`` -> ``(N,)`` int64."""
    flat = images.reshape(len(images), -1).long()
    return flat[:, 0] + 256 * flat[:, 1]


def write_idx(path: Path, array: Tensor, gz: bool) -> Path:
    """Write ``array`` (uint8) as an idx file, at ``path`` or ``path.gz``."""
    payload = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.numpy().tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_fake_mnist(directory: Path, n_train: int = 300, n_test: int = 50, gz: bool = True) -> dict[str, Tensor]:
    """The four MNIST idx files in ``directory``; returns what was written, by file name."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    arrays = {
        MNIST_FILES[0]: fake_images(n_train, (28, 28), seed=2),
        MNIST_FILES[1]: torch.randint(0, 10, (n_train,), dtype=torch.uint8, generator=generator),
        MNIST_FILES[2]: fake_images(n_test, (28, 28), seed=3),
        MNIST_FILES[3]: torch.randint(0, 10, (n_test,), dtype=torch.uint8, generator=generator),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, gz)
    return arrays


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar10(root: Path, per_batch: int = 40) -> dict[str, tuple[Tensor, Tensor]]:
    """``root/cifar-10-batches-py`` like the real one (pickled dicts with bytes keys, ``data`` uint8 ``(N, 3072)``);
    returns ``{"train": (data, labels), "test": (data, labels)}`` with the 5 train batches concatenated."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    written = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        data = fake_images(per_batch * len(names), (3 * 32 * 32,), seed=len(names))
        labels = torch.arange(len(data)) % 10
        for i, name in enumerate(names):
            rows = slice(i * per_batch, (i + 1) * per_batch)
            entry = {b"batch_label": name.encode(), b"labels": labels[rows].tolist(), b"data": data[rows].numpy()}
            (directory / name).write_bytes(pickle.dumps(entry))
        written[split] = (data, labels)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072, b"num_cases_per_batch": per_batch}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta))
    return written


def write_image_folder(root: Path, per_class: int, classes: tuple[str, ...] = ("cat", "dog")) -> None:
    """``root/<class>/<i>.png``: single-colour images of varied size and mode; class ``k`` is gray level ``100 * k``
    (so the channel means of any subset are known), image ``i`` of each class alternates RGB, RGBA and L."""
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode = ("RGB", "RGBA", "L")[i % 3]
            color = 100 * k if mode == "L" else (100 * k,) * len(mode)
            if mode == "RGBA":
                color = (*color[:3], 255)
            Image.new(mode, (10 + i, 7 + 2 * i), color).save(root / name / f"{i}.png")

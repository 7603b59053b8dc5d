"""Data sets: finding their files, reading them, and splitting them into train / validation / test.

:func:`load_dataset` returns a :class:`DataSplits`: train / val / test splits, the class names, and per-channel
normalisation statistics of the train split. MNIST, Fashion-MNIST, CIFAR-10 cat-vs-dog and image folders of up to a
few GB live in memory as ``uint8`` tensors (:class:`TensorData`); a larger ``imagefolder:PATH`` data set is read from
its image files during training (:class:`ImageFolderData`). Turning a split into batches is :mod:`nnbackprop.loaders`'
job.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from nnbackprop.errors import DatasetNotFoundError

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four idx files."""

STATS_SAMPLE_SIZE = 1000
"""Number of training images the normalisation statistics of an image folder read from disk are estimated from."""

IN_MEMORY_BYTES = 2 * 2**30
"""An image folder whose images, resized, fit in this many bytes is read into memory once, before training."""

MAX_DATA_FILE_BYTES = 2 * 2**30
"""The most bytes a data file (an idx file or a CIFAR-10 batch, once gunzipped) may hold, 45 times MNIST's training
images: an idx header that promises more is refused before the rest is read, and a stream is never read further."""

MAX_IMAGE_PIXELS = 120_000_000
"""The most pixels (width x height, as the file's header says) an image file may have: larger ones are refused before
they are decoded. Photos of 24, 50 or 108 megapixels are within it."""

REDUCED_DECODE_PIXELS = 16_000_000
"""An image of more pixels than this is decoded at a reduced scale where its format allows it (JPEG: 1/2 to 1/8, PIL's
draft mode), still at least the size it is resized to."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""The name endings (any case) of the files an image folder's class folders are searched for."""

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")


@dataclass(frozen=True)
class TensorData:
    """A split held in memory.

    Attributes:
        images: ``uint8`` tensor of shape ``(N, C, H, W)``.
        labels: ``int64`` tensor of shape ``(N,)``.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, indices: Tensor) -> "TensorData":
        return TensorData(self.images[indices], self.labels[indices])


def _to_tensor(image: Image.Image) -> Tensor:
    """A PIL image of mode ``L`` or ``RGB`` as ``uint8`` ``(C, H, W)``."""
    channels = len(image.getbands())
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, channels).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, shape: Sequence[int]) -> Tensor:
    """An image file (any format PIL reads, any size up to :data:`MAX_IMAGE_PIXELS`, grey or colour, 8 or 16 bits) as
    a model of input ``shape`` ``(C, H, W)`` sees it in training: 16-bit grey scaled to 8 bits (``round(v / 257)``),
    converted to grey (``C`` 1) or RGB (``C`` 3), resized to ``W x H`` (bilinear, aspect ratio not kept; an image of
    more than :data:`REDUCED_DECODE_PIXELS` decoded at a reduced scale first where its format allows); a ``uint8``
    tensor of ``shape``. PIL's warnings are not passed on.

    Raises:
        ValueError: the file cannot be read as an image, or has more than :data:`MAX_IMAGE_PIXELS` (the message names
            it), or ``C`` is not 1 or 3.
    """
    channels, height, width = shape
    if channels not in (1, 3):
        raise ValueError(f"images have 1 (grey) or 3 (RGB) channels, not {channels}")
    mode = "L" if channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's (a large image, a palette's transparency, odd EXIF): not the user's
            with Image.open(path) as image:
                size = image.size
                if size[0] * size[1] <= MAX_IMAGE_PIXELS:
                    if size[0] * size[1] > REDUCED_DECODE_PIXELS:
                        image.draft(mode, (width, height))
                    image = _eight_bits(image).convert(mode).resize((width, height), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError as error:  # PIL's own limit, far above ours, met before the size is known
        count = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(count.group(1)) / 1e6:.0f} megapixels" if count else "its size"
        raise _too_large(path, pixels) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: cannot read this image ({error}); remove or replace the file") from error
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise _too_large(path, f"{size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} megapixels)")
    return _to_tensor(image)


def _too_large(path: str | Path, pixels: str) -> ValueError:
    return ValueError(f"{path}: {pixels} is more than the {MAX_IMAGE_PIXELS / 1e6:g} megapixels an image may have "
                      "(datasets.MAX_IMAGE_PIXELS); downscale the file, or remove it")


def _eight_bits(image: Image.Image) -> Image.Image:
    """``image`` with 16-bit grey values (PIL's modes ``I;16*``, and ``I``, as which it reads 16-bit PGM files) scaled
    to the 8-bit range, ``round(v * 255 / 65535)``, where PIL's own conversion would clip them at 255."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        return image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    return image


class ImageFolderData(Dataset):
    """A split of an image folder, read from disk one image at a time (in ``DataLoader`` workers).

    Item ``i`` is ``(image, label)``: the file converted to RGB (or grey, ``grayscale``) and resized to
    ``image_size x image_size`` (bilinear, aspect ratio not kept), as a ``uint8`` tensor of shape
    ``(C, image_size, image_size)`` (``C`` 3, or 1 for grey), and its class index.

    Attributes:
        samples: ``(path, label)`` of each image.
        image_size: side of the square the images are resized to.
        grayscale: read the images as one grey channel.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, grayscale: bool = False) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.grayscale = grayscale

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return read_image(path, (self.channels, self.image_size, self.image_size)), label

    @property
    def labels(self) -> Tensor:
        """``int64`` tensor of shape ``(N,)``."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def subset(self, indices: Tensor) -> "ImageFolderData":
        return ImageFolderData([self.samples[i] for i in indices.tolist()], self.image_size, self.grayscale)


SplitData = Union[TensorData, ImageFolderData]


@dataclass(frozen=True)
class DataSplits:
    """The splits of a data set and what a model and a loader need to know about it.

    Attributes:
        name: the data set name given to :func:`load_dataset`.
        train, val, test: the splits; ``val`` is carved from the training data and may be empty.
        classes: class names, indexed by label.
        input_shape: ``(C, H, W)`` of one image.
        mean, std: per-channel mean and standard deviation of ``pixel / 255`` over the train split (length ``C``);
            a constant channel gets std 1.
        source: where the data was read from.
        augmentation: the batch augmentation that suits the data, ``{"shift": pixels, "flip": bool}`` (for
            MNIST's digits a 1-pixel shift; none for Fashion-MNIST within a short run; shifts and flips for photos of
            animals; flips for an image folder of photos), which training uses where its settings leave it open.
        statistics: what the training images are like, per image (:func:`image_statistics`), for telling an input
            unlike them; ``None`` for an image folder read from disk during training.
    """

    name: str
    train: SplitData
    val: SplitData
    test: SplitData
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    augmentation: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, list[float]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def info(self) -> dict[str, Any]:
        """What a checkpoint records about the data: enough to rebuild the model and prepare new inputs alike."""
        return {"name": self.name, "source": self.source, "classes": list(self.classes),
                "input_shape": list(self.input_shape), "mean": list(self.mean), "std": list(self.std),
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
                "statistics": self.statistics}


# --- reading files -------------------------------------------------------------------------------------------------


def _open(path: Path) -> io.BufferedIOBase:
    """``path`` opened for reading bytes, gunzipped as it is read if its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _gzip_error(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path}: corrupt or truncated gzip file ({error}); delete it and get it again")


def _read_bytes(path: Path) -> bytearray:
    """The content of ``path``, gunzipped if its name ends in ``.gz``; refused beyond :data:`MAX_DATA_FILE_BYTES`."""
    try:
        with _open(path) as file:
            data = bytearray(file.read(MAX_DATA_FILE_BYTES + 1))
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise _gzip_error(path, error) from error
    if len(data) > MAX_DATA_FILE_BYTES:
        unpacked = " once gunzipped" if path.suffix == ".gz" else ""
        raise ValueError(f"{path}: holds more than {MAX_DATA_FILE_BYTES:,} bytes{unpacked}, more than a data file of "
                         "its kind (datasets.MAX_DATA_FILE_BYTES); it is damaged or not one: delete it and get it "
                         "again")
    return data


def read_idx(path: str | Path) -> Tensor:
    """Read an idx file of unsigned bytes (the MNIST format), gzipped or not.

    The file is the magic number ``00 00 08 ndim``, then ``ndim`` big-endian uint32 sizes, then the values in
    row-major order. The header is read first: a file whose header promises more than :data:`MAX_DATA_FILE_BYTES` is
    refused, and no more than the promised values and one byte are read (so a gzip bomb is never unpacked).

    Returns:
        ``uint8`` tensor of shape ``(d_1, ..., d_ndim)``.

    Raises:
        ValueError: the file is not such an idx file, promises too much, or is shorter or longer than its header
            says.
    """
    path = Path(path)
    try:
        with _open(path) as file:
            magic = file.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] == 0:
                raise ValueError(f"{path}: not an idx file of unsigned bytes (header {magic.hex()!r}, expected "
                                 "'000008' and a dimension count); check the file name or get the file again")
            sizes = file.read(4 * magic[3])
            if len(sizes) < 4 * magic[3]:
                raise ValueError(f"{path}: truncated idx file (the header is cut off); delete it and get it again")
            shape = struct.unpack(f">{magic[3]}I", sizes)
            offset, size = 4 + len(sizes), math.prod(shape)
            if size > MAX_DATA_FILE_BYTES:
                raise ValueError(f"{path}: its header promises shape {shape}, {size:,} bytes, more than the "
                                 f"{MAX_DATA_FILE_BYTES:,} an idx file may hold (datasets.MAX_DATA_FILE_BYTES); it "
                                 "is damaged or not an idx file: delete it and get it again")
            values = bytearray(file.read(size + 1))
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise _gzip_error(path, error) from error
    if len(values) != size:
        found = f"{offset + len(values):,}" if len(values) < size else "more"
        raise ValueError(f"{path}: truncated or corrupt idx file: its header promises {offset + size:,} bytes for "
                         f"shape {shape}, the file has {found}; delete it and get it again")
    flat = torch.frombuffer(values, dtype=torch.uint8) if values else torch.empty(0, dtype=torch.uint8)
    return flat.view(shape)


def _read_mnist(files: dict[str, Path], classes: list[str]) -> tuple[TensorData, TensorData]:
    """The (train, test) splits of MNIST or Fashion-MNIST from its four idx files; images ``(N, 1, 28, 28)``."""

    def split(prefix: str) -> TensorData:
        images_path, labels_path = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{images_path} (shape {tuple(images.shape)}) and {labels_path} (shape "
                             f"{tuple(labels.shape)}) are not N images and N labels; get the files again")
        if len(labels) and int(labels.max()) >= len(classes):
            raise ValueError(f"{labels_path}: label {int(labels.max())} is out of range for {len(classes)} classes")
        return TensorData(images.unsqueeze(1), labels.long())

    return split("train"), split("t10k")


def _text(value: str | bytes) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else value


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds only what a CIFAR-10 batch holds — dicts, lists, strings, numbers and NumPy arrays — and refuses every
    other class or function a pickle names, so a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def _plain(value: Any) -> bool:
    """Whether ``value`` is made only of what a CIFAR-10 batch holds (numeric or byte arrays, no objects)."""
    if isinstance(value, (str, bytes, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return type(value).__name__ == "ndarray" and value.dtype.kind in "biuf"


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    """A pickled dict of the CIFAR-10 python version, with its keys as ``str``, read by a restricted unpickler."""
    try:
        entry = _CifarUnpickler(io.BytesIO(_read_bytes(path)), encoding="latin1").load()
    except Exception as error:  # a damaged or hostile pickle fails in many ways, all of which mean the same here
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({type(error).__name__}: {error}); delete "
                         "cifar-10-batches-py and get it again") from error
    if not isinstance(entry, dict) or not all(isinstance(k, (str, bytes)) and _plain(v) for k, v in entry.items()):
        raise ValueError(f"{path}: expected a dict of arrays, lists, strings and numbers, got "
                         f"{type(entry).__name__}; delete cifar-10-batches-py and get it again")
    return {_text(key): value for key, value in entry.items()}


def _read_cifar_batch(path: Path) -> TensorData:
    """One CIFAR-10 batch file: rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major)."""
    entry = _read_cifar_pickle(path)
    if "data" not in entry or "labels" not in entry:
        raise ValueError(f"{path}: a CIFAR-10 batch needs the keys 'data' and 'labels', found {sorted(entry)}")
    data, labels = torch.as_tensor(entry["data"]), torch.as_tensor(entry["labels"], dtype=torch.int64)
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise ValueError(f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {tuple(data.shape)} "
                         f"and {tuple(labels.shape)} labels")
    return TensorData(data.view(-1, 3, 32, 32), labels)


def _select_classes(data: TensorData, keep: Sequence[int]) -> TensorData:
    """The examples whose label is in ``keep``, relabelled ``keep[i] -> i``."""
    new_labels = torch.full_like(data.labels, -1)
    for new, old in enumerate(keep):
        new_labels[data.labels == old] = new
    kept = new_labels >= 0
    return TensorData(data.images[kept], new_labels[kept])


def _read_cifar10_catdog(files: dict[str, Path], classes: list[str]) -> tuple[TensorData, TensorData]:
    """The (train, test) splits of CIFAR-10 restricted to ``classes`` (cat, dog), relabelled 0, 1, ..."""
    meta_path = files["batches.meta"]
    names = [_text(name) for name in _read_cifar_pickle(meta_path).get("label_names", [])]
    missing = [name for name in classes if name not in names]
    if missing:
        raise ValueError(f"{meta_path}: label_names {names} lack {missing}; get cifar-10-batches-py again")
    keep = [names.index(name) for name in classes]
    train = [_read_cifar_batch(files[f"data_batch_{i}"]) for i in range(1, 6)]
    train_all = TensorData(torch.cat([b.images for b in train]), torch.cat([b.labels for b in train]))
    return _select_classes(train_all, keep), _select_classes(_read_cifar_batch(files["test_batch"]), keep)


# --- finding files -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Builtin:
    """How to find, read and download one of the data sets that :func:`load_dataset` knows by name."""

    title: str
    subdir: str  # torchvision's folder under a root directory
    files: tuple[str, ...]  # each may also be gzipped (``name.gz``)
    classes: list[str]
    read: Callable[[dict[str, Path], list[str]], tuple[TensorData, TensorData]]
    download: Callable[[Path], object]  # fetches the files into ``root / subdir``
    augmentation: dict[str, Any]  # what suits it: random shifts of digits, flips of animals (see DataSplits)
    how_to_get: str = ""


MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine"]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
"""The class names, as torchvision's data sets name them (checkpoints record them)."""


def _torchvision() -> Any:
    """``torchvision.datasets``, imported when a data set is downloaded (importing torchvision takes seconds)."""
    import torchvision.datasets

    return torchvision.datasets


_BUILTINS = {
    "mnist": _Builtin(
        "MNIST", "MNIST/raw", MNIST_FILES, MNIST_CLASSES, _read_mnist,
        lambda root: _torchvision().MNIST(str(root), download=True), {"shift": 1, "flip": False},
    ),
    "fashion-mnist": _Builtin(
        "Fashion-MNIST", "FashionMNIST/raw", MNIST_FILES, FASHION_MNIST_CLASSES, _read_mnist,
        lambda root: _torchvision().FashionMNIST(str(root), download=True), {"shift": 0, "flip": False},
        f"install it system-wide (apt-get install dataset-fashion-mnist, into {SYSTEM_FASHION_MNIST}); ",
    ),
    "cifar10-catdog": _Builtin(
        "CIFAR-10", "cifar-10-batches-py", CIFAR10_FILES, ["cat", "dog"], _read_cifar10_catdog,
        lambda root: _torchvision().CIFAR10(str(root), download=True), {"shift": 2, "flip": True},
    ),
}
DATASETS = (*_BUILTINS, "imagefolder:PATH")
"""The names :func:`load_dataset` accepts."""


def cache_dir() -> Path:
    """The default data directory: ``$NNBACKPROP_DATA`` if set, else ``~/.cache/nnbackprop``."""
    return Path(os.environ.get("NNBACKPROP_DATA") or Path.home() / ".cache" / "nnbackprop").expanduser()


def default_search_dirs(name: str) -> list[Path]:
    """Where ``name`` is looked for after ``data_dir``: the system copy (Fashion-MNIST only), then :func:`cache_dir`."""
    return ([SYSTEM_FASHION_MNIST] if name == "fashion-mnist" else []) + [cache_dir()]


def _find_files(directory: Path, names: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """``{name: path}`` of the files found in ``directory`` (``name``, else ``name.gz``), and the names missing."""
    found, missing = {}, []
    for name in names:
        path = next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def _locate(spec: _Builtin, roots: Sequence[Path], download_to: Path) -> tuple[Path, dict[str, Path]]:
    """The first of ``root / spec.subdir`` and ``root`` (for each root in order) holding all of ``spec.files``."""
    searched = []
    for directory in (d for root in roots for d in (root / spec.subdir, root)):
        if not directory.is_dir():
            searched.append(f"  {directory} (no such directory)")
            continue
        found, missing = _find_files(directory, spec.files)
        if not missing:
            return directory, found
        searched.append(f"  {directory} (missing {', '.join(missing)})")
    places = "\n".join(searched) or "  nowhere (no directories given)"
    raise DatasetNotFoundError(
        f"{spec.title} not found. Searched:\n{places}\nTo get it: {spec.how_to_get}pass "
        f"--download (download=True) to fetch it with torchvision into {download_to / spec.subdir}; or pass "
        f"--data-dir DIR (data_dir=DIR) naming a directory that holds {', '.join(spec.files)} (gzipped or not), "
        f"directly or in DIR/{spec.subdir}."
    )


def _download(spec: _Builtin, root: Path) -> None:
    try:
        spec.download(root)
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError, ... for a failed download
        raise DatasetNotFoundError(f"downloading {spec.title} into {root / spec.subdir} failed ({error}); check the "
                                   "network, or fetch the files yourself and pass --data-dir DIR") from error


# --- splits and statistics -----------------------------------------------------------------------------------------


def permutation(n: int, seed: int) -> Tensor:
    """``torch.randperm(n)`` from a CPU generator seeded with ``seed``: the same on every machine and device."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _hold_out(data: SplitData, size: int, seed: int, what: str) -> tuple[SplitData, SplitData]:
    """Split ``data`` into (rest, held out): ``size`` examples picked by a seeded permutation; both keep file order."""
    if not 0 <= size < len(data):
        raise ValueError(f"val_size {size} must be in [0, {len(data)}) to split {len(data)} examples into train and "
                         f"{what}; pass a smaller val_size")
    order = permutation(len(data), seed)
    return data.subset(order[size:].sort().values), data.subset(order[:size].sort().values)


IMAGE_STATISTICS: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
    "brightness": ("brightness (mean pixel)", lambda x: x.mean(1)),
    "contrast": ("contrast (pixels' standard deviation)", lambda x: x.std(1)),
    "black": ("share of black pixels", lambda x: (x == 0).float().mean(1)),  # MNIST's backgrounds
}
"""Statistics of one image ``(C·H·W,)`` of ``pixel / 255`` (rows of a batch), which tell an input unlike the training
images: a photo into a model trained on Fashion-MNIST's black backgrounds, a dark scan, a blank image."""


STATISTICS_SAMPLE = 10_000
"""At most this many images (every k-th) give :func:`image_statistics` its ranges: plenty for 99% quantiles, and a
tenth of a second instead of half a second for MNIST's 55,000."""


def image_statistics(images: Tensor, quantiles: tuple[float, float] = (0.005, 0.995)) -> dict[str, list[float]]:
    """The range each of :data:`IMAGE_STATISTICS` spans over ``images`` ``uint8 (N, C, H, W)`` (every k-th of them,
    :data:`STATISTICS_SAMPLE` at most): its ``quantiles`` (by default 99% of the images lie inside)."""
    images = images[::-(-len(images) // STATISTICS_SAMPLE)] if len(images) > STATISTICS_SAMPLE else images
    x = images.reshape(len(images), -1).float().div_(255)  # (N, C·H·W)
    q = torch.tensor(quantiles)
    return {name: [round(v, 4) for v in torch.quantile(f(x), q).tolist()] for name, (_, f) in IMAGE_STATISTICS.items()}


def unlike(image: Tensor, statistics: dict[str, list[float]], margin: float = 0.05) -> list[str]:
    """How ``image`` ``uint8 (C, H, W)`` lies outside the ranges ``statistics`` (:func:`image_statistics`) give, by
    more than ``margin``: one phrase per statistic, ``[]`` when it looks like the training images."""
    x = image.reshape(1, -1).float().div_(255)
    found = []
    for name, (label, f) in IMAGE_STATISTICS.items():
        if name not in statistics:
            continue
        low, high = statistics[name]
        value = f(x).item()
        if not low - margin <= value <= high + margin:
            found.append(f"its {label}, {value:.2f}, is outside the {low:.2f}-{high:.2f} of 99% of the training "
                         "images")
    return found


def _histogram(images: Tensor) -> Tensor:
    """Count of each byte value per channel: ``(N, C, H, W)`` uint8 -> ``(C, 256)`` int64."""
    return torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])])


def _mean_std(histogram: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population standard deviation of ``pixel / 255``, exact from a ``(C, 256)`` histogram.

    ``mean = sum_v count[v] * v / n``, ``std = sqrt(sum_v count[v] * v^2 / n - mean^2)``, ``v = 0, 1/255, ..., 1``.
    A constant channel gets std 1, so that normalising it only centres it.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    count = histogram.sum(1).double()
    mean = (histogram * values).sum(1) / count
    std = ((histogram * values**2).sum(1) / count - mean**2).clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def _folder_histogram(data: ImageFolderData, seed: int, num_workers: int) -> Tensor:
    """The ``(C, 256)`` histogram of at most :data:`STATS_SAMPLE_SIZE` images of ``data``, picked by ``seed``."""
    picked = permutation(len(data), seed)[:STATS_SAMPLE_SIZE].tolist()
    loader = DataLoader(Subset(data, picked), batch_size=100, num_workers=num_workers)
    return sum(_histogram(images) for images, _ in loader)


# --- loading -------------------------------------------------------------------------------------------------------


def default_num_workers() -> int:
    """Workers for decoding images: one per core, at most 8."""
    return min(8, os.cpu_count() or 1)


def worker_error(error: BaseException) -> str:
    """The message of an error raised in a ``DataLoader`` worker, without the traceback the loader wraps it in."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__
    original = [line for line in lines if line.startswith(f"{name}: ")]
    return original[-1].removeprefix(f"{name}: ") if original else (lines[0] if lines else name)


def _decode(data: ImageFolderData, num_workers: int) -> TensorData:
    """Every image of ``data`` read into memory (in ``num_workers`` processes), so that a file that is not an image
    stops the run before training, and training reads no file."""
    loader = DataLoader(data, batch_size=64, num_workers=num_workers if len(data) > 256 else 0)  # few: no workers
    try:
        batches = list(loader)
    except ValueError as error:
        raise ValueError(worker_error(error)) from None
    if not batches:
        return TensorData(torch.empty(0, data.channels, data.image_size, data.image_size, dtype=torch.uint8),
                          torch.empty(0, dtype=torch.int64))
    return TensorData(torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches]))


FileKey = Union[tuple[int, int], str]
"""What makes a file itself whatever the path to it: its device and inode (a broken link: its path)."""


def scan_image_folder(path: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """The images of an image folder and its classes, as ``torchvision.datasets.ImageFolder`` finds them — the classes
    are ``path``'s subfolders, sorted; a class's images are the files named with an image ending
    (:data:`IMAGE_EXTENSIONS`) anywhere in its folder, links followed, in the order of ``sorted(os.walk(...))`` —
    except that a file counts once however many links lead to it.

    Returns:
        ``(samples, classes)``: ``(path, class index)`` of each image, and the class names.

    Raises:
        DatasetNotFoundError: no class subfolder, or one without images.
        ValueError: a link leads back to a folder that holds it (a loop, which would list the same images over and
            over), one file is in two classes, or a folder cannot be listed; the message names them.
    """
    samples, classes, _ = _scan_image_folder(Path(path))
    return samples, classes


def _scan_image_folder(root: Path) -> tuple[list[tuple[str, int]], list[str], list[FileKey]]:
    """:func:`scan_image_folder`, with the :data:`FileKey` of each image."""
    try:
        with os.scandir(root) as entries:
            classes = sorted(entry.name for entry in entries if entry.is_dir())
    except OSError as error:
        raise DatasetNotFoundError(f"image folder {root}: cannot list it ({error.strerror or error})") from None
    if not classes:
        raise DatasetNotFoundError(f"image folder {root} has no class subfolders; it needs one subfolder of images "
                                   "per class")
    samples, keys, owners, empty = [], [], {}, []
    for index, name in enumerate(classes):
        found = _image_files(os.path.join(root, name))
        if not found:
            empty.append(name)
        for file, key in found:
            first = owners.setdefault(key, (file, name))
            if first[1] != name:
                raise ValueError(f"image folder {root}: {first[0]} (class {first[1]}) and {file} (class {name}) are "
                                 "one file, through a link; an image belongs to one class, so remove one of them")
            if first[0] == file:  # else the same image again in its own class, through a link: counted once
                samples.append((file, index))
                keys.append(key)
    if empty:
        raise DatasetNotFoundError(f"image folder {root}: the class folder(s) {', '.join(empty)} hold no images "
                                   f"(files ending in {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
    return samples, classes, keys


def _image_files(top: str) -> list[tuple[str, FileKey]]:
    """``(path, key)`` of each image file in ``top`` and its subfolders, links followed, each folder listed once, in
    the order of ``sorted(os.walk(top, followlinks=True))``; a link back to a folder that holds it is refused."""
    listed: list[tuple[str, list[tuple[str, FileKey]]]] = []
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            info = os.stat(directory)
            if (info.st_dev, info.st_ino) in seen:  # reached again through another link
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            raise ValueError(f"image folder: cannot list {directory} ({error.strerror or error}); fix its "
                             "permissions or remove it") from None
        files, folders = [], []
        for entry in entries:
            if entry.is_dir():  # a link to a folder too
                if entry.is_symlink():
                    _refuse_loop(entry.path, directory)
                folders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append((entry.path, _file_key(entry, info.st_dev)))
        listed.append((directory, files))
        stack.extend(reversed(folders))
    listed.sort(key=lambda item: item[0])
    return [file for _, files in listed for file in files]


def _file_key(entry: os.DirEntry, device: int) -> FileKey:
    if not entry.is_symlink():
        return device, entry.inode()
    try:
        info = entry.stat()
    except OSError:
        return entry.path  # a broken link: reading it names it
    return info.st_dev, info.st_ino


def _refuse_loop(link: str, directory: str) -> None:
    """Refuse ``link`` (in ``directory``) when it leads to ``directory`` or a folder that holds it."""
    target, here = os.path.realpath(link), os.path.realpath(directory)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        raise ValueError(f"image folder: {link} links to {target}, a folder that holds it, so its images would be "
                         "listed over and over; remove the link")


def _image_folder(path: Path) -> tuple[list[tuple[str, int]], list[str], list[FileKey]]:
    samples, classes, keys = _scan_image_folder(path)
    if len(classes) < 2:
        raise ValueError(f"image folder {path} has {len(classes)} class subfolder ({classes[0]}); a classifier needs "
                         "at least two classes, one subfolder each")
    return samples, classes, keys


def _load_image_folder(name: str, root: Path, val_size: int, seed: int, image_size: int,
                       grayscale: bool) -> DataSplits:
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist; pass imagefolder:PATH with PATH a directory "
                                   "holding one subdirectory of images per class (or train/ and test/ with those)")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    has_test = (root / "train").is_dir() and (root / "test").is_dir()
    samples, classes, keys = _image_folder(root / "train" if has_test else root)
    data = ImageFolderData(samples, image_size, grayscale)
    test = None
    if has_test:
        test_samples, test_classes, test_keys = _image_folder(root / "test")
        if test_classes != classes:
            raise ValueError(f"{root}/train has classes {classes} but {root}/test has {test_classes}; "
                             "both need the same class subdirectories")
        trained = dict(zip(keys, (file for file, _ in samples)))
        both = next(((file, trained[key]) for (file, _), key in zip(test_samples, test_keys) if key in trained), None)
        if both is not None:
            raise ValueError(f"{both[0]} is also in train/, as {both[1]} (one file, through a link): a test image must "
                             "not be trained on, so remove one of them")
        test = ImageFolderData(test_samples, image_size, grayscale)
    size = (len(data) + (len(test) if test is not None else 0)) * data.channels * image_size**2
    if size <= IN_MEMORY_BYTES:  # every file read once, here: a broken one is named before any training
        data = _decode(data, default_num_workers())
        test = _decode(test, default_num_workers()) if test is not None else None
    if test is None:
        data, test = _hold_out(data, val_size, seed, "test")
    train, val = _hold_out(data, val_size, seed, "val")
    histogram = (_histogram(train.images) if isinstance(train, TensorData)
                 else _folder_histogram(train, seed, default_num_workers()))
    mean, std = _mean_std(histogram)
    statistics = image_statistics(train.images) if isinstance(train, TensorData) else None
    # Photos: a mirrored cat is a cat (pass --no-flip for images whose mirror is another class, such as text).
    return DataSplits(name, train, val, test, classes, (data.channels, image_size, image_size), mean, std, str(root),
                      {"flip": True}, statistics=statistics)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    val_size: int = 5000,
    seed: int = 0,
    image_size: int = 32,
    search_dirs: Sequence[str | Path] | None = None,
    grayscale: bool = False,
) -> DataSplits:
    """Load a data set and split it into train / val / test.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10-catdog"`` (CIFAR-10 cats and dogs, labels 0=cat, 1=dog)
            or ``"imagefolder:PATH"``.
        data_dir: searched first, both as torchvision lays it out (``data_dir/FashionMNIST/raw``,
            ``data_dir/cifar-10-batches-py``) and flat (the files directly in ``data_dir``); idx files may be
            gzipped. Also where ``download`` puts the files (default: :func:`cache_dir`).
        download: fetch the data set with torchvision when no searched place has it.
        val_size: number of training examples held out for validation, picked by a permutation seeded with ``seed``;
            may be 0.
        seed: seed of the validation split (and of the test split of an image folder without ``test/``).
        image_size: side of the square an ``imagefolder`` image is resized to.
        grayscale: read an ``imagefolder``'s images as one grey channel instead of RGB.
        search_dirs: where to look after ``data_dir``, each again in both layouts; default
            :func:`default_search_dirs` (``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST, then
            :func:`cache_dir`).

    ``imagefolder:PATH`` is a ``torchvision.datasets.ImageFolder`` directory (one subdirectory per class, at least two
    classes), read by :func:`scan_image_folder` (each file once, links followed, loops refused). If ``PATH`` has
    ``train/`` and ``test/`` subdirectories, test is ``PATH/test`` (no file of which may be in ``PATH/train`` too)
    and train / val come from ``PATH/train``; otherwise test is carved first from ``PATH``, with ``val_size`` images
    as well. When the resized images fit in :data:`IN_MEMORY_BYTES` they are all read once, here, into
    :class:`TensorData` (a file that is not an image stops the load, named); a larger folder is read from disk during
    training
    (:class:`ImageFolderData`, its normalisation statistics estimated from :data:`STATS_SAMPLE_SIZE` training images).
    ``data_dir``, ``download`` and ``search_dirs`` do not apply to it.

    Raises:
        DatasetNotFoundError: no searched place has the data set (and ``download`` is off); the message lists them.
        ValueError: unknown name, a corrupt or truncated file (named in the message), or ``val_size`` out of range.
    """
    if name.startswith("imagefolder:"):
        return _load_image_folder(name, Path(name.removeprefix("imagefolder:")).expanduser(), val_size, seed,
                                  image_size, grayscale)
    if name not in _BUILTINS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    spec = _BUILTINS[name]
    download_to = Path(data_dir).expanduser() if data_dir is not None else cache_dir()
    roots = ([download_to] if data_dir is not None else []) + [
        Path(d).expanduser() for d in (default_search_dirs(name) if search_dirs is None else search_dirs)]
    try:
        directory, files = _locate(spec, roots, download_to)
    except DatasetNotFoundError:
        if not download:
            raise
        _download(spec, download_to)
        directory, files = _locate(spec, [download_to], download_to)
    train, test = spec.read(files, spec.classes)
    train, val = _hold_out(train, val_size, seed, "val")
    mean, std = _mean_std(_histogram(train.images))
    return DataSplits(name, train, val, test, list(spec.classes), tuple(train.images.shape[1:]), mean, std,
                      str(directory), dict(spec.augmentation), image_statistics(train.images))



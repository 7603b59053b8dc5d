"""Using a trained model: rebuild it from its checkpoint, predict the classes of image files, and evaluate it.

:func:`load_model` rebuilds the model a checkpoint describes — the MLP of its settings, or a user's model, built by
the ``PATH.py:FUNCTION`` the user names again (a checkpoint never makes nnbackprop import code, see
:mod:`nnbackprop.user_model`) — with the best weights, in evaluation mode. :func:`predict_files` gives the most likely
classes of image files (any size, grey or colour), prepared exactly as the training images were.
:func:`evaluate_checkpoint` measures the model on the test split of the data set it was trained on, or on another data
set with the same classes (e.g. another image folder), with per-class precision, recall and the confusion matrix.
Reading a checkpoint here changes nothing on disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from nnbackprop.build import EVAL_BATCH_SIZE, build_loss, build_model, dtypes
from nnbackprop.checkpoint import load_checkpoint, load_into, resolve_checkpoint, saved_config
from nnbackprop.config import TrainConfig
from nnbackprop.datasets import ImageFolderData, SplitData, load_dataset, read_image, scan_image_folder, unlike
from nnbackprop.device import resolve_device
from nnbackprop.errors import CheckpointError, ConfigError, DatasetNotFoundError, MissingFileError
from nnbackprop.evaluation import class_probabilities, evaluate
from nnbackprop.loaders import make_loader, normalize
from nnbackprop.losses import Loss
from nnbackprop.module import Module


def load_model(path: str | Path, device: torch.device | str = "cpu",
               model: str | None = None) -> tuple[Module, Loss, dict[str, Any]]:
    """Rebuild the model of a checkpoint (or run folder) with its best weights (its last ones if it has no best), in
    eval mode, in the dtype it computed in.

    Args:
        model: ``PATH.py:FUNCTION`` to build the model with. Needed for a model a user's function built: the
            checkpoint records which one, but only a file the user names is ever imported.

    Returns:
        ``(model, loss_fn, checkpoint)``: the loss the model was trained with, and the whole checkpoint dict.

    Raises:
        MissingFileError, CheckpointError: see :func:`~nnbackprop.checkpoint.load_checkpoint`; also when the model
            cannot be rebuilt (saying what is missing) or the weights do not fit it.
    """
    path = resolve_checkpoint(path)
    checkpoint = load_checkpoint(path)
    config = saved_config(checkpoint, path)
    source = checkpoint["run"].get("model", {"kind": "mlp"})
    if model is not None:
        config = config.replace(model=model)
    elif source.get("kind") == "python":
        raise CheckpointError(f"{path} holds a model that was passed to nnbackprop.train() in Python, which the "
                              "checkpoint cannot rebuild: build it again and load checkpoint['model'] into it, or pass "
                              "--model PATH.py:FUNCTION")
    elif config.model is not None:
        raise CheckpointError(f"{path} was trained with the model {config.model} builds; nnbackprop never imports "
                              "code because a checkpoint names it (anyone can write one): pass --model "
                              f"{config.model} to rebuild it, once you have checked that file is yours")
    info = checkpoint["data"]
    rebuilt = build_model(config, tuple(info["input_shape"]), len(info["classes"]), device)
    weights = checkpoint["best_model"] if checkpoint["best_model"] is not None else checkpoint["model"]
    load_into(rebuilt, weights, path, "model weights")
    compute_dtype, parameter_dtype = dtypes(config)
    if compute_dtype != parameter_dtype:  # mixed precision: the float32 master weights, computed with as in training
        rebuilt.to(compute_dtype)
    return rebuilt.eval(), build_loss(config), checkpoint


# ------------------------------------------------------------------------------------------------------ predict


def _parameter(model: Module) -> Tensor:
    """A parameter of ``model``, whose device and dtype the inputs must have."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("the model has no parameters, so its device and dtype are unknown")
    return parameter


@torch.no_grad()
def predict(model: Module, images: Tensor, data_info: Mapping[str, Any],
            batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """Class probabilities of images prepared as in training.

    Args:
        model: in evaluation mode (as :func:`load_model` returns it).
        images: ``uint8`` ``(N, C, H, W)`` with ``(C, H, W)`` the model's input shape (e.g. from
            :func:`read_images`); normalised here with ``data_info["mean"]`` and ``["std"]``, on the model's device
            and in its dtype, ``batch_size`` at a time.
        data_info: the checkpoint's ``data`` entry.

    Returns:
        ``(N, num_classes)`` float32 probabilities on the CPU (:func:`class_probabilities`).
    """
    expected = tuple(data_info["input_shape"])
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images must be uint8 (N, {', '.join(map(str, expected))}), got {images.dtype} "
                         f"{tuple(images.shape)}")
    parameter = _parameter(model)
    chunks = []
    for batch in images.split(batch_size):
        x = normalize(batch.to(parameter.device), data_info["mean"], data_info["std"], parameter.dtype)
        chunks.append(class_probabilities(model(x)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, len(data_info["classes"]))


def read_images(paths: Sequence[str | Path], data_info: Mapping[str, Any]) -> Tensor:
    """Image files as a model trained on ``data_info`` (a checkpoint's ``data`` entry) sees them:
    :func:`~nnbackprop.datasets.read_image` of each, stacked into ``uint8`` ``(N, C, H, W)``.

    Raises:
        FileNotFoundError: a file does not exist. ValueError: a file is not a readable image. Both name the file.
    """
    shape = tuple(data_info["input_shape"])
    images = []
    for path in paths:
        if not Path(path).is_file():
            what = "is a folder, not an image file" if Path(path).is_dir() else "not found"
            raise MissingFileError(f"image {path} {what}; pass image files")
        images.append(read_image(path, shape))
    return torch.stack(images) if images else torch.empty(0, *shape, dtype=torch.uint8)


def ranked(probabilities: Tensor, classes: Sequence[str], top: int | None = None) -> list[list[tuple[str, float]]]:
    """Per row of ``probabilities`` ``(N, C)``, the ``top`` most likely ``(class name, probability)`` pairs, most
    likely first (default ``top``: ``min(3, C)``; at most ``C``).

    Raises:
        ValueError: ``top`` is below 1, or ``classes`` does not have ``C`` names.
    """
    if probabilities.dim() != 2 or probabilities.shape[1] != len(classes):
        raise ValueError(f"{len(classes)} class names for probabilities of shape {tuple(probabilities.shape)}")
    if top is not None and top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    k = min(3 if top is None else top, len(classes))
    values, indices = probabilities.topk(k, dim=1)
    return [[(classes[i], p) for i, p in zip(row_indices, row_values)]
            for row_indices, row_values in zip(indices.tolist(), values.tolist())]


def predict_files(checkpoint: str | Path, images: Sequence[str | Path], *, top: int | None = None,
                  device: str = "auto", model: str | None = None) -> list[dict[str, Any]]:
    """The ``top`` most likely classes of each image file, by the model of ``checkpoint`` (a file or run folder).

    Every image is read first (:func:`read_images`), so a bad file fails before anything is predicted.

    Args:
        top: how many classes per image (default ``min(3, number of classes)``).
        model: ``PATH.py:FUNCTION`` to rebuild the model with (see :func:`load_model`).

    Returns:
        ``[{"image": path, "top": [{"class": name, "probability": p}, ...], "unlike": [...]}, ...]``, one per image,
        in order; ``unlike`` says how an image differs from the training images (:func:`unlike_training`), ``[]``
        when it does not.
    """
    rebuilt, _, saved = load_model(checkpoint, resolve_device(device), model)
    info = saved["data"]
    prepared = read_images(images, info)
    probabilities = predict(rebuilt, prepared, info)
    return [{"image": str(path), "top": [{"class": name, "probability": p} for name, p in row],
             "unlike": unlike_training(path, image, info)}
            for path, image, row in zip(images, prepared, ranked(probabilities, info["classes"], top))]


def unlike_training(path: str | Path, image: Tensor, info: Mapping[str, Any]) -> list[str]:
    """How an image file, prepared as ``image`` ``uint8 (C, H, W)``, differs from the images a model was trained on
    (``info``: a checkpoint's ``data``): a colour image for a model of grey images, and per-image statistics outside
    the training images' ranges (:func:`~nnbackprop.datasets.unlike`). A prediction for such an image may mean
    little: the model has never seen anything like it."""
    found = []
    if info["input_shape"][0] == 1 and _colourful(path):
        found.append("a colour image, read in grey for a model trained on grey images")
    if info.get("statistics"):
        found += unlike(image, info["statistics"])
    return found


def _colourful(path: str | Path, threshold: float = 0.04) -> bool:
    """Whether the image file's colour channels differ by more than ``threshold`` (of full scale) on average."""
    rgb = read_image(path, (3, 64, 64)).float().div_(255)  # (3, 64, 64)
    return (rgb - rgb.mean(0, keepdim=True)).abs().mean().item() > threshold


# ------------------------------------------------------------------------------------------------------ evaluate


@dataclass(frozen=True)
class Evaluation:
    """How a model did on a set of labelled examples.

    Attributes:
        checkpoint: the checkpoint file evaluated.
        epoch: epochs it had trained.
        best_epoch: the epoch whose weights were evaluated (the best validation result); ``None``: the last epoch's.
        dataset: the data set's name (``"mnist"``, ``"imagefolder:PATH"``).
        split: ``"test"`` (its test split) or ``"all"`` (every image of a folder without ``train/`` and ``test/``).
        source: where the examples were read from.
        classes: class names, indexed by label.
        loss: mean loss (the training loss function).
        accuracy: fraction of examples whose most likely class is their label.
        confusion: ``confusion[i][j]`` examples of class ``i`` predicted as class ``j``.
    """

    checkpoint: str
    epoch: int
    best_epoch: int | None
    dataset: str
    split: str
    source: str
    classes: list[str]
    loss: float
    accuracy: float
    confusion: list[list[int]]

    @property
    def num_examples(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def support(self) -> list[int]:
        """Examples of each class."""
        return [sum(row) for row in self.confusion]

    @property
    def precision(self) -> list[float | None]:
        """Per class, the fraction of the examples predicted as it that are it (``None``: none predicted as it)."""
        predicted = [sum(column) for column in zip(*self.confusion)]
        return [self.confusion[i][i] / n if n else None for i, n in enumerate(predicted)]

    @property
    def recall(self) -> list[float | None]:
        """Per class, the fraction of its examples predicted as it (``None``: it has no examples)."""
        return [self.confusion[i][i] / n if n else None for i, n in enumerate(self.support)]

    def to_dict(self) -> dict[str, Any]:
        """The fields, ``num_examples`` and a ``per_class`` list of ``{class, precision, recall, support}``, as
        JSON-ready values."""
        per_class = [{"class": name, "precision": p, "recall": r, "support": n}
                     for name, p, r, n in zip(self.classes, self.precision, self.recall, self.support)]
        return {**asdict(self), "num_examples": self.num_examples, "per_class": per_class}


def image_folder_split(root: str | Path, input_shape: Sequence[int]) -> tuple[ImageFolderData, list[str], str]:
    """The images of a folder to evaluate a model of ``input_shape`` ``(C, H, W)`` on: ``root/test`` if ``root`` has
    ``train/`` and ``test/``, else every image of ``root``, one subfolder per class; read as in training (grey for
    ``C`` 1, RGB for 3, resized to ``H x W``).

    Returns:
        ``(images, classes, split)``: ``split`` is ``"test"`` or ``"all"``.

    Raises:
        DatasetNotFoundError: no such folder, or no class subfolders with images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist; pass imagefolder:PATH with PATH a folder "
                                   "holding one subfolder of images per class (or train/ and test/ with those)")
    channels, height, width = input_shape
    if height != width:
        raise ValueError(f"the model takes {height}x{width} images; an image folder is read as squares")
    has_test = (root / "train").is_dir() and (root / "test").is_dir()
    folder = root / "test" if has_test else root
    samples, classes = scan_image_folder(folder)
    return ImageFolderData(samples, height, grayscale=channels == 1), classes, "test" if has_test else "all"


def _same_data_set(name: str, trained_on: str) -> bool:
    """Whether ``name`` is the data set ``trained_on`` (an image folder: the same folder)."""
    prefix = "imagefolder:"
    if name.startswith(prefix) and trained_on.startswith(prefix):
        return (Path(name.removeprefix(prefix)).expanduser().resolve()
                == Path(trained_on.removeprefix(prefix)).expanduser().resolve())
    return name == trained_on


def evaluation_data(config: TrainConfig, info: Mapping[str, Any], dataset: str | None = None,
                    data_dir: str | None = None) -> tuple[SplitData, list[str], str, str, str]:
    """The labelled examples to evaluate a model trained with ``config`` on ``info`` (a checkpoint's ``data``) on.

    ``dataset`` ``None`` or the training data set: its test split, found and split as in training (``data_dir``
    overrides the checkpoint's; an image folder is found by its path, so ``data_dir`` is refused for it).
    ``imagefolder:PATH``: :func:`image_folder_split`. Another name (``mnist``, ...): its test split.

    Returns:
        ``(examples, classes, dataset name, split, source)``.

    Raises:
        ConfigError: the data set's classes or input shape are not the model's (the message names both), or
            ``data_dir`` for an image folder.
        DatasetNotFoundError: no such data set.
    """
    shape = tuple(info["input_shape"])
    folder = dataset if dataset is not None else config.dataset
    if data_dir is not None and folder.startswith("imagefolder:"):
        raise ConfigError(f"--data-dir finds a named data set (mnist, ...); {folder} is found by its path: to evaluate "
                          "on another folder pass --dataset imagefolder:PATH, without --data-dir")
    if dataset is not None and dataset.startswith("imagefolder:") and not _same_data_set(dataset, config.dataset):
        root = Path(dataset.removeprefix("imagefolder:")).expanduser()
        examples, classes, split = image_folder_split(root, shape)  # read at the model's input shape
        name, source, found_shape = dataset, str(root), shape
    else:
        if dataset is None or _same_data_set(dataset, config.dataset):  # found and split as in training
            data = load_dataset(config.dataset, config.data_dir if data_dir is None else data_dir, False,
                                config.val_size, config.seed, config.image_size, grayscale=config.grayscale)
        else:
            data = load_dataset(dataset, data_dir, False, 0, config.seed)
        examples, classes, split = data.test, list(data.classes), "test"
        name, source, found_shape = data.name, data.source, data.input_shape
    if classes != list(info["classes"]):
        raise ConfigError(f"the model was trained on classes {info['classes']}, but {source} has {classes}; "
                         "evaluate on a data set with the same classes in the same order")
    if tuple(found_shape) != shape:
        raise ConfigError(f"the model takes inputs of shape {list(shape)}, but {name} has {list(found_shape)}; "
                         "evaluate on a data set of the same image size and channels")
    return examples, classes, name, split, source


def evaluate_checkpoint(path: str | Path, *, dataset: str | None = None, data_dir: str | None = None,
                        device: str = "auto", batch_size: int = EVAL_BATCH_SIZE,
                        model: str | None = None) -> Evaluation:
    """Evaluate a checkpoint's model on the test split of the data set it was trained on, or on ``dataset`` (see
    :func:`evaluation_data`), its images normalised with the statistics saved in the checkpoint.

    Args:
        path: a checkpoint file or run folder.
        model: ``PATH.py:FUNCTION`` to rebuild the model with (see :func:`load_model`).
    """
    torch_device = resolve_device(device)
    rebuilt, loss_fn, checkpoint = load_model(path, torch_device, model)
    config = saved_config(checkpoint, Path(path))
    info = checkpoint["data"]
    examples, classes, name, split, source = evaluation_data(config, info, dataset, data_dir)
    loader = make_loader(examples, batch_size, mean=info["mean"], std=info["std"], device=torch_device,
                         dtype=dtypes(config)[0])
    scores = evaluate(rebuilt, loss_fn, loader, num_classes=len(classes))
    best_epoch = checkpoint["early_stopping"].get("best_epoch") if checkpoint["best_model"] is not None else None
    return Evaluation(str(resolve_checkpoint(path)), checkpoint["epoch"], best_epoch, name, split, source, classes,
                      scores.loss, scores.accuracy, scores.confusion.tolist())

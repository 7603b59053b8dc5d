"""From settings to the parts of a run: the model, loss, optimizer and schedule a
:class:`~nnbackprop.config.TrainConfig` describes, the settings it leaves open resolved against the data, and the
checks that all of it fits the data and the machine — before anything is trained. :func:`~nnbackprop.train` uses
these, and so do ``nnbackprop evaluate`` / ``predict`` (:mod:`nnbackprop.inference`) and the benchmarks.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from nnbackprop.config import TrainConfig
from nnbackprop.datasets import DataSplits
from nnbackprop.errors import ConfigError, gist
from nnbackprop.layers import Dropout
from nnbackprop.layout import DTYPES, LOW_PRECISION
from nnbackprop.losses import LOSSES, Loss
from nnbackprop.model import cnn, mlp
from nnbackprop.module import Module
from nnbackprop.optim import DEFAULT_LR, OPTIMIZERS, Optimizer
from nnbackprop.schedule import make_scheduler
from nnbackprop.user_model import model_from_file

EVAL_BATCH_SIZE = 1000
"""Examples per batch when evaluating (validation, test, ``nnbackprop evaluate``)."""
DEFAULT_HIDDEN = (512, 512)
"""An MLP's hidden widths when ``hidden`` is left open."""


def dtypes(config: TrainConfig) -> tuple[torch.dtype, torch.dtype]:
    """``(compute, parameters)``: the layers and the data use the first; the model is built, and its weights kept, in
    the second — float32 under mixed precision (``bfloat16``), where the fast step keeps float32 master weights."""
    compute = DTYPES[config.dtype]
    return compute, torch.float32 if compute in LOW_PRECISION else compute


def num_outputs(config: TrainConfig, num_classes: int) -> int:
    """What the model's last layer must produce: one logit for ``bce``, else one per class."""
    return 1 if config.loss == "bce" else num_classes


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                device: torch.device | str = "cpu", dropout_generator: torch.Generator | None = None,
                model: Module | None = None) -> Module:
    """The model of ``config`` for inputs of ``input_shape`` ``(C, H, W)`` and ``num_classes`` classes — the MLP its
    settings describe, the one ``config.model`` (``PATH.py:FUNCTION``) returns, or ``model`` (a user's, passed to
    ``train()``) — on ``device`` in the parameter dtype of :func:`dtypes`, checked by :func:`check_model_fits`.

    The initial weights are drawn on the CPU from a generator seeded with ``config.seed`` (so they do not depend on
    the device; a user's function gets it as ``generator``). Dropout layers draw their masks from
    ``dropout_generator`` (``None``: torch's global generator).
    """
    if model is not None and not isinstance(model, Module):
        hint = (" (a torch.nn model: write it with nnbackprop's layers, whose backward is by hand)"
                if isinstance(model, torch.nn.Module) else "")
        raise ConfigError(f"train(model=...) takes an nnbackprop Module such as nb.Sequential(...), got a "
                          f"{type(model).__name__}{hint}")
    if config.loss == "bce" and num_classes != 2:
        raise ConfigError(f"loss 'bce' (one logit) needs a two-class data set, this one has {num_classes} classes; "
                          "use loss 'ce'")
    outputs = num_outputs(config, num_classes)
    generator = torch.Generator().manual_seed(config.seed)
    _, parameter_dtype = dtypes(config)
    try:
        if model is not None:
            pass
        elif config.model is not None:
            model = model_from_file(config.model, in_features=math.prod(input_shape), input_shape=tuple(input_shape),
                                    num_classes=outputs, generator=generator)
        elif config.arch == "cnn":
            check_memory(cnn_parameters(input_shape[0], config.channels, config.convs_per_stage, config.hidden or (),
                                        outputs), config, device)
            model = cnn(tuple(input_shape), config.channels, outputs, convs_per_stage=config.convs_per_stage,
                        activation=config.activation, batchnorm=bool(config.batchnorm), dropout=config.dropout,
                        hidden=config.hidden or (), init=config.init, generator=generator)
        else:
            hidden = config.hidden if config.hidden is not None else DEFAULT_HIDDEN
            check_memory(mlp_parameters(math.prod(input_shape), hidden, outputs, bool(config.batchnorm)), config,
                         device)
            model = mlp(math.prod(input_shape), hidden, outputs, activation=config.activation,
                        dropout=config.dropout, batchnorm=bool(config.batchnorm), init=config.init,
                        generator=generator)
        for m in model.modules():
            if isinstance(m, Dropout):
                m.generator = dropout_generator
        model.to(device, parameter_dtype)
    except RuntimeError as error:
        if not _out_of_memory(error):
            raise
        raise ConfigError(f"the model does not fit in memory ({gist(error)}); make it smaller") from error
    check_model_fits(model, input_shape, outputs, config.model or type(model).__name__)
    return model


def cnn_parameters(in_channels: int, channels: tuple[int, ...], convs_per_stage: int, hidden: tuple[int, ...],
                   outputs: int, kernel_size: int = 3) -> int:
    """About the number of parameters of :func:`~nnbackprop.model.cnn` with these sizes (its convolutions and linear
    layers, not its batch norms): enough to refuse what cannot fit in memory."""
    convs, previous = 0, in_channels
    for width in channels:
        convs += previous * width * kernel_size**2 + (convs_per_stage - 1) * width * width * kernel_size**2
        previous = width
    return convs + mlp_parameters(previous, hidden, outputs, False)


def mlp_parameters(in_features: int, hidden: tuple[int, ...], outputs: int, batchnorm: bool) -> int:
    """The number of parameters of :func:`~nnbackprop.model.mlp` with these sizes."""
    widths = [in_features, *hidden, outputs]
    return sum(a * b + b for a, b in zip(widths, widths[1:])) + (2 * sum(hidden) if batchnorm else 0)


def check_memory(num_parameters: int, config: TrainConfig, device: torch.device | str) -> None:
    """Refuse, before allocating, a model whose parameters with their gradients, optimizer state and master weights
    cannot fit in the device's memory (all of it, not what is free now)."""
    copies = 2 + {"sgd": 1, "adam": 3, "adamw": 3}[config.optimizer]  # values, gradients, optimizer state
    needed = num_parameters * copies * (8 if config.dtype == "float64" else 4)
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total:
        raise ConfigError(f"the model has {num_parameters:,} parameters, which with their gradients and optimizer "
                          f"state need about {needed / 2**30:.1f} GiB, more than the {total / 2**30:.1f} GiB of "
                          f"{device}; use smaller --{'channels' if config.arch == 'cnn' else 'hidden'} widths")


def _out_of_memory(error: RuntimeError) -> bool:
    return isinstance(error, getattr(torch, "OutOfMemoryError", ())) or "allocate" in str(error).lower()


@torch.no_grad()
def check_model_fits(model: Module, input_shape: tuple[int, ...], outputs: int, what: str) -> None:
    """Run the model once on two zero images of ``input_shape`` (in evaluation mode, saving nothing) and refuse, in
    one line, a model that does not take such inputs or does not return ``outputs`` values per example."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ConfigError(f"{what} has no parameters to train")
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *input_shape, dtype=parameter.dtype, device=parameter.device))
    except (ValueError, RuntimeError) as error:  # a layer refusing the input, or torch failing inside a user's layer
        detail = str(error).splitlines()[0] if isinstance(error, ValueError) else gist(error)
        raise ConfigError(f"{what} does not take this data set's images of shape {tuple(input_shape)}: "
                          f"{detail}") from error
    finally:
        model.train(was_training)
    per_example = math.prod(out.shape[1:]) if out.dim() > 1 else 1
    if out.shape[0] != 2 or per_example != outputs or out.dim() > 2:
        need = "1 output (one logit, --loss bce)" if outputs == 1 else f"{outputs} outputs, one per class"
        raise ConfigError(f"{what} returns outputs of shape {tuple(out.shape[1:])} per example, but this data set "
                          f"needs {need}: give its last layer {outputs} output{'s' * (outputs != 1)}")


def build_loss(config: TrainConfig) -> Loss:
    """The loss of ``config``, with mean reduction."""
    return LOSSES[config.loss]()


def build_optimizer(config: TrainConfig, model: Module) -> Optimizer:
    """The optimizer of ``config`` over ``model``'s parameters (``config.lr`` resolved, see :func:`resolved`)."""
    params = list(model.parameters())
    if not params:
        raise ConfigError("the model has no parameters to train")
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
    if config.optimizer == "sgd":
        return OPTIMIZERS["sgd"](params, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                                 weight_decay=config.weight_decay)
    return OPTIMIZERS[config.optimizer](params, lr=lr, betas=config.betas, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRScheduler:
    """The learning-rate schedule of ``config``, in optimizer steps."""
    step_epochs = config.step_epochs or max(1, config.epochs // 3)
    return make_scheduler(config.schedule, optimizer, total_steps=config.epochs * steps_per_epoch,
                          warmup_steps=round((config.warmup_epochs or 0) * steps_per_epoch),
                          step_size=step_epochs * steps_per_epoch, gamma=config.gamma)


def resolved(config: TrainConfig, data: DataSplits, previous: TrainConfig | None = None) -> TrainConfig:
    """``config`` with the settings it leaves open (``None``) filled in: as the ``previous`` run had them (a run being
    resumed), else the augmentation that suits ``data`` (``data.augmentation``), the optimizer's usual learning rate
    (:data:`~nnbackprop.optim.DEFAULT_LR`), a warm-up of one epoch (or a tenth of a run shorter than ten), and for
    the architecture its hidden layers (:data:`DEFAULT_HIDDEN` for an MLP, none for a CNN) and batch norm (off for an
    MLP, on for a CNN)."""
    if previous is not None:
        config = config.replace(**{name: getattr(previous, name) for name, value in config.to_dict().items()
                                   if value is None and getattr(previous, name) is not None})
    chosen: dict[str, Any] = {name: data.augmentation.get(name, default)
                              for name, default in (("shift", 0), ("flip", False), ("crop_scale", 1.0))
                              if getattr(config, name) is None}
    if config.lr is None:
        chosen["lr"] = DEFAULT_LR[config.optimizer]
    if config.warmup_epochs is None:
        chosen["warmup_epochs"] = min(1.0, config.epochs / 10)
    if config.hidden is None:
        chosen["hidden"] = DEFAULT_HIDDEN if config.arch == "mlp" else ()
    if config.batchnorm is None:
        chosen["batchnorm"] = config.arch == "cnn"
    return config.replace(**chosen) if chosen else config


def check_fits(config: TrainConfig, data: DataSplits) -> None:
    """Raise a :class:`~nnbackprop.errors.ConfigError` naming the limit when ``config`` cannot make sense for
    ``data``, before any training: empty splits, fewer than two classes, labels out of range, augmentation shifts as
    large as the images."""
    if len(data.train) == 0:
        raise ConfigError(f"{data.name}: the training split is empty")
    if len(data.test) == 0:
        raise ConfigError(f"{data.name} has no test split: give an image folder a test/ folder beside train/, or let "
                          "one be carved from the images with --val-size > 0")
    if data.num_classes < 2:
        raise ConfigError(f"{data.name} has {data.num_classes} class; a classifier needs at least two")
    if len(data.val) == 0 and config.patience is not None:
        raise ConfigError("early stopping (patience) needs a validation split; set val_size > 0")
    height, width = data.input_shape[1:]
    if (config.shift or 0) >= min(height, width):
        raise ConfigError(f"shift {config.shift} px does not fit {data.name}'s {height}x{width} images: random shifts "
                          f"must stay below {min(height, width)} px (2 to 4 suit 28-32 px images)")
    for split, part in (("train", data.train), ("val", data.val), ("test", data.test)):
        if len(part):
            low, high = (int(v) for v in torch.aminmax(part.labels))
            if low < 0 or high >= data.num_classes:
                raise ConfigError(f"{data.name}: the {split} split has label {low if low < 0 else high}, outside "
                                  f"[0, {data.num_classes - 1}] for its {data.num_classes} classes")

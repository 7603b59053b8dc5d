"""The settings of a training run, each declared once: name, type, default, help and check.

:class:`TrainConfig` is the one declaration. Everything else is generated from its fields: the checks run when a
config is built, :func:`add_arguments` makes the ``nnbackprop train`` options (and an experiment script's), and
:func:`load_config_file` reads any of them from a TOML file (or from the JSON ``summary.json`` a run writes), where
:func:`to_toml` writes them back. Options given on the command line win over the file, the file over the defaults::

    nnbackprop train --config run.toml --epochs 3       # run.toml: epochs = 20, hidden = [1024, 1024], ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nnbackprop.datasets import DATASETS
from nnbackprop.diagnostics import MODES
from nnbackprop.errors import ERROR_PREFIX, ConfigError, one_line
from nnbackprop.init import SCHEMES
from nnbackprop.layout import DTYPES
from nnbackprop.losses import LOSSES
from nnbackprop.model import ACTIVATIONS
from nnbackprop.optim import DEFAULT_LR, OPTIMIZERS
from nnbackprop.schedule import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Check = Callable[[Any], "str | None"]
"""A setting's check: ``None`` when the value is fine, else what is wrong with it (a phrase: 'must be ...')."""


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def at_least(minimum: float, *, strict: bool = False, maximum: float | None = None) -> Check:
    """``value >= minimum`` (``>`` with ``strict``), and ``value <= maximum`` when one is given."""

    def check(value: Any) -> str | None:
        if strict and value <= minimum or value < minimum:
            return f"must be {'>' if strict else '>='} {_number(minimum)}"
        if maximum is not None and value > maximum:
            return f"must be <= {_number(maximum)}"
        return None

    return check


def between(low: float, high: float, *, high_open: bool = True) -> Check:
    def check(value: Any) -> str | None:
        if not (low <= value < high if high_open else low <= value <= high):
            return f"must be in [{_number(low)}, {_number(high)}{')' if high_open else ']'}"
        return None

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    check.choices = choices  # type: ignore[attr-defined]
    return check


def each(check: Check, *, at_most: int | None = None) -> Check:
    """``check`` of every value of a list of at most ``at_most`` values."""

    def check_each(values: Any) -> str | None:
        if at_most is not None and len(values) > at_most:
            return f"must list at most {at_most} values, not {len(values)}"
        problems = [problem for problem in map(check, values) if problem]
        return f"values must each {problems[0].removeprefix('must ')}" if problems else None

    return check_each


MAX_EPOCHS = 100_000
"""The most epochs (and warm-up, step, patience epochs) a run may ask for: far beyond any useful run, short of one
that never ends."""
MAX_WIDTH = 65_536
"""The widest hidden layer: a 65,536 x 65,536 weight matrix alone is 16 GiB in float32."""
MAX_STAGES = 16
"""The most convolution stages, or convolutions per stage (each stage halves the image)."""
MAX_LAYERS = 1_000
MAX_BATCH_SIZE = 1_000_000
MAX_LOG_EVERY = 1_000_000
MAX_IMAGE_SIZE = 1_024
"""The largest side an image folder's images are resized to (3 x 1024 x 1024 inputs per image)."""
MAX_THREADS = 1_024
MAX_SEED = 2**62
"""The largest seed: generators are seeded with ``seed + 1`` and ``seed + epoch`` too, which stay below 2^63."""
_shown = reprlib.Repr()
_shown.maxlist = _shown.maxtuple = 8
_shown.maxlong, _shown.maxstring = 40, 200


def shown(value: Any) -> str:
    """``repr(value)``, shortened for an error line (a long list, a huge number, a long string)."""
    return _shown.repr(value)


def _model_spec(value: str) -> str | None:
    path, sep, function = value.rpartition(":")
    if not sep or not path.endswith(".py") or not function.isidentifier():
        return "must be PATH.py:FUNCTION, a Python file and the function in it that returns the model"
    return None


def _dataset(value: str) -> str | None:
    """Any name is a name (data passed to ``train()`` in Python carries its own); ``load_dataset`` knows
    :data:`~nnbackprop.datasets.DATASETS`."""
    if not value or value == "imagefolder:":
        return f"must be one of {', '.join(DATASETS)}"
    return None


def setting(default: Any, group: str, help: str, check: Check | None = None, *, resumable: bool = False) -> Any:
    """Declare a :class:`TrainConfig` field: its default, the group of options it is listed in, its help, its check,
    and whether a resumed run may change it (``resumable``)."""
    return field(default=default, metadata={"group": group, "help": help, "check": check, "resumable": resumable})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved in each checkpoint, in ``summary.json`` and ``config.toml``.

    Build one with keyword arguments (``TrainConfig(epochs=3)``), from the command line (:func:`parse_config`) or from
    a file (:func:`load_config_file`); :meth:`replace` changes settings. Every setting is checked when it is built:
    ``ValueError`` lists all the problems. The fields below are the settings; each one's help says what it does.
    """

    # data
    dataset: str = setting("fashion-mnist", "data", " | ".join(DATASETS), _dataset)
    data_dir: str | None = setting(None, "data", "look here first for the data set files (and download into it)",
                                   resumable=True)
    download: bool = setting(False, "data", "download the data set if it is not found", resumable=True)
    val_size: int = setting(5000, "data", "training examples held out for validation and early stopping",
                            at_least(0))
    image_size: int = setting(32, "data", "side images of an imagefolder data set are resized to",
                              at_least(1, maximum=MAX_IMAGE_SIZE))
    grayscale: bool = setting(False, "data", "read an imagefolder data set's images as one grey channel")
    # model
    model: str | None = setting(None, "model", "PATH.py:FUNCTION: train the model this function returns instead of "
                                "the MLP below (see the README's custom layers)", _model_spec)
    arch: str = setting("mlp", "model", "the model: mlp (hidden layers of --hidden widths) or cnn (stages of 3x3 "
                        "convolutions of --channels widths, each stage ending in 2x2 max pooling, then global average "
                        "pooling and the classifier)", one_of("mlp", "cnn"))
    hidden: tuple[int, ...] | None = setting(None, "model", "widths of the hidden linear layers, comma-separated, none "
                                             "for a linear classifier (default: 512,512 for mlp, none for cnn)",
                                             each(at_least(1, maximum=MAX_WIDTH), at_most=MAX_LAYERS))
    channels: tuple[int, ...] = setting((32, 64, 128), "model", "cnn: output channels of each stage",
                                        each(at_least(1, maximum=MAX_WIDTH), at_most=MAX_STAGES))
    convs_per_stage: int = setting(2, "model", "cnn: convolutions (each with batch norm and activation) per stage",
                                   at_least(1, maximum=MAX_STAGES))
    activation: str = setting("relu", "model", "activation of the hidden layers", one_of(*ACTIVATIONS))
    dropout: float = setting(0.2, "model", "dropout after each hidden layer (mlp) or before each linear layer of the "
                             "classifier (cnn)", between(0, 1))
    batchnorm: bool | None = setting(None, "model", "batch normalisation after each hidden linear layer (mlp) or "
                                     "convolution (cnn) (default: off for mlp, on for cnn)")
    init: str = setting("default", "model", "weight initialisation (default: as torch.nn.Linear)",
                        one_of(*SCHEMES))
    loss: str = setting("ce", "model", "ce: softmax cross-entropy; mse: squared error to one-hot targets; bce: one "
                        "logit, two classes", one_of(*LOSSES))
    # optimisation
    optimizer: str = setting("sgd", "optimisation", "sgd (with momentum), adam or adamw", one_of(*OPTIMIZERS))
    epochs: int = setting(20, "optimisation", "passes over the training split", at_least(1, maximum=MAX_EPOCHS),
                          resumable=True)
    batch_size: int = setting(128, "optimisation", "examples per step (all ranks together)",
                              at_least(1, maximum=MAX_BATCH_SIZE))
    lr: float | None = setting(None, "optimisation", "learning rate at its peak, after warm-up (default: " + ", ".join(
                               f"{lr:g} for {name}" for name, lr in DEFAULT_LR.items()) + ")",
                               at_least(0, strict=True))
    momentum: float = setting(0.9, "optimisation", "SGD momentum", at_least(0))
    nesterov: bool = setting(True, "optimisation", "SGD with Nesterov momentum")
    betas: tuple[float, ...] = setting((0.9, 0.999), "optimisation", "Adam/AdamW moment decay rates beta1,beta2",
                                       each(between(0, 1)))
    weight_decay: float = setting(5e-4, "optimisation", "L2 penalty (SGD, Adam) or decoupled decay (AdamW)",
                                  at_least(0))
    schedule: str = setting("cosine", "optimisation", "learning-rate schedule, stepped every batch",
                            one_of(*SCHEDULES))
    warmup_epochs: float | None = setting(None, "optimisation", "linear learning-rate warm-up, in epochs, may be "
                                          "fractional (default: 1 epoch, or a tenth of a run shorter than 10)",
                                          at_least(0, maximum=MAX_EPOCHS))
    step_epochs: int | None = setting(None, "optimisation", "step schedule: epochs between decays (default: a third "
                                      "of the run)", at_least(1, maximum=MAX_EPOCHS))
    gamma: float = setting(0.1, "optimisation", "step schedule: decay factor", at_least(0, strict=True))
    patience: int | None = setting(None, "optimisation", "stop after this many epochs without a better validation "
                                   "result (--monitor) (default: never)", at_least(1, maximum=MAX_EPOCHS),
                                   resumable=True)
    monitor: str = setting("val_loss", "optimisation", "the validation result that picks the weights kept (and "
                           "evaluated on the test split) and that --patience watches: val_loss (lowest) or "
                           "val_accuracy (highest; an overfitting classifier's loss can rise while its accuracy "
                           "still does)", one_of("val_loss", "val_accuracy"))
    shift: int | None = setting(None, "optimisation", "augmentation: random shifts of up to this many pixels "
                                "(default: what suits the data set: 1 for MNIST, 2 for CIFAR-10 cats and dogs, "
                                "else 0)", at_least(0, maximum=MAX_IMAGE_SIZE))
    crop_scale: float | None = setting(None, "optimisation", "augmentation: random crops keeping at least this share "
                                       "of an image's area (aspect ratios 3/4 to 4/3), stretched back to its size, "
                                       "instead of shifts; 1 for none (default: what suits the data set)",
                                       between(0.05, 1, high_open=False))
    flip: bool | None = setting(None, "optimisation", "augmentation: random horizontal flips (default: what suits "
                                "the data set: on for CIFAR-10 cats and dogs and image folders of photos, else off)")
    # run
    device: str = setting("auto", "run", "auto, cpu, cuda or cuda:N", resumable=True)
    dtype: str = setting("float32", "run", "the dtype the layers compute in; bfloat16: mixed precision, with float32 "
                         "master weights and optimizer state (the fast step)", one_of(*DTYPES))
    seed: int = setting(0, "run", "seed of weights, shuffling, dropout and augmentation",
                        at_least(0, maximum=MAX_SEED))
    fast: bool = setting(True, "run", "the fast step (buffers, flat parameters); --no-fast: the readable one",
                         resumable=True)
    cuda_graph: bool = setting(False, "run", "(CUDA) replay each training step as a CUDA graph", resumable=True)
    tf32: bool = setting(False, "run", "(CUDA) float32 matrix products and convolutions in TF32", resumable=True)
    log_every: int = setting(50, "run", "steps between reads of the running loss (progress, divergence check, "
                             "diagnostics)", at_least(1, maximum=MAX_LOG_EVERY), resumable=True)
    diagnostics: str = setting("on", "run", "per-layer statistics in OUT/layers.jsonl: off, on (one step per log "
                               "interval) or full (every step, averaged)", one_of(*MODES),
                               resumable=True)
    tensorboard: bool = setting(False, "run", "write TensorBoard logs to OUT/tensorboard (pip install "
                                "'nnbackprop[tensorboard]')", resumable=True)
    threads: int | None = setting(None, "run", "CPU threads torch may use (default: torch's choice, one per core); "
                                  "1 where other jobs share the cores", at_least(1, maximum=MAX_THREADS),
                                  resumable=True)
    out: str | None = setting(None, "run", "output directory (default: runs/DATASET)", resumable=True)

    def __post_init__(self) -> None:
        hints = _types()
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            problem = _type_problem(value, hints[f.name])
            if problem is None and value is not None and f.metadata["check"] is not None:
                problem = f.metadata["check"](value)
            if problem:
                problems.append(f"{f.name} {problem}, got {shown(value)}")
        if not problems:
            problems += self._cross_checks()
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))

    def _cross_checks(self) -> list[str]:
        problems = []
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            problems.append("nesterov needs a momentum > 0 (or --no-nesterov)")
        if len(self.betas) != 2:
            problems.append(f"betas needs two values, beta1,beta2, got {self.betas!r}")
        if self.warmup_epochs is not None and self.schedule != "constant" and self.warmup_epochs >= self.epochs:
            problems.append(f"warmup_epochs ({self.warmup_epochs:g}) must be shorter than the run (epochs "
                            f"{self.epochs}) to leave steps for the {self.schedule} schedule")
        return problems

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some settings changed (and checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings by name, tuples as lists: JSON-ready, and accepted back by ``TrainConfig(**...)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "TrainConfig | None" = None,
                     source: str = "the configuration") -> "TrainConfig":
        """``base`` (default: the defaults) with the settings in ``values`` (from a file, a checkpoint); an unknown
        key or a value of the wrong type is a ``ValueError`` naming ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; the settings are "
                             f"{', '.join(sorted(known))}")
        hints = _types()
        changes = {}
        for name, value in values.items():
            value = _coerce(value, hints[name])
            problem = _type_problem(value, hints[name])
            if problem:
                raise ConfigError(f"{source}: {name} {problem}, got {shown(value)}")
            changes[name] = value
        try:
            return (base or cls()).replace(**changes)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None

    @staticmethod
    def resumable() -> tuple[str, ...]:
        """The settings a resumed run may change; every other one must equal the checkpoint's."""
        return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resumable"])


# ---------------------------------------------------------------------------------------------------------- types


def _types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of ``X | None`` or ``X``."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _type_problem(value: Any, hint: Any) -> str | None:
    kind, optional = _unwrap(hint)
    if value is None:
        return None if optional else "must be given (not None)"
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is str:
        ok = isinstance(value, str)
    else:  # tuple[int, ...] or tuple[float, ...]
        item = typing.get_args(kind)[0]
        ok = isinstance(value, tuple) and all(_type_problem(v, item) is None for v in value)
        return None if ok else f"must be a list of {'integers' if item is int else 'numbers'}"
    return None if ok else "must be " + {float: "a finite number", int: "an integer", bool: "true or false",
                                         str: "a string"}[kind]


def _coerce(value: Any, hint: Any) -> Any:
    """A value read from TOML or JSON in the setting's type where that is lossless (lists as tuples, ints as floats)."""
    kind, _ = _unwrap(hint)
    if isinstance(value, list):
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_value(text: str, hint: Any) -> Any:
    """A command-line string as a setting of type ``hint`` (``none`` for an optional one; ``512,512`` for a list;
    ``none`` or an empty string for an empty list). Raises ``ValueError`` saying what was expected."""
    kind, optional = _unwrap(hint)
    if optional and text.strip().lower() == "none":
        return None
    if kind is str:
        return text
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    item = typing.get_args(kind)[0]
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(item(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated {item.__name__}s such as 512,512, got {text!r}") from None


# ---------------------------------------------------------------------------------------------------------- files


def load_toml(path: str | Path) -> dict[str, Any]:
    """The ``name = value`` pairs of a TOML file (or of a JSON file, or a run's ``summary.json``: its ``config``).

    Raises:
        ConfigError: the file cannot be read or parsed, or holds something else; the message names the file.
    """
    path = Path(path)
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start}); save it as UTF-8") from None
    try:
        values = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except RecursionError:
        raise ConfigError(f"config file {path}: its values are nested too deeply to be settings (a setting is a value "
                          "or a list of values); fix the file") from None
    except ValueError as error:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ConfigError(f"config file {path}: not valid {kind} ({one_line(error)})") from None
    if isinstance(values, dict) and isinstance(values.get("config"), dict):
        values = values["config"]  # a summary.json
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected settings as name = value, got a {type(values).__name__}")
    return values


def load_config_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) with the settings of ``path``: a TOML file of ``name = value`` lines (such
    as the ``config.toml`` a run writes), or a JSON file of them (a run's ``summary.json``: its ``config``)."""
    return TrainConfig.from_mapping(load_toml(path), base, f"config file {path}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(config: TrainConfig) -> str:
    """``config`` as TOML that :func:`load_config_file` reads back to an equal config (settings that are ``None``,
    which TOML cannot write, are left out: they are ``None`` by default)."""
    lines = ["# nnbackprop train --config FILE reads this back; options on the command line win over it"]
    group = None
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"\n# {group}")
        if value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """Add an option per setting (``--batch-size``, ``--flip/--no-flip``, ...) and ``--config FILE`` to ``parser``,
    grouped as the settings are. Options not given stay out of the parsed namespace, so that
    :func:`config_from_args` can tell them from the defaults."""
    defaults = defaults or TrainConfig()
    hints = _types()
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="read settings from a TOML file (or a run's summary.json); options given here win")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group = groups.get(f.metadata["group"]) or groups.setdefault(f.metadata["group"],
                                                                      parser.add_argument_group(f.metadata["group"]))
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # a setting left open says in its help what it resolves to
            help_text += f" (default: {shown})"
        kind, _ = _unwrap(hints[f.name])
        option = "--" + f.name.replace("_", "-")
        choices = getattr(f.metadata["check"], "choices", None)
        if kind is bool:
            group.add_argument(option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(option, type=_argument_type(f.name, hints[f.name]), default=argparse.SUPPRESS,
                               choices=choices, metavar=None if choices else f.name.upper(), help=help_text)


def _argument_type(name: str, hint: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parse_value(text, hint)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The config of parsed options: ``base`` (default: the defaults), then ``--config FILE``, then the options given
    on the command line."""
    config = base or TrainConfig()
    if getattr(args, "config", None) is not None:
        config = load_config_file(args.config, config)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return config.replace(**given) if given else config


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad argument as one ``nnbackprop: error: ...`` line, without the usage, and
    takes options by their full names only (``--epoch`` is not taken for ``--epochs``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{ERROR_PREFIX}{message}\n")


def parse_config(argv: Sequence[str] | None = None, base: TrainConfig | None = None,
                 description: str | None = None) -> TrainConfig:
    """Parse an experiment script's command line into a config: every setting as an option and ``--config FILE``,
    over the script's own ``base``. Exits with one error line on a bad option or setting."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, base)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args, base)
    except ValueError as error:
        parser.error(str(error))


def default_out(config: TrainConfig) -> Path:
    """Where a run writes when ``out`` is not set: ``runs/<dataset>`` (a file-system-safe version of the name)."""
    return Path("runs") / (re.sub(r"[^A-Za-z0-9_.-]+", "-", config.dataset).strip("-") or "run")

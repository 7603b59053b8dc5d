"""What the command line and the scripts print: the run's header, one fixed-format line per epoch, progress bars,
result tables, and errors as one ``nnbackprop: error: ...`` line. (The library itself never prints.)"""

from __future__ import annotations

import math
import sys
from typing import IO, TYPE_CHECKING, Any, Mapping, NoReturn, Sequence

from nnbackprop.errors import ERROR_PREFIX, one_line
from nnbackprop.metrics import EpochMetrics
from nnbackprop.callbacks import RunInfo, TrainCallback, TrainResult

if TYPE_CHECKING:
    from nnbackprop.inference import Evaluation


def print_error(message: Any) -> None:
    """Print ``message`` as one ``nnbackprop: error: ...`` line on stderr."""
    print(ERROR_PREFIX + one_line(message), file=sys.stderr, flush=True)


def fail(message: Any, code: int = 2) -> NoReturn:
    """:func:`print_error`, then exit with ``code``."""
    print_error(message)
    sys.exit(code)


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    """The fixed-format line printed after each epoch."""
    width = len(str(epochs))
    val = (f"val loss {m.val_loss:.4f} acc {100 * m.val_accuracy:6.2f}%" if m.val_loss is not None
           else "val loss    -   acc     -  ")
    return (f"epoch {m.epoch:>{width}}/{epochs} | train loss {m.train_loss:.4f} acc {100 * m.train_accuracy:6.2f}% | "
            f"{val} | lr {m.lr:.2e} | {m.seconds:6.1f} s | {m.samples_per_s:7.0f} samples/s")


def describe_model(info: RunInfo) -> str:
    """``MLP 784-512-512-10 (relu, dropout 0.2)`` or where a user's model came from."""
    c, d = info.config, info.data
    if c.model is not None:
        return f"{c.model} ({type(info.model).__name__} of {len(list(info.model.children()))} layers)"
    outputs = 1 if c.loss == "bce" else d.num_classes
    extras = f"{f', dropout {c.dropout}' if c.dropout else ''}{', batchnorm' if c.batchnorm else ''}"
    if c.arch == "cnn":
        head = "-".join(str(w) for w in (*c.hidden, outputs))
        return (f"CNN {'x'.join(map(str, d.input_shape))} stages {'-'.join(map(str, c.channels))} x "
                f"{c.convs_per_stage} convs, classifier {head} ({c.activation}{extras})")
    widths = "-".join(str(w) for w in (math.prod(d.input_shape), *c.hidden, outputs))
    return f"MLP {widths} ({c.activation}{extras})"


def describe_optimizer(info: RunInfo) -> str:
    c = info.config
    if c.optimizer == "sgd":
        rule = f"SGD lr {c.lr:g} momentum {c.momentum:g}{' (Nesterov)' if c.nesterov else ''}"
    else:
        rule = f"{'Adam' if c.optimizer == 'adam' else 'AdamW'} lr {c.lr:g} betas {c.betas[0]:g},{c.betas[1]:g}"
    plural = "" if c.warmup_epochs == 1 else "s"
    warmup = f" after {c.warmup_epochs:g} warm-up epoch{plural}" if c.warmup_epochs else ""
    kinds = ([f"crops of {c.crop_scale:g}-1 of the area"] if c.crop_scale < 1 else
             [f"shifts of up to {c.shift} px"] * bool(c.shift)) + ["flips"] * c.flip
    augment = ", augmentation: " + " and ".join(kinds) if kinds else ""
    return (f"{rule} weight decay {c.weight_decay:g}, {c.schedule} schedule{warmup}; batch {c.batch_size}, "
            f"{info.steps_per_epoch} steps/epoch{augment}")


class ConsoleLogger(TrainCallback):
    """Prints the run's header, one :func:`format_epoch` line per epoch and the test result to ``stream``; with
    ``progress``, draws a tqdm bar per epoch on stderr showing the running loss."""

    def __init__(self, progress: bool = True, stream: IO[str] | None = None) -> None:
        self.progress = progress
        self.stream = stream or sys.stdout
        self.epochs = 0
        self.bar: Any = None

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def on_train_begin(self, info: RunInfo) -> None:
        c, d = info.config, info.data
        self.epochs = c.epochs
        self._print(f"data: {d.name} from {d.source}: {len(d.train)} train / {len(d.val)} val / {len(d.test)} test, "
                    f"{d.num_classes} classes")
        step = info.step + (f" ({info.step_reason})" if info.step_reason else "")
        self._print(f"model: {describe_model(info)}, {info.num_parameters:,} parameters, loss {c.loss}, "
                    f"{info.device} {c.dtype}, {step}")
        self._print(f"optimizer: {describe_optimizer(info)}")
        if info.start_epoch:
            self._print(f"resuming {info.out_dir} after epoch {info.start_epoch}")

    def on_epoch_begin(self, epoch: int, num_steps: int) -> None:
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=num_steps, desc=f"epoch {epoch}/{self.epochs}", unit="step", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def on_step(self, epoch: int, step: int, running_loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if running_loss is not None:
                self.bar.set_postfix_str(f"loss {running_loss:.4f}", refresh=False)

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        self.close()
        self._print(format_epoch(metrics, self.epochs))

    def on_train_end(self, result: TrainResult) -> None:
        best = f"best epoch {result.best_epoch}" if result.best_epoch is not None else "last epoch"
        stopped = ", stopped early" if result.stopped_early else ""
        self._print(f"test loss {result.test_loss:.4f} accuracy {100 * result.test_accuracy:.2f}% "
                    f"({best}{stopped}; {result.wall_time:.1f} s)")

    def close(self) -> None:
        """Remove the progress bar, if one is drawn (call it when training stops with an error)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` (dicts with the same keys) as an aligned text table with a header; floats with 4 significant digits,
    or 2 decimals in a column whose name ends in ``%``."""
    cells = [[(f"{v:.2f}" if k.endswith("%") else f"{v:.4g}") if isinstance(v, float) else str(v)
              for k, v in row.items()] for row in rows]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if isinstance(v, str) else c.rjust(w) for c, w, v in zip(row, widths, values))
              for row, values in zip(cells, (r.values() for r in rows))]
    return "\n".join(lines)


def format_predictions(predictions: Sequence[Mapping[str, Any]]) -> str:
    """One line per image of :func:`~nnbackprop.inference.predict_files` (``cat.1.jpg: cats 91.3%, dogs 8.7%``), and
    under an image unlike the training images a warning line saying how."""
    lines = []
    for p in predictions:
        lines.append(f"{p['image']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in p["top"]))
        if p.get("unlike"):
            lines.append(f"  warning: unlike the training images ({'; '.join(p['unlike'])}): the model has not seen "
                         "anything like it, so the prediction may mean little")
    return "\n".join(lines)


def format_evaluation(e: Evaluation) -> str:
    """An :class:`~nnbackprop.inference.Evaluation`: a line with where, loss and accuracy, then per class (a row
    each, by true class) its precision, recall, support and confusion counts (how often predicted as each class).
    The count columns are headed by the class names when they fit in 60 characters, else by the classes' numbers,
    which then begin the rows."""
    where = f"the {e.dataset} test split" if e.split == "test" else f"all images of {e.dataset}"
    weights = f", weights of epoch {e.best_epoch}" if e.best_epoch not in (None, e.epoch) else ""
    lines = [(f"{e.checkpoint} (after epoch {e.epoch}{weights}) on {where} ({e.num_examples} examples from "
              f"{e.source}): loss {e.loss:.4f} accuracy {100 * e.accuracy:.2f}%"), ""]
    count_width = len(str(max(e.support, default=0)))
    by_name = sum(max(len(c), count_width) + 2 for c in e.classes) <= 60
    heads = list(e.classes) if by_name else [str(i) for i in range(len(e.classes))]
    widths = [max(len(h), count_width) for h in heads]
    names = list(e.classes) if by_name else [f"{i:>{len(heads[-1])}} {c}" for i, c in enumerate(e.classes)]
    name_width = max(len("class"), *map(len, names))

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    label = "predicted as:"
    lines.append(f"{'class':<{name_width}}  precision  recall  support  | {label} "
                 + "  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for name, p, r, n, row in zip(names, e.precision, e.recall, e.support, e.confusion):
        lines.append(f"{name:<{name_width}}  {percent(p):>9}  {percent(r):>6}  {n:>7}  | {'':{len(label)}} "
                     + "  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)

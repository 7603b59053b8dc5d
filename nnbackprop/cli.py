"""The command line: ``nnbackprop train``, ``evaluate``, ``gradcheck`` and ``bench``.

Every command exits non-zero with a one-line ``nnbackprop: error: ...`` message for bad arguments or input.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import re
import runpy
import sys
from pathlib import Path
from typing import IO, Any, Callable, NoReturn, Sequence

import torch

from nnbackprop.data import DATASETS, DatasetNotFoundError, DataSplits
from nnbackprop.distributed import DistributedError, cleanup, init_distributed
from nnbackprop.layers import LINEAR_INITS
from nnbackprop.lr_scheduler import SCHEDULES
from nnbackprop.model import ACTIVATIONS
from nnbackprop.plot import plot_history, require_matplotlib
from nnbackprop.train import (DTYPES, LOSSES, EpochMetrics, NonFiniteLossError, RunInfo, TrainCallback, TrainConfig,
                              TrainResult, evaluate_checkpoint, resolve_device, train)

GRADCHECK_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------ console output


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    """The fixed-format line printed after each epoch."""
    width = len(str(epochs))
    val = (f"val loss {m.val_loss:.4f} acc {100 * m.val_accuracy:6.2f}%" if m.val_loss is not None
           else "val loss    -   acc     -  ")
    return (f"epoch {m.epoch:>{width}}/{epochs} | train loss {m.train_loss:.4f} acc {100 * m.train_accuracy:6.2f}% | "
            f"{val} | lr {m.lr:.2e} | {m.seconds:6.1f} s | {m.samples_per_s:7.0f} samples/s")


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
        widths = "-".join(str(w) for w in (math.prod(d.input_shape), *c.hidden, info.model[-1].out_features))
        self._print(f"data: {d.name} from {d.source}: {len(d.train)} train / {len(d.val)} val / {len(d.test)} test, "
                    f"{d.num_classes} classes")
        self._print(f"model: MLP {widths} ({c.activation}{f', dropout {c.dropout}' if c.dropout else ''}"
                    f"{', batchnorm' if c.batchnorm else ''}), {info.num_parameters:,} parameters, loss {c.loss}, "
                    f"{info.device} {c.dtype}, {info.step}")
        plural = "" if c.warmup_epochs == 1 else "s"
        warmup = f" after {c.warmup_epochs:g} warm-up epoch{plural}" if c.warmup_epochs else ""
        augment = ", augmentation: " + " and ".join([f"shifts of up to {c.shift} px"] * bool(c.shift) +
                                                    ["flips"] * c.flip) if c.shift or c.flip else ""
        self._print(f"optimizer: SGD lr {c.lr:g} momentum {c.momentum:g}{' (Nesterov)' if c.nesterov else ''} weight "
                    f"decay {c.weight_decay:g}, {c.schedule} schedule{warmup}; batch {c.batch_size}, "
                    f"{info.steps_per_epoch} steps/epoch{augment}")
        if info.start_epoch:
            self._print(f"resuming {info.checkpoint} after epoch {info.start_epoch}")

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


def run_experiment(config: TrainConfig, out_dir: Path, data: DataSplits | None = None,
                   progress: bool | None = None) -> TrainResult:
    """Train as an experiment script does: a :class:`ConsoleLogger` (progress bars when stderr is a terminal),
    results in ``out_dir`` (replacing an earlier run's), curves plotted when matplotlib is installed. Exits with the
    message when the data set is missing, the settings do not fit it, or the training diverges."""
    logger = ConsoleLogger(progress=sys.stderr.isatty() if progress is None else progress)
    try:
        result = train(config, data, out_dir=out_dir, overwrite=True, callback=logger)
    except (DatasetNotFoundError, NonFiniteLossError, ValueError) as error:
        sys.exit(f"error: {error}")
    finally:
        logger.close()
    try:
        plot_history(result.history, out_dir)
    except ImportError:
        print("(no plots: matplotlib is not installed; pip install 'nnbackprop[plot]')")
    return result


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` (dicts with the same keys) as an aligned text table with a header; floats with 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if isinstance(v, str) else c.rjust(w) for c, w, v in zip(row, widths, values))
              for row, values in zip(cells, (r.values() for r in rows))]
    return "\n".join(lines)


def result_row(name: str, result: TrainResult) -> dict[str, Any]:
    """One row of an experiment's summary table."""
    last = result.history[-1]
    return {"run": name, "test acc %": round(100 * result.test_accuracy, 2), "test loss": result.test_loss,
            "best epoch": result.best_epoch if result.best_epoch is not None else "-", "epochs": last.epoch,
            "train loss": last.train_loss, "wall s": round(result.wall_time, 1)}


# ------------------------------------------------------------------------------------------------------ argument types


def _number(text: str, kind: type, minimum: float, strict: bool) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, strict=False)


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, strict=False)


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, strict=True)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, strict=False)


def probability(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def hidden_sizes(text: str) -> tuple[int, ...]:
    """``"512,512"`` -> ``(512, 512)``; ``""`` or ``"none"``: no hidden layer."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths such as 512,512, got {text!r}")
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return sizes


def dataset_name(text: str) -> str:
    if text in DATASETS[:-1] or (text.startswith("imagefolder:") and len(text) > len("imagefolder:")):
        return text
    raise argparse.ArgumentTypeError(f"unknown data set {text!r}; choose one of {', '.join(DATASETS)}")


def parse_overrides(config: TrainConfig, argv: Sequence[str]) -> TrainConfig:
    """``config`` with settings replaced by ``key=value`` arguments, as the experiment scripts take them; exits with a
    message for an argument that is not ``key=value``, an unknown key, or a value the configuration rejects.

    Values are Python literals (``epochs=3``, ``hidden=1024,1024``, ``patience=None``, ``flip=False``), or plain strings
    (``dataset=mnist``); a single width is a one-layer ``hidden``.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    changes: dict[str, Any] = {}
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep or key not in names:
            sys.exit(f"error: expected key=value with key one of {', '.join(names)}; got {arg!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        changes[key] = (value,) if key == "hidden" and isinstance(value, int) else value
    try:
        return config.replace(**changes)
    except (TypeError, ValueError) as error:
        sys.exit(f"error: {error}")


def _default_out(dataset: str) -> Path:
    return Path("runs") / (re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-") or "run")


# ------------------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib()
    resolve_device(args.device)
    config = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, download=args.download, val_size=args.val_size,
        image_size=args.image_size, hidden=args.hidden, activation=args.activation, dropout=args.dropout,
        batchnorm=args.batchnorm, init=args.init, loss=args.loss, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        schedule=args.schedule, warmup_epochs=args.warmup_epochs, step_epochs=args.step_epochs, gamma=args.gamma,
        patience=args.patience, shift=2 if args.augment and args.shift is None else args.shift or 0,
        flip=args.flip or args.augment, device=args.device, dtype=args.dtype, seed=args.seed, fast=args.fast,
    )
    out = args.out if args.out is not None else _default_out(args.dataset)
    args.out = out
    dist = init_distributed(args.device)  # a single process unless launched by torchrun
    logger = ConsoleLogger(progress=not args.quiet and sys.stderr.isatty())
    try:
        if dist.distributed and dist.is_main:
            print(f"data-parallel: {dist.world_size} processes ({dist.backend}), global batch {args.batch_size}")
        result = train(config, out_dir=out, resume=args.resume, overwrite=args.overwrite, callback=logger, dist=dist)
    finally:
        logger.close()
        cleanup()
    if not dist.is_main:
        return 0
    print(f"results in {out}/ (checkpoint.pt, metrics.jsonl, summary.json)")
    if args.plot:
        paths = plot_history(result.history, out)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    r = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size)
    print(f"{args.checkpoint} (after epoch {r['epoch']}) on the {r['dataset']} test split ({r['num_examples']} "
          f"examples from {r['source']}): loss {r['test_loss']:.4f} accuracy {100 * r['test_accuracy']:.2f}%")
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from nnbackprop.gradcheck import builtin_checks

    device = resolve_device(args.device)
    dtypes = [GRADCHECK_DTYPES[d] for d in args.dtype]
    failed = 0
    total = 0
    print(f"gradient check: hand-written backward vs torch.autograd on {device} (torch {torch.__version__})")
    for dtype in dtypes:
        fd = args.finite_differences and dtype == torch.float64
        reports = builtin_checks(device, dtype, seed=args.seed, finite_differences=fd)
        print(f"\n{str(dtype).replace('torch.', '')}: {'with' if fd else 'without'} finite differences")
        print(f"  {'check':<40} {'tensors':>7} {'max rel err':>12} {'tolerance':>10}  result")
        for r in reports:
            tol = max(c.tolerance for c in r.checks if c.tolerance > 0)
            print(f"  {r.subject:<40} {len(r.checks):>7} {r.max_rel_err:>12.2e} {tol:>10.0e}  "
                  f"{'ok' if r.passed else 'FAIL'}")
            if not r.passed or args.verbose:
                print("\n".join("      " + line for line in str(r).splitlines()[1:]))
        failed += sum(not r.passed for r in reports)
        total += len(reports)
    print(f"\n{total - failed} passed, {failed} failed")
    return 1 if failed else 0


BENCHMARKS = ("step", "epoch", "distributed")


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}_benchmark.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks live in the source checkout "
                                "(git clone, then pip install -e .)")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ------------------------------------------------------------------------------------------------------ parser


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument as one line, without the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nnbackprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()

    p = sub.add_parser("train", help="train an MLP with hand-written backpropagation",
                       description="Train an MLP with hand-written backpropagation and SGD; writes checkpoint.pt, "
                                   "metrics.jsonl and summary.json to --out.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=dataset_name, default=defaults.dataset,
                   help=f"{' | '.join(DATASETS)} (default: {defaults.dataset})")
    g.add_argument("--data-dir", help="look here first for the data set files (and download into it)")
    g.add_argument("--download", action="store_true", help="download the data set if it is not found")
    g.add_argument("--val-size", type=non_negative_int, default=defaults.val_size,
                   help=f"training examples held out for validation and early stopping (default: {defaults.val_size})")
    g.add_argument("--image-size", type=positive_int, default=defaults.image_size,
                   help=f"side images of an imagefolder data set are resized to (default: {defaults.image_size})")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=hidden_sizes, default=defaults.hidden,
                   help="hidden layer widths, comma-separated (default: 512,512)")
    g.add_argument("--activation", choices=list(ACTIVATIONS), default=defaults.activation)
    g.add_argument("--dropout", type=probability, default=defaults.dropout, help="dropout after each hidden layer")
    g.add_argument("--batchnorm", action="store_true", help="batch normalisation after each hidden linear layer")
    g.add_argument("--init", choices=list(LINEAR_INITS), default=defaults.init,
                   help="weight initialisation (default: as torch.nn.Linear)")
    g.add_argument("--loss", choices=list(LOSSES), default=defaults.loss,
                   help="ce: softmax cross-entropy; mse: squared error to one-hot targets; bce: one logit, two classes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    g.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    g.add_argument("--lr", type=positive_float, default=defaults.lr, help=f"learning rate (default: {defaults.lr})")
    g.add_argument("--momentum", type=non_negative_float, default=defaults.momentum)
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay)
    g.add_argument("--schedule", choices=list(SCHEDULES), default=defaults.schedule,
                   help="learning-rate schedule, stepped every batch (default: constant)")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=defaults.warmup_epochs,
                   help="linear learning-rate warm-up, in epochs (may be fractional)")
    g.add_argument("--step-epochs", type=positive_int, help="step schedule: epochs between decays (default: a third)")
    g.add_argument("--gamma", type=positive_float, default=defaults.gamma, help="step schedule: decay factor")
    g.add_argument("--patience", type=positive_int,
                   help="stop after this many epochs without a lower validation loss (default: never)")
    g.add_argument("--augment", action="store_true", help="random ±2 px shifts and horizontal flips of each batch")
    g.add_argument("--shift", type=non_negative_int, help="random shifts of up to this many pixels")
    g.add_argument("--flip", action="store_true", help="random horizontal flips")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", choices=list(DTYPES), default=defaults.dtype)
    g.add_argument("--seed", type=non_negative_int, default=defaults.seed,
                   help="seed of weights, shuffling, dropout and augmentation: CPU runs repeat bit for bit")
    g.add_argument("--out", type=Path, help="output directory (default: runs/DATASET)")
    g.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--plot", action="store_true", help="write loss and accuracy curves as PNG (needs matplotlib)")
    g.add_argument("--no-fast", dest="fast", action="store_false",
                   help="use the readable reference training step instead of the fast one")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on its data set's test split")
    p.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by nnbackprop train")
    p.add_argument("--data-dir", help="where the data set is (default: where training found it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=positive_int, default=1000)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("gradcheck", help="check every built-in layer and loss against torch.autograd")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    p.add_argument("--dtype", nargs="+", choices=list(GRADCHECK_DTYPES), default=["float64", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-finite-differences", dest="finite_differences", action="store_false",
                   help="skip the float64 finite-difference check")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor of every check")
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("bench", help="run a benchmark script of the source checkout's benchmarks/ folder",
                       description="Runs benchmarks/<name>_benchmark.py with the remaining arguments (see its --help).")
    p.add_argument("name", choices=BENCHMARKS, help="step: training step vs eager autograd, torch.compile and the "
                   "matmul floor; epoch: a whole Fashion-MNIST epoch vs its steps; distributed: 1 vs 2 processes")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)
    return parser


def one_line(message: str) -> str:
    """A multi-line message joined into one line (a line ending in ``:`` introduces the next ones)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for previous, line in zip(lines, lines[1:]):
        text += (" " if previous.endswith(":") else "; ") + line
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except NonFiniteLossError as err:
        print(f"nnbackprop: error: {err}. Lower the learning rate (--lr) or add warm-up (--warmup-epochs)",
              file=sys.stderr)
        return 1
    except (ValueError, ImportError, FileNotFoundError, FileExistsError, DistributedError) as err:
        print(f"nnbackprop: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "out", None)
        hint = f"; continue from the last finished epoch with --resume --out {where}" if where is not None else ""
        print(f"nnbackprop: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

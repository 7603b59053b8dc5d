"""The command line: nnbackprop train, evaluate, predict and gradcheck.

Every command exits non-zero with one "nnbackprop: error: ..." line for bad arguments or input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from nnbackprop.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, saved_config
from nnbackprop.config import OneLineParser, add_arguments, config_from_args, default_out
from nnbackprop.console import ConsoleLogger, format_evaluation, format_predictions, print_error
from nnbackprop.datasets import DatasetNotFoundError
from nnbackprop.distributed import DistributedError, cleanup, init_distributed
from nnbackprop.files import WriteError
from nnbackprop.gradcheck import LAYOUTS
from nnbackprop.inference import evaluate_checkpoint, predict_files
from nnbackprop.plot import plot_run, require_matplotlib
from nnbackprop.training import NonFiniteLossError, train

GRADCHECK_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib()
    config = config_from_args(args)
    out = Path(config.out) if config.out is not None else default_out(config)
    if args.resume and (out / CHECKPOINT_FILE).is_file():  # the run as it was, changed only by the options given
        config = config_from_args(args, saved_config(load_checkpoint(out), out / CHECKPOINT_FILE)).replace(out=str(out))
    args.out_dir = out
    dist = init_distributed(config.device)  # a single process unless launched by torchrun
    logger = ConsoleLogger(progress=not args.quiet and sys.stderr.isatty())
    try:
        if dist.distributed and dist.is_main:
            print(f"data-parallel: {dist.world_size} processes ({dist.backend}), global batch {config.batch_size}")
        result = train(config, out_dir=out, resume=args.resume, overwrite=args.overwrite, callback=logger, dist=dist)
    finally:
        logger.close()
        cleanup()
    if not dist.is_main:
        return 0
    print(f"results in {out}/ (checkpoint.pt, metrics.jsonl, summary.json, config.toml)")
    if args.plot:
        paths = plot_run(result, out)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    evaluation = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                                     device=args.device, batch_size=args.batch_size, model=args.model)
    print(json.dumps(evaluation.to_dict(), indent=2) if args.json else format_evaluation(evaluation))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    predictions = predict_files(args.checkpoint, args.images, top=args.top, device=args.device, model=args.model)
    print(json.dumps(predictions, indent=2) if args.json else format_predictions(predictions))
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from nnbackprop.distributed import resolve_device
    from nnbackprop.gradcheck import builtin_checks

    device = resolve_device(args.device)
    failed = total = 0
    print(f"gradient check: hand-written backward vs torch.autograd on {device} (torch {torch.__version__})")
    for layout in args.layout:
        for name in args.dtype:
            dtype = GRADCHECK_DTYPES[name]
            fd = args.finite_differences and dtype == torch.float64
            reports = builtin_checks(device, dtype, seed=args.seed, finite_differences=fd, layout=layout)
            print(f"\n{name}, {layout} layout: {'with' if fd else 'without'} finite differences")
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


# ------------------------------------------------------------------------------------------------------ parser


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--model``, for the commands that load a checkpoint."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--model", metavar="PATH.py:FUNCTION", help="rebuild the model with this function instead of the "
                   "one the checkpoint records")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nnbackprop", description="A multilayer perceptron with hand-written backpropagation "
                           "on torch tensors, every gradient checked against torch.autograd.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("train", help="train an MLP (or your own model) with hand-written backpropagation",
                       description="Train an MLP, or the model a Python function returns (--model), with hand-written "
                       "backpropagation; writes checkpoint.pt, metrics.jsonl, summary.json and config.toml to --out. "
                       "Settings come from the defaults (with --resume: the run's checkpoint), then --config FILE, "
                       "then the options given here.")
    add_arguments(p)
    g = p.add_argument_group("this command")
    g.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out, with its "
                   "settings (options given here change them where a run can change: --epochs, --patience, ...)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--plot", action="store_true", help="write the loss, accuracy and learning-rate curves as PNG, "
                   "and the per-layer diagnostics when the run recorded layers.jsonl (needs matplotlib)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on its data set's test split, or on another data set",
                       description="Evaluate a trained model on the test split of the data set it was trained on, or "
                       "on another data set with the same classes (--dataset): accuracy, loss, and per class the "
                       "precision, recall, support and confusion counts.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by nnbackprop train, or its run folder")
    p.add_argument("--dataset", metavar="NAME", help="evaluate on this data set instead: a name (mnist, ...) for its "
                   "test split, or imagefolder:PATH for PATH/test if PATH has train/ and test/, else all of PATH's "
                   "images; its classes must be the model's (default: the training data set's test split)")
    p.add_argument("--data-dir", help="where the data set is (default: where training found it)")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="the most likely classes of image files",
                       description="Print the most likely classes of each image file (any size, grey or colour), "
                       "with their probabilities; the images are prepared as the training images were.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by nnbackprop train, or its run folder")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    p.add_argument("--top", type=int, metavar="K", help="how many classes per image (default: 3, or fewer classes)")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document: a list of {image, top: [{class, "
                   "probability}, ...]}")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("gradcheck", help="check every built-in layer and loss against torch.autograd",
                       description="Check every built-in layer, loss and a few models against torch.autograd (and "
                       "finite differences in float64), in the plain layout and in the fast step's layout.")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    p.add_argument("--dtype", nargs="+", choices=list(GRADCHECK_DTYPES), default=["float64", "float32"])
    p.add_argument("--layout", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                   help="plain: the layers allocate; fast: workspace buffers and flat parameters (default: both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-finite-differences", dest="finite_differences", action="store_false",
                   help="skip the float64 finite-difference check")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor of every check")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def _reports(error: BaseException) -> bool:
    """Whether this process prints ``error``: under torchrun every rank meets the same settings, data and checkpoint,
    so rank 0 alone reports them; an error of this rank's own (``DistributedError``) is reported where it happens."""
    return os.environ.get("RANK", "0") == "0" or isinstance(error, DistributedError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a reader that has gone (``| head``) shows here rather than at exit
        return code
    except BrokenPipeError:  # stop quietly, as Unix tools do; what was not read is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except NonFiniteLossError as error:
        if _reports(error):
            print_error(f"{error}. Lower the learning rate (--lr) or add warm-up (--warmup-epochs)")
        return 1
    except (ValueError, ImportError, FileNotFoundError, FileExistsError, DistributedError, WriteError,
            CheckpointError, DatasetNotFoundError) as error:
        if _reports(error):
            print_error(error)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "out_dir", None)
        hint = f"; continue from the last finished epoch with --resume --out {where}" if where is not None else ""
        print(f"nnbackprop: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

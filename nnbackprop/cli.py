"""The command line: nnbackprop train, compare, evaluate, predict, export, gradcheck and doctor.

Every command exits non-zero with one "nnbackprop: error: ..." line for bad arguments or input: the
:class:`~nnbackprop.errors.NNBackpropError` the library raises (status 2; 1 when training diverged), or a layer's
``ValueError`` refusing its input. Ctrl-C and SIGTERM stop a run with one line saying how to resume it (status 130 and
143). Each command imports what it needs when it runs, so ``--help`` answers quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from nnbackprop.config import OneLineParser, add_arguments, config_from_args, default_out
from nnbackprop.console import print_error
from nnbackprop.errors import ConfigError, DistributedError, NNBackpropError, NonFiniteLossError


class Terminated(BaseException):
    """SIGTERM arrived: stop as Ctrl-C does (a ``BaseException``, so that nothing on the way catches it)."""


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise Terminated


# ------------------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from nnbackprop.checkpoint import CHECKPOINT_FILE, run_settings
    from nnbackprop.console import ConsoleLogger
    from nnbackprop.distributed import cleanup, init_distributed
    from nnbackprop.training import train

    if args.plot:
        from nnbackprop.plot import require_matplotlib

        require_matplotlib()
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite starts it afresh: give one of them")
    config = config_from_args(args)
    out = Path(config.out) if config.out is not None else default_out(config)
    if args.seeds is not None or args.sweep is not None:
        return _train_many(args, config, out)
    if args.resume and (out / CHECKPOINT_FILE).is_file():  # the run as it was, changed only by the options given
        saved = run_settings(out)
        if saved.model is not None and config.model is None:  # neither --model nor --config named one
            raise ConfigError(f"{out / CHECKPOINT_FILE} was trained with the model {saved.model} builds; nnbackprop "
                              "never imports code because a checkpoint names it: resume with --model "
                              f"{saved.model}, once you have checked that file is yours")
        config = config_from_args(args, saved).replace(out=str(out))
    args.out_dir = out
    dist = init_distributed(config.device)  # a single process unless launched by torchrun
    logger = ConsoleLogger(progress=not args.quiet and sys.stderr.isatty())
    try:
        if dist.distributed and dist.is_main:
            print(f"data-parallel: {dist.world_size} processes ({dist.backend}), global batch {config.batch_size}")
        result = train(config, out_dir=out, resume=args.resume, overwrite=args.overwrite, callback=logger, dist=dist)
        cleanup(wait=True)
    finally:
        logger.close()
        cleanup()
    if not dist.is_main:
        return 0
    print(f"results in {out}/ (checkpoint.pt, metrics.jsonl, summary.json, config.toml)")
    if args.plot:
        from nnbackprop.plot import plot_run

        paths = plot_run(result, out)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def _train_many(args: argparse.Namespace, config: Any, out: Path) -> int:
    """``--seeds`` and ``--sweep``: every planned run in a folder of its own under ``out``, a line as each ends."""
    from nnbackprop.sweep import describe, load_grid, parse_seeds, plan, run_all

    if args.resume or args.overwrite:
        raise ConfigError("a sweep resumes by itself (finished runs are skipped, stopped ones resumed): drop "
                          "--resume/--overwrite, or give another --out to start afresh")
    runs = plan(config, load_grid(args.sweep) if args.sweep is not None else None,
                parse_seeds(args.seeds) if args.seeds is not None else None)
    print(f"{len(runs)} run{'s' * (len(runs) != 1)} under {out}/, one after the other", flush=True)
    finished = run_all(runs, out, on_finished=lambda f: print(describe(f), flush=True))
    failed = sum(f.how == "failed" for f in finished)
    print(f"compare them: nnbackprop compare {out}" + (f" ({failed} failed)" if failed else ""))
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from nnbackprop.compare import comparison_rows, find_runs, group_runs, to_json
    from nnbackprop.console import format_table

    groups = group_runs(find_runs(args.runs))
    if args.plot is not None:
        from nnbackprop.plot import plot_comparison, require_matplotlib

        require_matplotlib()
        plot_comparison(groups, args.plot)
    print(json.dumps(to_json(groups), indent=2) if args.json else format_table(comparison_rows(groups)))
    if args.plot is not None and not args.json:
        print(f"plot: {args.plot}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nnbackprop.console import format_evaluation
    from nnbackprop.inference import evaluate_checkpoint

    evaluation = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                                     device=args.device, batch_size=args.batch_size, model=args.model)
    print(json.dumps(evaluation.to_dict(), indent=2) if args.json else format_evaluation(evaluation))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from nnbackprop.console import format_predictions
    from nnbackprop.inference import predict_files

    predictions = predict_files(args.checkpoint, args.images, top=args.top, device=args.device, model=args.model)
    print(json.dumps(predictions, indent=2) if args.json else format_predictions(predictions))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import math

    from nnbackprop.export import export_run

    exported = export_run(args.run, args.format, args.out, args.model)
    checked = ("not checked: onnxruntime is not installed" if math.isnan(exported.max_rel_err) else
               f"loaded back and checked against nnbackprop's forward: max relative difference "
               f"{exported.max_rel_err:.1e}")
    print(f"exported {exported.path} (what it takes and returns: {exported.info}); {checked}")
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    import torch

    from nnbackprop.device import resolve_device
    from nnbackprop.gradcheck import builtin_checks
    from nnbackprop.layout import DTYPES

    device = resolve_device(args.device)
    failed = total = 0
    print(f"gradient check: hand-written backward vs torch.autograd on {device} (torch {torch.__version__})")
    for layout in args.layout:
        for name in args.dtype:
            dtype = DTYPES[name]
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


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from nnbackprop.doctor import RESULT_FILE, doctor

    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"nnbackprop doctor checks a GPU machine, and torch {torch.__version__} ({build}) sees no "
                          "CUDA device here; run it where there is one (make gpu-check)")
    out = args.out or Path("runs") / "gpu-check" / RESULT_FILE
    results = doctor(out, args.data_dir, args.budget_s)
    return 1 if any(r.status == "fail" for r in results) else 0


# ------------------------------------------------------------------------------------------------------ parser


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--model``, for the commands that load a checkpoint."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--model", metavar="PATH.py:FUNCTION", help="rebuild the model with this function: needed for a "
                   "model a user's function built (nnbackprop never imports a file because a checkpoint names it)")


def build_parser() -> argparse.ArgumentParser:
    from nnbackprop.build import EVAL_BATCH_SIZE
    from nnbackprop.gradcheck import LAYOUTS
    from nnbackprop.layout import DTYPES

    parser = OneLineParser(prog="nnbackprop", description="Neural networks with hand-written backpropagation on torch "
                           "tensors, every gradient checked against torch.autograd.")
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
    g.add_argument("--seeds", metavar="SEEDS", help="train once per seed (0,1,2 or 0-4), each run in OUT/seed=N; "
                   "compare them with nnbackprop compare OUT")
    g.add_argument("--sweep", type=Path, metavar="GRID.toml", help="train once per combination of the values a TOML "
                   "grid gives settings (lr = [0.01, 0.05]), each run in a folder of its own under --out; finished "
                   "runs are skipped and stopped ones resumed when run again")
    g.add_argument("--plot", action="store_true", help="write the loss, accuracy and learning-rate curves as PNG, "
                   "and the per-layer diagnostics when the run recorded layers.jsonl (needs matplotlib)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="compare runs: mean ± std over seeds, and the settings that differ",
                       description="Group runs that differ only in their seed and print, per group, the mean ± "
                       "standard deviation of the test accuracy, the best epoch, the epochs and the time, beside the "
                       "settings that differ between groups.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders, or folders holding them (a "
                   "sweep's --out)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw every run's validation accuracy, one "
                   "colour per group (needs matplotlib)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on its data set's test split, or on another data set",
                       description="Evaluate a trained model on the test split of the data set it was trained on, or "
                       "on another data set with the same classes (--dataset): accuracy, loss, and per class the "
                       "precision, recall, support and confusion counts.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by nnbackprop train, or its run folder")
    p.add_argument("--dataset", metavar="NAME", help="evaluate on this data set instead: a name (mnist, ...) for its "
                   "test split, or imagefolder:PATH for PATH/test if PATH has train/ and test/, else all of PATH's "
                   "images; its classes must be the model's (default: the training data set's test split)")
    p.add_argument("--data-dir", help="where a named data set is (default: where training found it)")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help=f"default: {EVAL_BATCH_SIZE}")
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

    p = sub.add_parser("export", help="export a trained model: torch.export (.pt2) or ONNX",
                       description="Export the model of a run for use without nnbackprop, checked against "
                       "nnbackprop's own forward: torch.export's .pt2, or ONNX (needs pip install "
                       "'nnbackprop[onnx]'). A JSON file beside it says what it takes (normalised images, the mean "
                       "and std) and returns (logits, the class names).")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder, or its checkpoint.pt")
    p.add_argument("--format", choices=["torch", "onnx"], default="torch", help="default: torch")
    p.add_argument("--out", type=Path, metavar="FILE", help="default: RUN/model.pt2 or RUN/model.onnx")
    p.add_argument("--model", metavar="PATH.py:FUNCTION", help="rebuild a model a user's function built (nnbackprop "
                   "never imports a file because a checkpoint names it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("gradcheck", help="check every built-in layer and loss against torch.autograd",
                       description="Check every built-in layer, loss and a few models against torch.autograd (and "
                       "finite differences in float64), in the plain layout and in the fast step's layout.")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float64", "float32"],
                   help="default: float64 float32")
    p.add_argument("--layout", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                   help="plain: the layers allocate; fast: workspace buffers and flat parameters (default: both)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--no-finite-differences", dest="finite_differences", action="store_false",
                   help="skip the float64 finite-difference check")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor of every check")
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("doctor", help="prove a GPU machine: every CUDA path, in a few minutes",
                       description="Run every CUDA path of nnbackprop on this machine's GPU — the CUDA tests, CUDA "
                       "graphs against eager steps, a host-sync audit, mixed precision, training with and without "
                       "graphs and a resume, torchrun on NCCL, the step benchmark's CUDA rows for an MLP and a CNN, "
                       "the gradient check — each in a process of its own; print a table, write one JSON file and "
                       "each check's output beside it (NAME.log).")
    p.add_argument("--data-dir", help="where Fashion-MNIST is, for the training checks (default: skip them)")
    p.add_argument("--out", type=Path, help="the JSON file (default: runs/gpu-check/gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting checks after this many seconds "
                   "(default: 480)")
    p.set_defaults(func=cmd_doctor)
    return parser


def _reports(error: BaseException) -> bool:
    """Whether this process prints ``error``: under torchrun every rank meets the same settings, data and checkpoint,
    so rank 0 alone reports them; an error of this rank's own (``DistributedError``) is reported where it happens."""
    return os.environ.get("RANK", "0") == "0" or isinstance(error, DistributedError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    previous = signal.signal(signal.SIGTERM, _terminate)
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
    except (NNBackpropError, ValueError) as error:  # ValueError: a layer refusing its input
        if _reports(error):
            print_error(error)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        from nnbackprop.checkpoint import CHECKPOINT_FILE

        where = getattr(args, "out_dir", None)
        resumable = where is not None and (Path(where) / CHECKPOINT_FILE).is_file()
        hint = f"; continue from the last finished epoch with --resume --out {where}" if resumable else ""
        what = "interrupted" if isinstance(stop, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"nnbackprop: {what}{hint}", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

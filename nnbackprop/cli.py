"""The command line: ``nnbackprop gradcheck``.

Every command exits non-zero with a one-line ``nnbackprop: error: ...`` message for bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    """A problem with the user's arguments or environment, reported as one line."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was requested but CUDA is not available on this machine; use --device cpu")
    return device


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from nnbackprop.gradcheck import builtin_checks

    device = resolve_device(args.device)
    dtypes = [DTYPES[d] for d in args.dtype]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnbackprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="check every built-in layer and loss against torch.autograd")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float64", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-finite-differences", dest="finite_differences", action="store_false",
                   help="skip the float64 finite-difference check")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor of every check")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (CLIError, ValueError, FileNotFoundError) as err:
        print(f"nnbackprop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nnbackprop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

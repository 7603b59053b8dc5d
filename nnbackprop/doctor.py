"""``nnbackprop doctor``: prove a GPU machine in a few minutes — every CUDA path of nnbackprop, run for real.

For someone who has just got a GPU box, and for us the first time one is at hand. It runs with the machine's own Python
and torch (no network, nothing installed), from a checkout (``make gpu-check``) or an installed package (then the
checks that need the checkout's ``tests/`` and ``benchmarks/`` are skipped, and say so). The checks, most informative
first, each in a process of its own with a time limit (so one that crashes CUDA cannot take the others with it):

1. ``environment``: torch, CUDA, cuDNN, the GPU (name, capability, memory), nnbackprop;
2. ``cuda-tests``: every test marked ``cuda`` (``pytest -m cuda``);
3. ``graphs``: for every optimizer setting, loss and layer, training steps replayed as CUDA graphs against the same
   steps run eagerly (the same parameters), graphs captured once per key and nothing falling back;
4. ``host-sync``: captured replays and eager fast steps under ``torch.cuda.set_sync_debug_mode("error")``;
5. ``mixed-precision``: bfloat16 training with float32 master weights, and TF32, on the GPU;
6. ``train``: 3 epochs of the default run on Fashion-MNIST with and without ``--cuda-graph`` (the same accuracy), and
   2 epochs resumed to 3 (the same accuracy as 3 straight);
7. ``torchrun``: one process of data-parallel training over NCCL;
8. ``step-benchmark``: the step benchmark on CUDA in float32, TF32 and bfloat16 — ours, ours replayed as a CUDA
   graph, eager autograd, the floors;
9. ``gradcheck``: ``nnbackprop gradcheck --device cuda``;
10. ``cnn-benchmark``: the step benchmark's CNN row on CUDA (the cats-vs-dogs network at batch 64).

It writes one JSON file (``--out``), each check's whole output beside it (``NAME.log``), and prints a table: check,
result, seconds, what it measured. Exit status 0 when every check passed or was skipped, 1 when one failed. Without
CUDA it refuses in one line.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

RESULT_FILE = "gpu_check.json"


@dataclass
class Result:
    """One check's outcome: ``status`` is ``pass``, ``fail`` or ``skip``; ``detail`` one line; ``data`` what it
    measured (JSON-ready)."""

    name: str
    status: str
    seconds: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """A check: ``command(ctx)`` gives the argv of the process that runs it (``None``: skip, ``why_skipped(ctx)``
    says why), ``judge(returncode, output, ctx)`` turns that process's end into ``(status, detail, data)``."""

    name: str
    command: Callable[["Context"], list[str] | None]
    judge: Callable[[int, str, "Context"], tuple[str, str, dict[str, Any]]]
    timeout_s: float
    why_skipped: Callable[["Context"], str] = lambda ctx: "not available here"


@dataclass
class Context:
    """Where the checks run: the checkout (``None`` for an installed package), the data, a scratch folder."""

    root: Path | None
    data_dir: str | None
    scratch: Path
    python: str = sys.executable


def _last_json(output: str) -> dict[str, Any]:
    """The last line of ``output`` that is a JSON object (how a child check reports what it measured)."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def _child_env(ctx: Context) -> dict[str, str]:
    """A check's environment: unbuffered output, and this checkout first on the import path, so that a script run from
    it (``benchmarks/…``) imports this nnbackprop where the package is not installed (a GPU machine's own python3)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if ctx.root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(ctx.root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _text(part: str | bytes | None) -> str:
    """What a timed-out process printed (``TimeoutExpired`` gives bytes or ``None`` even for a text-mode run)."""
    return part.decode(errors="replace") if isinstance(part, bytes) else part or ""


def _tail(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_checks(checks: Sequence[Check], ctx: Context, *, budget_s: float = 8 * 60,
               report: Callable[[Result], None] | None = None, logs: Path | None = None) -> list[Result]:
    """Run ``checks`` in order, each in its own process under its time limit (and what is left of ``budget_s``); a
    check skipped, failed or timed out does not stop the others. With ``logs``, each process's output (up to its time
    limit, if it reached it) is written there as ``NAME.log`` as soon as it ends."""
    results = []
    started = time.perf_counter()
    for check in checks:
        left = budget_s - (time.perf_counter() - started)
        begin = time.perf_counter()
        argv = check.command(ctx)
        if argv is None:
            result = Result(check.name, "skip", 0.0, check.why_skipped(ctx))
        elif left <= 0:
            result = Result(check.name, "skip", 0.0, f"the {budget_s:.0f} s budget was spent")
        else:
            timeout = min(check.timeout_s, left)
            try:
                proc = subprocess.run(argv, cwd=ctx.root or ctx.scratch, capture_output=True, text=True,
                                      timeout=timeout, env=_child_env(ctx))
                output = proc.stdout + proc.stderr
                status, detail, data = check.judge(proc.returncode, output, ctx)
            except subprocess.TimeoutExpired as expired:
                output = "".join(_text(part) for part in (expired.stdout, expired.stderr))
                status, detail, data = "fail", f"did not finish within {timeout:.0f} s", {}
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
                (logs / f"{check.name}.log").write_text(f"$ {' '.join(argv)}\n{output}")
            result = Result(check.name, status, time.perf_counter() - begin, detail, data)
        results.append(result)
        if report is not None:
            report(result)
    return results


# ---------------------------------------------------------------------------------------------------- the checks
def _module(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, "-m", "nnbackprop", *args]


def _child(name: str) -> Callable[[Context], list[str]]:
    """A check run by this module in a child process (``python -m nnbackprop.doctor --child NAME``)."""
    return lambda ctx: [ctx.python, "-m", "nnbackprop.doctor", "--child", name]


def _judge_child(returncode: int, output: str, ctx: Context) -> tuple[str, str, dict[str, Any]]:
    data = _last_json(output)
    if returncode == 0 and data.get("ok"):
        return "pass", data.get("detail", ""), data
    return "fail", data.get("detail") or _tail(output), data


def _judge_pytest(returncode: int, output: str, ctx: Context) -> tuple[str, str, dict[str, Any]]:
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", output)}
    detail = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or _tail(output)
    ok = returncode == 0 and counts.get("passed", 0) > 0
    return ("pass" if ok else "fail"), detail, counts


def _judge_gradcheck(returncode: int, output: str, ctx: Context) -> tuple[str, str, dict[str, Any]]:
    found = re.search(r"(\d+) passed, (\d+) failed", output)
    if found is None:
        return "fail", _tail(output), {}
    passed, failed = map(int, found.groups())
    return ("pass" if returncode == 0 and not failed else "fail"), found.group(0), {"passed": passed,
                                                                                     "failed": failed}


def _judge_benchmark(returncode: int, output: str, path: Path) -> tuple[str, str, dict[str, Any]]:
    if returncode != 0 or not path.is_file():
        return "fail", _tail(output), {}
    rows = json.loads(path.read_text()).get("rows", [])
    ratios = [f"{row.get('model', '')} b{row.get('batch', '')} {row.get('variant', row.get('dtype', ''))}: "
              f"eager/ours {row['eager_over_ours']:.2f}" for row in rows if row.get("eager_over_ours") is not None]
    return "pass", "; ".join(ratios) or "no rows", {"rows": rows}


def _judge_torchrun(returncode: int, output: str, ctx: Context) -> tuple[str, str, dict[str, Any]]:
    result = next((line for line in output.splitlines() if line.startswith("test loss")), "")
    if returncode != 0 or "nccl" not in output or not result:
        return "fail", _tail(output), {}
    return "pass", f"1 process over NCCL: {result}", {}


def _in_checkout(relative: str) -> Callable[[Context], bool]:
    return lambda ctx: ctx.root is not None and (ctx.root / relative).exists()


def _needs(relative: str, command: Callable[[Context], list[str]]) -> Callable[[Context], list[str] | None]:
    present = _in_checkout(relative)
    return lambda ctx: command(ctx) if present(ctx) else None


def _step_benchmark(name: str, timeout_s: float, *args: str) -> Check:
    """A check that runs ``benchmarks/step_benchmark.py --device cuda --no-compile ARGS`` (its rows in a file of its
    own) and reports each row's ratio of eager autograd's time to ours."""
    def command(ctx: Context) -> list[str]:
        return [ctx.python, "benchmarks/step_benchmark.py", "--device", "cuda", "--no-compile", *args,
                "--out", str(ctx.scratch / f"{name}.json")]

    return Check(name, _needs("benchmarks/step_benchmark.py", command),
                 lambda returncode, output, ctx: _judge_benchmark(returncode, output, ctx.scratch / f"{name}.json"),
                 timeout_s, lambda ctx: "needs the checkout's benchmarks/")


def _needs_data(command: Callable[[Context], list[str]]) -> Callable[[Context], list[str] | None]:
    return lambda ctx: command(ctx) if ctx.data_dir is not None else None


CHECKS: list[Check] = [
    Check("environment", _child("environment"), _judge_child, 60),
    Check("cuda-tests", _needs("tests", lambda ctx: [
        ctx.python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "--durations=10", "tests",
        "--deselect", "tests/test_doctor.py::test_the_whole_check_passes_on_a_gpu"]),  # that one runs these checks
          _judge_pytest, 240, lambda ctx: "needs the checkout's tests/ (run from a clone: make gpu-check)"),
    Check("graphs", _child("graphs"), _judge_child, 120),
    Check("host-sync", _child("host-sync"), _judge_child, 60),
    Check("mixed-precision", _child("mixed-precision"), _judge_child, 60),
    Check("train", _needs_data(_child("train")), _judge_child, 180,
          lambda ctx: "needs Fashion-MNIST: pass --data-dir DIR"),
    Check("torchrun", _needs_data(lambda ctx: [ctx.python, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node=1", "-m", "nnbackprop", "train", "--dataset",
                                               "fashion-mnist", "--data-dir", ctx.data_dir, "--epochs", "1",
                                               "--device", "cuda", "--quiet", "--overwrite", "--out",
                                               str(ctx.scratch / "torchrun")]),
          _judge_torchrun, 120, lambda ctx: "needs Fashion-MNIST: pass --data-dir DIR"),
    _step_benchmark("step-benchmark", 150, "--models", "784-512-512-10", "--batch-sizes", "128", "2048", "--steps",
                    "30", "--dtype", "float32", "bfloat16", "--tf32"),
    Check("gradcheck", lambda ctx: _module(ctx, "gradcheck", "--device", "cuda"), _judge_gradcheck, 120),
    _step_benchmark("cnn-benchmark", 150, "--models", "cnn:3,64,64:32-64-128-256:2", "--batch-sizes", "64",
                    "--steps", "30", "--dtype", "float32", "bfloat16", "--tf32"),
]
"""The checks, in the order they run."""


# ---------------------------------------------------------------------------------------------------- child checks
def _child_environment() -> dict[str, Any]:
    import torch

    import nnbackprop

    props = torch.cuda.get_device_properties(0)
    data = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "devices": torch.cuda.device_count(),
            "python": platform.python_version(), "nnbackprop": nnbackprop.__version__}
    return {"ok": True, "detail": f"{props.name} (sm_{props.major}{props.minor}, {data['memory_gib']} GiB), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}", **data}


def _graph_cases() -> list[tuple[str, Callable[[], Any], str]]:
    """(name, model builder, loss) for :func:`_child_graphs`: every built-in layer, each loss."""
    import torch

    import nnbackprop as nb

    def generator() -> torch.Generator:
        return torch.Generator("cuda").manual_seed(1)

    def every_layer() -> Any:
        g = torch.Generator().manual_seed(0)
        return nb.Sequential(nb.Flatten(), nb.Linear(64, 32, generator=g), nb.BatchNorm1d(32), nb.ReLU(),
                             nb.Dropout(0.2, generator=generator()), nb.Linear(32, 32, generator=g), nb.GELU(),
                             nb.Linear(32, 32, generator=g), nb.Tanh(), nb.Linear(32, 32, generator=g), nb.Sigmoid(),
                             nb.Linear(32, 24, generator=g), nb.LeakyReLU(0.1), nb.Linear(24, 10, generator=g))

    def binary() -> Any:
        return nb.mlp(64, [32], 1, generator=torch.Generator().manual_seed(0))

    return [("every layer, ce", every_layer, "ce"), ("every layer, mse", every_layer, "mse"),
            ("mlp, bce", binary, "bce")]


def _optimizers() -> list[tuple[str, Callable[[Any], Any]]]:
    import nnbackprop as nb

    return [("sgd", lambda p: nb.SGD(p, lr=0.05)),
            ("sgd momentum nesterov wd", lambda p: nb.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
            ("sgd dampening", lambda p: nb.SGD(p, lr=0.05, momentum=0.9, dampening=0.1)),
            ("adam", lambda p: nb.Adam(p, lr=1e-3)), ("adam amsgrad wd", lambda p: nb.Adam(p, lr=1e-3, amsgrad=True,
                                                                                           weight_decay=1e-2)),
            ("adamw", lambda p: nb.AdamW(p, lr=1e-3))]


def _child_graphs() -> dict[str, Any]:
    import torch

    import nnbackprop as nb

    losses = {"ce": nb.CrossEntropyLoss, "mse": nb.MSELoss, "bce": nb.BCEWithLogitsLoss}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 32, 1, 8, 8, generator=g).cuda()  # 6 batches of 32
    failures, worst, cases = [], 0.0, 0
    for case, build, loss in _graph_cases():
        y = torch.randint(0, 2 if loss == "bce" else 10, (6, 32), generator=g).cuda()
        for name, make_optimizer in _optimizers():
            finals = []
            for graphed in (False, True):
                model = build().cuda()
                step = nb.FastStep(model, losses[loss](), make_optimizer(model.parameters()), cuda_graph=graphed,
                                   graph_warmup=2)
                for epoch in range(3):
                    model.train(epoch != 1)  # an eval-mode epoch is another graph key
                    for i in range(6):
                        step(x[i], y[i])
                torch.cuda.synchronize()
                finals.append(torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]))
                if graphed and step.graph_failure is not None:
                    failures.append(f"{case} / {name}: capture failed ({step.graph_failure})")
            error = ((finals[0] - finals[1]).abs().max() / finals[0].abs().max()).item()
            worst = max(worst, error)
            cases += 1
            if not error <= 1e-5:
                failures.append(f"{case} / {name}: graph and eager differ by {error:.1e}")
    detail = (f"{cases} cases (layers x losses x optimizers), graph vs eager max rel diff {worst:.1e}" if not failures
              else "; ".join(failures[:3]))
    return {"ok": not failures, "detail": detail, "cases": cases, "max_rel_diff": worst, "failures": failures}


def _child_host_sync() -> dict[str, Any]:
    import torch

    import nnbackprop as nb

    model = nb.mlp(784, [512, 512], 10, dropout=0.2).cuda()
    x, y = torch.randn(128, 1, 28, 28, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    results = {}
    for graphed in (False, True):
        model.train()
        step = nb.FastStep(model, nb.CrossEntropyLoss(), nb.SGD(model.parameters(), lr=0.01, momentum=0.9),
                           cuda_graph=graphed, graph_warmup=2)
        for _ in range(4):  # warm-up and capture
            step(x, y)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(20):
                step(x, y)
            results["graph" if graphed else "eager"] = "no host sync in 20 steps"
        except RuntimeError as error:
            results["graph" if graphed else "eager"] = f"synced: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    ok = all(v.startswith("no host sync") for v in results.values())
    return {"ok": ok, "detail": "; ".join(f"{k}: {v}" for k, v in results.items()), **results}


def _child_mixed_precision() -> dict[str, Any]:
    import torch

    import nnbackprop as nb

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 28, 28, generator=g).cuda(), torch.randint(0, 10, (256,), generator=g).cuda()
    losses, kinds = {}, set()
    for name, options in (("float32", {}), ("tf32", {"tf32": True}), ("bfloat16", {"dtype": torch.bfloat16})):
        model = nb.mlp(784, [512, 512], 10, generator=torch.Generator().manual_seed(0)).cuda()
        optimizer = nb.AdamW(model.parameters(), lr=1e-3)
        step = nb.FastStep(model, nb.CrossEntropyLoss(), optimizer, **options)
        for _ in range(50):
            loss_sum, _ = step(x.to(options.get("dtype", torch.float32)), y)
        losses[name] = float(loss_sum) / 256
        if name == "bfloat16":
            state = optimizer.state_dict()["state"][0]
            masters = step.model_state_dict()
            kinds = {str(state["exp_avg"].dtype), str(state["step"].dtype), str(next(iter(masters.values())).dtype)}
    ok = all(v < 0.5 for v in losses.values()) and kinds == {"torch.float32"}
    detail = ", ".join(f"{k} loss {v:.4f} after 50 AdamW steps" for k, v in losses.items())
    return {"ok": ok, "detail": detail + f"; bf16 state and master weights {sorted(kinds)}", "losses": losses}


def _train_runs(data_dir: str, scratch: Path, device: str = "cuda", dataset: str = "fashion-mnist",
               ) -> list[tuple[str, list[str], list[str] | None]]:
    """The runs of the ``train`` check: ``(name, argv, argv to resume it or None)``. ``straight`` (3 epochs) and
    ``resumed`` (2, then resumed to 3) must agree, so nothing they resolve may depend on the number of epochs: a
    schedule a resumed run may lengthen, with a fixed warm-up (the default warm-up is a tenth of a short run)."""
    base = [sys.executable, "-m", "nnbackprop", "train", "--dataset", dataset, "--data-dir", data_dir, "--device",
            device, "--quiet", "--overwrite"]
    stretchable = ["--schedule", "step", "--step-epochs", "1", "--warmup-epochs", "1"]
    resume = [sys.executable, "-m", "nnbackprop", "train", "--out", str(scratch / "resumed"), "--resume", "--epochs",
              "3", "--quiet", "--device", device]
    return [("eager", base + ["--epochs", "3", "--out", str(scratch / "eager")], None),
            ("graph", base + ["--epochs", "3", "--cuda-graph", "--out", str(scratch / "graph")], None),
            ("straight", base + ["--epochs", "3", *stretchable, "--out", str(scratch / "straight")], None),
            ("resumed", base + ["--epochs", "2", *stretchable, "--out", str(scratch / "resumed")], resume)]


def _child_train() -> dict[str, Any]:
    data_dir, scratch = os.environ["NNBACKPROP_DOCTOR_DATA"], Path(os.environ["NNBACKPROP_DOCTOR_SCRATCH"])
    accuracy = {}
    for name, argv, resume in _train_runs(data_dir, scratch):
        for command in (argv, resume):
            if command is None:
                continue
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                return {"ok": False, "detail": f"{name}: {_tail(proc.stdout + proc.stderr)}"}
        accuracy[name] = json.loads((scratch / name / "summary.json").read_text())["test_accuracy"]
    same_graph = abs(accuracy["eager"] - accuracy["graph"]) <= 0.003
    same_resume = abs(accuracy["straight"] - accuracy["resumed"]) <= 0.001
    detail = ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items()) + " (3 epochs, test accuracy)"
    return {"ok": same_graph and same_resume, "detail": detail, "accuracy": accuracy}


CHILDREN: dict[str, Callable[[], dict[str, Any]]] = {
    "environment": _child_environment, "graphs": _child_graphs, "host-sync": _child_host_sync,
    "mixed-precision": _child_mixed_precision, "train": _child_train,
}


# ---------------------------------------------------------------------------------------------------- the command
def find_checkout() -> Path | None:
    """The checkout this package lives in (the folder with ``pyproject.toml``, ``tests/`` beside ``nnbackprop/``), if
    it is run from one."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "tests").is_dir() else None


def format_result(result: Result) -> str:
    return f"{result.name:<16} {result.status:<5} {result.seconds:6.1f} s  {result.detail}"


def doctor(out: Path, data_dir: str | None, budget_s: float, checks: Sequence[Check] = CHECKS,
           echo: Callable[[str], None] = print) -> list[Result]:
    """Run ``checks`` (see the module docstring), print a line per check as it ends, write ``out`` (JSON)."""
    with tempfile.TemporaryDirectory(prefix="nnbackprop-doctor-") as scratch:
        ctx = Context(find_checkout(), data_dir, Path(scratch))
        os.environ.update(NNBACKPROP_DOCTOR_SCRATCH=scratch, NNBACKPROP_DOCTOR_DATA=data_dir or "")
        echo(f"{'check':<16} {'result':<5} {'time':>8}  detail")
        results = run_checks(checks, ctx, budget_s=budget_s, report=lambda r: echo(format_result(r)), logs=out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": [asdict(r) for r in results]}, indent=2) + "\n")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    echo(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; results in {out}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nnbackprop.doctor --child NAME``: run one child check and print its JSON line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--child" or args[1] not in CHILDREN:
        print(f"usage: python -m nnbackprop.doctor --child {{{','.join(CHILDREN)}}}", file=sys.stderr)
        return 2
    print(json.dumps(CHILDREN[args[1]](), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

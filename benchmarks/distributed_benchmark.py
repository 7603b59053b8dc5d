"""Data-parallel throughput on CPU (gloo): training samples/s of a model with 1 and 2 processes, and the time of the
step spent in the gradient all_reduce.

Each configuration runs in fresh processes started with the environment torchrun would set (127.0.0.1, a free port).
Processes on a machine with few cores compete for them, so each run fixes the threads of each process
(torch.set_num_threads): by default 2 processes × 1 thread against 1 process × 1 and × 2 threads, for 2 cores. The
step is the one nnbackprop.train takes (make_step with the all_reduce gradient hook); the all_reduce time is measured
around the hook, so it includes waiting for the slower rank. Data is random (throughput does not depend on it). Rows
are printed as each configuration finishes, then the noise warnings; everything goes to a JSON file (--out).

Usage (with the package installed, ``pip install -e .``)::

    python benchmarks/distributed_benchmark.py --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import nnbackprop as nb
from harness import LR, MOMENTUM, resolve_model
from internals import all_reduce_mean_hook, broadcast_module, cleanup, init_distributed, local_batch_size
from report import (MODEL_SPECS, Column, HelpFormatter, Table, add_shape_options, describe_machine, format_time, key,
                    load_average, machine_info, noise_warnings, non_negative, positive, stop_on_signals, summarize,
                    write_json)

# ---------------------------------------------------------------------------------------------------- configuration
MODEL = "784-512-512-10"
INPUT_SHAPE = "1,28,28"
NUM_CLASSES = 10
GLOBAL_BATCHES = [128, 512]
RUNS = ["1x1", "1x2", "2x1"]  # processes x threads per process
WARMUP_STEPS = 5
TIMED_STEPS = 30
TIMEOUT_S = 120.0  # process-group timeout, and the longest wait for one configuration
OUT = "results/distributed_benchmark.json"

COLUMNS_HELP = """\
columns (a time is "median ±N%": the median milliseconds over the timed steps, and N half their interquartile range
as a percentage of the median; a row where the interquartile range exceeds 10% of the median gets a warning line
naming it below the table):
  batch          the global batch, split evenly between the processes
  procs          processes (ranks)
  thr/proc       torch threads of each process
  samples/s      training examples per second over all timed steps (all ranks together)
  step ms        one step: the slowest rank's time of each step
  allreduce ms   the gradient all_reduce within the step, averaged over the ranks ("-" for one process)
  share          the all_reduce's share of the step time
  speed-up       samples/s against the first run of --runs at the same batch"""


# ------------------------------------------------------------------------------------------------------- one rank


def worker(settings: dict[str, Any]) -> None:
    """One rank: time ``steps`` training steps after a warm-up, each step and the gradient hook within it."""
    ctx = init_distributed("cpu", timeout_s=TIMEOUT_S)
    try:
        torch.set_num_threads(settings["threads"])
        model_spec = resolve_model(settings["model"], settings["input_shape"], settings["num_classes"])
        b = local_batch_size(settings["global_batch"], ctx.world_size)
        g = torch.Generator().manual_seed(ctx.rank)
        batches = [(torch.randn(b, *model_spec.input_shape, generator=g),
                    torch.randint(0, model_spec.num_classes, (b,), generator=g)) for _ in range(4)]
        model = model_spec.build(torch.Generator().manual_seed(0))
        broadcast_module(ctx, model)
        hook = all_reduce_mean_hook(ctx)
        hook_s = 0.0

        def timed_hook(flat_grads: Tensor) -> None:
            nonlocal hook_s
            start = time.perf_counter()
            hook(flat_grads)
            hook_s += time.perf_counter() - start

        step = nb.make_step(model, nb.CrossEntropyLoss(), nb.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                            grad_hook=timed_hook if hook is not None else None)  # the step nnbackprop.train uses
        for i in range(settings["warmup"]):
            step(*batches[i % len(batches)])
        step_s, all_reduce_s = [], []
        for i in range(settings["steps"]):
            hook_s = 0.0
            start = time.perf_counter()
            step(*batches[i % len(batches)])
            step_s.append(time.perf_counter() - start)
            all_reduce_s.append(hook_s)
        Path(settings["result"]).write_text(json.dumps({"step_s": step_s, "all_reduce_s": all_reduce_s}))
        cleanup(wait=True)  # a rank that leaves while its peer still tears down its group aborts the peer
    finally:
        cleanup()


# ------------------------------------------------------------------------------------------------- one configuration


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(settings: dict[str, Any], processes: int, threads: int, global_batch: int, workdir: Path) -> dict:
    """Start one configuration's processes, wait for them, and combine their timings into a row."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    if processes > 1:
        env.update(WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if "lo" in {name for _, name in socket.if_nameindex()}:
            env["GLOO_SOCKET_IFNAME"] = "lo"
    tag = f"p{processes}_t{threads}_b{global_batch}"
    procs = []
    try:
        for rank in range(processes):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if processes > 1 else env
            rank_settings = {**settings, "threads": threads, "global_batch": global_batch,
                             "result": str(workdir / f"{tag}_rank{rank}.json")}
            with open(workdir / f"{tag}_rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(rank_settings)],
                                              env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        for rank, proc in enumerate(procs):
            if proc.wait(timeout=TIMEOUT_S) != 0:
                log = (workdir / f"{tag}_rank{rank}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{tag}: rank {rank} exited with {proc.returncode}:\n{log}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ranks = [json.loads((workdir / f"{tag}_rank{r}.json").read_text()) for r in range(processes)]
    step_ms = [1e3 * max(times) for times in zip(*(r["step_s"] for r in ranks))]  # the slowest rank, per step
    all_reduce_ms = [1e3 * sum(times) / processes for times in zip(*(r["all_reduce_s"] for r in ranks))]
    elapsed = max(sum(r["step_s"]) for r in ranks)
    return {
        "global_batch": global_batch, "processes": processes, "threads_per_process": threads,
        "steps": settings["steps"], "samples_per_s": global_batch * settings["steps"] / elapsed,
        "timings": {"step": summarize(step_ms), "all_reduce": summarize(all_reduce_ms) if processes > 1 else None},
        "all_reduce_share": sum(all_reduce_ms) / 1e3 / elapsed if processes > 1 else None,
        "load_average": (load_average() or [None])[0],
    }


def runs_spec(text: str) -> tuple[int, int]:
    try:
        processes, threads = (int(s) for s in text.lower().split("x"))
    except ValueError:
        processes = threads = 0
    if processes < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected PROCESSESxTHREADS, e.g. 2x1")
    return processes, threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=COLUMNS_HELP,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=MODEL, metavar="SPEC", help=f"the model: {MODEL_SPECS}")
    add_shape_options(parser, INPUT_SHAPE, NUM_CLASSES)
    parser.add_argument("--batch-sizes", nargs="+", type=positive, default=GLOBAL_BATCHES, metavar="N",
                        help="global batches, each a multiple of every process count")
    parser.add_argument("--runs", nargs="+", type=runs_spec, default=RUNS, metavar="PxT",
                        help="configurations: processes x torch threads per process")
    parser.add_argument("--steps", type=positive, default=TIMED_STEPS, help="timed steps per configuration")
    parser.add_argument("--warmup", type=non_negative, default=WARMUP_STEPS, help="untimed steps before them")
    parser.add_argument("--out", type=Path, default=Path(OUT), help="JSON file for the rows and the machine")
    args = parser.parse_args()
    runs = [runs_spec(r) if isinstance(r, str) else r for r in args.runs]
    for batch in args.batch_sizes:
        for processes, _ in runs:
            if batch % processes:
                parser.error(f"--batch-sizes {batch} does not divide among {processes} processes")
    try:
        model = resolve_model(args.model, args.input_shape, args.num_classes)
    except ValueError as error:
        parser.error(str(error))
    settings = {"model": args.model, "input_shape": args.input_shape, "num_classes": args.num_classes,
                "steps": args.steps, "warmup": args.warmup}

    machine = machine_info(torch.device("cpu"))
    print(describe_machine(machine))
    print(f"data-parallel {model.name}, float32, CPU (gloo); {args.warmup} warm-up + {args.steps} timed steps per "
          "configuration (columns: --help)")
    print()
    table = Table([Column("batch", key("global_batch"), 5), Column("procs", key("processes")),
                   Column("thr/proc", key("threads_per_process")), Column("samples/s", key("samples_per_s", "{:,.0f}")),
                   Column("step ms", lambda row: format_time(row["timings"]["step"], 2), 10),
                   Column("allreduce ms", lambda row: format_time(row["timings"]["all_reduce"], 2), 10),
                   Column("share", key("all_reduce_share", "{:.1%}"), 6),
                   Column("speed-up", key("speedup_vs_first", "{:.2f}x"))])
    table.header()
    rows = []
    stopped = None
    with tempfile.TemporaryDirectory() as tmp, stop_on_signals():
        try:
            for global_batch in args.batch_sizes:
                baseline = None
                for processes, threads in runs:
                    row = run(settings, processes, threads, global_batch, Path(tmp))
                    baseline = baseline or row["samples_per_s"]
                    row["speedup_vs_first"] = row["samples_per_s"] / baseline
                    rows.append(row)
                    table.row(row)
        except KeyboardInterrupt:
            stopped = "interrupted"
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # a rank that failed or hung
            stopped = f"error: {error}"
    if stopped is not None:
        print(f"{stopped}; {len(rows)} rows measured", file=sys.stderr)
    print()
    for line in noise_warnings(rows, lambda r: f"batch {r['global_batch']}, {r['processes']} processes x "
                                               f"{r['threads_per_process']} threads"):
        print(line)
    result = {"benchmark": "distributed", "machine": machine, "load_average_end": load_average(), **settings,
              "runs": [f"{p}x{t}" for p, t in runs], "dtype": "float32", "backend": "gloo", "stopped": stopped,
              "speedup_baseline": f"the first run at each batch, {runs[0][0]}x{runs[0][1]}", "rows": rows}
    written = write_json(args.out, result)
    return 130 if stopped == "interrupted" else 0 if written and stopped is None else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())

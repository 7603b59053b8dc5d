"""Data-parallel throughput on CPU (gloo): training samples/s of the 784-512-512-10 MLP with 1 and 2 processes, and
the share of the step spent in the gradient all_reduce.

Each configuration runs in fresh processes started with the environment torchrun would set (127.0.0.1, a free port).
Processes on a machine with few cores compete for them, so ``RUNS`` fixes the threads of each process
(``torch.set_num_threads``): 2 processes × 1 thread against 1 process × 1 and × 2 threads on 2 cores. The all_reduce
time is measured around the gradient hook, so it includes waiting for the slower rank. Data is random (throughput
does not depend on it).

Usage (with the package installed, ``pip install -e .``)::

    python benchmarks/distributed_benchmark.py [--steps 50] [--out results/distributed_benchmark.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from nnbackprop import CrossEntropyLoss, make_step, mlp
from nnbackprop.distributed import all_reduce_mean_hook, broadcast_module, cleanup, init_distributed, local_batch_size
from nnbackprop.files import write_text
from nnbackprop.optim import SGD

# ---------------------------------------------------------------------------------------------------- configuration
IN_FEATURES, HIDDEN, CLASSES = 784, [512, 512], 10
GLOBAL_BATCHES = [128, 512]
RUNS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)
WARMUP_STEPS = 5
TIMED_STEPS = 30
LR, MOMENTUM = 0.01, 0.9
TIMEOUT_S = 120.0  # process-group timeout, and the longest wait for one configuration
OUT = "results/distributed_benchmark.json"


def worker(global_batch: int, threads: int, steps: int, result: Path) -> None:
    """One rank: time ``steps`` training steps after a warm-up, and the gradient hook within them."""
    ctx = init_distributed("cpu", timeout_s=TIMEOUT_S)
    try:
        torch.set_num_threads(threads)
        b = local_batch_size(global_batch, ctx.world_size)
        g = torch.Generator().manual_seed(ctx.rank)
        batches = [(torch.randn(b, IN_FEATURES, generator=g), torch.randint(0, CLASSES, (b,), generator=g))
                   for _ in range(4)]
        model = mlp(IN_FEATURES, HIDDEN, CLASSES, generator=torch.Generator().manual_seed(0))
        broadcast_module(ctx, model)
        hook = all_reduce_mean_hook(ctx)
        hook_s = 0.0

        def timed_hook(flat_grads: Tensor) -> None:
            nonlocal hook_s
            start = time.perf_counter()
            hook(flat_grads)
            hook_s += time.perf_counter() - start

        step = make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                         grad_hook=timed_hook if hook is not None else None)  # the step nnbackprop.train uses
        for i in range(WARMUP_STEPS):
            step(*batches[i % len(batches)])
        hook_s = 0.0
        start = time.perf_counter()
        for i in range(steps):
            step(*batches[i % len(batches)])
        elapsed = time.perf_counter() - start
        result.write_text(json.dumps({"elapsed_s": elapsed, "all_reduce_s": hook_s}))
    finally:
        cleanup()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, threads: int, global_batch: int, steps: int, workdir: Path) -> dict:
    """Start one configuration's processes, wait for them, and combine their timings."""
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
            with open(workdir / f"{tag}_rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(global_batch), str(threads), str(steps),
                     str(workdir / f"{tag}_rank{rank}.json")],
                    env=rank_env, stdout=log, stderr=subprocess.STDOUT,
                ))
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
    elapsed = max(r["elapsed_s"] for r in ranks)
    all_reduce = sum(r["all_reduce_s"] for r in ranks) / processes
    return {
        "global_batch": global_batch, "processes": processes, "threads_per_process": threads, "steps": steps,
        "samples_per_s": global_batch * steps / elapsed, "step_ms": 1e3 * elapsed / steps,
        "all_reduce_ms": 1e3 * all_reduce / steps, "all_reduce_share": all_reduce / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps per configuration")
    parser.add_argument("--out", type=Path, default=Path(OUT), help="where to write the JSON results")
    args = parser.parse_args()
    rows = []
    print(f"data-parallel MLP {IN_FEATURES}-{'-'.join(map(str, HIDDEN))}-{CLASSES}, float32, CPU (gloo), "
          f"{os.cpu_count()} cores, torch {torch.__version__}; {WARMUP_STEPS} warm-up + {args.steps} timed steps")
    header = f"{'batch':>6} {'procs':>5} {'thr/proc':>8} {'samples/s':>10} {'step ms':>8} {'allreduce ms':>12} " \
             f"{'share':>6} {'speed-up':>8}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for global_batch in GLOBAL_BATCHES:
            baseline = None
            for processes, threads in RUNS:
                row = run(processes, threads, global_batch, args.steps, Path(tmp))
                baseline = baseline or row["samples_per_s"]
                row["speedup_vs_first"] = row["samples_per_s"] / baseline
                rows.append(row)
                print(f"{global_batch:>6} {processes:>5} {threads:>8} {row['samples_per_s']:>10.0f} "
                      f"{row['step_ms']:>8.2f} {row['all_reduce_ms']:>12.2f} {row['all_reduce_share']:>6.1%} "
                      f"{row['speedup_vs_first']:>7.2f}x")
    result = {
        "benchmark": "distributed", "model": [IN_FEATURES, *HIDDEN, CLASSES], "dtype": "float32", "backend": "gloo",
        "warmup_steps": WARMUP_STEPS, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "speedup_baseline": "first run of each batch: 1 process, 1 thread",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        batch, threads, steps, out = sys.argv[2:6]
        worker(int(batch), int(threads), int(steps), Path(out))
    else:
        sys.exit(main())

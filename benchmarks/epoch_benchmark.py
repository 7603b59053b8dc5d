"""Epoch benchmark: one whole Fashion-MNIST training epoch as nnbackprop.train runs it, against the sum of its steps,
and with the per-layer diagnostics off, on (the default: one recorded step per log interval) and full.

An epoch is ``nnbackprop.training.train_epoch``, the function ``train`` calls: reshuffle the on-device training split,
gather each mini-batch by indexing, take one FastStep (forward, cross-entropy, hand-written backward, SGD-momentum
update) per batch, step the schedule, read the running loss every ``log_every`` steps (and with diagnostics, arm the
hooks for the recorded steps and read their statistics with it). The same steps are also timed alone, on batches
gathered beforehand, so the difference is what the data path and the loop add. The variants are timed in
alternating rounds, forwards and backwards in turn; the table gives the median of ``REPEATS`` epochs each, the
overhead against the steps alone and, for the diagnostics, against the epoch without them, samples/s, and the peak
memory (RSS on the CPU, ``max_memory_allocated`` on CUDA).

Usage (with the package installed, ``pip install -e .``)::

    python benchmarks/epoch_benchmark.py [--device cpu] [--batch-size 128] [--repeats 5]
                                         [--out results/epoch_benchmark.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from harness import machine_info

from nnbackprop.callbacks import TrainCallback
from nnbackprop.config import TrainConfig
from nnbackprop.datasets import load_dataset
from nnbackprop.diagnostics import Diagnostics
from nnbackprop.distributed import DistContext
from nnbackprop.files import write_text
from nnbackprop.loaders import make_loader
from nnbackprop.step import FastStep
from nnbackprop.build import build_loss, build_model, build_optimizer, build_scheduler
from nnbackprop.training import Run, train_epoch

# ---------------------------------------------------------------------------------------------------- configuration
CONFIG = TrainConfig(dataset="fashion-mnist", hidden=(512, 512), batch_size=128, lr=0.05, momentum=0.9, epochs=100)
REPEATS = 5  # epochs timed of each kind (the median is reported)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT = "results/epoch_benchmark.json"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", default=DEVICE)
parser.add_argument("--batch-size", type=int, default=CONFIG.batch_size)
parser.add_argument("--repeats", type=int, default=REPEATS)
parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST is, if not in the usual places")
parser.add_argument("--out", default=OUT)
args = parser.parse_args()
if args.batch_size < 1 or args.repeats < 1:
    parser.error("--batch-size and --repeats must be positive")
device = torch.device(args.device)
if device.type == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: no CUDA device is available here")
config = CONFIG.replace(batch_size=args.batch_size, data_dir=args.data_dir)

# ------------------------------------------------------------------------------------------------------------ setup
data = load_dataset(config.dataset, data_dir=config.data_dir, seed=0)
loader = make_loader(data.train, config.batch_size, mean=data.mean, std=data.std, device=device, shuffle=True, seed=0)
generator = torch.Generator(device).manual_seed(1)
model = build_model(config, data.input_shape, data.num_classes, device, generator)
loss_fn = build_loss(config)
optimizer = build_optimizer(config, model)
scheduler = build_scheduler(config, optimizer, len(loader))
step = FastStep(model, loss_fn, optimizer)
diagnostics = {mode: Diagnostics(model, optimizer, mode) for mode in ("on", "full")}


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch(mode: str, number: int) -> float:
    """Seconds for one epoch of ``train_epoch`` with diagnostics ``mode`` (off, on, full)."""
    sync()
    start = time.perf_counter()
    train_epoch(Run(config, step, loss_fn, loader, scheduler, generator, TrainCallback(), DistContext(),
                    diagnostics.get(mode), [], None), number)
    return time.perf_counter() - start


def steps_alone(number: int) -> float:
    """Seconds for the same steps on batches gathered beforehand, the loss read once at the end."""
    loader.set_epoch(number)
    batches = list(loader)
    sync()
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for x, y in batches:
        total += step(x, y)[0]
    total.item()
    return time.perf_counter() - start


# -------------------------------------------------------------------------------------------------------- benchmark
machine = machine_info(device)
print(", ".join(f"{key}: {value}" for key, value in machine.items()))
print(f"{config.dataset}: {loader.num_samples} training samples, MLP 784-{'-'.join(map(str, config.hidden))}-10, "
      f"batch {config.batch_size}, {len(loader)} steps per epoch, log_every {config.log_every}")
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)

epoch("off", 0)  # warm-up: first-touch allocations, caches
kinds = ("steps alone", "diagnostics off", "diagnostics on", "diagnostics full")
times: dict[str, list[float]] = {kind: [] for kind in kinds}
number = 1
for repeat in range(args.repeats):
    for kind in kinds if repeat % 2 == 0 else kinds[::-1]:  # forwards, then backwards: no kind always follows another
        seconds = steps_alone(number) if kind == "steps alone" else epoch(kind.split()[1], number)
        times[kind].append(seconds)
        number += 1
    print(f"repeat {repeat + 1}/{args.repeats} | " + " | ".join(f"{k} {t[-1]:6.3f} s" for k, t in times.items()))

if device.type == "cuda":
    peak = {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
else:
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
median = {kind: statistics.median(t) for kind, t in times.items()}
rows = [{"kind": kind, "epoch_s": median[kind], "all_s": times[kind],
         "overhead_vs_steps": median[kind] / median["steps alone"] - 1,
         "overhead_vs_no_diagnostics": (median[kind] / median["diagnostics off"] - 1
                                        if kind.startswith("diagnostics") else None),
         "samples_per_s": loader.num_samples / median[kind]} for kind in kinds]

print()
print(f"{'epoch':<18} {'median s':>9} {'vs steps':>9} {'vs no diagnostics':>18} {'samples/s':>10}")
for row in rows:
    overhead = row["overhead_vs_no_diagnostics"]
    vs_diag = "-" if overhead is None else f"{100 * overhead:+.1f}%"
    print(f"{row['kind']:<18} {row['epoch_s']:>9.3f} {100 * row['overhead_vs_steps']:>+8.1f}% {vs_diag:>18} "
          f"{row['samples_per_s']:>10.0f}")
print(f"peak memory: {next(iter(peak.values())):.0f} MiB")
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
result = {"machine": machine, "config": config.to_dict(), "steps_per_epoch": len(loader), "rows": rows, **peak}
write_text(out, json.dumps(result, indent=2))
print(f"wrote {out}")

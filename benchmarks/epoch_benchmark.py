"""Epoch benchmark: one whole Fashion-MNIST training epoch, data included, against the sum of its steps.

An epoch is: reshuffle the on-device training split (``torch.randperm``), gather each mini-batch by indexing, and take
one FastStep (forward, cross-entropy, hand-written backward, SGD-momentum update) per batch, reading the summed loss
once at the end. The same steps are then timed on batches gathered beforehand, so the difference is what the data path
and the loop add. The table gives the median of ``REPEATS`` epochs of each, the overhead
``epoch / steps − 1``, samples/s, and the peak memory (RSS on the CPU, ``max_memory_allocated`` on CUDA).

Usage (with the package installed, ``pip install -e .``)::

    python benchmarks/epoch_benchmark.py [--device cpu] [--batch-size 128] [--repeats 3] [--out results/epoch_benchmark.json]
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
from nnbackprop.datasets import load_dataset
from nnbackprop.files import atomic_write
from nnbackprop.loaders import make_loader
from nnbackprop.losses import CrossEntropyLoss
from nnbackprop.model import mlp
from nnbackprop.optim import SGD
from nnbackprop.step import FastStep

# ---------------------------------------------------------------------------------------------------- configuration
DATASET = "fashion-mnist"
HIDDEN = [512, 512]
BATCH_SIZE = 128
LR, MOMENTUM = 0.05, 0.9
REPEATS = 3  # epochs timed of each kind (the median is reported)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT = "results/epoch_benchmark.json"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", default=DEVICE)
parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
parser.add_argument("--repeats", type=int, default=REPEATS)
parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST is, if not in the usual places")
parser.add_argument("--out", default=OUT)
args = parser.parse_args()
if args.batch_size < 1 or args.repeats < 1:
    parser.error("--batch-size and --repeats must be positive")
device = torch.device(args.device)
if device.type == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: no CUDA device is available here")

# ------------------------------------------------------------------------------------------------------------ setup
data = load_dataset(DATASET, data_dir=args.data_dir, seed=0)
loader = make_loader(data.train, args.batch_size, mean=data.mean, std=data.std, device=device, shuffle=True, seed=0)
model = mlp(784, HIDDEN, data.num_classes, generator=torch.Generator().manual_seed(0)).to(device)
step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=LR, momentum=MOMENTUM))


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch(batches) -> tuple[float, float]:
    """Seconds for one pass of ``step`` over ``batches``, and the summed loss (read once, at the end)."""
    sync()
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for x, y in batches:
        loss_sum, _ = step(x, y)
        total += loss_sum
    loss = total.item()
    return time.perf_counter() - start, loss


# -------------------------------------------------------------------------------------------------------- benchmark
machine = machine_info(device)
print(", ".join(f"{key}: {value}" for key, value in machine.items()))
print(f"{DATASET}: {loader.num_samples} training samples, MLP 784-{'-'.join(map(str, HIDDEN))}-10, "
      f"batch {args.batch_size}, {len(loader)} steps per epoch")
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)

loader.set_epoch(0)
epoch(loader)  # warm-up: first-touch allocations, caches
epoch_s, steps_s = [], []
for repeat in range(args.repeats):
    loader.set_epoch(repeat + 1)
    seconds, loss = epoch(loader)
    epoch_s.append(seconds)
    loader.set_epoch(repeat + 1)
    batches = list(loader)  # the same batches, gathered beforehand
    sync()
    seconds_steps, _ = epoch(batches)
    steps_s.append(seconds_steps)
    del batches
    print(f"repeat {repeat + 1}/{args.repeats} | epoch {seconds:7.3f} s | steps alone {seconds_steps:7.3f} s | "
          f"mean train loss {loss / loader.num_samples:.4f}")

if device.type == "cuda":
    peak = {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
else:
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
row = {
    "dataset": DATASET, "model": "-".join(map(str, [784, *HIDDEN, 10])), "batch": args.batch_size,
    "device": str(device), "steps_per_epoch": len(loader), "samples": loader.num_samples,
    "epoch_s": statistics.median(epoch_s), "steps_s": statistics.median(steps_s),
    "epoch_s_all": epoch_s, "steps_s_all": steps_s, **peak,
}
row["overhead"] = row["epoch_s"] / row["steps_s"] - 1
row["samples_per_s"] = row["samples"] / row["epoch_s"]

print()
print(f"{'model':<16} {'batch':>5} {'epoch s':>8} {'steps s':>8} {'overhead':>9} {'samples/s':>10} {'peak MiB':>9}")
print(f"{row['model']:<16} {row['batch']:>5} {row['epoch_s']:>8.3f} {row['steps_s']:>8.3f} "
      f"{100 * row['overhead']:>8.1f}% {row['samples_per_s']:>10.0f} {next(iter(peak.values())):>9.0f}")
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
atomic_write(out, lambda f: f.write(json.dumps({"machine": machine, "rows": [row]}, indent=2).encode()))
print(f"wrote {out}")

"""Epoch benchmark: one whole training epoch as nnbackprop.train runs it, against the sum of its steps, and with the
per-layer diagnostics off, on (the default: one recorded step per log interval) and full.

An epoch is the function train calls for one: reshuffle the on-device training split, gather each mini-batch by
indexing, take one FastStep (forward, cross-entropy, hand-written backward, SGD-momentum update) per batch, step the
schedule, read the running loss every log_every steps (and with diagnostics, arm the hooks for the recorded steps and
read their statistics with it). The same steps are also timed alone, on batches gathered beforehand, so the
difference is what the data path and the loop add. The four kinds are timed in alternating rounds, forwards and
backwards in turn, after one untimed warm-up epoch; a line is printed per timed epoch. At the end, or when stopped
with Ctrl-C (or SIGTERM), the table of what was measured is printed once and written, with the machine and its load,
to a JSON file.

Usage (with the package installed, ``pip install -e .``)::

    python benchmarks/epoch_benchmark.py --repeats 3 --max-steps 100
"""

from __future__ import annotations

import argparse
import itertools
import math
import resource
import sys
import time
from typing import Any, Iterator

import torch

import nnbackprop as nb
from internals import (Diagnostics, DistContext, Run, build_loss, build_model, build_optimizer, build_scheduler,
                       resolved, train_epoch)
from nnbackprop.datasets import load_dataset
from nnbackprop.loaders import make_loader
from report import (Column, HelpFormatter, Table, add_device_options, describe_machine, device_from, format_time, key,
                    load_average, machine_info, noise_warnings, positive, stop_on_signals, summarize, write_json)

# ---------------------------------------------------------------------------------------------------- configuration
CONFIG = nb.TrainConfig(dataset="fashion-mnist", hidden=(512, 512), batch_size=128, lr=0.05, momentum=0.9, epochs=100)
REPEATS = 5
OUT = "results/epoch_benchmark.json"
KINDS = ("steps alone", "diagnostics off", "diagnostics on", "diagnostics full")

COLUMNS_HELP = """\
columns (the time is "median ±N%": the median seconds per epoch over the timed epochs of that kind, and N half their
interquartile range as a percentage of the median; a row where the interquartile range exceeds 10% of the median
gets a warning line naming it below the table):
  epoch              steps alone: the epoch's steps on batches gathered beforehand, the loss read once at the end;
                     diagnostics off / on / full: the whole epoch as train runs it, with --diagnostics off, on (one
                     recorded step per log interval, the default) or full (every step recorded)
  seconds            seconds per epoch
  vs steps           the epoch's overhead over the steps alone: what the data path and the loop add
  vs no diagnostics  the overhead of the diagnostics over the epoch without them
  samples/s          training examples per second, from the median
  epochs             how many epochs of that kind were timed"""

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=COLUMNS_HELP,
                                 formatter_class=HelpFormatter)
parser.add_argument("--dataset", default=CONFIG.dataset, help="mnist, fashion-mnist, cifar10-catdog or "
                                                               "imagefolder:PATH, as for nnbackprop train")
parser.add_argument("--data-dir", default=None, help="where the data set is, if not in the usual places")
parser.add_argument("--model", default=None, metavar="FILE.py:FUNCTION",
                    help="time the model this function returns (as 'nnbackprop train --model') instead of train's "
                         f"default MLP, hidden layers {','.join(map(str, CONFIG.hidden))}")
parser.add_argument("--batch-size", type=positive, default=CONFIG.batch_size, help="examples per step")
parser.add_argument("--repeats", type=positive, default=REPEATS, help="timed epochs of each kind")
parser.add_argument("--max-steps", type=positive, default=None,
                    help="stop each epoch after this many steps (default: the whole training split)")
add_device_options(parser)
parser.add_argument("--out", default=OUT, help="JSON file for the table, the settings and the machine")
args = parser.parse_args()
device = device_from(parser, args)
try:
    config = CONFIG.replace(dataset=args.dataset, batch_size=args.batch_size, data_dir=args.data_dir, model=args.model)
except ValueError as error:
    parser.error(str(error))


class FirstBatches:
    """The first ``max_steps`` batches of each epoch of ``loader`` (all of them for ``None``); otherwise the loader."""

    def __init__(self, loader: Any, max_steps: int | None) -> None:
        self.loader, self.max_steps = loader, max_steps or len(loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return min(len(self.loader), self.max_steps)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.max_steps)


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch(mode: str, number: int) -> float:
    """Seconds for one epoch of ``train_epoch`` with diagnostics ``mode`` (off, on, full)."""
    sync()
    start = time.perf_counter()
    train_epoch(Run(config, step, loss_fn, loader, scheduler, generator, nb.TrainCallback(), DistContext(),
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


def rows_of(times: dict[str, list[float]], samples_per_epoch: int) -> list[dict[str, Any]]:
    """The table's rows from the seconds of each kind's epochs so far (a kind not timed yet: ``None`` values)."""
    median = {kind: summarize(t)["median"] if t else None for kind, t in times.items()}

    def over(kind: str, base: str) -> float | None:
        measured = kind != base and median[kind] is not None and median[base] is not None
        return median[kind] / median[base] - 1 if measured else None

    load = (load_average() or [None])[0]
    return [{"kind": kind, "timings": {"epoch": summarize(times[kind]) if times[kind] else None}, "load_average": load,
             "all_s": [round(t, 4) for t in times[kind]], "epochs": len(times[kind]),
             "overhead_vs_steps": over(kind, "steps alone"),
             "overhead_vs_no_diagnostics": over(kind, "diagnostics off") if kind.startswith("diagnostics") else None,
             "samples_per_s": samples_per_epoch / median[kind] if median[kind] else None} for kind in KINDS]


def percent(name: str) -> Any:
    return lambda row: "-" if row[name] is None else f"{100 * row[name]:+.1f}%"


table = Table([Column("epoch", key("kind"), max(map(len, KINDS)), left=True),
               Column("seconds", lambda row: format_time(row["timings"]["epoch"]), 11),
               Column("vs steps", percent("overhead_vs_steps")),
               Column("vs no diagnostics", percent("overhead_vs_no_diagnostics")),
               Column("samples/s", key("samples_per_s", "{:,.0f}"), 9), Column("epochs", key("epochs"))])

# -------------------------------------------------------------------------------------------------------- benchmark
machine = machine_info(device)
print(describe_machine(machine), flush=True)
times: dict[str, list[float]] = {kind: [] for kind in KINDS}
stopped = None
samples_per_epoch = 0
start = time.perf_counter()
with stop_on_signals():
    try:
        try:
            print(f"loading {config.dataset} ...", flush=True)
            data = load_dataset(config.dataset, data_dir=config.data_dir, val_size=config.val_size, seed=0)
            config = resolved(config, data)  # what train() runs: the settings left open filled in for the data
            full = make_loader(data.train, config.batch_size, mean=data.mean, std=data.std, device=device,
                               shuffle=True, seed=0)
            loader = FirstBatches(full, args.max_steps)
            samples_per_epoch = min(full.num_samples, len(loader) * config.batch_size)
            generator = torch.Generator(device).manual_seed(1)
            model = build_model(config, data.input_shape, data.num_classes, device, generator)
            loss_fn = build_loss(config)
            optimizer = build_optimizer(config, model)
            scheduler = build_scheduler(config, optimizer, len(loader))
            step = nb.make_step(model, loss_fn, optimizer)  # the step train takes
            diagnostics = {mode: Diagnostics(model, optimizer, mode) for mode in ("on", "full")}
        except (ValueError, FileNotFoundError) as error:  # no data set, a user's model that fails
            sys.exit(f"error: {error}")
        sizes = (math.prod(data.input_shape), *config.hidden, data.num_classes)
        model_name = config.model or "MLP " + "-".join(map(str, sizes))
        print(f"{config.dataset}: {full.num_samples} training samples; model {model_name} "
              f"({type(step).__name__}); batch {config.batch_size}; {len(loader)} of {len(full)} steps per epoch; "
              f"log_every {config.log_every}", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        print(f"warm-up epoch (untimed): {epoch('off', 0):.3f} s", flush=True)
        number = 1
        for repeat in range(args.repeats):
            for kind in KINDS if repeat % 2 == 0 else KINDS[::-1]:  # forwards, then backwards: no kind always follows
                seconds = steps_alone(number) if kind == "steps alone" else epoch(kind.split()[1], number)
                times[kind].append(seconds)
                number += 1
                print(f"repeat {repeat + 1}/{args.repeats} | {kind:<16} | {seconds:8.3f} s | "
                      f"elapsed {time.perf_counter() - start:7.1f} s", flush=True)
    except KeyboardInterrupt:
        stopped = "interrupted"

# ------------------------------------------------------------------------------------------------------- the results
if not any(times.values()):
    print("stopped before the first timed epoch: nothing to write", file=sys.stderr)
    sys.exit(130)
rows = rows_of(times, samples_per_epoch)
print()
table.header()
for row in rows:
    table.row(row)
print()
for line in noise_warnings(rows, lambda row: row["kind"]):
    print(line)
if device.type == "cuda":
    peak = {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
else:
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(f"peak memory: {next(iter(peak.values())):.0f} MiB")
if stopped is not None:
    print(f"{stopped} after {sum(map(len, times.values()))} timed epochs", file=sys.stderr)
result = {"benchmark": "epoch", "machine": machine, "load_average_end": load_average(), "config": config.to_dict(),
          "training_samples": full.num_samples, "steps_per_epoch": len(loader), "samples_per_epoch": samples_per_epoch,
          "max_steps": args.max_steps, "repeats": args.repeats, "stopped": stopped, "rows": rows, **peak}
write_json(args.out, result)
sys.exit(0 if stopped is None else 130)

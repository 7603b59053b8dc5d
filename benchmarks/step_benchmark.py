"""Training-step benchmark: nnbackprop's step against torch.nn + autograd + torch.optim.SGD (eager and compiled) and
against two floors, for MLPs (or your own model) at several batch sizes.

One step is forward, cross-entropy, backward and an SGD-momentum update (lr 0.01, momentum 0.9). Every implementation
starts from the same weights; the script stops if one step of any of them disagrees with ours. The implementations are
timed in alternating blocks, so that a machine whose load drifts slows them alike; rows are printed as they are
measured, then the noise warnings; the rows, the machine and its load go to a JSON file (--out), and a bar chart to
--plot. The first run compiles (tens of seconds per model on a small CPU); inductor caches the result for later runs.

Usage (with the package installed, ``pip install -e .``)::

    python benchmarks/step_benchmark.py --models 784-512-512-10 --batch-sizes 32 128 --steps 50
    python benchmarks/step_benchmark.py --model my_model.py:build --input-shape 1,28,28 --num-classes 10
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from harness import CHANNELS_LAST, EAGER_VARIANTS, LR, MOMENTUM, benchmark_model, describe, resolve_model
from internals import NNBackpropError
from report import (MODEL_SPECS, Column, HelpFormatter, Table, add_device_options, add_shape_options, describe_machine,
                    device_from, format_time, key, load_average, machine_info, noise_warnings, non_negative, plot_times,
                    positive, ratio, stop_on_signals, write_json)

# ---------------------------------------------------------------------------------------------------- configuration
MODELS = ["784-512-512-10", "784-1024-1024-1024-10"]
BATCH_SIZES = [32, 128, 512, 2048]
DTYPES = ["float32"]
STEPS = 20
WARMUP = 3
ROUNDS = 5
INPUT_SHAPE = "1,28,28"
NUM_CLASSES = 10
OUT = "results/step_benchmark.json"
PLOTTED = ["ours", "eager", "compiled", "floor", "floor+update"]  # the bars of --plot, per configuration

COLUMNS_HELP = """\
columns (each time is "median ±N%": the median milliseconds per step over --steps timed steps, and N half their
interquartile range as a percentage of the median, so the middle half of the steps lies within about median ±N%;
a row where the interquartile range exceeds 10% of the median gets a warning line naming it below the table):
  model             an MLP's layer sizes, cnn:C,H,W:CHANNELS:CLASSES, or FILE.py:FUNCTION
  batch, dtype      examples per step; parameter and data type (shown when there are several): bfloat16 is mixed
                    precision (float32 weights, bfloat16 batches), "float32 tf32" float32 with TF32 products
                    and convolutions (CUDA); plain float32 on CUDA is float32 for every implementation (no TF32,
                    which torch's default allows cuDNN's convolutions)
  ours ms           the step nnbackprop.train takes: FastStep (buffers, flat parameters), or SimpleStep when the
                    fast layout cannot hold the model (said above the table)
  graph ms          (CUDA) FastStep replayed as a CUDA graph
  simple ms         SimpleStep, the readable step on the plain model (none in bfloat16: it has no mixed precision)
  eager ms, best    the model's torch.nn equivalent (nnbackprop.to_torch) + autograd + torch.optim.SGD: the fastest
                    of its default, foreach and fused variants, for image models each also channels-last
                    (model and batch, "+cl"), named in "best"
  compiled ms       the eager step (default optimizer) under torch.compile; "compile s": its compile time, apart
  floor ms          only the step's matrix products, with the same shapes, nothing else: per Linear the forward
                    addmm (x Wᵀ + b), dW = doutᵀ x and dx = dout W (none for the first layer with parameters, whose
                    input is data; per Conv2d the forward convolution and its dW, dx); other layers with parameters
                    are named above the table as left out
  floor+upd ms      the floor, then one fused SGD-momentum update (torch.optim.SGD(fused=True), else foreach) over
                    one flat parameter, gradient and momentum tensor the size of the model: the least memory
                    traffic an update can have
  eager/ours, compiled/ours
                    above 1: ours is faster
  ours/floor        1 is the floor: what a step adds beyond the matrix products
  ours/(floor+upd)  1 is the floor with the update: what is left above 1 is overhead (elementwise layers, the loss,
                    bias gradients, copies, Python)"""


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=COLUMNS_HELP,
                                 formatter_class=HelpFormatter)
parser.add_argument("--models", "--model", nargs="+", default=MODELS, metavar="SPEC",
                    help=f"models to time: {MODEL_SPECS}")
add_shape_options(parser, INPUT_SHAPE, NUM_CLASSES)
parser.add_argument("--batch-sizes", nargs="+", type=positive, default=BATCH_SIZES, metavar="N",
                    help="examples per step")
parser.add_argument("--dtype", nargs="+", default=DTYPES, choices=["float32", "float64", "bfloat16"],
                    help="parameter and data types; bfloat16: mixed precision, a float32 model on bfloat16 batches "
                         "(ours with float32 master weights, eager and compiled under torch.autocast)")
parser.add_argument("--tf32", action="store_true",
                    help="(CUDA) also time float32 with TF32 matrix products and convolutions, for every "
                         "implementation and the floors")
parser.add_argument("--steps", type=positive, default=STEPS,
                    help="timed steps per implementation and configuration (the median and quartiles are over them)")
parser.add_argument("--warmup", type=non_negative, default=WARMUP,
                    help="untimed steps of each implementation before them")
parser.add_argument("--rounds", type=positive, default=ROUNDS,
                    help="blocks the timed steps are split into, alternating between the implementations")
add_device_options(parser)
parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
parser.add_argument("--out", default=OUT, help="JSON file for the rows, the settings and the machine")
parser.add_argument("--plot", default=None, metavar="FILE.png",
                    help="also draw ours, eager, compiled and the floors per configuration (needs matplotlib)")
args = parser.parse_args()

device = device_from(parser, args)
if args.tf32 and (device.type != "cuda" or "float32" not in args.dtype):
    parser.error("--tf32 times float32 on CUDA: pass --device cuda and --dtype float32")
configs = [(dtype, False) for dtype in args.dtype] + [("float32", True)] * args.tf32  # (dtype, tf32) of each row
try:
    models = [resolve_model(spec, args.input_shape, args.num_classes) for spec in args.models]
except (ValueError, NNBackpropError) as error:
    parser.error(str(error))
compile_steps = not args.no_compile

# ------------------------------------------------------------------------------------------------------- the table
model_width = max(len(m.name) for m in models)
time_width = 11
columns = [Column("model", key("model"), model_width, left=True), Column("batch", key("batch"), 5)]
if len(configs) > 1:
    columns.append(Column("dtype", key("dtype"), 12))


def measured(row: dict, name: str) -> dict | None:
    """The summary of the timings of ``name`` in ``row`` (``eager``: the best eager variant), ``None`` if not timed."""
    return row["timings"].get(f"eager_{row['eager_best']}" if name == "eager" else name)


def timing(name: str) -> Any:
    return lambda row: format_time(measured(row, name))


columns.append(Column("ours ms", timing("ours"), time_width))
if device.type == "cuda":
    columns.append(Column("graph ms", timing("ours_cuda_graph"), time_width))
columns += [Column("simple ms", timing("simple"), time_width),
            Column("eager ms", timing("eager"), time_width),
            Column("best", key("eager_best"), max(map(len, EAGER_VARIANTS)) + len(CHANNELS_LAST))]
if compile_steps:
    columns += [Column("compiled ms", timing("compiled"), time_width),
                Column("compile s", key("compile_s", "{:.1f}"))]
columns += [Column("floor ms", timing("floor"), time_width),
            Column("floor+upd ms", timing("floor+update"), time_width),
            Column("eager/ours", lambda row: ratio(row["eager_over_ours"]))]
if compile_steps:
    columns.append(Column("compiled/ours", lambda row: ratio(row["compiled_over_ours"])))
columns += [Column("ours/floor", lambda row: ratio(row["ours_over_floor"])),
            Column("ours/(floor+upd)", lambda row: ratio(row["ours_over_floor_update"]))]
table = Table(columns)


def label(row: dict) -> str:
    return f"{row['model']} batch {row['batch']} {row['dtype']}"


# ------------------------------------------------------------------------------------------------------- benchmark
machine = machine_info(device)
print(describe_machine(machine))
print(f"one step: forward, cross-entropy, backward, SGD lr {LR} momentum {MOMENTUM}; times: median ±half the "
      f"interquartile range of {args.steps} steps in {args.rounds} alternating blocks, after {args.warmup} warm-up "
      f"steps (columns: --help)")
for model in models:
    about = describe(model)
    notes = [f"{about['parameters']:,} parameters",
             "ours is FastStep" if about["fast_reason"] is None else f"ours is SimpleStep ({about['fast_reason']})"]
    if about["eager_skip"] is not None:
        notes.append(f"no torch.nn equivalent ({about['eager_skip']}): ours and simple only")
    if about["floor_left_out"]:
        notes.append(f"the floor leaves out {', '.join(about['floor_left_out'])} (no matrix products known for it)")
    print(f"{model.name}: " + "; ".join(notes))
print()
table.header()
rows: list[dict] = []
stopped = None
with stop_on_signals():
    try:
        for dtype, tf32 in configs:
            for model in models:
                rows += benchmark_model(model, args.batch_sizes, dtype=getattr(torch, dtype), device=device,
                                        steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                                        compile=compile_steps, tf32=tf32, on_row=table.row)
    except KeyboardInterrupt:
        stopped = "interrupted"
    except RuntimeError as error:  # an implementation that disagrees with ours
        stopped = f"error: {error}"

# ------------------------------------------------------------------------------------------------------- the results
print()
for line in noise_warnings(rows, label):
    print(line)
if compile_steps:
    for reason in sorted({row["compiled_skip"] for row in rows if row["compiled_skip"]}):
        print(f"torch.compile skipped: {reason}")
if stopped is not None:
    print(f"{stopped}; {len(rows)} rows measured", file=sys.stderr)
if rows:
    settings = {name: getattr(args, name) for name in ("models", "batch_sizes", "device", "dtype", "tf32", "steps",
                                                          "warmup", "rounds", "threads")}
    result = {"benchmark": "step", "machine": machine, "load_average_end": load_average(), **settings,
              "compile": compile_steps, "lr": LR, "momentum": MOMENTUM, "stopped": stopped, "rows": rows}
    write_json(args.out, result)
    if args.plot is not None:
        series = {name: [measured(row, name) for row in rows] for name in PLOTTED}
        load = machine["load_average"][0] if machine["load_average"] else "unknown"
        plot_times(args.plot, [f"{row['model']}\nbatch {row['batch']} {row['dtype']}" for row in rows],
                   {name: values for name, values in series.items() if any(v is not None for v in values)},
                   ylabel="ms per step (median, quartiles)",
                   title=f"training step on {machine['device']} ({machine['torch_threads']} threads), torch "
                         f"{machine['torch']}, load average {load}")
sys.exit(0 if stopped is None else 130 if stopped == "interrupted" else 1)

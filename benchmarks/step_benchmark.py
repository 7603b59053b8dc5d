"""Training-step benchmark: nnbackprop's FastStep against torch.nn + autograd + torch.optim.SGD (eager and compiled)
and against the matrix-product floor, for two MLPs at four batch sizes.

One step is forward, cross-entropy, backward and an SGD-momentum update. For each model and batch size the table gives
the median milliseconds per step of

* ``ours``      FastStep (``simple``: the readable layer-by-layer SimpleStep, for reference);
* ``eager``     the fastest of torch.optim.SGD's default / foreach / fused variants (named in ``best``);
* ``compiled``  the eager step under torch.compile (compile time in ``compile s``, measured apart);
* ``floor``     only the matrix products of the step (forward addmm, dW and dx products);

and the ratios eager/ours, compiled/ours (above 1: ours is faster) and ours/floor (1 is the floor). Every implementation
starts from the same weights; the script stops if one step of any of them disagrees with FastStep's. On CUDA there is
also a bf16 row (float32 master weights) and the CUDA-graph FastStep. All rows and the machine go to a JSON file.

The first run compiles (tens of seconds per model on a small CPU); inductor caches the result for later runs.

Usage (with the package installed, ``pip install -e .``)::

    python benchmarks/step_benchmark.py [--models 784-512-512-10] [--batch-sizes 128 2048] [--device cpu]
        [--dtype float32] [--steps 20] [--threads 2] [--no-compile] [--out results/step_benchmark.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness import benchmark_model, machine_info, parse_sizes
from nnbackprop.files import write_text

# ---------------------------------------------------------------------------------------------------- configuration
MODELS = ["784-512-512-10", "784-1024-1024-1024-10"]
BATCH_SIZES = [32, 128, 512, 2048]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = ["float32"]
STEPS = 20  # timed steps per measurement (the median is reported)
WARMUP = 3  # untimed steps before them
OUT = "results/step_benchmark.json"

COLUMNS = [  # (header, row key, format)
    ("model", "model", "{}"), ("batch", "batch", "{}"), ("dtype", "dtype", "{}"),
    ("ours ms", "ours_ms", "{:.3f}"), ("simple ms", "simple_ms", "{:.3f}"),
    ("eager ms", "eager_best_ms", "{:.3f}"), ("best", "eager_best", "{}"),
    ("compiled ms", "compiled_ms", "{:.3f}"), ("compile s", "compile_s", "{:.1f}"), ("floor ms", "floor_ms", "{:.3f}"),
    ("eager/ours", "eager_over_ours", "{:.2f}"), ("compiled/ours", "compiled_over_ours", "{:.2f}"),
    ("ours/floor", "ours_over_floor", "{:.2f}"),
]


def format_row(row: dict) -> list[str]:
    return [("-" if row.get(key) is None else fmt.format(row[key])) for _, key, fmt in COLUMNS]


def print_table(rows: list[dict]) -> None:
    cells = [[header for header, _, _ in COLUMNS]] + [format_row(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--models", nargs="+", default=MODELS, help="layer sizes joined by '-'")
parser.add_argument("--batch-sizes", nargs="+", type=int, default=BATCH_SIZES)
parser.add_argument("--device", default=DEVICE)
parser.add_argument("--dtype", nargs="+", default=DTYPES, choices=["float32", "float64"])
parser.add_argument("--steps", type=int, default=STEPS, help="timed steps per measurement (>= 1; 20+ for results)")
parser.add_argument("--warmup", type=int, default=WARMUP)
parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
parser.add_argument("--out", default=OUT, help="JSON file for the rows and the machine")
args = parser.parse_args()

if args.steps < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
    parser.error("--steps and --batch-sizes must be positive and --warmup non-negative")
device = torch.device(args.device)
if device.type == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: no CUDA device is available here")
models = [parse_sizes(spec) for spec in args.models]
if args.threads is not None:
    torch.set_num_threads(args.threads)

# ------------------------------------------------------------------------------------------------------- benchmark
machine = machine_info(device)
print(", ".join(f"{key}: {value}" for key, value in machine.items()))
print(f"median of {args.steps} steps after {args.warmup} warm-up steps; SGD lr 0.01 momentum 0.9, cross-entropy")
rows = []
for dtype in args.dtype:
    for sizes in models:
        rows += benchmark_model(sizes, args.batch_sizes, dtype=getattr(torch, dtype), device=device, steps=args.steps,
                                warmup=args.warmup, compile=not args.no_compile,
                                on_row=lambda row: print("  ".join(format_row(row)), flush=True))

print()
print_table(rows)
for reason in sorted({row["compiled_skip"] for row in rows if row["compiled_skip"]}):
    print(f"torch.compile skipped: {reason}")
if device.type == "cuda":
    print("CUDA graph FastStep ms: " + ", ".join(f"{r['model']}/{r['batch']}/{r['dtype']} {r['ours_cuda_graph_ms']:.3f}"
                                                 for r in rows))

out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
result = {"machine": machine, "steps": args.steps, "warmup": args.warmup, "rows": rows}
write_text(out, json.dumps(result, indent=2))
print(f"wrote {out}")

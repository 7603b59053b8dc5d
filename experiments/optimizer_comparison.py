"""Full-batch gradient descent, SGD, SGD with momentum and Nesterov momentum on the same budget of samples.

Each optimizer trains the same MLP from the same initial weights, at the same learning rate, for the same number of
epochs over the same 10,000 Fashion-MNIST training images, so each sees every image equally often and does about the
same arithmetic. What differs is what it does with the gradients:

* full-batch gradient descent averages the gradient over all 10,000 images and takes one exact step per epoch;
* SGD takes a step after every mini-batch of 128: 79 cheaper, noisier steps per epoch;
* momentum (μ = 0.9) keeps a running sum of past gradients, ``b ← μ b + g``, and steps along it: where successive
  gradients agree the step grows towards ``lr / (1 − μ)``, ten times the plain step, and where they zig-zag it cancels;
* Nesterov momentum evaluates the correction at the point the momentum is about to carry the weights to
  (``θ ← θ − lr (g + μ b)``), which damps overshooting.

The printed table and results/optimizer_comparison/loss_curves.png (with matplotlib) tell the story in numbers.

    python experiments/optimizer_comparison.py             # a few minutes on a CPU
    python experiments/optimizer_comparison.py epochs=30   # any setting of TrainConfig as key=value
"""

import json
import sys
from pathlib import Path

import torch

from nnbackprop.checkpoint import atomic_write
from nnbackprop.cli import format_table, parse_overrides, result_row, run_experiment
from nnbackprop.data import DatasetNotFoundError, DataSplits, load_dataset
from nnbackprop.plot import plot_curves
from nnbackprop.train import TrainConfig

# ---------------------------------------------------------------------------------------------------- configuration
n_train, n_val = 10_000, 2_000  # the first images of Fashion-MNIST's training and validation splits; all 10,000 test
base = TrainConfig(
    dataset="fashion-mnist",
    hidden=(128,),
    epochs=15,
    batch_size=128,
    lr=0.05,
    schedule="constant",
    seed=0,
)
runs = {  # name: what differs from base
    "full-batch GD": dict(batch_size=n_train, momentum=0.0),
    "SGD": dict(momentum=0.0),
    "SGD + momentum 0.9": dict(momentum=0.9),
    "Nesterov 0.9": dict(momentum=0.9, nesterov=True),
}
out_dir = Path("results/optimizer_comparison")
# ------------------------------------------------------------------------------------------------------------------
base = parse_overrides(base, sys.argv[1:])

try:
    full = load_dataset(base.dataset, base.data_dir, base.download, base.val_size, base.seed)
except DatasetNotFoundError as error:
    sys.exit(f"error: {error}")
data = DataSplits(full.name, full.train.subset(torch.arange(n_train)), full.val.subset(torch.arange(n_val)),
                  full.test, full.classes, full.input_shape, full.mean, full.std, full.source)

results = {}
for name, changes in runs.items():
    config = base.replace(**changes)
    print(f"\n=== {name}: batch {config.batch_size}, lr {config.lr}, momentum {config.momentum}"
          f"{', Nesterov' if config.nesterov else ''} ===")
    results[name] = run_experiment(config, out_dir / name.replace(" ", "_").replace("+", "and"), data)

rows = [{**result_row(name, r), "updates": r.history[-1].epoch * -(-n_train // base.replace(**runs[name]).batch_size)}
        for name, r in results.items()]
out_dir.mkdir(parents=True, exist_ok=True)
atomic_write(out_dir / "summary.json", lambda f: f.write(json.dumps(rows, indent=2).encode()))
try:
    plot_curves({name: ([m.epoch for m in r.history], [m.train_loss for m in r.history]) for name, r in results.items()},
                out_dir / "loss_curves.png", title=f"Training loss, {n_train} Fashion-MNIST images",
                xlabel="epoch (= 10,000 images seen)", ylabel="mean training loss", logy=True)
except ImportError:
    pass

print(f"\n{len(runs)} optimizers, {base.epochs} epochs each over the same {n_train} images, lr {base.lr}:\n")
print(format_table(rows))
print(f"\nresults in {out_dir}/")

"""Full-batch gradient descent, SGD, momentum, Nesterov momentum, Adam and AdamW on the same budget of samples.

Each optimizer trains the same MLP from the same initial weights for the same number of epochs over the same 55,000
Fashion-MNIST training images, with no regularisation, augmentation or schedule, so each sees every image equally
often and does about the same arithmetic. What differs is what it does with the gradients:

* full-batch gradient descent averages the gradient over all 55,000 images and takes one exact step per epoch;
* SGD takes a step after every mini-batch of 128: 430 cheaper, noisier steps per epoch;
* momentum (μ = 0.9) keeps a running sum of past gradients, ``b ← μ b + g``, and steps along it: where successive
  gradients agree the step grows towards ``lr / (1 − μ)``, ten times the plain step, and where they zig-zag it cancels;
* Nesterov momentum evaluates the correction at the point the momentum is about to carry the weights to
  (``θ ← θ − lr (g + μ b)``), which damps overshooting;
* Adam divides a running mean of the gradient by the root of a running mean of its square, so each weight gets a step
  of about ``lr`` whatever its gradient's scale (its usual lr, 1e-3, is used here: 0.01 is too large for it);
* AdamW is Adam with the weight decay taken out of the gradient and applied to the weights directly (decoupled).

Measured with the command below (20 epochs of 784-256-10, seed 0; 67 s in all on a 2-core CPU, torch 2.15):

    run                 test acc %  best epoch  train loss  lr     updates
    full-batch GD            56.96          20       1.751   0.01       20
    SGD                      86.22          20      0.3318   0.01     8600
    SGD + momentum 0.9       88.53          11      0.1667   0.01     8600
    Nesterov 0.9             89.00          15      0.1585   0.01     8600
    Adam                     88.06           6      0.1315  0.001     8600
    AdamW, decay 0.01        87.80           6      0.1398  0.001     8600

The exact gradient buys nothing when it costs a whole epoch per step: at equal cost, 430 noisy steps go much further
than one exact one, and momentum goes further still. Adam drives the training loss lowest but overfits soonest: its
validation loss is lowest at epoch 6, and the weights of that epoch are the ones tested. The printed table and
results/optimizer_comparison/loss_curves.png (with matplotlib) show it for your run.

    python experiments/optimizer_comparison.py
    python experiments/optimizer_comparison.py --epochs 40 --lr 0.02   # any setting as an option (see --help)
"""

import json
import sys
from pathlib import Path

from nnbackprop.config import TrainConfig, parse_config
from nnbackprop.console import fail, format_table
from nnbackprop.datasets import DatasetNotFoundError, load_dataset
from runner import result_row, run_experiment
from nnbackprop.files import write_text
from nnbackprop.plot import plot_curves

# ---------------------------------------------------------------------------------------------------- configuration
base = TrainConfig(  # plain: no regularisation, no augmentation, no schedule, so only the optimizer differs
    dataset="fashion-mnist",
    val_size=5000,
    hidden=(256,),
    dropout=0.0,
    epochs=20,
    batch_size=128,
    lr=0.01,
    momentum=0.0,
    nesterov=False,
    weight_decay=0.0,
    schedule="constant",
    warmup_epochs=0,
    shift=0,
    flip=False,
    seed=0,
    out="results/optimizer_comparison",
)
runs = {  # name: what differs from base; batch_size None is the whole training split
    "full-batch GD": dict(batch_size=None),
    "SGD": dict(),
    "SGD + momentum 0.9": dict(momentum=0.9),
    "Nesterov 0.9": dict(momentum=0.9, nesterov=True),
    "Adam": dict(optimizer="adam", lr=1e-3),
    "AdamW, decay 0.01": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01),
}
# ------------------------------------------------------------------------------------------------------------------
base = parse_config(sys.argv[1:], base, __doc__)
out_dir = Path(base.out)

try:
    data = load_dataset(base.dataset, base.data_dir, base.download, base.val_size, base.seed, base.image_size)
except DatasetNotFoundError as error:
    fail(error)

results, rows = {}, []
for name, changes in runs.items():
    config = base.replace(**{**changes, "batch_size": changes.get("batch_size", base.batch_size) or len(data.train)})
    print(f"\n=== {name}: {config.optimizer}, batch {config.batch_size}, lr {config.lr}, momentum {config.momentum}"
          f"{', Nesterov' if config.nesterov else ''}, weight decay {config.weight_decay} ===")
    folder = out_dir / name.replace(" + ", "_and_").replace(", ", "_").replace(" ", "_")
    results[name] = run_experiment(config, folder, data)
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    updates = results[name].history[-1].epoch * steps_per_epoch
    rows.append({**result_row(name, results[name]), "lr": config.lr, "updates": updates})

out_dir.mkdir(parents=True, exist_ok=True)
write_text(out_dir / "summary.json", json.dumps(rows, indent=2))
try:
    curves = {name: ([m.epoch for m in r.history], [m.train_loss for m in r.history]) for name, r in results.items()}
    plot_curves(curves, out_dir / "loss_curves.png", title=f"Training loss, {len(data.train)} Fashion-MNIST images",
                xlabel="epoch (every image seen once)", ylabel="mean training loss", logy=True)
except ImportError:
    pass

print(f"\n{len(runs)} optimizers, {base.epochs} epochs each over the same {len(data.train)} images:\n")
print(format_table(rows))
print(f"\nresults in {out_dir}/")

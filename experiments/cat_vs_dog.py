"""Cats against dogs with a multilayer perceptron: a binary task with one output logit and binary cross-entropy.

The images are a folder of photos with one subfolder per class (``--dataset imagefolder:PATH``; with ``train/`` and
``test/`` inside, those are the splits), such as the 4,000 photos of Kaggle's "Dogs vs. Cats" (2,000 to train on,
2,000 to test), each resized to image_size x image_size; or CIFAR-10's cats and dogs (the default: 10,000 training
and 2,000 test images, 32x32 colour). An MLP sees 3,072 unrelated numbers and no shapes, so expect far less than a
convolutional network.

On the 2,000 training photos, with 400 held out for validation (seed 0), this configuration reached 69.25%
validation accuracy at its best epoch (56; stopped early at 96) and **65.40% on the 2,000 test photos** (47 s on a
2-core CPU, torch 2.14.1). It was chosen among about 30 runs on the validation split alone (the test split was not read
while tuning); the best validation accuracies, at the epoch of lowest validation loss:

    images      hidden          dropout  augmentation        epochs  optimizer            val acc
    16x16 RGB   1024-512        0.3      shifts 1 px, flips      30  SGD lr 0.01            67.0%
    32x32 grey  1024-512        0.3      shifts 2 px, flips      30  SGD lr 0.01            63.5%
    32x32 RGB   1024-512        0.3      shifts 2 px, flips      30  SGD lr 0.01            66.5%
    48x48 RGB   1024-512        0.3      shifts 3 px, flips      30  SGD lr 0.01            68.5%
    32x32 RGB   1024-512        0.3      none                    30  SGD lr 0.01            66.3%  (98% on training)
    32x32 RGB   1024-512        0.3      shifts 2 px, flips     100  SGD lr 0.01            68.8%
    32x32 RGB   1024-512        0.3      shifts 2 px, flips     100  Adam lr 1e-4           66.8%
    32x32 RGB   1024-512        0.5      shifts 4 px, flips     200  SGD lr 0.01            69.3%  <- this configuration
    32x32 RGB   1024-1024-1024  0.5      shifts 4 px, flips     200  SGD lr 0.01            69.3%
    32x32 RGB   1024-512        0.5      shifts 4 px, flips     200  AdamW 3e-4, wd 0.05    64.8%

Colour helps (grey loses 2–3 points) and size beyond 16x16 hardly matters: what an MLP can use here is mostly colour
and coarse layout. Without augmentation it learns the training photos by heart and generalises no better; with strong
shifts, flips and dropout it fits them no better than new ones (about 70%), and validation accuracy stays between
63.5% and 69.3% whatever else changes. On 400 validation photos one standard error is 2.3 points, so these
differences are mostly noise, and picking the best of 30 runs flatters the winner: the 2,000 test photos say 65.4%.

    python experiments/cat_vs_dog.py --dataset imagefolder:../shared/datasets/cats-vs-dogs
    python experiments/cat_vs_dog.py --download          # CIFAR-10's cats and dogs (170 MB)

Writes results/cat_vs_dog/: checkpoint.pt, metrics.jsonl, layers.jsonl, summary.json, and the figures of
nnbackprop.plot.plot_run when matplotlib is installed.
"""

import sys
from pathlib import Path

from nnbackprop.config import TrainConfig, parse_config
from runner import report, run_experiment

# ---------------------------------------------------------------------------------------------------- configuration
config = TrainConfig(
    dataset="cifar10-catdog",
    val_size=400,
    image_size=32,
    hidden=(1024, 512),
    dropout=0.5,
    loss="bce",
    epochs=200,
    batch_size=128,
    lr=0.01,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=1,
    shift=4,
    flip=True,
    patience=40,
    seed=0,
    out="results/cat_vs_dog",
)
# ------------------------------------------------------------------------------------------------------------------
config = parse_config(sys.argv[1:], config, __doc__)
out_dir = Path(config.out)

result = run_experiment(config, out_dir)
report("MLP " + "-".join(map(str, config.hidden)) + ", one logit", result, out_dir)

"""Cats against dogs with a multilayer perceptron: a binary task with one output logit and binary cross-entropy.

The images are CIFAR-10's cats and dogs (5,000 + 5,000 training and 1,000 + 1,000 test images, 32x32 colour), or any
folder of images with one subdirectory per class (``--dataset imagefolder:PATH``, e.g. the Kaggle "Dogs vs. Cats"
pictures sorted into cat/ and dog/; resized to image_size x image_size). An MLP sees 3,072 unrelated numbers and no
shapes, so expect far less than a convolutional network: around two thirds of the test images right on CIFAR-10.

No data set is bundled: pass --download (CIFAR-10, 170 MB), --data-dir DIR (holding cifar-10-batches-py), or
--dataset imagefolder:PATH.

    python experiments/cat_vs_dog.py --download
    python experiments/cat_vs_dog.py --dataset imagefolder:~/data/cats_and_dogs --image-size 48

Writes results/cat_vs_dog/: checkpoint.pt, metrics.jsonl, summary.json, and loss.png / accuracy.png / lr.png
when matplotlib is installed.
"""

import sys
from pathlib import Path

from nnbackprop.config import TrainConfig, parse_config
from nnbackprop.console import format_table
from nnbackprop.experiment import result_row, run_experiment

# ---------------------------------------------------------------------------------------------------- configuration
config = TrainConfig(
    dataset="cifar10-catdog",
    val_size=1000,
    image_size=32,
    hidden=(1024, 512),
    dropout=0.3,
    loss="bce",
    epochs=30,
    batch_size=128,
    lr=0.01,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=1,
    shift=2,
    flip=True,
    patience=8,
    seed=0,
)
out_dir = Path("results/cat_vs_dog")
# ------------------------------------------------------------------------------------------------------------------
config = parse_config(sys.argv[1:], config, __doc__)

result = run_experiment(config, out_dir)

print()
print(format_table([result_row("MLP " + "-".join(map(str, config.hidden)) + ", one logit", result)]))
print(f"results in {out_dir}/")

"""Fashion-MNIST with a multilayer perceptron trained by hand-written backpropagation: the accuracy run.

The best MLPs in the Fashion-MNIST benchmark (zalandoresearch/fashion-mnist) reach 87.1% (sklearn MLPClassifier) and
88.33% test accuracy. This configuration reached 90.65% after 30 epochs (best validation epoch 27; 161 s on a
2-core CPU, torch 2.14.1, seed 0; 90.82% with torch 2.15): two wide ReLU layers with batch normalisation and
dropout, SGD with Nesterov momentum and weight decay, one epoch of linear warm-up then a cosine decay of the learning
rate, and each training image mirrored left-right at random (clothes look the same mirrored).

5,000 training images are held out for validation; the weights of the epoch with the lowest validation loss are the
ones evaluated on the 10,000 test images, once, at the end.

What the parts are worth, on the validation split (where this configuration is the best of these; the test split was
read once, for the final run above): 30 epochs of 784-1024-1024-10, SGD lr 0.05, Nesterov 0.9, weight decay 5e-4,
warm-up + cosine, batch 128, seed 0, validation accuracy at the epoch of lowest validation loss (torch 2.15):

    batch norm  dropout  flips  shifts (px)   validation accuracy
    no          0.2      no     0             89.94%
    no          0.2      yes    0             90.22%
    no          0.1      yes    1             89.90%
    yes         0.1      yes    1             90.42%
    yes         0.2      yes    1             89.98%
    yes         0.3      yes    0             90.46%
    yes         0.2      yes    0             90.52%   <- this configuration

Random shifts of a pixel or two are a strong regulariser for an MLP, which has no notion of neighbouring pixels, but
within 30 epochs they keep it from fitting the training set (91% training accuracy against 95–97% without); flips
cost less, and batch normalisation makes the most of the budget. The differences are a few tenths of a point, about
one standard error of 5,000 validation images (0.4 points).

    python experiments/fashion_mnist_mlp.py                     # the full run
    python experiments/fashion_mnist_mlp.py --epochs 3 --device cpu  # any setting as an option (see --help)

Writes results/fashion_mnist_mlp/: checkpoint.pt, metrics.jsonl, layers.jsonl, summary.json, and the figures of
nnbackprop.plot.plot_run when matplotlib is installed.
"""

import sys
from pathlib import Path

from nnbackprop.config import TrainConfig, parse_config
from runner import report, run_experiment

# ---------------------------------------------------------------------------------------------------- configuration
config = TrainConfig(
    dataset="fashion-mnist",
    val_size=5000,
    hidden=(1024, 1024),
    batchnorm=True,
    dropout=0.2,
    epochs=30,
    batch_size=128,
    lr=0.05,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=1,
    flip=True,
    seed=0,
    out="results/fashion_mnist_mlp",
)
# ------------------------------------------------------------------------------------------------------------------
config = parse_config(sys.argv[1:], config, __doc__)
out_dir = Path(config.out)

result = run_experiment(config, out_dir)
report("MLP " + "-".join(map(str, config.hidden)), result, out_dir)
print(f"benchmark MLPs: 87.10% / 88.33%; target >= 90.5%: {'reached' if result.test_accuracy >= 0.905 else 'missed'}")

"""The training loop: the reference step against torch.autograd + torch.optim, repeatability, resume, early stopping,
the divergence guard, checkpoints that do not fit, and short runs on real Fashion-MNIST."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from nnbackprop import (GELU, AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten,
                        LeakyReLU, Linear, MaxPool2d, ReLU, Sequential, Sigmoid, Tanh)
from nnbackprop import functional as F
from nnbackprop.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from nnbackprop.config import TrainConfig
from nnbackprop.files import WriteError
from nnbackprop.datasets import SYSTEM_FASHION_MNIST, DataSplits, TensorData, load_dataset
from nnbackprop.device import make_current
from nnbackprop.inference import load_model
from nnbackprop.loaders import make_loader
from nnbackprop.losses import CrossEntropyLoss
from nnbackprop.metrics import METRICS_FILE
from nnbackprop.callbacks import TrainCallback, TrainResult
from nnbackprop.errors import ConfigError, NonFiniteLossError
from nnbackprop.evaluation import evaluate
from nnbackprop.training import SUMMARY_FILE, train
from user_layers import Scale, Swish

# A small run: 3 classes of 6x6 images, 300 training examples, 10 steps per epoch.
BASE = TrainConfig(dataset="toy", hidden=(16,), dropout=0.0, epochs=3, batch_size=32, lr=0.05, nesterov=False,
                   weight_decay=0.0, schedule="constant", warmup_epochs=0, device="cpu", log_every=4)


def toy_data(n_train: int = 300, n_val: int = 60, n_test: int = 60, classes: int = 3, learnable: bool = True,
             seed: int = 0) -> DataSplits:
    """Images whose brightness gives the class (``learnable``), or noise with random labels (nothing to learn, so a
    network that fits the training labels gets worse on validation)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> TensorData:
        labels = torch.randint(0, classes, (n,), generator=g)
        noise = torch.rand(n, 1, 6, 6, generator=g)
        level = labels.view(-1, 1, 1, 1) / classes if learnable else torch.zeros(n, 1, 1, 1)
        return TensorData((255 * (0.6 * level + 0.4 * noise)).to(torch.uint8), labels)

    return DataSplits("toy", split(n_train), split(n_val), split(n_test), [str(c) for c in range(classes)], (1, 6, 6),
                      (0.5,), (0.25,), "generated")


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def losses(history) -> list:
    return [(m.epoch, m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy, m.lr) for m in history]


# ------------------------------------------------------------------------------------------------------ the loop


def test_train_learns_and_writes_its_files(tmp_path):
    result = train(BASE.replace(epochs=4, dropout=0.1), data=toy_data(), out_dir=tmp_path)
    assert result.test_accuracy > 0.9 and result.history[-1].train_loss < result.history[0].train_loss
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert set(json.loads(lines[0])) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                                         "seconds", "samples_per_s"}
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["test_accuracy"] == result.test_accuracy and summary["best_epoch"] == result.best_epoch
    assert summary["config"]["hidden"] == [16] and summary["data"]["source"] == "generated"
    assert summary["wall_time_s"] > 0 and load_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class Recorder(TrainCallback):
    def __init__(self, stop_after: int | None = None) -> None:
        self.events, self.stop_after = [], stop_after

    def on_epoch_begin(self, epoch, num_steps):
        self.events.append(("begin", epoch, num_steps))

    def on_step(self, epoch, step, running_loss):
        if running_loss is not None:
            self.events.append(("loss", epoch, step))

    def on_epoch_end(self, metrics):
        self.events.append(("end", metrics.epoch))
        if metrics.epoch == self.stop_after:
            raise KeyboardInterrupt


def test_callback_hears_every_epoch_and_the_running_loss_every_log_every_steps():
    recorder = Recorder()
    train(BASE.replace(epochs=1), data=toy_data(), callback=recorder)
    assert recorder.events == [("begin", 1, 10), ("loss", 1, 4), ("loss", 1, 8), ("loss", 1, 10), ("end", 1)]


def test_seed_repeats_bit_for_bit():
    config = BASE.replace(dropout=0.2, shift=1, flip=True, batchnorm=True, epochs=2)
    first, second = train(config, data=toy_data()), train(config, data=toy_data())
    assert_same_weights(first.model.state_dict(), second.model.state_dict())
    assert losses(first.history) == losses(second.history)
    other = train(config.replace(seed=1), data=toy_data())
    assert not torch.equal(other.model.state_dict()["1.weight"], first.model.state_dict()["1.weight"])


RESUME = BASE.replace(epochs=6, dropout=0.2, batchnorm=True, shift=1, flip=True, nesterov=True, weight_decay=1e-3,
                      schedule="cosine", warmup_epochs=1, patience=5)


@pytest.mark.parametrize("how, fast", [("interrupted", True), ("interrupted", False), ("extended", True)])
def test_resume_equals_training_straight_through(tmp_path, how, fast):
    """3 epochs, then resume for 3 more == 6 epochs at once: same weights, optimizer state and metrics, bit for bit."""
    config = (RESUME if how == "interrupted" else RESUME.replace(schedule="constant")).replace(fast=fast)
    straight = train(config, data=toy_data(), out_dir=tmp_path / "straight")
    if how == "interrupted":  # stopped after epoch 3 (as by Ctrl-C), continued with the same settings
        with pytest.raises(KeyboardInterrupt):
            train(config, data=toy_data(), out_dir=tmp_path / "resumed", callback=Recorder(stop_after=3))
    else:  # a finished 3-epoch run, extended to 6 epochs
        train(config.replace(epochs=3), data=toy_data(), out_dir=tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["epoch"] == 3
    recorder = Recorder()
    resumed = train(config, data=toy_data(), out_dir=tmp_path / "resumed", resume=True, callback=recorder)
    assert recorder.events[0] == ("begin", 4, 10)
    assert losses(resumed.history) == losses(straight.history)
    assert_same_weights(resumed.model.state_dict(), straight.model.state_dict())
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT_FILE) for d in ("straight", "resumed"))
    assert_same_weights(a["model"], b["model"])
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert all(torch.equal(x, y) for x, y in zip(a["rng"]["generators"], b["rng"]["generators"], strict=True))
    assert resumed.test_accuracy == straight.test_accuracy
    assert resumed.summary["step"] == ("FastStep" if fast else "SimpleStep")
    assert len((tmp_path / "resumed" / METRICS_FILE).read_text().splitlines()) == 6


def test_resume_refuses_other_settings(tmp_path):
    train(BASE.replace(epochs=1), data=toy_data(), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"other settings: hidden \(16,\) there, \(32,\) here") as info:
        train(BASE.replace(epochs=2, hidden=(32,)), data=toy_data(), out_dir=tmp_path, resume=True)
    assert str(tmp_path / CHECKPOINT_FILE) in str(info.value)
    with pytest.raises(CheckpointError, match="other data"):
        train(BASE.replace(epochs=2), data=toy_data(n_train=200), out_dir=tmp_path, resume=True)


def test_resume_refuses_to_stretch_a_cosine_schedule(tmp_path):
    train(BASE.replace(epochs=2, schedule="cosine"), data=toy_data(), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"cosine schedule was laid out for 2 epochs; resume with --epochs 2"):
        train(BASE.replace(epochs=4, schedule="cosine"), data=toy_data(), out_dir=tmp_path, resume=True)


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    train(BASE.replace(epochs=1), data=toy_data(), out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(BASE.replace(epochs=1), data=toy_data(), out_dir=tmp_path)
    train(BASE.replace(epochs=1, seed=3), data=toy_data(), out_dir=tmp_path, overwrite=True)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["config"]["seed"] == 3


def test_early_stopping_restores_the_weights_of_the_lowest_validation_loss(tmp_path):
    data = toy_data(n_train=64, n_val=200, learnable=False)  # random labels: fitting them makes validation worse
    config = BASE.replace(hidden=(128,), lr=0.2, batch_size=16, epochs=30, patience=3)
    result = train(config, data=data, out_dir=tmp_path)
    val_losses = [m.val_loss for m in result.history]
    assert result.stopped_early and len(result.history) < 30
    assert result.best_epoch == 1 + val_losses.index(min(val_losses)) == len(result.history) - 3
    assert val_losses[-1] > min(val_losses)
    val_loader = make_loader(data.val, 1000, mean=data.mean, std=data.std)
    assert evaluate(result.model, CrossEntropyLoss(), val_loader).loss == pytest.approx(min(val_losses), rel=1e-12)
    best = load_checkpoint(tmp_path / CHECKPOINT_FILE)["best_model"]
    assert_same_weights(result.model.state_dict(), best)
    assert_same_weights(load_model(tmp_path / CHECKPOINT_FILE)[0].state_dict(), best)


def test_monitoring_validation_accuracy_keeps_the_most_accurate_epoch(tmp_path):
    """With monitor="val_accuracy" the weights kept, evaluated and resumed are the first epoch of highest validation
    accuracy, whatever its loss; the summary names that epoch's loss."""
    data = toy_data(n_train=64, n_val=200, learnable=False)
    config = BASE.replace(hidden=(128,), lr=0.2, batch_size=16, epochs=6, monitor="val_accuracy")
    result = train(config, data=data, out_dir=tmp_path)
    accuracies = [m.val_accuracy for m in result.history]
    assert result.best_epoch == 1 + accuracies.index(max(accuracies))
    val_loader = make_loader(data.val, 1000, mean=data.mean, std=data.std)
    assert evaluate(result.model, CrossEntropyLoss(), val_loader).accuracy == max(accuracies)
    assert result.summary["best_val_loss"] == result.history[result.best_epoch - 1].val_loss
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)["early_stopping"]
    assert state["best_score"] == -max(accuracies) and state["best_epoch"] == result.best_epoch
    resumed = train(config.replace(epochs=8), data=data, out_dir=tmp_path, resume=True)
    assert max(m.val_accuracy for m in resumed.history) == resumed.history[resumed.best_epoch - 1].val_accuracy
    with pytest.raises(ValueError, match="monitor"):
        BASE.replace(monitor="accuracy")


def test_early_stopping_needs_a_validation_split():
    with pytest.raises(ValueError, match="validation split"):
        train(BASE.replace(patience=2), data=toy_data(n_val=0))


def test_divergence_stops_with_the_epoch_and_steps_and_keeps_the_last_good_checkpoint(tmp_path):
    # The lr grows 1e4-fold after every epoch (a "step" schedule with gamma > 1): epoch 1 is fine, then it blows up.
    config = BASE.replace(epochs=5, schedule="step", step_epochs=1, gamma=1e4, momentum=0.0, lr=0.01)
    with pytest.raises(NonFiniteLossError) as info:
        train(config, data=toy_data(), out_dir=tmp_path)
    error = info.value
    assert error.epoch >= 2 and error.last_good_epoch == error.epoch - 1
    assert f"epoch {error.epoch}, step" in str(error) and str(tmp_path / CHECKPOINT_FILE) in str(error)
    saved = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert saved["epoch"] == error.last_good_epoch
    assert all(bool(t.isfinite().all()) for t in saved["model"].values())
    model = load_model(tmp_path / CHECKPOINT_FILE)[0]
    assert all(bool(p.data.isfinite().all()) for p in model.parameters())


def test_divergence_in_the_first_epoch_says_no_checkpoint_was_written():
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, steps 1-4 of 10.*no checkpoint was written"):
        train(BASE.replace(lr=1e30), data=toy_data())


def test_model_weights_that_do_not_fit_their_configuration(tmp_path):
    train(BASE.replace(epochs=1), data=toy_data(), out_dir=tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    checkpoint = load_checkpoint(path)
    checkpoint["config"]["hidden"] = [20]
    save_checkpoint(path, checkpoint)
    with pytest.raises(CheckpointError, match="model weights do not fit") as info:
        load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("loss, classes", [("bce", 2), ("mse", 3)])
def test_other_losses_train(loss, classes):
    result = train(BASE.replace(loss=loss, epochs=4, lr=0.2 if loss == "mse" else 0.05), data=toy_data(classes=classes))
    assert result.test_accuracy > 0.8
    assert result.model[-1].out_features == (1 if loss == "bce" else classes)


def test_bce_needs_two_classes():
    with pytest.raises(ValueError, match="two-class"):
        train(BASE.replace(loss="bce"), data=toy_data(classes=3))


def test_unknown_device_and_missing_cuda():
    with pytest.raises(ValueError, match="unknown device"):
        train(BASE.replace(device="gpu"), data=toy_data())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(BASE.replace(device="cuda"), data=toy_data())


def test_only_an_indexed_cuda_device_is_made_current(monkeypatch):
    """``cuda`` means torch's current CUDA device: ``torch.cuda.set_device`` refuses it (it needs ``cuda:N``), which
    made every ``--device cuda`` run fail at its start on the first GPU this project met."""
    made = []
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    for name in ("cpu", "cuda", "cuda:1"):
        make_current(torch.device(name))
    assert made == [torch.device("cuda:1")]


# ------------------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def fashion_slice() -> DataSplits:
    if not SYSTEM_FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed in {SYSTEM_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    full = load_dataset("fashion-mnist", search_dirs=[SYSTEM_FASHION_MNIST])
    first = lambda split, n: split.subset(torch.arange(n))  # noqa: E731
    return DataSplits(full.name, first(full.train, 3000), first(full.val, 500), first(full.test, 1000), full.classes,
                      full.input_shape, full.mean, full.std, full.source)


def test_short_run_on_fashion_mnist(fashion_slice):
    config = TrainConfig(hidden=(64,), epochs=2, lr=0.05, device="cpu", shift=2, flip=True)
    result = train(config, data=fashion_slice)
    assert result.test_accuracy > 0.7, result.history
    assert result.summary["data"]["source"] == str(SYSTEM_FASHION_MNIST)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fast", [True, False])
def test_cuda_run_learns_and_resumes(tmp_path, fast):
    config = BASE.replace(device="cuda", epochs=4, dropout=0.1, shift=1, flip=True, fast=fast)
    straight = train(config, data=toy_data(), out_dir=tmp_path / "straight")
    assert straight.test_accuracy > 0.9 and straight.summary["device"].startswith("cuda")
    with pytest.raises(KeyboardInterrupt):
        train(config, data=toy_data(), out_dir=tmp_path / "resumed", callback=Recorder(stop_after=2))
    resumed = train(config, data=toy_data(), out_dir=tmp_path / "resumed", resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-6), key


# ------------------------------------------------------------------------------------------------------ one math


def _every_layer(outputs: int) -> Sequential:
    """A model with every built-in layer (and a LeakyReLU slope and GELU form the old fast kernels refused): a small
    convolutional front on the 1x6x6 images, then the dense layers."""
    g = torch.Generator().manual_seed(0)
    widths = [(8, 16), (16, 16), (16, 16), (16, 16), (16, 16), (16, 16)]
    linear = [Linear(i, o, generator=g) for i, o in widths]
    convs = [Conv2d(1, 4, 3, padding=1, generator=g), BatchNorm2d(4), ReLU(), Dropout(0.1), MaxPool2d(2),
             Conv2d(4, 8, 3, padding=1, groups=2, generator=g), AvgPool2d(2, 1), AdaptiveAvgPool2d(1), Flatten()]
    return Sequential(*convs, linear[0], BatchNorm1d(16), ReLU(), Dropout(0.1), linear[1], LeakyReLU(-0.3),
                      linear[2], Sigmoid(), linear[3], Tanh(), linear[4], GELU(), linear[5], GELU("tanh"),
                      Linear(16, outputs, generator=g))


PAIRS = sorted(name.removesuffix("_backward") for name in vars(F) if name.endswith("_backward"))
LOSS_OF = {"mse": ("mse", 3), "bce_with_logits": ("bce", 2)}  # the loss (and classes) that runs a pair; else ce


def _train_every_layer(loss: str, classes: int) -> TrainResult:
    config = BASE.replace(epochs=1, loss=loss, lr=0.02)
    return train(config, model=_every_layer(1 if loss == "bce" else classes), data=toy_data(classes=classes))


def test_the_step_train_uses_runs_every_functional_pair(monkeypatch):
    calls: Counter = Counter()
    for name, function in list(vars(F).items()):
        if name.endswith(("_forward", "_backward")):
            def counted(*args, _name=name, _function=function, **kwargs):
                calls[_name] += 1
                return _function(*args, **kwargs)
            monkeypatch.setattr(F, name, counted)
    for loss, classes in [("ce", 3), *LOSS_OF.values()]:
        assert _train_every_layer(loss, classes).summary["step"] == "FastStep"
    assert PAIRS == ["adaptive_avg_pool2d", "avg_pool2d", "batchnorm", "bce_with_logits", "conv2d", "cross_entropy",
                     "dropout", "gelu", "leaky_relu", "linear", "max_pool2d", "mse", "relu", "sigmoid", "tanh"]
    not_run = [f"{pair}_{half}" for pair in PAIRS for half in ("forward", "backward") if not calls[f"{pair}_{half}"]]
    assert not not_run, f"train() never ran {not_run}"


@pytest.mark.parametrize("pair", PAIRS)
def test_changing_one_backward_in_functional_changes_what_train_learns(pair, monkeypatch):
    loss, classes = LOSS_OF.get(pair, ("ce", 3))
    before = _train_every_layer(loss, classes).model.state_dict()
    original = getattr(F, f"{pair}_backward")

    def scaled(*args, **kwargs):
        result = original(*args, **kwargs)
        return tuple(None if t is None else 1.5 * t for t in result) if isinstance(result, tuple) else 1.5 * result

    monkeypatch.setattr(F, f"{pair}_backward", scaled)
    after = _train_every_layer(loss, classes).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{pair}_backward does not reach training"


# ------------------------------------------------------------------------------------------------------ user models


def _user_model():
    g = torch.Generator().manual_seed(0)
    return Sequential(Flatten(), Linear(36, 16, generator=g), Swish(), Scale(16), Dropout(0.2),
                      Linear(16, 3, generator=g))


def test_a_user_model_trains_resumes_and_stops_early_like_a_built_in_one(tmp_path):
    config = BASE.replace(epochs=4, patience=10)
    straight = train(config, model=_user_model(), data=toy_data(), out_dir=tmp_path / "straight")
    assert straight.summary["step"] == "FastStep" and straight.test_accuracy > 0.8
    assert straight.summary["model"]["kind"] == "python" and "Swish()" in straight.summary["model"]["repr"]
    with pytest.raises(KeyboardInterrupt):
        train(config, model=_user_model(), data=toy_data(), out_dir=tmp_path / "resumed",
              callback=Recorder(stop_after=2))
    resumed = train(config, model=_user_model(), data=toy_data(), out_dir=tmp_path / "resumed", resume=True)
    assert losses(resumed.history) == losses(straight.history)
    assert_same_weights(resumed.model.state_dict(), straight.model.state_dict())
    with pytest.raises(CheckpointError, match="passed to nnbackprop.train"):
        load_model(tmp_path / "straight")


# ------------------------------------------------------------------------------------------------------ faults


def test_an_unwritable_output_folder_stops_the_run_before_any_data_is_read(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=r"output folder .*file/run: .*\(ENOTDIR\)"):
        train(BASE, data=None, out_dir=blocker / "run")  # data=None: it would be loaded, and fail, only after


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from nnbackprop import files

    train(BASE.replace(epochs=1), data=toy_data(), out_dir=tmp_path)
    before = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    real_replace = files.os.replace

    def full_disk(source, target):
        if str(target).endswith(CHECKPOINT_FILE):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(WriteError, match=r"cannot write .*checkpoint.pt: No space left on device \(ENOSPC\)"):
        train(BASE.replace(epochs=2), data=toy_data(), out_dir=tmp_path, resume=True)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == before["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_temporary_files_of_a_killed_run_are_removed_when_it_resumes(tmp_path):
    train(BASE.replace(epochs=1), data=toy_data(), out_dir=tmp_path)
    stale = tmp_path / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(BASE.replace(epochs=2), data=toy_data(), out_dir=tmp_path, resume=True)
    assert not stale.exists()


def test_metrics_behind_the_checkpoint_are_repaired_when_the_run_resumes_and_reading_writes_nothing(tmp_path):
    train(BASE.replace(epochs=2), data=toy_data(), out_dir=tmp_path)
    metrics = tmp_path / METRICS_FILE
    full = metrics.read_text()
    metrics.write_text(full.splitlines(keepends=True)[0])  # killed after the checkpoint, before metrics line 2
    load_model(tmp_path)
    assert metrics.read_text() == full.splitlines(keepends=True)[0]  # a reader has no side effect
    train(BASE.replace(epochs=3), data=toy_data(), out_dir=tmp_path, resume=True)
    assert metrics.read_text().startswith(full) and len(metrics.read_text().splitlines()) == 3


@pytest.mark.parametrize("changes, data, message", [
    (dict(shift=6), dict(), r"shift 6 px does not fit toy's 6x6 images: random shifts must stay below 6 px"),
    (dict(), dict(n_test=0), "toy has no test split"),
    (dict(), dict(classes=1), "toy has 1 class; a classifier needs at least two"),
])
def test_settings_that_cannot_fit_the_data_are_refused_before_training(changes, data, message):
    with pytest.raises(ValueError, match=message):
        train(BASE.replace(**changes), data=toy_data(**data), callback=Recorder(stop_after=0))


def test_labels_outside_the_classes_are_refused_before_training():
    data = toy_data()
    data.test.labels[3] = 7
    with pytest.raises(ValueError, match=r"the test split has label 7, outside \[0, 2\] for its 3 classes"):
        train(BASE, data=data)


def test_the_thread_count_is_recorded(tmp_path):
    result = train(BASE.replace(epochs=1), data=toy_data(), out_dir=tmp_path)
    assert result.summary["threads"] == torch.get_num_threads()
    assert load_checkpoint(tmp_path)["run"]["threads"] == torch.get_num_threads()


def test_bfloat16_trains_with_float32_master_weights_and_resumes_exactly(tmp_path):
    """Mixed precision through train(): the layers and the data in bfloat16, the weights the checkpoint keeps and the
    optimizer state in float32, and a resumed run equal to one straight through."""
    config = RESUME.replace(dtype="bfloat16", optimizer="adamw", lr=1e-3, epochs=4)
    straight = train(config, data=toy_data(), out_dir=tmp_path / "straight")
    assert straight.summary["step"] == "FastStep" and next(straight.model.parameters()).dtype == torch.bfloat16
    saved = load_checkpoint(tmp_path / "straight" / CHECKPOINT_FILE)
    assert all(w.dtype == torch.float32 for w in saved["model"].values() if w.is_floating_point())
    state = saved["optimizer"]["state"][0]
    assert state["exp_avg"].dtype == torch.float32 and state["step"].dtype == torch.float32 and state["step"] == 40
    with pytest.raises(KeyboardInterrupt):
        train(config, data=toy_data(), out_dir=tmp_path / "resumed", callback=Recorder(stop_after=2))
    resumed = train(config, data=toy_data(), out_dir=tmp_path / "resumed", resume=True)
    assert losses(resumed.history) == losses(straight.history)
    assert_same_weights(load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["model"], saved["model"])
    assert straight.test_accuracy > 0.6 and resumed.test_accuracy == straight.test_accuracy


# ------------------------------------------------------------------------------------------------------ resume, exactly


class KillAt(TrainCallback):
    """Stops the run in the middle of an epoch, as a kill would (nothing after the last checkpoint is kept)."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def on_step(self, epoch, step, running_loss):
        if (epoch, step) == (self.epoch, self.step):
            raise KeyboardInterrupt


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "simple"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_run_killed_mid_epoch_resumes_bit_for_bit_with_every_optimizer(tmp_path, optimizer, fast):
    config = BASE.replace(epochs=3, optimizer=optimizer, lr=None, weight_decay=1e-3, dropout=0.2, shift=1, flip=True,
                          schedule="cosine", warmup_epochs=1, fast=fast)
    straight = train(config, data=toy_data(), out_dir=tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(config, data=toy_data(), out_dir=tmp_path / "resumed", callback=KillAt(epoch=2, step=5))
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 1
    resumed = train(config, data=toy_data(), out_dir=tmp_path / "resumed", resume=True)
    assert resumed.summary["step"] == ("FastStep" if fast else "SimpleStep")
    assert losses(resumed.history) == losses(straight.history)
    assert_same_weights(resumed.model.state_dict(), straight.model.state_dict())
    a, b = (load_checkpoint(tmp_path / d) for d in ("straight", "resumed"))
    assert_same_weights(a["model"], b["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():
        assert state.keys() == b["optimizer"]["state"][index].keys()
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"{name} of parameter {index}"
    if optimizer != "sgd":
        assert {float(s["step"]) for s in b["optimizer"]["state"].values()} == {30.0}  # 3 epochs of 10 steps
    assert a["scheduler"] == b["scheduler"]
    assert resumed.test_loss == straight.test_loss


# ------------------------------------------------------------------------------------------------------ a user's model


@pytest.mark.parametrize("outputs, classes, loss, need", [
    (5, 2, "ce", "2 outputs, one per class"),
    (13, 10, "ce", "10 outputs, one per class"),
    (2, 2, "bce", "1 output (one logit, --loss bce)"),
])
def test_a_model_whose_outputs_do_not_fit_the_classes_is_refused_before_training(outputs, classes, loss, need):
    g = torch.Generator().manual_seed(0)
    model = Sequential(Flatten(), Linear(36, 8, generator=g), ReLU(), Linear(8, outputs, generator=g))
    recorder = Recorder()
    with pytest.raises(ConfigError) as info:
        train(BASE.replace(loss=loss), model=model, data=toy_data(classes=classes), callback=recorder)
    message = str(info.value)
    assert f"returns outputs of shape ({outputs},) per example, but this data set needs {need}" in message
    assert "\n" not in message and recorder.events == []


def test_a_model_that_does_not_take_the_images_is_refused_before_training():
    model = Sequential(Flatten(), Linear(50, 3))
    recorder = Recorder()
    with pytest.raises(ConfigError) as info:
        train(BASE, model=model, data=toy_data(), callback=recorder)
    message = str(info.value)
    assert message.startswith("Sequential does not take this data set's images of shape (1, 6, 6): Linear(")
    assert "expected 50 input features" in message and "\n" not in message and recorder.events == []


@pytest.mark.parametrize("model, words", [
    ("x", "got a str"),
    (torch.nn.Linear(3, 3), "got a Linear (a torch.nn model: write it with nnbackprop's layers"),
])
def test_a_model_that_is_not_an_nnbackprop_module_is_one_line(model, words):
    with pytest.raises(ConfigError) as info:
        train(BASE, model=model, data=toy_data())
    assert "train(model=...) takes an nnbackprop Module" in str(info.value) and words in str(info.value)
    assert "\n" not in str(info.value)


def test_a_mixed_precision_run_with_batch_norm_trains_resumes_and_evaluates(tmp_path):
    config = BASE.replace(epochs=3, dtype="bfloat16", batchnorm=True, dropout=0.1, optimizer="adam", lr=1e-2,
                          patience=5)
    data = toy_data()
    straight = train(config, data=data, out_dir=tmp_path / "straight")
    assert straight.summary["step"] == "FastStep" and straight.test_accuracy > 0.8
    with pytest.raises(KeyboardInterrupt):
        train(config, data=toy_data(), out_dir=tmp_path / "resumed", callback=KillAt(epoch=2, step=5))
    resumed = train(config, data=toy_data(), out_dir=tmp_path / "resumed", resume=True)
    assert losses(resumed.history) == losses(straight.history)
    a, b = (load_checkpoint(tmp_path / d) for d in ("straight", "resumed"))
    assert_same_weights(a["model"], b["model"])
    assert all(a["model"][name].dtype == torch.float32 for name, _ in straight.model.named_parameters())
    model, loss_fn, _ = load_model(tmp_path / "straight")
    assert next(model.parameters()).dtype == torch.bfloat16
    test = make_loader(data.test, 1000, mean=data.mean, std=data.std, dtype=torch.bfloat16)
    assert evaluate(model, loss_fn, test).accuracy == straight.test_accuracy


def test_the_threads_setting_sets_the_run_s_threads_and_restores_them(tmp_path):
    before = torch.get_num_threads()
    threads = 2 if before == 1 else 1
    seen = []

    class Watch(TrainCallback):
        def on_epoch_end(self, metrics):
            seen.append(torch.get_num_threads())

    result = train(BASE.replace(epochs=2, threads=threads), data=toy_data(), out_dir=tmp_path, callback=Watch())
    assert seen == [threads, threads] and result.summary["threads"] == threads
    assert load_checkpoint(tmp_path)["run"]["threads"] == threads and result.summary["config"]["threads"] == threads
    assert torch.get_num_threads() == before

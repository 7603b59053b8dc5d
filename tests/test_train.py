"""The training loop: the reference step against torch.autograd + torch.optim, repeatability, resume, early stopping,
the divergence guard, checkpoints that do not fit, and short runs on real Fashion-MNIST."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nnbackprop.augment import augment_batch
from nnbackprop.checkpoint import CheckpointError, load_checkpoint
from nnbackprop.data import SYSTEM_FASHION_MNIST, DataSplits, TensorData, load_dataset, make_loader
from nnbackprop.losses import CrossEntropyLoss
from nnbackprop.model import mlp, to_torch
from nnbackprop.optim import SGD
from nnbackprop.train import (CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, NonFiniteLossError, SimpleStep,
                              TrainCallback, TrainConfig, evaluate, load_model, num_correct, train)

# A small run: 3 classes of 6x6 images, 300 training examples, 10 steps per epoch.
BASE = TrainConfig(dataset="toy", hidden=(16,), epochs=3, batch_size=32, lr=0.05, device="cpu", log_every=4)


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


# ------------------------------------------------------------------------------------------------------ the step


@pytest.mark.parametrize("nesterov, weight_decay", [(False, 0.0), (True, 1e-2)])
def test_simple_step_matches_autograd_and_torch_sgd(nesterov, weight_decay):
    torch.manual_seed(0)
    model = mlp(12, [8, 8], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = to_torch(model)
    step = SimpleStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov,
                                                     weight_decay=weight_decay))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov,
                                weight_decay=weight_decay)
    for _ in range(3):
        x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 3, (10,))
        loss_sum, correct = step(x, y)
        optimizer.zero_grad()
        out = reference(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        optimizer.step()
        assert torch.allclose(loss_sum, torch.nn.functional.cross_entropy(out, y) * 10, rtol=1e-12)
        assert int(correct) == int((out.argmax(1) == y).sum())
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, rtol=1e-10, atol=1e-12), key


def test_grad_hook_sees_one_flat_gradient_and_its_changes_count():
    model = mlp(5, [4], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []

    def hook(flat):
        seen.append(flat.clone())
        flat.mul_(0.5)

    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    SimpleStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=1.0), hook)(x, y)
    twin = mlp(5, [4], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    SimpleStep(twin, CrossEntropyLoss(), SGD(twin.parameters(), lr=0.5))(x, y)
    (flat,) = seen  # halving the gradient at lr 1 is the step at lr 0.5
    assert flat.shape == (sum(p.data.numel() for p in model.parameters()),)
    assert_same_weights(model.state_dict(), twin.state_dict())


def test_num_correct():
    assert int(num_correct(torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]]), torch.tensor([1, 1, 1]))) == 2
    assert int(num_correct(torch.tensor([[0.5], [-0.5], [2.0]]), torch.tensor([1, 0, 0]))) == 2
    assert int(num_correct(torch.tensor([0.5, -0.5]), torch.tensor([0, 0]))) == 1


# ------------------------------------------------------------------------------------------------------ augmentation


def test_augment_shift_moves_images_and_repeats():
    x = torch.arange(2 * 3 * 7 * 7, dtype=torch.float32).view(2, 3, 7, 7)
    out = augment_batch(x, shift=2, generator=torch.Generator().manual_seed(0))
    again = augment_batch(x, shift=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    for image, moved in zip(x, out):  # each output is the input translated by one (dy, dx) in [-2, 2]^2
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(moved[:, 2:5, 2:5], image[:, 2 + dy:5 + dy, 2 + dx:5 + dx])]
        assert len(matches) == 1
    assert augment_batch(x, generator=torch.Generator()) is x


def test_augment_flip_mirrors_about_half_the_images():
    x = torch.randn(400, 1, 4, 5)
    out = augment_batch(x, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ unchanged).all()) and 150 < int(flipped.sum()) < 250


# ------------------------------------------------------------------------------------------------------ the loop


def test_train_learns_and_writes_its_files(tmp_path):
    result = train(BASE.replace(epochs=4, dropout=0.1), toy_data(), out_dir=tmp_path)
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
    train(BASE.replace(epochs=1), toy_data(), callback=recorder)
    assert recorder.events == [("begin", 1, 10), ("loss", 1, 4), ("loss", 1, 8), ("loss", 1, 10), ("end", 1)]


def test_seed_repeats_bit_for_bit():
    config = BASE.replace(dropout=0.2, shift=1, flip=True, batchnorm=True, epochs=2)
    first, second = train(config, toy_data()), train(config, toy_data())
    assert_same_weights(first.model.state_dict(), second.model.state_dict())
    assert losses(first.history) == losses(second.history)
    other = train(config.replace(seed=1), toy_data())
    assert not torch.equal(other.model.state_dict()["1.weight"], first.model.state_dict()["1.weight"])


RESUME = BASE.replace(epochs=6, dropout=0.2, batchnorm=True, shift=1, flip=True, nesterov=True, weight_decay=1e-3,
                      schedule="cosine", warmup_epochs=1, patience=5)


@pytest.mark.parametrize("how, fast", [("interrupted", True), ("interrupted", False), ("extended", True)])
def test_resume_equals_training_straight_through(tmp_path, how, fast):
    """3 epochs, then resume for 3 more == 6 epochs at once: same weights, optimizer state and metrics, bit for bit."""
    config = (RESUME if how == "interrupted" else RESUME.replace(schedule="constant")).replace(fast=fast)
    straight = train(config, toy_data(), out_dir=tmp_path / "straight")
    if how == "interrupted":  # stopped after epoch 3 (as by Ctrl-C), continued with the same settings
        with pytest.raises(KeyboardInterrupt):
            train(config, toy_data(), out_dir=tmp_path / "resumed", callback=Recorder(stop_after=3))
    else:  # a finished 3-epoch run, extended to 6 epochs
        train(config.replace(epochs=3), toy_data(), out_dir=tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["epoch"] == 3
    recorder = Recorder()
    resumed = train(config, toy_data(), out_dir=tmp_path / "resumed", resume=True, callback=recorder)
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
    train(BASE.replace(epochs=1), toy_data(), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"other settings: hidden \(16,\) there, \(32,\) here") as info:
        train(BASE.replace(epochs=2, hidden=(32,)), toy_data(), out_dir=tmp_path, resume=True)
    assert str(tmp_path / CHECKPOINT_FILE) in str(info.value)
    with pytest.raises(CheckpointError, match="other data"):
        train(BASE.replace(epochs=2), toy_data(n_train=200), out_dir=tmp_path, resume=True)


def test_resume_refuses_to_stretch_a_cosine_schedule(tmp_path):
    train(BASE.replace(epochs=2, schedule="cosine"), toy_data(), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"schedule cannot continue.*checkpoint's epochs \(2\)"):
        train(BASE.replace(epochs=4, schedule="cosine"), toy_data(), out_dir=tmp_path, resume=True)


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    train(BASE.replace(epochs=1), toy_data(), out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(BASE.replace(epochs=1), toy_data(), out_dir=tmp_path)
    train(BASE.replace(epochs=1, seed=3), toy_data(), out_dir=tmp_path, overwrite=True)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["config"]["seed"] == 3


def test_early_stopping_restores_the_weights_of_the_lowest_validation_loss(tmp_path):
    data = toy_data(n_train=64, n_val=200, learnable=False)  # random labels: fitting them makes validation worse
    config = BASE.replace(hidden=(128,), lr=0.2, batch_size=16, epochs=30, patience=3)
    result = train(config, data, out_dir=tmp_path)
    val_losses = [m.val_loss for m in result.history]
    assert result.stopped_early and len(result.history) < 30
    assert result.best_epoch == 1 + val_losses.index(min(val_losses)) == len(result.history) - 3
    assert val_losses[-1] > min(val_losses)
    val_loader = make_loader(data.val, 1000, mean=data.mean, std=data.std)
    assert evaluate(result.model, CrossEntropyLoss(), val_loader)[0] == pytest.approx(min(val_losses), rel=1e-12)
    best = load_checkpoint(tmp_path / CHECKPOINT_FILE)["best_model"]
    assert_same_weights(result.model.state_dict(), best)
    assert_same_weights(load_model(tmp_path / CHECKPOINT_FILE)[0].state_dict(), best)


def test_early_stopping_needs_a_validation_split():
    with pytest.raises(ValueError, match="validation split"):
        train(BASE.replace(patience=2), toy_data(n_val=0))


def test_divergence_stops_with_the_epoch_and_steps_and_keeps_the_last_good_checkpoint(tmp_path):
    # The lr grows 1e4-fold after every epoch (a "step" schedule with gamma > 1): epoch 1 is fine, then it blows up.
    config = BASE.replace(epochs=5, schedule="step", step_epochs=1, gamma=1e4, momentum=0.0, lr=0.01)
    with pytest.raises(NonFiniteLossError) as info:
        train(config, toy_data(), out_dir=tmp_path)
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
        train(BASE.replace(lr=1e30), toy_data())


def test_model_weights_that_do_not_fit_their_configuration(tmp_path):
    train(BASE.replace(epochs=1), toy_data(), out_dir=tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["hidden"] = (20,)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="model weights do not fit") as info:
        load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("loss, classes", [("bce", 2), ("mse", 3)])
def test_other_losses_train(loss, classes):
    result = train(BASE.replace(loss=loss, epochs=4, lr=0.2 if loss == "mse" else 0.05), toy_data(classes=classes))
    assert result.test_accuracy > 0.8
    assert result.model[-1].out_features == (1 if loss == "bce" else classes)


def test_bce_needs_two_classes():
    with pytest.raises(ValueError, match="two-class"):
        train(BASE.replace(loss="bce"), toy_data(classes=3))


@pytest.mark.parametrize("changes, message", [
    (dict(lr=-0.1), "lr must be a finite number > 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(hidden=(16, 0)), "hidden sizes"),
    (dict(dropout=1.0), "dropout"),
    (dict(nesterov=True, momentum=0.0), "nesterov"),
    (dict(schedule="linear"), "unknown schedule"),
    (dict(lr=math.nan, epochs=0), "epochs must.*; lr must"),
])
def test_config_errors_name_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        BASE.replace(**changes)


def test_unknown_device_and_missing_cuda():
    with pytest.raises(ValueError, match="unknown device"):
        train(BASE.replace(device="gpu"), toy_data())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(BASE.replace(device="cuda"), toy_data())


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
    result = train(config, fashion_slice)
    assert result.test_accuracy > 0.7, result.history
    assert result.summary["data"]["source"] == str(SYSTEM_FASHION_MNIST)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fast", [True, False])
def test_cuda_run_learns_and_resumes(tmp_path, fast):
    config = BASE.replace(device="cuda", epochs=4, dropout=0.1, shift=1, flip=True, fast=fast)
    straight = train(config, toy_data(), out_dir=tmp_path / "straight")
    assert straight.test_accuracy > 0.9 and straight.summary["device"].startswith("cuda")
    with pytest.raises(KeyboardInterrupt):
        train(config, toy_data(), out_dir=tmp_path / "resumed", callback=Recorder(stop_after=2))
    resumed = train(config, toy_data(), out_dir=tmp_path / "resumed", resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-6), key

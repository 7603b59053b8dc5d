"""Using a trained model: class probabilities, predictions for image files prepared as in training, and evaluation on
the training data set's test split or on another image folder, with per-class precision, recall and confusion."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from datagen import write_image_folder
from PIL import Image

from nnbackprop.checkpoint import load_checkpoint
from nnbackprop.config import TrainConfig
from nnbackprop.datasets import DatasetNotFoundError, ImageFolderData
from nnbackprop.inference import (Evaluation, class_probabilities, evaluate_checkpoint, image_folder_split, load_model,
                                  predict, predict_files, ranked, read_images)
from nnbackprop.console import format_predictions
from nnbackprop.loaders import make_loader
from nnbackprop.training import train

CLASSES = ("cats", "dogs")  # write_image_folder: cats are black, dogs grey


def train_on_folder(root: Path, out: Path, **settings) -> dict:
    """A tiny MLP trained for 3 epochs on the image folder ``root`` (it learns black vs grey perfectly); the summary."""
    config = TrainConfig(dataset=f"imagefolder:{root}", image_size=8, hidden=(8,), epochs=3, val_size=10,
                         batch_size=10, device="cpu", **settings)
    return train(config, out_dir=out).summary


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pets")
    write_image_folder(root, 30, classes=CLASSES)
    return root


@pytest.fixture(scope="module")
def run(pets, tmp_path_factory) -> tuple[Path, dict]:
    """(run folder, summary) of a model trained with cross-entropy on :func:`pets`."""
    out = tmp_path_factory.mktemp("run")
    return out, train_on_folder(pets, out)


@pytest.fixture(scope="module")
def bce_run(pets, tmp_path_factory) -> tuple[Path, dict]:
    """The same with one logit (``loss = "bce"``)."""
    out = tmp_path_factory.mktemp("bce")
    return out, train_on_folder(pets, out, loss="bce")


# ------------------------------------------------------------------------------------------------------ probabilities


def test_class_probabilities_of_logits_are_their_softmax():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    p = class_probabilities(logits)
    torch.testing.assert_close(p, torch.softmax(logits, 1))
    torch.testing.assert_close(p.sum(1), torch.ones(5))


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_class_probabilities_of_one_logit_are_sigmoid_and_its_complement(shape):
    logits = torch.linspace(-3, 3, 6).reshape(shape)
    p = class_probabilities(logits)
    assert p.shape == (6, 2)
    torch.testing.assert_close(p[:, 1], torch.sigmoid(logits.reshape(-1)))
    torch.testing.assert_close(p.sum(1), torch.ones(6))


def test_ranked_orders_by_probability_and_defaults_to_three():
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.15, 0.05]])
    names = ["a", "b", "c", "d"]
    top = ranked(probabilities, names)
    assert [[name for name, _ in row] for row in top] == [["d", "c", "b"], ["a", "c", "b"]]
    assert top[0][0][1] == pytest.approx(float(probabilities[0, 3]))
    assert [len(row) for row in ranked(probabilities, names, top=1)] == [1, 1]
    assert [len(row) for row in ranked(probabilities, names, top=10)] == [len(names)] * 2
    assert [len(row) for row in ranked(probabilities[:, :2], names[:2])] == [2, 2]
    with pytest.raises(ValueError, match="at least 1"):
        ranked(probabilities, names, top=0)


# ------------------------------------------------------------------------------------------------------ predict


def sample_files(root: Path, per_class: int = 3) -> list[tuple[Path, int]]:
    return [(root / name / f"{i}.png", label) for label, name in enumerate(CLASSES) for i in range(per_class)]


@pytest.mark.parametrize("which", ["run", "bce_run"])
def test_predict_files_names_the_right_class_and_probabilities_sum_to_one(request, pets, which):
    out, _ = request.getfixturevalue(which)
    files = sample_files(pets)
    predictions = predict_files(out, [path for path, _ in files], device="cpu", top=len(CLASSES))
    assert [p["image"] for p in predictions] == [str(path) for path, _ in files]
    for prediction, (_, label) in zip(predictions, files):
        top = prediction["top"]
        assert sorted(t["class"] for t in top) == sorted(CLASSES)
        assert math.isclose(sum(t["probability"] for t in top), 1.0, abs_tol=1e-5)
        assert top[0]["class"] == CLASSES[label] and top[0]["probability"] > 0.5
        assert top[0]["probability"] >= top[1]["probability"]


def test_predict_prepares_files_exactly_as_the_training_loader(run, pets):
    """A file given to predict gets the probabilities the model gives the same file in a training-style batch."""
    out, _ = run
    model, _, checkpoint = load_model(out, "cpu")
    info = checkpoint["data"]
    files = sample_files(pets, per_class=5)
    samples = [(str(path), label) for path, label in files]
    loader = make_loader(ImageFolderData(samples, info["input_shape"][1]), 100, mean=info["mean"], std=info["std"],
                         num_workers=0)
    (x, _), = list(loader)
    expected = class_probabilities(model(x))
    images = read_images([path for path, _ in files], info)
    assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == tuple(info["input_shape"])
    torch.testing.assert_close(predict(model, images, info, batch_size=3), expected)


def test_predict_reads_any_size_and_mode(run, tmp_path):
    out, _ = run
    info = load_checkpoint(out / "checkpoint.pt")["data"]
    big_grey = tmp_path / "big.jpg"
    Image.new("L", (300, 120), 0).save(big_grey)
    tiny_palette = tmp_path / "tiny.gif"
    Image.new("P", (3, 5), 0).save(tiny_palette)
    images = read_images([big_grey, tiny_palette], info)
    assert tuple(images.shape) == (2, *info["input_shape"])
    assert [p["top"][0]["class"] for p in predict_files(out, [big_grey, tiny_palette], device="cpu")] == ["cats"] * 2


def test_read_images_names_a_missing_or_unreadable_file(run, tmp_path):
    info = load_checkpoint(run[0] / "checkpoint.pt")["data"]
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.png'} not found"):
        read_images([tmp_path / "nope.png"], info)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"{broken}: cannot read this image"):
        read_images([broken], info)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_images([tmp_path], info)


# ------------------------------------------------------------------------------------------------------ evaluate


def test_evaluation_metrics_follow_from_the_confusion_matrix():
    confusion = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]
    e = Evaluation("c.pt", 2, 1, "toy", "all", "here", ["a", "b", "c"], 0.5, 8 / 11, confusion)
    assert e.num_examples == 11 and e.support == [6, 5, 0]
    assert e.precision == [5 / 7, 3 / 4, None]  # nothing was predicted as c
    assert e.recall == [5 / 6, 3 / 5, None]  # there is no c
    data = json.loads(json.dumps(e.to_dict()))
    assert data["confusion"] == confusion and data["num_examples"] == 11
    assert data["per_class"][1] == {"class": "b", "precision": 3 / 4, "recall": 3 / 5, "support": 5}


def test_evaluate_on_the_training_test_split_gives_the_training_result(run):
    out, summary = run
    e = evaluate_checkpoint(out, device="cpu")
    assert e.split == "test" and e.classes == list(CLASSES)
    assert e.epoch == summary["epochs_trained"] and e.best_epoch == summary["best_epoch"]
    assert e.num_examples == summary["data"]["sizes"]["test"]
    assert e.accuracy == summary["test_accuracy"]
    assert e.loss == pytest.approx(summary["test_loss"], rel=1e-5, abs=1e-7)
    assert sum(e.confusion[i][i] for i in range(len(CLASSES))) == round(e.accuracy * e.num_examples)


def test_naming_the_training_folder_is_the_same_as_the_default(run, pets):
    out, _ = run
    assert evaluate_checkpoint(out, dataset=f"imagefolder:{pets}/", device="cpu") == \
        evaluate_checkpoint(out, device="cpu")


def test_evaluate_on_another_folder_gives_its_confusion_matrix(run, tmp_path):
    """Every image of the other folder is black, the colour of cats: all are predicted cats, dogs included."""
    out, _ = run
    other = tmp_path / "other"
    write_image_folder(other, 7, classes=("cats",))
    shutil.copytree(other / "cats", other / "dogs")
    (other / "dogs" / "0.png").unlink()
    e = evaluate_checkpoint(out, dataset=f"imagefolder:{other}", device="cpu")
    cats, dogs = 7, 6
    assert e.split == "all" and e.source == str(other) and e.dataset == f"imagefolder:{other}"
    assert e.confusion == [[cats, 0], [dogs, 0]]
    assert e.support == [cats, dogs] and e.accuracy == cats / (cats + dogs)
    assert e.precision == [cats / (cats + dogs), None] and e.recall == [1.0, 0.0]


def test_evaluate_on_a_folder_with_train_and_test_uses_its_test_split(run, tmp_path):
    out, _ = run
    write_image_folder(tmp_path / "split" / "train", 2, classes=CLASSES)
    write_image_folder(tmp_path / "split" / "test", 4, classes=CLASSES)
    e = evaluate_checkpoint(out, dataset=f"imagefolder:{tmp_path / 'split'}", device="cpu")
    assert e.split == "test" and e.support == [4, 4] and e.accuracy == 1.0


def test_image_folder_split_reads_as_the_model_sees(tmp_path):
    write_image_folder(tmp_path / "f", 3, classes=CLASSES)
    images, classes, split = image_folder_split(tmp_path / "f", (1, 5, 5))
    assert classes == list(CLASSES) and split == "all" and len(images) == 6
    assert images.grayscale and tuple(images[0][0].shape) == (1, 5, 5)


def test_a_class_mismatch_names_both_lists(run, tmp_path):
    out, _ = run
    write_image_folder(tmp_path / "zoo", 2, classes=("cat", "dog", "fox"))
    with pytest.raises(ValueError) as error:
        evaluate_checkpoint(out, dataset=f"imagefolder:{tmp_path / 'zoo'}", device="cpu")
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert str(list(CLASSES)) in message and "['cat', 'dog', 'fox']" in message and str(tmp_path / "zoo") in message


def test_a_missing_or_empty_folder_is_one_line(run, tmp_path):
    out, _ = run
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        evaluate_checkpoint(out, dataset=f"imagefolder:{tmp_path / 'nothing'}", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as error:
        evaluate_checkpoint(out, dataset=f"imagefolder:{tmp_path / 'empty'}", device="cpu")
    assert len(str(error.value).splitlines()) == 1 and str(tmp_path / "empty") in str(error.value)


# ------------------------------------------------------------------------------------------------------ readers


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time, and the folders' modification times (a
    file written and removed again shows there)."""
    return {str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
            for path in [folder, *sorted(folder.rglob("*"))]}


def test_reading_a_run_changes_nothing_in_its_folder(run, pets, tmp_path):
    """load_model, evaluate_checkpoint and predict_files read: even a run whose metrics are behind its checkpoint and
    that has a killed writer's temporary file is left as it is, byte for byte and time for time (the next training
    run repairs it)."""
    original, _ = run
    out = tmp_path / "run"
    shutil.copytree(original, out)
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    before, data_before = _snapshot(out), _snapshot(pets)
    load_model(out)
    load_model(out / "checkpoint.pt")
    evaluate_checkpoint(out, device="cpu")
    evaluate_checkpoint(out, dataset=f"imagefolder:{pets}", device="cpu")
    predict_files(out, [pets / "cats" / "0.png"], device="cpu")
    assert _snapshot(out) == before
    assert _snapshot(pets) == data_before


def test_predict_warns_of_an_image_unlike_the_training_images(tmp_path):
    """Grey images on black backgrounds (as MNIST's); then a colour photo-like image and a grey one without a black
    background are flagged, saying how they differ, and an image like the training ones is not."""
    root = tmp_path / "grey"
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(30):
            image = torch.zeros(16, 16, dtype=torch.uint8)
            image[4:12, 4:12] = torch.randint(60 + 100 * k, 100 + 100 * k, (8, 8), generator=g, dtype=torch.uint8)
            Image.fromarray(image.numpy(), "L").save(root / name / f"{i}.png")
    out = tmp_path / "run"
    train(TrainConfig(dataset=f"imagefolder:{root}", image_size=16, grayscale=True, hidden=(8,), epochs=1,
                      val_size=10, batch_size=10, device="cpu"), out_dir=out)
    colour = tmp_path / "colour.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB").save(colour)
    no_background = tmp_path / "no_background.png"
    Image.new("L", (16, 16), 120).save(no_background)
    alike = root / CLASSES[1] / "3.png"
    found = {Path(p["image"]).name: p["unlike"] for p in predict_files(out, [colour, no_background, alike])}
    assert "a colour image, read in grey for a model trained on grey images" in found["colour.png"]
    assert any("share of black pixels, 0.00, is outside" in phrase for phrase in found["no_background.png"])
    assert found["3.png"] == []
    printed = format_predictions(predict_files(out, [colour, alike]))
    assert printed.count("\n  warning: unlike the training images (a colour image") == 1

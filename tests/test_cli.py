"""The command line: ``nnbackprop train`` and ``evaluate`` on small generated idx files, ``gradcheck``; bad arguments
and bad input give one line and exit 2."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torchvision
from datagen import write_fake_mnist, write_image_folder
from PIL import Image

from conftest import ROOT, SUBPROCESS_TIMEOUT_S, subprocess_env

from nnbackprop import gradcheck
from nnbackprop.cli import main

SMALL = ["--hidden", "16", "--batch-size", "50", "--val-size", "50", "--schedule", "constant", "--device", "cpu",
         "--quiet"]


@pytest.fixture
def mnist_dir(tmp_path, monkeypatch):
    """Fake MNIST idx files (300 train, 50 test) in tmp_path/data; the default data cache is an empty directory."""
    monkeypatch.setenv("NNBACKPROP_DATA", str(tmp_path / "empty-cache"))
    write_fake_mnist(tmp_path / "data")
    return tmp_path / "data"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_evaluate(tmp_path, mnist_dir, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "2",
                         "--out", str(out_dir), *SMALL)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"data: mnist from {mnist_dir}: 250 train / 50 val / 50 test")
    assert lines[1].startswith("model: MLP 784-16-10 (relu, dropout 0.2), 12,730 parameters")
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and epoch_lines[0].startswith("epoch 1/2 | train loss ")
    assert " | val loss " in epoch_lines[0] and epoch_lines[0].endswith("samples/s")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert f"test loss {summary['test_loss']:.4f} accuracy {100 * summary['test_accuracy']:.2f}%" in out
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 2

    code, out, err = run(capsys, "evaluate", str(out_dir / "checkpoint.pt"), "--device", "cpu")
    assert code == 0, err
    assert f"loss {summary['test_loss']:.4f} accuracy {100 * summary['test_accuracy']:.2f}%" in out
    assert "50 examples" in out


def test_resume_from_the_command_line(tmp_path, mnist_dir, capsys):
    args = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"), *SMALL]
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    code, out, err = run(capsys, *args, "--epochs", "2")
    assert code == 2 and "already exists" in err and "--resume" in err
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 0, err
    assert "resuming" in out and "epoch 1/2" not in out and "epoch 2/2" in out
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume", "--hidden", "8")
    assert code == 2 and "other settings: hidden (16,) there, (8,) here" in err and len(err.splitlines()) == 1


def test_resume_takes_the_runs_own_settings_and_changes_only_those_given(tmp_path, mnist_dir, capsys):
    out_dir = tmp_path / "run"
    first = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--out", str(out_dir), *SMALL,
             "--schedule", "cosine", "--dropout", "0.1", "--epochs", "2"]
    assert run(capsys, *first)[0] == 0
    code, out, err = run(capsys, "train", "--out", str(out_dir), "--resume", "--quiet")
    assert code == 0, err
    assert "resuming" in out and "after epoch 2" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["config"]["dropout"] == 0.1 and summary["config"]["epochs"] == 2
    code, out, err = run(capsys, "train", "--out", str(out_dir), "--resume", "--epochs", "3")
    assert code == 2 and "cosine schedule was laid out for 2 epochs" in err


def test_divergence_is_one_line_with_a_hint(tmp_path, mnist_dir, capsys):
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--lr", "1e30",
                         "--out", str(tmp_path / "run"), *SMALL)
    assert code == 1 and len(err.splitlines()) == 1
    assert "non-finite in epoch 1, step" in err and "--lr" in err


def test_plot_writes_curves_and_diagnostics(tmp_path, mnist_dir, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib")
    args = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "2", "--plot", *SMALL]
    code, out, err = run(capsys, *args, "--out", str(tmp_path / "run"), "--diagnostics", "off")
    assert code == 0, err
    curves = [tmp_path / "run" / name for name in ("loss.png", "accuracy.png", "lr.png")]
    assert out.splitlines()[-1] == "plots: " + ", ".join(str(p) for p in curves)
    for path in curves:
        assert path.read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "run" / "gradients.png").exists()

    code, out, err = run(capsys, *args, "--out", str(tmp_path / "recorded"))  # diagnostics are on by default
    assert code == 0, err
    written = out.splitlines()[-1].removeprefix("plots: ").split(", ")
    names = ["loss.png", "accuracy.png", "lr.png", "gradients.png", "update_ratio.png", "saturation.png"]
    assert written == [str(tmp_path / "recorded" / name) for name in names]
    assert all((tmp_path / "recorded" / name).read_bytes().startswith(b"\x89PNG") for name in names)


def test_plot_of_a_malformed_layer_record_is_one_line(tmp_path, mnist_dir, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib")
    from nnbackprop import training

    real_train = training.train

    def train_with_a_broken_record(config, **kwargs):
        result = real_train(config, **kwargs)
        (kwargs["out_dir"] / "layers.jsonl").write_text('{"epoch": 1, "step"\n')
        return result

    monkeypatch.setattr(training, "train", train_with_a_broken_record)
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1",
                         "--out", str(tmp_path / "run"), "--plot", *SMALL)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'run' / 'layers.jsonl'}, line 1: not a layer record" in err
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_plot_without_matplotlib_fails_before_training(tmp_path, mnist_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" raise ImportError
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir),
                         "--out", str(tmp_path / "run"), "--plot", *SMALL)
    assert code == 2 and "pip install 'nnbackprop[plot]'" in err and len(err.splitlines()) == 1 and out == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-0.1"], "invalid training configuration: lr must be > 0, got -0.1"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--epochs", "2.5"], "argument --epochs: expected an integer"),
    (["--dataset", "imagenet"], "unknown data set 'imagenet'"),
    (["--hidden", "512,x"], "argument --hidden: expected comma-separated ints such as 512,512"),
    (["--hidden", "512,-3"], "hidden values must each be >= 1, got (512, -3)"),
    (["--dropout", "1"], "dropout must be in [0, 1), got 1.0"),
    (["--nesterov", "--momentum", "0"], "nesterov needs a momentum > 0 (or --no-nesterov)"),
    (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dataset", "mnist"], "MNIST not found. Searched:"),
    (["--dataset", "imagefolder:/nonexistent/cats"], "image folder /nonexistent/cats does not exist"),
    (["--config", "/nonexistent/run.toml"], "config file /nonexistent/run.toml: cannot read it"),
    (["--model", "model.txt"], "model must be PATH.py:FUNCTION"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NNBACKPROP_DATA", str(tmp_path))
    code, out, err = run(capsys, "train", "--out", str(tmp_path / "run"), *argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert err.startswith("nnbackprop")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--device", "cuda", "--out", str(tmp_path))
    assert code == 2 and "CUDA is not available" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage", [b"", b"garbage"])
def test_evaluate_a_damaged_checkpoint(tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(damage)
    code, out, err = run(capsys, "evaluate", str(path))
    assert code == 2 and str(path) in err and "cannot read this checkpoint" in err and len(err.splitlines()) == 1


def test_evaluate_a_missing_checkpoint(tmp_path, capsys):
    code, out, err = run(capsys, "evaluate", str(tmp_path / "nope.pt"))
    assert code == 2 and "nope.pt not found" in err


def test_the_installed_command_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nnbackprop", "train", "--batch-size", "0"], capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "nnbackprop: error: invalid training configuration: batch_size must be >= 1, got 0\n"


def test_output_piped_into_a_reader_that_stops_early_ends_without_a_traceback() -> None:
    command = (f"{sys.executable} -m nnbackprop gradcheck --dtype float32 --layout plain --no-finite-differences "
               "| head -n 1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S, env=subprocess_env())
    assert result.stdout.startswith("gradient check:") and len(result.stdout.splitlines()) == 1
    assert result.stderr == "" and result.returncode == 1


def test_resume_without_a_run(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--resume", "--out", str(tmp_path / "nothing"), "--device", "cpu")
    assert code == 2 and "no run to resume" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------------ gradcheck


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnbackprop", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def test_gradcheck_float64_passes() -> None:
    proc = _run_cli("gradcheck", "--dtype", "float64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"(\d+) passed, 0 failed", last), last
    assert int(last.split()[0]) > 20
    assert "with finite differences" in proc.stdout
    assert "FAIL" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_gradcheck_on_missing_cuda_is_a_one_line_error() -> None:
    proc = _run_cli("gradcheck", "--device", "cuda")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nnbackprop: error: ") and "CUDA is not available" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, code, stream, pattern",
    [
        (["--dtype", "float32", "--no-finite-differences"], 0, "out", r"\n\d+ passed, 0 failed\n$"),
        (["--dtype", "float32", "-v"], 0, "out", r"  loss .* ok\n"),
        (["--device", "tpu9"], 2, "err", r"^nnbackprop: error: [^\n]*'tpu9'[^\n]*\n$"),
    ],
    ids=["float32", "verbose", "unknown-device"],
)
def test_gradcheck_in_process(args: list[str], code: int, stream: str, pattern: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gradcheck", *args]) == code
    captured = capsys.readouterr()
    assert re.search(pattern, captured.out if stream == "out" else captured.err), captured


def test_gradcheck_failure_exits_1_and_shows_the_failing_tensor(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    def one_failure(device: torch.device, dtype: torch.dtype, **kwargs: object) -> list[gradcheck.GradCheckReport]:
        rows = {"broken layer": ("weight", 1.0), "fine layer": ("input", 0.0)}
        return [gradcheck.GradCheckReport(subject, dtype, device, [gradcheck.TensorCheck(name, (2,), err, err, 1e-10)])
                for subject, (name, err) in rows.items()]

    monkeypatch.setattr(gradcheck, "builtin_checks", one_failure)
    assert main(["gradcheck", "--dtype", "float64", "--layout", "plain"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"broken layer .* FAIL\n\s+weight .* FAIL", out), out
    assert out.strip().splitlines()[-1] == "1 passed, 1 failed"


# ------------------------------------------------------------------------------------------------------ --model

MODEL_FILE = '''
import torch
import nnbackprop as nb


class Swish(nb.Module):
    def forward(self, x):
        self.check_input(x)
        s = torch.sigmoid(x)
        self.save_for_backward(x, s)
        return x * s

    def backward(self, dout):
        x, s = self.saved_tensors
        return dout * (s + x * s * (1 - s))


def build(in_features, num_classes, generator):
    return nb.Sequential(nb.Flatten(), nb.Linear(in_features, 16, generator=generator), Swish(),
                         nb.Linear(16, num_classes, generator=generator))


def broken():
    raise RuntimeError("no model today")


def not_a_model():
    return torch.nn.Linear(3, 3)
'''


def test_a_users_model_trains_resumes_and_evaluates_from_the_command_line(tmp_path, mnist_dir, capsys):
    model_file = tmp_path / "net.py"
    model_file.write_text(MODEL_FILE)
    args = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--model", f"{model_file}:build",
            "--out", str(tmp_path / "run"), *SMALL]
    code, out, err = run(capsys, *args, "--epochs", "1")
    assert code == 0, err
    assert f"model: {model_file}:build (Sequential of 4 layers), 12,730 parameters" in out and "FastStep" in out
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 0 and "epoch 2/2" in out, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == {"kind": "file", "spec": f"{model_file}:build", "path": str(model_file)}
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"), "--model", f"{model_file}:build")
    assert code == 0 and f"accuracy {100 * summary['test_accuracy']:.2f}%" in out, err

    moved = tmp_path / "moved.py"
    model_file.rename(moved)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"), "--model", f"{moved}:build")
    assert code == 0 and f"accuracy {100 * summary['test_accuracy']:.2f}%" in out, err


def test_a_checkpoint_never_makes_nnbackprop_import_the_file_it_names(tmp_path, mnist_dir, capsys):
    """A checkpoint is data: evaluate, predict and --resume rebuild a user's model only from a --model given on
    their own command line, and say which file and function the checkpoint records."""
    model_file = tmp_path / "net.py"
    model_file.write_text(MODEL_FILE)
    spec = f"{model_file}:build"
    args = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"), *SMALL]
    assert run(capsys, *args, "--model", spec, "--epochs", "1")[0] == 0
    model_file.write_text(MODEL_FILE + "\nimport pathlib\npathlib.Path(__file__).with_name('ran').touch()\n")
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    for command in (["evaluate", str(tmp_path / "run")], ["predict", str(tmp_path / "run"), str(image)],
                    [*args, "--epochs", "2", "--resume"]):
        code, out, err = run(capsys, *command)
        assert code == 2 and (f"pass --model {spec}" in err or f"resume with --model {spec}" in err), err
        assert len(err.splitlines()) == 1 and not (tmp_path / "ran").exists()
    assert run(capsys, *args, "--epochs", "2", "--resume", "--model", spec)[0] == 0
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("spec, message", [
    ("missing.py:build", "no file"),
    ("net.py:nothing", "has no function nothing"),
    ("net.py:broken", r"broken\(\) raised RuntimeError: no model today"),
    ("net.py:not_a_model", "returned a Linear, not an nnbackprop Module"),
    ("syntax.py:build", "importing .*syntax.py failed: SyntaxError"),
])
def test_a_bad_model_file_is_one_line(tmp_path, mnist_dir, capsys, spec, message):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    (tmp_path / "syntax.py").write_text("def build(:\n")
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--model",
                         str(tmp_path / spec), "--out", str(tmp_path / "run"), *SMALL)
    assert code == 2 and re.search(message, err) and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------- predict, evaluate

PETS = ("cats", "dogs")  # write_image_folder: cats are black, dogs grey


@pytest.fixture(scope="module")
def pets_run(tmp_path_factory):
    """(image folder, run folder): a tiny MLP trained 3 epochs from the command line on cats and dogs."""
    root = tmp_path_factory.mktemp("pets")
    write_image_folder(root, 30, classes=PETS)
    out = tmp_path_factory.mktemp("pets-run")
    assert main(["train", "--dataset", f"imagefolder:{root}", "--image-size", "8", "--hidden", "8", "--epochs", "3",
                 "--val-size", "10", "--batch-size", "10", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    return root, out


PREDICTION = re.compile(r"^(?P<image>.+?): (?P<top>.+)$")


def parse_predictions(out: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """``[(image, [(class, percent), ...]), ...]`` from predict's human output (its warning lines left out)."""
    parsed = []
    for line in out.splitlines():
        if line.startswith("  warning: unlike the training images ("):
            continue
        match = PREDICTION.match(line)
        assert match, line
        pairs = [item.rsplit(" ", 1) for item in match["top"].split(", ")]
        parsed.append((match["image"], [(name, float(p.removesuffix("%"))) for name, p in pairs]))
    return parsed


def test_predict_prints_each_image_with_its_classes_by_name(pets_run, capsys):
    root, out = pets_run
    images = [str(root / "cats" / "0.png"), str(root / "dogs" / "1.png"), str(root / "dogs" / "2.png")]
    code, stdout, err = run(capsys, "predict", str(out / "checkpoint.pt"), *images, "--device", "cpu")
    assert code == 0 and err == "", err
    parsed = parse_predictions(stdout)
    assert [image for image, _ in parsed] == images
    for (image, top), expected in zip(parsed, ["cats", "dogs", "dogs"]):
        assert sorted(name for name, _ in top) == sorted(PETS)  # default: min(3, 2 classes)
        assert top[0][0] == expected and top[0][1] >= top[1][1]
        assert sum(p for _, p in top) == pytest.approx(100, abs=0.11)  # each rounded to 0.1%

    code, stdout, err = run(capsys, "predict", str(out), images[0], "--top", "1")
    assert code == 0 and [len(top) for _, top in parse_predictions(stdout)] == [1]


def test_predict_json(pets_run, capsys):
    root, out = pets_run
    images = [str(root / "dogs" / "3.png"), str(root / "cats" / "4.png")]
    code, stdout, err = run(capsys, "predict", str(out), *images, "--json")
    assert code == 0, err
    document = json.loads(stdout)
    assert [entry["image"] for entry in document] == images
    assert [entry["top"][0]["class"] for entry in document] == ["dogs", "cats"]
    for entry in document:
        assert sum(t["probability"] for t in entry["top"]) == pytest.approx(1, abs=1e-5)


def test_predict_of_a_bad_or_missing_image_is_one_line(pets_run, tmp_path, capsys):
    root, out = pets_run
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is no picture")
    for bad, message in ((broken, "cannot read this image"), (tmp_path / "gone.png", "not found")):
        code, stdout, err = run(capsys, "predict", str(out), str(root / "cats" / "0.png"), str(bad))
        assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
        assert err.startswith("nnbackprop: error: ") and str(bad) in err and message in err
    code, stdout, err = run(capsys, "predict", str(out), str(root / "cats" / "0.png"), "--top", "0")
    assert code == 2 and "--top must be at least 1" in err and len(err.splitlines()) == 1


def test_evaluate_on_another_folder_prints_the_per_class_table(pets_run, tmp_path, capsys):
    """The other folder's dogs are black like cats: the table must show all of them predicted as cats."""
    _, out = pets_run
    other = tmp_path / "other"
    write_image_folder(other, 5, classes=("cats",))
    shutil.copytree(other / "cats", other / "dogs")
    code, stdout, err = run(capsys, "evaluate", str(out), "--dataset", f"imagefolder:{other}", "--device", "cpu")
    assert code == 0, err
    lines = stdout.splitlines()
    assert f"on all images of imagefolder:{other} (10 examples from {other}): loss " in lines[0]
    assert lines[0].endswith("accuracy 50.00%")
    header = lines[2].split()
    assert header[:4] == ["class", "precision", "recall", "support"] and header[-2:] == list(PETS)
    assert lines[3].split() == ["cats", "50.0%", "100.0%", "5", "|", "5", "0"]
    assert lines[4].split() == ["dogs", "-", "0.0%", "5", "|", "5", "0"]

    code, stdout, err = run(capsys, "evaluate", str(out), "--dataset", f"imagefolder:{other}", "--json")
    assert code == 0, err
    document = json.loads(stdout)
    assert document["confusion"] == [[5, 0], [5, 0]] and document["accuracy"] == 0.5
    assert [c["precision"] for c in document["per_class"]] == [0.5, None]


def test_evaluate_with_other_classes_is_one_line_naming_both(pets_run, tmp_path, capsys):
    _, out = pets_run
    write_image_folder(tmp_path / "zoo", 2, classes=("cat", "dog", "fox"))
    code, stdout, err = run(capsys, "evaluate", str(out), "--dataset", f"imagefolder:{tmp_path / 'zoo'}")
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1
    assert "trained on classes ['cats', 'dogs']" in err and f"{tmp_path / 'zoo'} has ['cat', 'dog', 'fox']" in err


def test_ten_classes_predict_three_and_evaluate_numbers_the_columns(tmp_path, mnist_dir, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1",
                       "--out", str(out_dir), *SMALL)
    assert code == 0, err
    image = tmp_path / "digit.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)  # colour and any size: read as 28x28 grey
    code, stdout, err = run(capsys, "predict", str(out_dir), str(image))
    assert code == 0, err
    (_, top), = parse_predictions(stdout)
    assert len(top) == 3 and all(name in torchvision.datasets.MNIST.classes for name, _ in top)

    code, stdout, err = run(capsys, "evaluate", str(out_dir))
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    lines = stdout.splitlines()
    assert lines[0].endswith(f"accuracy {100 * summary['test_accuracy']:.2f}%") and "mnist test split" in lines[0]
    assert lines[2].split()[-10:] == [str(i) for i in range(10)]
    rows = lines[3:]
    assert [row.split("|")[0].split()[:2] for row in rows][:2] == [["0", "0"], ["1", "1"]]
    counts = [[int(c) for c in row.split("|")[1].split()] for row in rows]
    assert len(counts) == 10 and sum(map(sum, counts)) == 50
    assert sum(counts[i][i] for i in range(10)) == round(summary["test_accuracy"] * 50)

    code, stdout, err = run(capsys, "evaluate", str(out_dir), "--dataset", "fashion-mnist", "--data-dir",
                            str(mnist_dir))
    assert code == 2 and len(err.splitlines()) == 1 and "'T-shirt/top'" in err and "'0 - zero'" in err


# ------------------------------------------------------------------------------------------------------ one line each


def test_resume_and_overwrite_together_are_refused(tmp_path, mnist_dir, capsys):
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1",
                         "--out", str(tmp_path / "run"), *SMALL, "--resume", "--overwrite")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("nnbackprop: error: --resume continues the run in --out and --overwrite starts it afresh")
    assert not (tmp_path / "run").exists()


def test_options_need_their_full_names(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--epoch", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and err == "nnbackprop: error: unrecognized arguments: --epoch 1\n"
    code, out, err = run(capsys, "evaluate", str(tmp_path), "--batch", "10")
    assert code == 2 and err == "nnbackprop: error: unrecognized arguments: --batch 10\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("fast, message", [
    ([], "FastStep: tf32 and cuda_graph need the model on a CUDA device, it is on cpu"),
    (["--no-fast"], "tf32 need the fast step, which cannot run here (fast=False)"),
])
def test_tf32_on_a_machine_without_cuda_is_one_line(tmp_path, mnist_dir, capsys, fast, message):
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1",
                         "--out", str(tmp_path / "run"), *SMALL, "--tf32", *fast)
    assert code == 2 and err == f"nnbackprop: error: {message}\n"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path, mnist_dir, capsys):
    huge = ",".join(["65536"] * 20)  # the widest layers there may be: about 1 TB with SGD's momentum
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1",
                         "--out", str(tmp_path / "run"), *SMALL, "--hidden", huge)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.match(r"nnbackprop: error: the model has [\d,]+ parameters, which with their gradients "
                    r"and optimizer state need about \d+\.\d GiB, more than the \d+\.\d GiB of cpu; use smaller "
                    "--hidden widths$", err), err


def test_evaluate_with_data_dir_on_an_image_folder_run_is_one_line(pets_run, tmp_path, capsys):
    _, out = pets_run
    code, stdout, err = run(capsys, "evaluate", str(out), "--data-dir", str(tmp_path))
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert "--data-dir finds a named data set (mnist, ...)" in err and "pass --dataset imagefolder:PATH" in err


# ------------------------------------------------------------------------------------------------------ stopping


def _train_process(out, data_dir, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """``nnbackprop train`` in a process of its own (Python's own Ctrl-C handler installed even where the test runner
    ignores SIGINT), its output line by line."""
    launcher = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "from nnbackprop.cli import main; sys.exit(main())")
    command = [sys.executable, "-c", launcher, "train", "--dataset", "mnist", "--data-dir", str(data_dir),
               "--out", str(out), *SMALL, *extra]
    return subprocess.Popen(command, cwd=ROOT, env={**subprocess_env(), "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _wait_for_line(proc: subprocess.Popen, pattern: str) -> None:
    """Read the process's output until a line matches ``pattern`` (or it ends); a process that says nothing for
    five minutes is killed."""
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if re.match(pattern, line):
                return
    finally:
        watchdog.cancel()


def test_sigterm_stops_a_run_with_one_line_saying_how_to_resume_it(tmp_path, mnist_dir):
    from nnbackprop.checkpoint import load_checkpoint

    out = tmp_path / "run"
    proc = _train_process(out, mnist_dir, "--epochs", "100000", "--diagnostics", "off")
    _wait_for_line(proc, r"epoch +1/100000 \| ")
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 143, err
    assert err == f"nnbackprop: terminated (SIGTERM); continue from the last finished epoch with --resume --out {out}\n"
    assert load_checkpoint(out)["epoch"] >= 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


WAITING_MODEL = '''
import pathlib, time
import nnbackprop as nb


def build(in_features, num_classes):
    pathlib.Path(__file__).with_name("building").touch()
    time.sleep(600)
'''


def test_ctrl_c_before_any_checkpoint_gives_no_resume_hint(tmp_path, mnist_dir):
    model_file = tmp_path / "slow.py"
    model_file.write_text(WAITING_MODEL)
    proc = _train_process(tmp_path / "run", mnist_dir, "--model", f"{model_file}:build")
    try:
        for _ in range(3000):  # the model is being built: no epoch, no checkpoint yet
            if (tmp_path / "building").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
    finally:
        code, err = _finish(proc)
    assert code == 130 and err == "nnbackprop: interrupted\n", err


EXITING_MODELS = '''
import sys
import nnbackprop as nb


def exits():
    sys.exit(0)


def interrupted():
    raise KeyboardInterrupt


def too_many(in_features):
    return nb.Sequential(nb.Flatten(), nb.Linear(in_features, 13))


def wrong_input():
    return nb.Sequential(nb.Flatten(), nb.Linear(50, 10))
'''


@pytest.mark.parametrize("source, function, message", [
    ("import sys\nsys.exit(0)\n", "build", r"importing \S+ failed: SystemExit\(0\) \(it called sys.exit; a model file "
     r"must only define the model\)$"),
    (EXITING_MODELS, "exits", r"exits\(\) raised SystemExit\(0\) \(it called sys.exit"),
    (EXITING_MODELS, "too_many", r"returns outputs of shape \(13,\) per example, but this data set needs 10 outputs, "
     r"one per class: give its last layer 10 outputs$"),
    (EXITING_MODELS, "wrong_input", r"does not take this data set's images of shape \(1, 28, 28\): Linear\(.*expected "
     r"50 input features"),
], ids=["exit-at-import", "exit-in-function", "too-many-outputs", "wrong-input"])
def test_a_model_file_that_exits_or_does_not_fit_is_one_line(tmp_path, mnist_dir, capsys, source, function, message):
    (tmp_path / "net.py").write_text(source)
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--model",
                         f"{tmp_path / 'net.py'}:{function}", "--out", str(tmp_path / "run"), *SMALL)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("nnbackprop: error: "), err
    assert re.search(message, err.rstrip("\n")), err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("where", ["import", "function"])
def test_a_keyboard_interrupt_in_a_model_file_gives_no_resume_hint(tmp_path, mnist_dir, capsys, where):
    source = "raise KeyboardInterrupt\n" if where == "import" else EXITING_MODELS
    (tmp_path / "net.py").write_text(source)
    function = "build" if where == "import" else "interrupted"
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--model",
                         f"{tmp_path / 'net.py'}:{function}", "--out", str(tmp_path / "run"), *SMALL)
    assert code == 130 and err == "nnbackprop: interrupted\n", err


@pytest.mark.parametrize("code", ["import nnbackprop", "from nnbackprop.cli import build_parser; build_parser()"])
def test_starting_up_imports_no_heavy_optional_module(code):
    """``import nnbackprop`` and building the command line import torch, not torchvision (its models alone took 1.7 s),
    matplotlib or TensorBoard: each command imports those when it needs them."""
    probe = (f"{code}\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & "
             "{'torchvision', 'matplotlib', 'tensorboard', 'onnx', 'onnxscript'}))")
    result = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_cnn_trains_resumes_evaluates_and_predicts_from_the_command_line(tmp_path, mnist_dir, capsys):
    args = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--arch", "cnn", "--channels", "4,8",
            "--convs-per-stage", "1", "--out", str(tmp_path / "run"), *SMALL, "--hidden", "none"]
    code, out, err = run(capsys, *args, "--epochs", "1")
    assert code == 0, err
    assert "model: CNN 1x28x28 stages 4-8 x 1 convs, classifier 10 (relu, dropout 0.2, batchnorm)" in out
    assert ", FastStep" in out
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 0 and "epoch 2/2" in out, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["arch"] == "cnn" and summary["config"]["batchnorm"] is True
    assert summary["config"]["hidden"] == []
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run"))
    assert code == 0 and f"accuracy {100 * summary['test_accuracy']:.2f}%" in out, err
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    code, out, err = run(capsys, "predict", str(tmp_path / "run"), str(image))
    assert code == 0 and out.startswith(f"{image}: "), err

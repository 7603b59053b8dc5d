"""The benchmark scripts as tools: every option has help, the table is printed once with its headers first, each median
has its spread and noisy rows are named, a user's model runs with ``--model FILE.py:FUNCTION``, the floor counts
exactly the step's matrix products, and the epoch benchmark writes what it has when it is stopped.

The scripts run as subprocesses on tiny models for a few steps; no test looks at a timing's value.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nnbackprop as nb
from conftest import ROOT, subprocess_env
from datagen import write_fake_mnist
from user_layers import Scale

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import harness  # noqa: E402
import report  # noqa: E402

SUMMARY_KEYS = {"median", "p25", "p75", "min", "max", "n"}
USER_MODELS = '''
import nnbackprop as nb
from user_layers import Scale, Swish


def plain(in_features, num_classes, generator):
    return nb.mlp(in_features, [12], num_classes, generator=generator)


def with_user_layers(input_shape, num_classes, generator):
    return nb.Sequential(nb.Flatten(), nb.Linear(input_shape[0] * input_shape[1] * input_shape[2], 12,
                                                 generator=generator),
                         Scale(12), Swish(), nb.Linear(12, num_classes, generator=generator))
'''


def script_env() -> dict[str, str]:
    """:func:`subprocess_env` with ``tests/`` on the path too (the user's model file imports ``user_layers``)."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env["PYTHONPATH"]])
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


def run_script(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=600)


def table_of(stdout: str, first_header: str) -> tuple[list[str], list[str]]:
    """The table's header line and its rows (the lines after the dashed rule, up to the first blank line); the header
    must occur exactly once, directly above its rule, with no row above it."""
    lines = stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.split()[:1] == [first_header]]
    assert len(headers) == 1, f"the table's header should be printed once:\n{stdout}"
    start = headers[0]
    assert set(lines[start + 1].replace(" ", "")) == {"-"}, stdout
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line)
    return lines[start], rows


# ------------------------------------------------------------------------------------------------------------ --help

HELP_RUNNER = '''
import contextlib, io, json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def quick_runs() -> dict[tuple[str, ...], dict]:
    """``--help`` of each script and a few bad command lines, all in one process (they stop before any work, so
    importing torch once is most of their time): ``(script, *args)`` → exit code, stdout, stderr."""
    calls = [("step_benchmark.py", "--help"), ("epoch_benchmark.py", "--help"), ("distributed_benchmark.py", "--help"),
             ("step_benchmark.py", "--model", "nowhere.py:build"), ("step_benchmark.py", "--models", "784-x-10"),
             ("step_benchmark.py", "--input-shape", "1,x"), ("epoch_benchmark.py", "--max-steps", "0"),
             ("distributed_benchmark.py", "--runs", "2", "--steps", "1"),
             ("step_benchmark.py", "--tf32", "--device", "cpu")]
    env = {**script_env(), "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), script_env()["PYTHONPATH"]])}
    argvs = [[str(BENCHMARKS / script), *args] for script, *args in calls]
    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(argvs)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return dict(zip(calls, json.loads(result.stdout.splitlines()[-1])))


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help, by its first name."""
    section = help_text.split("options:\n", 1)[1].split("\n\n", 1)[0]
    blocks = re.split(r"\n(?=  -)", section)
    return {block.split()[0].rstrip(","): block for block in blocks}


@pytest.mark.parametrize("script, defaults, columns", [
    ("step_benchmark.py", {"--steps": "20", "--batch-sizes": "32 128 512 2048", "--input-shape": "1,28,28",
                           "--out": "results/step_benchmark.json"},
     ["ours ms", "eager ms", "compiled ms", "floor ms", "floor+upd ms", "ours/floor", "ours/(floor+upd)"]),
    ("epoch_benchmark.py", {"--repeats": "5", "--batch-size": "128", "--dataset": "fashion-mnist"},
     ["seconds", "vs steps", "vs no diagnostics", "samples/s"]),
    ("distributed_benchmark.py", {"--runs": "1x1 1x2 2x1", "--steps": "30", "--model": "784-512-512-10"},
     ["samples/s", "step ms", "allreduce ms", "share", "speed-up"]),
])
def test_help_explains_every_option_and_column(quick_runs: dict, script: str, defaults: dict[str, str],
                                               columns: list[str]) -> None:
    run = quick_runs[(script, "--help")]
    assert run["code"] == 0, run["stderr"]
    text = run["stdout"]
    blocks = option_blocks(text)
    for name, block in blocks.items():
        described = re.split(r"\s{2,}", block.strip(), maxsplit=1)[1:]  # the invocation has single spaces only
        assert described and described[0].strip(), f"{name} has no help:\n{block}"
        assert block.count("(default:") <= 1, f"{name}: its default is given twice:\n{block}"
    for name, default in defaults.items():
        assert f"(default: {default})" in " ".join(blocks[name].split()), blocks[name]
    epilog = text.split("columns (", 1)[1]
    assert "median ±N%" in epilog and "interquartile range" in epilog and "10%" in epilog
    for column in columns:
        assert re.search(rf"^\s+{re.escape(column)}[\s,]", epilog, re.M), f"column {column} is not explained"


def test_step_help_defines_the_floors(quick_runs: dict) -> None:
    epilog = quick_runs[("step_benchmark.py", "--help")]["stdout"].split("columns (", 1)[1]
    floor = " ".join(epilog.split("floor ms", 1)[1].split("floor+upd ms")[0].split())
    assert "only the step's matrix products" in floor and "dW = doutᵀ x" in floor and "dx = dout W" in floor
    update = " ".join(epilog.split("floor+upd ms", 1)[1].split("eager/ours")[0].split())
    assert "fused SGD-momentum update" in update and "flat parameter, gradient and momentum" in update


@pytest.mark.parametrize("call, message", [
    (("step_benchmark.py", "--model", "nowhere.py:build"), "--model nowhere.py:build: no file nowhere.py"),
    (("step_benchmark.py", "--models", "784-x-10"), "model '784-x-10': expected layer sizes joined by '-'"),
    (("step_benchmark.py", "--input-shape", "1,x"), "'1,x': expected positive sizes joined by ','"),
    (("epoch_benchmark.py", "--max-steps", "0"), "argument --max-steps: '0': expected an integer of at least 1"),
    (("distributed_benchmark.py", "--runs", "2", "--steps", "1"), "'2': expected PROCESSESxTHREADS"),
    (("step_benchmark.py", "--tf32", "--device", "cpu"), "--tf32 times float32 on CUDA"),
])
def test_bad_options_stop_with_one_line(quick_runs: dict, call: tuple[str, ...], message: str) -> None:
    run = quick_runs[call]
    assert run["code"] == 2 and message in run["stderr"].splitlines()[-1], run["stderr"]
    assert "Traceback" not in run["stderr"]


# -------------------------------------------------------------------------------------------------- step benchmark


def test_step_benchmark_of_a_cnn_in_mixed_precision(tmp_path: Path) -> None:
    """A CNN in float32 and bfloat16: every implementation checked against ours after one step (the script stops
    otherwise); no simple row in bfloat16, the floor's update over float32 master weights."""
    out = tmp_path / "step.json"
    result = run_script("step_benchmark.py", "--models", "cnn:3,8,8:4-6:2", "--dtype", "float32", "bfloat16",
                        "--batch-sizes", "4", "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1",
                        "--no-compile", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    header, rows = table_of(result.stdout, "model")
    assert "dtype" in header and [row.split()[2] for row in rows] == ["float32", "bfloat16"]
    float32, bfloat16 = json.loads(out.read_text())["rows"]
    assert float32["floor_left_out"] == bfloat16["floor_left_out"] == ["BatchNorm2d"]
    assert "simple" in float32["timings"] and "simple" not in bfloat16["timings"]
    assert bfloat16["ours_step"] == "FastStep" and bfloat16["eager_over_ours"] > 0
    assert set(bfloat16["checks"]) >= {"eager_default", "eager_foreach", "eager_default+cl", "eager_foreach+cl"}
    assert max(bfloat16["checks"].values()) <= harness.UPDATE_TOLERANCES[torch.bfloat16]
    assert max(float32["checks"].values()) <= 1e-4  # rounding only, far below the tolerance of 1e-3


def test_step_benchmark_with_user_models(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text(USER_MODELS)
    models = str(tmp_path / "models.py")
    out, plot = tmp_path / "step.json", tmp_path / "step.png"
    result = run_script("step_benchmark.py", "--models", "12-8-3", f"{models}:plain", f"{models}:with_user_layers",
                        "--input-shape", "1,3,4", "--num-classes", "3", "--batch-sizes", "4", "8", "--steps", "4",
                        "--warmup", "1", "--rounds", "2", "--threads", "1", "--no-compile", "--out", out,
                        "--plot", plot)
    assert result.returncode == 0, result.stdout + result.stderr
    header, rows = table_of(result.stdout, "model")
    for column in ("ours ms", "simple ms", "eager ms", "best", "floor ms", "floor+upd ms", "eager/ours", "ours/floor",
                   "ours/(floor+upd)"):
        assert column in header
    assert "compiled" not in header and "dtype" not in header  # --no-compile, one dtype
    names = ["12-8-3", "models.py:plain", "models.py:with_user_layers"]
    assert [row.split()[:2] for row in rows] == [[name, batch] for name in names for batch in ("4", "8")]
    for row in rows:
        assert re.search(r" \d+\.\d{3} ±\d+%", row), row  # the ours cell: median ±spread
    assert "models.py:with_user_layers: " in result.stdout and "the floor leaves out Scale" in result.stdout
    assert "no torch.nn equivalent" not in result.stdout  # user layers convert through their own forward

    saved = json.loads(out.read_text())
    assert saved["stopped"] is None and saved["steps"] == 4 and saved["models"][0] == "12-8-3"
    assert len(saved["machine"]["load_average"]) == 3 and len(saved["load_average_end"]) == 3
    assert [(r["model"], r["batch"]) for r in saved["rows"]] == [(n, b) for n in names for b in (4, 8)]
    for row in saved["rows"]:
        assert row["ours_step"] == "FastStep" and "load_average" in row
        for name in ("ours", "floor", "floor+update"):
            assert set(row["timings"][name]) == SUMMARY_KEYS and row["timings"][name]["n"] == 4
            assert row["timings"][name]["p25"] <= row["timings"][name]["median"] <= row["timings"][name]["p75"]
        assert row["ours_over_floor"] > 0 and row["ours_over_floor_update"] > 0
        assert row["update_floor"] in ("fused", "foreach")
    plain, user = saved["rows"][2], saved["rows"][4]
    assert plain["eager_skip"] is None and plain["eager_over_ours"] > 0
    assert plain["eager_best"].removesuffix(harness.CHANNELS_LAST) in harness.EAGER_VARIANTS  # images: +cl too
    assert max(plain["checks"].values()) <= 1e-5 and "simple" in plain["checks"]
    assert user["eager_skip"] is None and user["eager_over_ours"] > 0  # Scale converts through its own forward
    assert max(user["checks"].values()) <= 1e-5 and user["floor_left_out"] == ["Scale"]
    assert user["parameters"] == 12 * 12 + 12 + 12 + 12 * 3 + 3
    if "matplotlib" in result.stderr:
        assert "matplotlib is not installed" in result.stderr and not plot.exists()
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------- the pieces


def test_summary_and_spread() -> None:
    s = report.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert report.spread(s) == pytest.approx(2 / 3)
    assert report.format_time(s) == "3.000 ±33%"
    one = report.summarize([2.5])
    assert report.spread(one) is None and report.format_time(one) == "2.500"
    assert report.format_time(None) == "-"
    with pytest.raises(ValueError):
        report.summarize([])


def timings(median: float, iqr: float, n: int = 9) -> dict:
    return {"median": median, "p25": median - iqr / 2, "p75": median + iqr / 2, "min": 0.0, "max": 9.0, "n": n}


def test_noise_warning_names_each_noisy_row_and_timing() -> None:
    rows = [
        {"name": "quiet", "timings": {"ours": timings(1.0, 0.05), "eager": timings(5.0, 0.5), "none": None}},
        {"name": "noisy", "timings": {"ours": timings(1.0, 0.25), "floor": timings(0.5, 0.02)}, "load_average": 1.5},
        {"name": "one step", "timings": {"ours": timings(1.0, 0.9, n=1)}},
        {"name": "both", "timings": {"ours": timings(1.0, 0.101), "eager": timings(1.0, 0.5)}},
    ]
    lines = report.noise_warnings(rows, lambda row: row["name"], cores=2)
    assert len(lines) == 2, lines  # exactly 10% is not noisy; one sample has no spread
    assert lines[0].startswith("warning: noisy: noisy (load average 1.5): interquartile range ours 25% of the median")
    assert "floor" not in lines[0] and "above 10%" in lines[0]
    assert lines[1].startswith("warning: noisy: both: interquartile range ours 10%, eager 50% of the median")
    loaded = [{**rows[1], "load_average": 3.4}]
    assert report.noise_warnings(loaded, lambda row: row["name"], cores=2)[-1].startswith(
        "note: the load average reached 3.4 on 2 cores")
    assert report.noise_warnings(rows[:1], lambda row: row["name"]) == []


def test_table_prints_its_header_once_then_each_row() -> None:
    lines: list[str] = []
    table = report.Table([report.Column("model", report.key("model"), 10, left=True),
                          report.Column("ms", lambda row: report.format_time(row["t"]), 9),
                          report.Column("ratio", lambda row: report.ratio(row.get("r")))], write=lines.append)
    table.header()
    table.row({"model": "a-b", "t": report.summarize([1.0, 1.1, 1.2]), "r": 1.234})
    table.row({"model": "long-model", "t": None})
    assert lines == ["model              ms  ratio",
                     "----------  ---------  -----",
                     "a-b         1.100 ±5%   1.23",
                     "long-model          -      -"]


def recorded_products(monkeypatch: pytest.MonkeyPatch, model: nb.Module, x: torch.Tensor) -> tuple[list, list]:
    """The (operand shapes) of each matrix product one run of the model's floor makes, and the layers it leaves out."""
    run, left_out = harness.matmul_floor(model, x)
    calls = []
    for name in ("mm", "addmm"):
        original = getattr(torch, name)

        def record(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, *(tuple(a.shape) for a in args[-2:])))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, record)
    run()
    monkeypatch.undo()
    return calls, left_out


def test_floor_has_exactly_the_steps_matrix_products(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nb.mlp(6, [5, 4], 3, flatten=False)
    calls, left_out = recorded_products(monkeypatch, model, torch.randn(2, 6))
    assert left_out == []
    assert calls == [
        ("addmm", (2, 6), (6, 5)), ("addmm", (2, 5), (5, 4)), ("addmm", (2, 4), (4, 3)),  # forward: x Wᵀ + b
        ("mm", (3, 2), (2, 4)), ("mm", (2, 3), (3, 4)),  # last layer: dW = doutᵀ x, dx = dout W
        ("mm", (4, 2), (2, 5)), ("mm", (2, 4), (4, 5)),
        ("mm", (5, 2), (2, 6)),  # first layer: its input is data, no dx
    ]


def test_update_difference_tells_rounding_from_another_step() -> None:
    start = {"w": torch.randn(1000, dtype=torch.float64), "steps": torch.tensor(0)}
    g = torch.randn(1000, dtype=torch.float64)
    ours = {"w": start["w"] - 0.01 * g, "steps": torch.tensor(1)}
    rounded = {"w": ours["w"].float().double(), "steps": torch.tensor(1)}
    twice = {"w": start["w"] - 0.02 * g, "steps": torch.tensor(1)}
    assert harness.update_difference(start, ours, ours) == 0.0
    assert harness.update_difference(start, ours, rounded) < 1e-4 < harness.UPDATE_TOLERANCES[torch.float32]
    assert harness.update_difference(start, ours, twice) == pytest.approx(1.0)


def test_floor_of_a_cnn_has_each_convolution_and_its_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per Conv2d the forward convolution and one convolution_backward (dx only after the first); batch norm has no
    products and is named."""
    model = harness.cnn_model("cnn:3,8,8:4-6:2").build(torch.Generator().manual_seed(0))
    run, left_out = harness.matmul_floor(model, torch.randn(2, 3, 8, 8))
    calls = []
    conv, conv_backward = torch.nn.functional.conv2d, torch.ops.aten.convolution_backward

    def record_forward(x, w, *args, **kwargs):
        calls.append(("conv2d", tuple(x.shape), tuple(w.shape)))
        return conv(x, w, *args, **kwargs)

    def record_backward(dout, x, w, *args):
        calls.append(("backward", tuple(x.shape), tuple(args[-1])))
        return conv_backward(dout, x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "conv2d", record_forward)
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", record_backward)
    run()
    monkeypatch.undo()
    assert left_out == ["BatchNorm2d"]  # named once per type
    assert [c for c in calls if c[0] == "conv2d"] == [
        ("conv2d", (2, 3, 8, 8), (4, 3, 3, 3)), ("conv2d", (2, 4, 8, 8), (4, 4, 3, 3)),
        ("conv2d", (2, 4, 4, 4), (6, 4, 3, 3)), ("conv2d", (2, 6, 4, 4), (6, 6, 3, 3))]
    assert [c[2] for c in calls if c[0] == "backward"] == [(True, True, False)] * 3 + [(False, True, False)]
    with pytest.raises(ValueError, match="cnn:C,H,W:CHANNELS:CLASSES"):
        harness.resolve_model("cnn:3,8:4:2", (1,), 1)


def test_floor_of_a_model_with_user_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer the floor has no products for is named; a Linear after a first layer with parameters needs its dx."""
    model = nb.Sequential(Scale(6), nb.Linear(6, 4, bias=False), nb.ReLU())
    calls, left_out = recorded_products(monkeypatch, model, torch.randn(3, 6))
    assert left_out == ["Scale"]
    assert calls == [("mm", (3, 6), (6, 4)), ("mm", (4, 3), (3, 6)), ("mm", (3, 4), (4, 6))]


def test_update_floor_is_one_sgd_momentum_step_over_all_parameters() -> None:
    update, implementation = harness.update_floor(10, torch.float32, torch.device("cpu"))
    assert implementation in ("fused", "foreach")
    param = update.__self__.param_groups[0]["params"][0]
    before = param.clone()
    update()
    assert param.shape == (10,) and not torch.equal(param, before)


def test_a_user_model_that_does_not_fit_the_input_shape(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text("import nnbackprop as nb\n\ndef five_to_three():\n"
                                        "    return nb.mlp(5, [4], 3, flatten=False)\n")
    spec = f"{tmp_path / 'models.py'}:five_to_three"
    with pytest.raises(ValueError, match=r"the model does not take a batch of shape \(2, 1, 3, 4\) \(--input-shape\)"):
        harness.resolve_model(spec, (1, 3, 4), 3)
    with pytest.raises(ValueError, match=r"returns \(2, 3\) for a batch of 2, cross-entropy needs \(2, 7\)"):
        harness.resolve_model(spec, (5,), 7)
    assert harness.resolve_model(spec, (5,), 3).name == "models.py:five_to_three"


# ------------------------------------------------------------------------------------------------- epoch benchmark


@pytest.fixture(scope="module")
def fake_fashion_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake Fashion-MNIST with 64 training examples past the 5000 that train holds out for validation."""
    directory = tmp_path_factory.mktemp("fashion-mnist")
    write_fake_mnist(directory, n_train=5064, n_test=10)
    return directory


EPOCH_ARGS = ("--batch-size", "16", "--max-steps", "2", "--threads", "1")
PROGRESS = re.compile(r"^repeat \d+/\d+ \| (steps alone|diagnostics (off|on|full)) +\| +\d+\.\d{3} s \| "
                      r"elapsed +\d+\.\d s$")


def test_epoch_benchmark_shows_progress_and_one_table(tmp_path: Path, fake_fashion_mnist: Path) -> None:
    out = tmp_path / "epoch.json"
    (tmp_path / "models.py").write_text(USER_MODELS)
    result = run_script("epoch_benchmark.py", "--data-dir", fake_fashion_mnist, "--repeats", "2", *EPOCH_ARGS,
                        "--model", f"{tmp_path / 'models.py'}:plain", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    progress = [i for i, line in enumerate(lines) if PROGRESS.match(line)]
    assert len(progress) == 8, result.stdout
    header, rows = table_of(result.stdout, "epoch")
    assert lines.index(header) > progress[-1]
    assert [row.split("  ")[0] for row in rows] == ["steps alone", "diagnostics off", "diagnostics on",
                                                     "diagnostics full"]
    assert "models.py:plain (FastStep); batch 16; 2 of 4 steps per epoch" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["stopped"] is None and saved["steps_per_epoch"] == 2 and saved["samples_per_epoch"] == 32
    assert saved["max_steps"] == 2 and saved["repeats"] == 2 and len(saved["machine"]["load_average"]) == 3
    assert saved["config"]["model"].endswith("models.py:plain")
    for row in saved["rows"]:
        assert row["epochs"] == 2 and len(row["all_s"]) == 2 and set(row["timings"]["epoch"]) == SUMMARY_KEYS
    assert saved["rows"][0]["overhead_vs_steps"] is None and saved["rows"][1]["overhead_vs_no_diagnostics"] is None
    assert saved["rows"][2]["overhead_vs_no_diagnostics"] is not None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_epoch_benchmark_stopped_writes_what_it_has(tmp_path: Path, fake_fashion_mnist: Path, signum: int) -> None:
    out = tmp_path / "epoch.json"
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "epoch_benchmark.py"), "--data-dir",
                             str(fake_fashion_mnist), "--repeats", "1000", *EPOCH_ARGS, "--out", str(out)],
                            cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if PROGRESS.match(line.rstrip("\n")):
                proc.send_signal(signum)
                break
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = "".join(seen) + stdout
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    _, rows = table_of(stdout, "epoch")
    assert len(rows) == 4
    saved = json.loads(out.read_text())
    assert saved["stopped"] == "interrupted" and saved["repeats"] == 1000
    timed = [row["epochs"] for row in saved["rows"]]
    assert timed[0] >= 1  # the first kind of the first round finished
    for row in saved["rows"]:
        assert (row["timings"]["epoch"] is None) == (row["epochs"] == 0)


# ------------------------------------------------------------------------------------------- distributed benchmark


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_distributed_benchmark_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "distributed.json"
    result = run_script("distributed_benchmark.py", "--model", "12-8-3", "--batch-sizes", "8", "--runs", "2x1",
                        "--steps", "3", "--warmup", "1", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    header, rows = table_of(result.stdout, "batch")
    assert "step ms" in header and "allreduce ms" in header
    assert [row.split()[:3] for row in rows] == [["8", "2", "1"]]
    assert re.search(r" \d+\.\d\d ±\d+% +\d+\.\d\d ±\d+% ", rows[0]), rows[0]
    saved = json.loads(out.read_text())
    (row,) = saved["rows"]
    assert saved["runs"] == ["2x1"] and row["processes"] == 2 and row["steps"] == 3
    assert set(row["timings"]["step"]) == SUMMARY_KEYS and row["timings"]["step"]["n"] == 3
    assert row["timings"]["all_reduce"]["n"] == 3 and 0 < row["all_reduce_share"] < 1

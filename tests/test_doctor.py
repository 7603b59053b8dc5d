"""``nnbackprop doctor`` (``make gpu-check``): its CPU-side logic — the order of the checks, running each in a process
of its own under a time limit and a budget, judging their output, the table and the JSON — and its refusal without
CUDA.
The checks themselves need a GPU (the ``cuda`` test at the end runs the whole thing where there is one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA, ROOT, SUBPROCESS_TIMEOUT_S, subprocess_env
from datagen import write_fake_mnist

from nnbackprop import doctor
from nnbackprop.cli import main
from nnbackprop.doctor import CHECKS, CHILDREN, Check, Context, Result, run_checks


def python_check(name: str, code: str, timeout_s: float = 60) -> Check:
    """A check whose process is ``python -c code``, judged by its exit status."""
    return Check(name, lambda ctx: [sys.executable, "-c", code],
                 lambda returncode, output, ctx: ("pass" if returncode == 0 else "fail", output.strip(), {}), timeout_s)


def test_the_checks_run_most_informative_first():
    assert [c.name for c in CHECKS] == ["environment", "cuda-tests", "graphs", "host-sync", "mixed-precision", "train",
                                        "torchrun", "step-benchmark", "gradcheck", "cnn-benchmark"]
    in_children = [c.name for c in CHECKS if c.command(Context(ROOT, "data", Path("."), "python"))[1:3] == [
        "-m", "nnbackprop.doctor"]]
    assert set(in_children) <= set(CHILDREN) and "graphs" in in_children


def test_each_check_runs_in_its_own_process_and_a_failure_does_not_stop_the_others(tmp_path):
    checks = [python_check("crash", "import os; os.abort()"), python_check("ok", "print('fine')"),
              python_check("slow", "import time; time.sleep(30)", timeout_s=1),
              Check("absent", lambda ctx: None, lambda *a: ("pass", "", {}), 10, lambda ctx: "needs the checkout")]
    results = run_checks(checks, Context(None, None, tmp_path), logs=tmp_path / "logs")
    assert [(r.name, r.status) for r in results] == [("crash", "fail"), ("ok", "pass"), ("slow", "fail"),
                                                     ("absent", "skip")]
    assert results[1].detail == "fine" and results[2].detail == "did not finish within 1 s"
    assert results[3].detail == "needs the checkout"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["crash.log", "ok.log", "slow.log"]
    assert (tmp_path / "logs" / "ok.log").read_text().splitlines()[1:] == ["fine"]


def test_a_script_a_check_runs_imports_the_checkout_it_runs_from(tmp_path, monkeypatch):
    """On a GPU machine the package is not installed: a script run from the checkout (``benchmarks/…``, whose own
    folder is its first import path) must still import this nnbackprop."""
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    script = tmp_path / "script.py"
    script.write_text("import sys; print(sys.path[1])")  # [0] is the script's folder; here nnbackprop is installed
    check = Check("script", lambda ctx: [sys.executable, str(script)],
                  lambda returncode, output, ctx: ("pass" if returncode == 0 else "fail", output.strip(), {}), 60)
    (result,) = run_checks([check], Context(ROOT, None, tmp_path))
    assert (result.status, result.detail) == ("pass", str(ROOT))


def test_a_check_that_runs_out_of_time_leaves_what_it_printed_in_its_log(tmp_path):
    code = "import sys, time; print('started', flush=True); print('on stderr', file=sys.stderr, flush=True); " \
           "time.sleep(30)"
    run_checks([python_check("slow", code, timeout_s=10)], Context(None, None, tmp_path), logs=tmp_path)
    log = (tmp_path / "slow.log").read_text()
    assert "started" in log and "on stderr" in log


def test_the_budget_skips_what_is_left_when_it_is_spent(tmp_path):
    checks = [python_check("first", "import time; time.sleep(1.5)"), python_check("second", "pass")]
    results = run_checks(checks, Context(None, None, tmp_path), budget_s=1.0)
    assert results[0].status == "fail" and "within 1 s" in results[0].detail
    assert results[1].status == "skip" and "budget" in results[1].detail


def test_the_judges_read_what_the_tools_print():
    ctx = Context(None, None, Path("."))
    assert doctor._judge_pytest(0, "...\n312 passed, 3 skipped in 40.1s\n", ctx) == (
        "pass", "312 passed, 3 skipped", {"passed": 312, "skipped": 3})
    assert doctor._judge_pytest(1, "2 failed, 310 passed in 40s", ctx)[0] == "fail"
    assert doctor._judge_pytest(5, "no tests ran", ctx)[0] == "fail"
    assert doctor._judge_gradcheck(0, "...\n120 passed, 0 failed\n", ctx) == ("pass", "120 passed, 0 failed",
                                                                               {"passed": 120, "failed": 0})
    assert doctor._judge_gradcheck(1, "119 passed, 1 failed", ctx)[0] == "fail"
    child = 'warning: something\n{"ok": true, "detail": "20 cases"}\n'
    assert doctor._judge_child(0, child, ctx) == ("pass", "20 cases", {"ok": True, "detail": "20 cases"})
    assert doctor._judge_child(1, "Traceback ...\nRuntimeError: CUDA error: an illegal memory access", ctx) == (
        "fail", "RuntimeError: CUDA error: an illegal memory access", {})
    assert doctor._judge_torchrun(0, "data-parallel: 1 processes (nccl), global batch 128\ntest loss 0.4 accuracy 85%",
                                  ctx)[0] == "pass"


def test_a_benchmark_check_reads_its_own_rows_and_fails_without_them(tmp_path):
    rows = {"rows": [{"model": "cnn", "batch": 64, "dtype": "float32", "eager_over_ours": 1.25}]}
    (tmp_path / "step_benchmark.json").write_text(json.dumps(rows))  # another check's file must not count
    check = next(c for c in CHECKS if c.name == "cnn-benchmark")
    ctx = Context(ROOT, None, tmp_path)
    assert check.command(ctx)[-2:] == ["--out", str(tmp_path / "cnn-benchmark.json")]
    assert check.judge(0, "", ctx)[0] == "fail"
    (tmp_path / "cnn-benchmark.json").write_text(json.dumps(rows))
    assert check.judge(0, "", ctx)[:2] == ("pass", "cnn b64 float32: eager/ours 1.25")
    assert check.judge(1, "Traceback", ctx)[0] == "fail"


def test_the_table_and_the_json(tmp_path):
    lines = []
    out = tmp_path / "gpu" / "gpu_check.json"
    checks = [python_check("ok", "print('fine')"), python_check("bad", "raise SystemExit(3)")]
    results = doctor.doctor(out, None, 60, checks, echo=lines.append)
    assert lines[0].split() == ["check", "result", "time", "detail"]
    assert lines[1].startswith("ok") and " pass " in lines[1] and lines[2].startswith("bad") and " fail " in lines[2]
    assert lines[-1].startswith("\n1 passed, 1 failed, 0 skipped; results in")
    written = json.loads(out.read_text())["results"]
    assert [r["status"] for r in written] == ["pass", "fail"] and written == [vars(r) for r in results]
    assert all(isinstance(r, Result) for r in results)


def test_the_train_checks_straight_and_resumed_runs_agree_bit_for_bit(tmp_path, monkeypatch):
    """The train check compares 3 epochs straight with 2 resumed to 3. On the first GPU they differed by 0.05 points:
    the default warm-up is a tenth of a short run, 0.3 epochs against 0.2, so the two runs differed from their first
    step. Run on the CPU with the check's own arguments (a smaller model), they agree exactly."""
    monkeypatch.setenv("NNBACKPROP_DATA", str(tmp_path / "empty-cache"))
    write_fake_mnist(tmp_path / "data")
    runs = {name: (argv, resume) for name, argv, resume in doctor._train_runs(str(tmp_path / "data"), tmp_path, "cpu",
                                                                              "mnist")}
    small = ["--hidden", "16", "--batch-size", "50", "--val-size", "50"]
    for argv, resume in (runs["straight"], runs["resumed"]):
        for command in (argv + small, resume):
            if command is not None:
                proc = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(),
                                      timeout=SUBPROCESS_TIMEOUT_S)
                assert proc.returncode == 0, proc.stderr

    def metrics(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_s")} for line in lines]

    assert len(metrics("straight")) == 3 and metrics("resumed") == metrics("straight")


def test_it_finds_the_checkout_it_runs_from():
    assert doctor.find_checkout() == ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no CUDA")
def test_without_cuda_it_refuses_in_one_line(capsys):
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "sees no CUDA device here" in err


@CUDA
@pytest.mark.cuda
@pytest.mark.slow
def test_the_whole_check_passes_on_a_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    results = doctor.doctor(out, None, 600, [c for c in CHECKS if c.name not in ("cuda-tests",)])
    assert not [r for r in results if r.status == "fail"], [vars(r) for r in results if r.status == "fail"]

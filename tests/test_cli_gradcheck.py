"""``nnbackprop gradcheck``: a passing run, and one-line errors for an unusable device."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

from nnbackprop import gradcheck
from nnbackprop.cli import main


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnbackprop", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


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
    assert main(["gradcheck", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"broken layer .* FAIL\n\s+weight .* FAIL", out), out
    assert out.strip().splitlines()[-1] == "1 passed, 1 failed"

"""The README's Python blocks run as shown, and its excerpt of functional.py is the code in functional.py."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from nnbackprop import functional as F
from nnbackprop.datasets import SYSTEM_FASHION_MNIST

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
RUNNABLE = [block for block in BLOCKS if "import nnbackprop" in block]


def test_the_readme_has_python_blocks_to_run() -> None:
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_a_python_block_runs(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "needs Fashion-MNIST" in block and not (Path(SYSTEM_FASHION_MNIST) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"needs Fashion-MNIST in {SYSTEM_FASHION_MNIST} (make test installs it as root)")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})


def test_the_functional_excerpt_is_the_code() -> None:
    excerpt = next(block for block in BLOCKS if "def relu_forward" in block)
    for name in ("relu_forward", "relu_backward"):
        code = inspect.getsource(getattr(F, name)).splitlines()
        shown = re.search(rf"def {name}.*?(?=\n\n|\Z)", excerpt, re.S).group(0).splitlines()
        assert shown[0] == code[0] and shown[-1] == code[-1], f"the README's {name} is not functional.py's"


def test_the_reading_path_points_at_each_function() -> None:
    """Each hop of "Reading path" names a file, a line and a function: the line is that function's ``def``."""
    text = README.read_text(encoding="utf-8")
    hops = re.findall(r"^\d+\. `(nnbackprop/[\w/]+\.py):(\d+)` `(\w+)`", text, re.M)
    assert len(hops) >= 10
    root = README.parent
    for path, line, name in hops:
        shown = (root / path).read_text(encoding="utf-8").splitlines()[int(line) - 1]
        assert re.match(rf"\s*def {name}\b", shown), f"README's {path}:{line} is not def {name}: {shown.strip()!r}"

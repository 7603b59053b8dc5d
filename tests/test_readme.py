"""The README's Python blocks run as shown, and its excerpt of functional.py is the code in functional.py."""

from __future__ import annotations

import inspect
import shlex
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


def shell_commands() -> list[list[str]]:
    """The commands of the README's ``bash`` blocks, continuation lines joined and comments dropped, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def nnbackprop_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``nnbackprop`` (or ``-m nnbackprop``) in ``argv``; ``None`` for other commands."""
    if argv[0] == "nnbackprop":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["nnbackprop"]:
        return argv[argv.index("-m") + 2:]
    return None


COMMANDS = [args for args in map(nnbackprop_arguments, shell_commands()) if args is not None]
EXPERIMENTS = [argv[2:] for argv in shell_commands() if argv[:2] != ["python", "-m"] and argv[0] == "python"
               and argv[1].startswith("experiments/")
               and "parse_config(sys.argv" in (README.parent / argv[1]).read_text(encoding="utf-8")]


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_each_nnbackprop_command_in_the_readme_parses(args: list[str]) -> None:
    """Every option the README gives ``nnbackprop`` exists and takes the value shown (``--help`` exits 0)."""
    from nnbackprop.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit as stop:
        assert stop.code == 0 and "--help" in args, f"nnbackprop {' '.join(args)}: exit {stop.code}"


@pytest.mark.parametrize("args", EXPERIMENTS, ids=[" ".join(a)[:60] for a in EXPERIMENTS])
def test_each_experiment_command_in_the_readme_parses(args: list[str]) -> None:
    from nnbackprop.config import parse_config

    parse_config(args)


def test_the_readme_shows_commands_to_check() -> None:
    assert len(COMMANDS) >= 15 and len(EXPERIMENTS) >= 3

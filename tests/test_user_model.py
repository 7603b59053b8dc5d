"""A user's model from ``PATH.py:FUNCTION``: whatever the file or the function does wrong — ``sys.exit`` included —
is one line naming it, and Ctrl-C is still Ctrl-C. (How the command line reports these: test_cli.py.)"""

from __future__ import annotations

import sys

import pytest
import torch

from nnbackprop.errors import ConfigError, MissingFileError
from nnbackprop.model import Sequential
from nnbackprop.user_model import model_from_file

MODELS = '''
import sys
import nnbackprop as nb


def build(in_features, num_classes, generator=None):
    return nb.Sequential(nb.Flatten(), nb.Linear(in_features, num_classes, generator=generator))


def exits():
    sys.exit(3)


def interrupted():
    raise KeyboardInterrupt
'''


def _write(tmp_path, source: str, name: str = "net.py"):
    path = tmp_path / name
    path.write_text(source)
    return path


def test_the_function_gets_the_arguments_it_declares(tmp_path):
    path = _write(tmp_path, MODELS)
    model = model_from_file(f"{path}:build", in_features=12, num_classes=3, input_shape=(3, 2, 2),
                            generator=torch.Generator().manual_seed(0))
    assert isinstance(model, Sequential) and model[1].weight.shape == (3, 12)


@pytest.mark.parametrize("source, function, words", [
    ("import sys\nsys.exit(0)\n", "build", "importing {path} failed: SystemExit(0) (it called sys.exit; a model file "
     "must only define the model)"),
    ("raise SystemExit('bye')\n", "build", "importing {path} failed: SystemExit('bye')"),
    (MODELS, "exits", "exits() raised SystemExit(3) (it called sys.exit"),
    ("import nnbackprop_no_such_module\n", "build", "importing {path} failed: ModuleNotFoundError: No module named "
     "'nnbackprop_no_such_module'"),
], ids=["exit-0-at-import", "exit-text-at-import", "exit-in-function", "import-error"])
def test_a_file_or_function_that_exits_or_fails_is_one_line(tmp_path, source, function, words):
    path = _write(tmp_path, source)
    modules = set(sys.modules)
    with pytest.raises(ConfigError) as info:
        model_from_file(f"{path}:{function}", in_features=12, num_classes=3)
    message = str(info.value)
    assert message.startswith(f"--model {path}:{function}: ") and words.format(path=path) in message
    assert "\n" not in message
    if function == "build":  # a file that failed to import leaves no half module behind
        assert set(sys.modules) - modules == set()


@pytest.mark.parametrize("source, function", [("raise KeyboardInterrupt\n", "build"), (MODELS, "interrupted")],
                         ids=["at-import", "in-function"])
def test_ctrl_c_in_a_model_file_is_not_taken_for_its_error(tmp_path, source, function):
    path = _write(tmp_path, source)
    with pytest.raises(KeyboardInterrupt):
        model_from_file(f"{path}:{function}", in_features=12, num_classes=3)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(MissingFileError, match=f"--model {tmp_path}/gone.py:build: no file {tmp_path}/gone.py"):
        model_from_file(f"{tmp_path}/gone.py:build")

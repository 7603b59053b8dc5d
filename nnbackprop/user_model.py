"""A user's model from ``PATH.py:FUNCTION``: the file imported, the function called, every failure in one line.

nnbackprop imports a file only because a person named it — ``--model`` on the command line, ``model`` in a config
they wrote, or a call in Python — never because a checkpoint names it: a checkpoint is data, and anyone can write one
with a hash that matches. A checkpoint records which file and function built its model; rebuilding it (``evaluate``,
``predict``, ``--resume``) takes ``--model PATH.py:FUNCTION`` again, and the error says which one the checkpoint
records.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from nnbackprop.errors import ConfigError, MissingFileError, gist
from nnbackprop.module import Module


def split_spec(spec: str) -> tuple[Path, str]:
    """``"PATH.py:FUNCTION"`` as ``(path, function name)``."""
    path, _, function = spec.rpartition(":")
    return Path(path).expanduser(), function


def model_from_file(spec: str, **available: Any) -> Module:
    """The model returned by the function ``spec`` names, ``"PATH.py:FUNCTION"``.

    The file is imported as a module; the function is called with those of ``available`` (e.g. ``in_features``,
    ``input_shape``, ``num_classes``, ``generator``) that it declares as parameters.

    Raises:
        MissingFileError: no such file.
        ConfigError: in one line, naming the file or function: it does not import, has no such function, raises (also
            ``SystemExit``), or returns something other than an nnbackprop module.
    """
    path, function_name = split_spec(spec)
    if not path.is_file():
        raise MissingFileError(f"--model {spec}: no file {path}")
    module_name = f"nnbackprop_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    try:
        import_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(import_spec)
        sys.modules[module_name] = module
        import_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # whatever the user's file raises while importing, sys.exit() included
        sys.modules.pop(module_name, None)
        raise ConfigError(f"--model {spec}: importing {path} failed: {_what(error)}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--model {spec}: {path} has no function {function_name}")
    accepted = inspect.signature(function).parameters
    try:
        model = function(**{k: v for k, v in available.items() if k in accepted})
    except (Exception, SystemExit) as error:  # whatever the user's function raises
        raise ConfigError(f"--model {spec}: {function_name}() raised {_what(error)}") from error
    if not isinstance(model, Module):
        raise ConfigError(f"--model {spec}: {function_name}() returned a {type(model).__name__}, not an nnbackprop "
                          "Module (e.g. nnbackprop.Sequential(...))")
    return model


def _what(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code!r}) (it called sys.exit; a model file must only define the model)"
    return gist(error)

"""The settings, declared once: their checks, the command-line options and TOML files generated from them, and the
order in which defaults, a file and options combine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from nnbackprop.config import (TrainConfig, add_arguments, config_from_args, load_config_file, parse_config,
                               parse_value, to_toml)
from nnbackprop.cli import build_parser


@pytest.mark.parametrize("changes, message", [
    (dict(lr=-0.1), "lr must be > 0, got -0.1"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(hidden=(16, 0)), r"hidden values must each be >= 1, got \(16, 0\)"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(nesterov=True, momentum=0.0), r"nesterov needs a momentum > 0 \(or --no-nesterov\)"),
    (dict(schedule="linear"), "schedule must be one of constant, step, cosine, got 'linear'"),
    (dict(lr=math.nan, epochs=0), "epochs must be >= 1, got 0; lr must be a finite number, got nan"),
    (dict(epochs="3"), "epochs must be an integer, got '3'"),
    (dict(flip=1), "flip must be true or false, got 1"),
    (dict(betas=(0.9,)), "betas needs two values"),
    (dict(model="net.py"), "model must be PATH.py:FUNCTION"),
    (dict(schedule="cosine", epochs=2, warmup_epochs=2), "warmup_epochs .* must be shorter than the run"),
])
def test_every_problem_is_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_lists_become_tuples_and_to_dict_round_trips():
    config = TrainConfig(hidden=[64, 32], betas=[0.8, 0.99])
    assert config.hidden == (64, 32) and config.betas == (0.8, 0.99)
    assert TrainConfig(**json.loads(json.dumps(config.to_dict()))) == config


def test_every_setting_has_a_help_a_group_and_an_option():
    options = {action.dest for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] and f.metadata["group"] in ("data", "model", "optimisation", "run"), f.name
        assert f.name in options, f"no --{f.name.replace('_', '-')} option"


@pytest.mark.parametrize("text, hint, value", [
    ("512,256", tuple[int, ...], (512, 256)), ("none", tuple[int, ...], ()), ("", tuple[int, ...], ()),
    ("none", int | None, None), ("3", int | None, 3), ("yes", bool, True), ("off", bool, False),
    ("1e-3", float, 1e-3), ("imagefolder:/a/b", str, "imagefolder:/a/b"),
])
def test_command_line_values(text, hint, value):
    assert parse_value(text, hint) == value


def _parse(argv, base=None):
    parser = argparse.ArgumentParser()
    add_arguments(parser, base)
    return config_from_args(parser.parse_args(argv), base)


def test_the_command_line_wins_over_the_file_which_wins_over_the_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 20\nhidden = [1024, 1024]\nlr = 1\nschedule = "cosine"\nflip = true\n')
    config = _parse(["--config", str(path), "--epochs", "3", "--no-flip"])
    assert (config.epochs, config.hidden, config.lr, config.schedule, config.flip) == (3, (1024, 1024), 1.0, "cosine",
                                                                                     False)
    assert config.batch_size == TrainConfig().batch_size
    script_base = TrainConfig(dataset="mnist", epochs=7)  # an experiment's own configuration
    assert _parse([], script_base) == script_base
    assert _parse(["--config", str(path)], script_base).dataset == "mnist"


def test_a_run_writes_a_config_that_reads_back(tmp_path):
    config = TrainConfig(dataset="imagefolder:/data/cats", hidden=(256,), patience=3, betas=(0.8, 0.9), lr=0.01,
                         flip=True, model="nets/my.py:build")
    (tmp_path / "config.toml").write_text(to_toml(config))
    assert load_config_file(tmp_path / "config.toml") == config
    (tmp_path / "summary.json").write_text(json.dumps({"test_accuracy": 0.9, "config": config.to_dict()}))
    assert load_config_file(tmp_path / "summary.json") == config


@pytest.mark.parametrize("text, message", [
    ("epochs = 3\nepoch = 4\n", "unknown setting.*epoch;"),
    ('epochs = "many"\n', "epochs must be an integer"),
    ("epochs = [\n", "not valid TOML"),
    ("lr = -1\n", "lr must be > 0"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_config_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_experiment_scripts_parse_the_same_options(capsys):
    config = parse_config(["--epochs", "3", "--hidden", "64"], TrainConfig(dataset="mnist"))
    assert (config.dataset, config.epochs, config.hidden) == ("mnist", 3, (64,))
    with pytest.raises(SystemExit):
        parse_config(["--lr", "-1"])
    assert capsys.readouterr().err == "nnbackprop: error: invalid training configuration: lr must be > 0, got -1.0\n"


@pytest.mark.parametrize("changes, message", [
    (dict(epochs=2**63 - 1), "epochs must be <= 100000, got 9223372036854775807"),
    (dict(hidden=(2**63 - 1,)), r"hidden values must each be <= 65536, got \(9223372036854775807,\)"),
    (dict(hidden=(8,) * 5000),
     r"hidden must list at most 1000 values, not 5000, got \(8, 8, 8, 8, 8, 8, 8, 8, \.\.\.\)"),
    (dict(batch_size=10**12), "batch_size must be <= 1000000, got 1000000000000"),
    (dict(image_size=100_000), "image_size must be <= 1024, got 100000"),
    (dict(log_every=2**40), "log_every must be <= 1000000"),
    (dict(patience=2**31), "patience must be <= 100000"),
    (dict(step_epochs=2**31), "step_epochs must be <= 100000"),
    (dict(warmup_epochs=1e300, schedule="constant"), "warmup_epochs must be <= 100000"),
    (dict(shift=2**20), "shift must be <= 1024"),
    (dict(seed=2**64), "seed must be <= 4611686018427387904"),
    (dict(threads=0), "threads must be >= 1, got 0"),
    (dict(threads=10**6), "threads must be <= 1024"),
])
def test_every_setting_is_bounded_to_what_makes_sense(changes, message):
    """``epochs = 2**63 - 1`` was accepted (and trained forever), ``hidden = [2**63 - 1]`` overflowed in torch."""
    with pytest.raises(ValueError, match=message) as info:
        TrainConfig(**changes)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_threads_is_a_setting_with_an_option():
    assert TrainConfig().threads is None
    assert _parse(["--threads", "3"]).threads == 3
    assert "threads" in TrainConfig.resumable()


@pytest.mark.parametrize("content, message", [
    (b"hidden = " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
     r"its values are nested too deeply to be settings \(a setting is a value or a list of values\); fix the file"),
    (b"epochs = 3\n# caf\xe9 au lait\n", r"not UTF-8 text \(byte 0xe9 at offset 16\); save it as UTF-8"),
    (b"hidden = [9223372036854775807]\n", r"hidden values must each be <= 65536, got \(9223372036854775807,\)"),
    (b"epochs = 9223372036854775807\n", "epochs must be <= 100000, got 9223372036854775807"),
], ids=["nested-100000-deep", "latin-1", "huge-width", "endless-epochs"])
def test_a_config_file_that_cannot_be_settings_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"config file {path}: ") and "\n" not in str(info.value)


def test_a_nested_json_summary_names_the_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=f"config file {path}: its values are nested too deeply"):
        load_config_file(path)

"""From settings to a run's parts: a model that cannot fit the machine is refused before anything is allocated, and
one that cannot fit the data before anything is trained, each in one line."""

from __future__ import annotations

import pytest
import torch

from nnbackprop import build
from nnbackprop.build import build_model, check_model_fits, mlp_parameters
from nnbackprop.config import TrainConfig
from nnbackprop.errors import ConfigError
from nnbackprop.layers import Flatten, Linear
from nnbackprop.model import Sequential, mlp

HUGE = TrainConfig(hidden=(65536,) * 20, device="cpu")  # 1 TB with SGD's momentum


@pytest.mark.parametrize("hidden, batchnorm", [((), False), ((7,), False), ((7, 5), True)])
def test_mlp_parameters_counts_what_mlp_builds(hidden, batchnorm):
    model = mlp(12, list(hidden), 3, batchnorm=batchnorm)
    assert mlp_parameters(12, hidden, 3, batchnorm) == sum(p.numel() for p in model.parameters())


def test_a_model_too_large_for_memory_is_refused_before_it_is_allocated(monkeypatch):
    def allocate(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(build, "mlp", allocate)
    with pytest.raises(ConfigError) as info:
        build_model(HUGE, (1, 28, 28), 10)
    parameters = mlp_parameters(784, HUGE.hidden, 10, False)
    message = str(info.value)
    assert message.startswith(f"the model has {parameters:,} parameters, which with their gradients and optimizer "
                              f"state need about {parameters * 3 * 4 / 2**30:.1f} GiB, more than the ")
    assert message.endswith(" GiB of cpu; use smaller --hidden widths") and "\n" not in message


def test_a_config_too_large_for_memory_is_refused_by_train():
    from test_training import toy_data

    from nnbackprop.training import train

    with pytest.raises(ConfigError, match=r"^the model has [\d,]+ parameters, .* GiB of cpu"):
        train(HUGE.replace(dataset="toy", epochs=1), data=toy_data())


def test_running_out_of_memory_while_building_is_one_line(monkeypatch):
    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 160000000000 bytes.\nmore detail")

    monkeypatch.setattr(build, "mlp", allocate)
    with pytest.raises(ConfigError) as info:
        build_model(TrainConfig(hidden=(8,), device="cpu"), (1, 28, 28), 10)
    assert str(info.value).startswith("the model does not fit in memory (RuntimeError: [enforce fail")
    assert str(info.value).endswith("make it smaller") and "\n" not in str(info.value)


def test_check_model_fits_runs_the_model_once_without_a_trace():
    model = Sequential(Flatten(), Linear(12, 3))
    check_model_fits(model, (3, 2, 2), 3, "net.py:build")
    assert model.training  # its mode is put back, and nothing was saved for a backward
    with pytest.raises(RuntimeError, match="without a forward"):
        model.backward(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match=r"^net.py:build returns outputs of shape \(3,\) per example, but this data "
                                          r"set needs 1 output \(one logit, --loss bce\): give its last layer 1 "
                                          r"output$"):
        check_model_fits(model, (3, 2, 2), 1, "net.py:build")
    with pytest.raises(ConfigError, match=r"^net.py:build does not take this data set's images of shape \(1, 2, 2\)"):
        check_model_fits(model, (1, 2, 2), 3, "net.py:build")
    with pytest.raises(ConfigError, match="has no parameters to train"):
        check_model_fits(Sequential(Flatten()), (1, 2, 2), 4, "Sequential")


@pytest.mark.parametrize("arch, hidden, batchnorm", [("mlp", (512, 512), False), ("cnn", (), True)])
def test_what_the_architecture_leaves_open_resolves_for_it(arch, hidden, batchnorm):
    from nnbackprop.build import resolved
    from test_training import toy_data

    config = resolved(TrainConfig(arch=arch), toy_data())
    assert config.hidden == hidden and config.batchnorm is batchnorm
    assert resolved(TrainConfig(arch=arch, hidden=(7,), batchnorm=not batchnorm), toy_data()).hidden == (7,)

"""Every layer: hand-written backward against autograd and finite differences, forward against ``torch.nn``,
initialisation, batch-norm running statistics and dropout masks."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from conftest import CUDA, assert_matches_torch_nn, assert_passed, make_input, randomize_batchnorm

from nnbackprop import (GELU, BatchNorm1d, Dropout, Flatten, LeakyReLU, Linear, Module, ReLU, Sigmoid, Tanh,
                        check_gradients, check_gradients_fd, to_torch)

F64 = torch.float64


def _batchnorm(training: bool) -> Callable[[torch.Generator], Module]:
    """A ``BatchNorm1d(6)`` with random affine parameters and running statistics."""
    return lambda g: randomize_batchnorm(BatchNorm1d(6, momentum=0.2, dtype=F64), g, training)


# name -> (factory(generator) building the layer in float64, input shape, input scale, input shift)
LAYERS: dict[str, tuple[Callable[[torch.Generator], Module], tuple[int, ...], float, float]] = {
    "linear": (lambda g: Linear(7, 5, dtype=F64, generator=g), (4, 7), 1.0, 0.0),
    "linear-batch1": (lambda g: Linear(7, 5, dtype=F64, generator=g), (1, 7), 1.0, 0.0),
    "linear-nobias": (lambda g: Linear(3, 2, bias=False, dtype=F64, generator=g), (5, 3), 1.0, 0.0),
    "linear-kaiming": (lambda g: Linear(16, 8, init="kaiming", dtype=F64, generator=g), (6, 16), 1.0, 0.0),
    "relu": (lambda g: ReLU(), (4, 6), 1.0, 0.0),
    "relu-batch1": (lambda g: ReLU(), (1, 6), 1.0, 0.0),
    "leaky_relu-rank3": (lambda g: LeakyReLU(0.1), (2, 3, 5), 1.0, 0.0),
    "sigmoid": (lambda g: Sigmoid(), (4, 6), 3.0, 0.0),
    "tanh": (lambda g: Tanh(), (3, 7), 2.0, 0.0),
    "gelu": (lambda g: GELU(), (4, 6), 2.0, 0.0),
    "gelu-tanh-batch1": (lambda g: GELU("tanh"), (1, 9), 2.0, 0.0),
    "dropout-train": (lambda g: Dropout(0.3, generator=torch.Generator().manual_seed(1)), (8, 10), 1.0, 0.0),
    "dropout-eval": (lambda g: Dropout(0.3).eval(), (4, 6), 1.0, 0.0),
    "flatten": (lambda g: Flatten(), (3, 2, 4, 5), 1.0, 0.0),
    "flatten-middle": (lambda g: Flatten(1, 2), (2, 3, 4, 2), 1.0, 0.0),
    "batchnorm-train": (_batchnorm(True), (8, 6), 3.0, 1.0),
    "batchnorm-train-batch2": (_batchnorm(True), (2, 6), 3.0, 1.0),
    "batchnorm-eval-batch1": (_batchnorm(False), (1, 6), 3.0, 1.0),
}
# torch.nn.Dropout draws its own masks, so only the deterministic cases can be compared value for value.
DETERMINISTIC = [name for name in LAYERS if name != "dropout-train"]


def _build(name: str, gen: torch.Generator, device: torch.device | str = "cpu", dtype: torch.dtype = F64,
           layout: str = "contiguous") -> tuple[Module, torch.Tensor]:
    factory, shape, scale, shift = LAYERS[name]
    layer = factory(gen).to(device=device, dtype=dtype)
    return layer, make_input(shape, gen, device=device, dtype=dtype, layout=layout, scale=scale, shift=shift)


@pytest.mark.parametrize("name", LAYERS)
def test_backward_matches_autograd(name: str, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
                                   layout: str) -> None:
    layer, x = _build(name, gen, device, dtype, layout)
    assert_passed(check_gradients(layer, x, generator=gen))


@pytest.mark.parametrize("name", LAYERS)
def test_backward_matches_finite_differences(name: str, gen: torch.Generator) -> None:
    layer, x = _build(name, gen)
    assert check_gradients_fd(layer, x)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_forward_and_state_match_torch_nn(name: str, gen: torch.Generator, device: torch.device,
                                          dtype: torch.dtype) -> None:
    assert_matches_torch_nn(*_build(name, gen, device, dtype))


# ---------------------------------------------------------------------------------------------------- Linear init


@pytest.mark.parametrize("in_features", [1, 13, 784])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype_", [torch.float32, torch.float64])
def test_linear_default_init_equals_torch_nn_linear_under_same_seed(in_features: int, bias: bool,
                                                                     dtype_: torch.dtype) -> None:
    torch.manual_seed(1234)
    ours = Linear(in_features, 6, bias=bias, dtype=dtype_)
    next_after_ours = torch.rand(3)
    torch.manual_seed(1234)
    ref = torch.nn.Linear(in_features, 6, bias=bias, dtype=dtype_)
    next_after_ref = torch.rand(3)
    assert torch.equal(ours.weight.data, ref.weight.detach())
    if bias:
        assert torch.equal(ours.bias.data, ref.bias.detach())
    assert torch.equal(next_after_ours, next_after_ref), "Linear consumed the global RNG differently from torch.nn"


@pytest.mark.parametrize("init", ["default", "kaiming", "xavier"])
def test_linear_init_repeats_with_a_seeded_generator(init: str) -> None:
    a = Linear(9, 4, init=init, generator=torch.Generator().manual_seed(5))
    b = Linear(9, 4, init=init, generator=torch.Generator().manual_seed(5))
    c = Linear(9, 4, init=init, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.weight.data, b.weight.data) and torch.equal(a.bias.data, b.bias.data)
    assert not torch.equal(a.weight.data, c.weight.data)


@pytest.mark.parametrize(
    "init, expected_std, bound",
    [
        ("default", 1 / math.sqrt(3 * 400), 1 / math.sqrt(400)),
        ("kaiming", math.sqrt(2 / 400), None),
        ("xavier", math.sqrt(2 / (400 + 300)), math.sqrt(6 / (400 + 300))),
    ],
)
def test_linear_init_statistics(init: str, expected_std: float, bound: float | None) -> None:
    layer = Linear(400, 300, init=init, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = layer.weight.data
    assert abs(w.mean().item()) < 0.02 * expected_std
    assert w.std().item() == pytest.approx(expected_std, rel=0.02)
    if bound is not None:
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound
    if init == "default":
        assert 0 < layer.bias.data.abs().max().item() <= bound
    else:
        assert torch.equal(layer.bias.data, torch.zeros(300, dtype=F64))


# ---------------------------------------------------------------------------------------------------- BatchNorm1d


def test_batchnorm_running_stats_follow_torch_over_several_batches(gen: torch.Generator) -> None:
    ours = BatchNorm1d(5, momentum=0.3, dtype=F64)
    ref = to_torch(ours)
    for step, n in enumerate([4, 7, 2, 9, 3]):
        x = make_input((n, 5), gen, scale=1 + step, shift=step - 2.0)
        torch.testing.assert_close(ours(x), ref(x).detach())
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)

    ours.eval()
    ref.eval()
    x = make_input((3, 5), gen, scale=2.0)
    before = ours.state_dict()
    out = ours(x)
    by_hand = (x - ours.running_mean) / torch.sqrt(ours.running_var + ours.eps) * ours.weight.data + ours.bias.data
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(out, ref(x).detach())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"evaluation changed {key}"


# ------------------------------------------------------------------------------------------------------- Dropout


def test_dropout_scales_kept_units_and_drops_a_fraction_p() -> None:
    p = 0.3
    layer = Dropout(p, generator=torch.Generator().manual_seed(0))
    x = torch.ones(200, 500, dtype=F64)
    out = layer(x)
    dropped = (out == 0).double().mean().item()
    assert dropped == pytest.approx(p, abs=0.01)
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(layer.backward(dout), dout * out)


def test_dropout_masks_repeat_with_the_same_generator_seed() -> None:
    x = torch.randn(16, 32)
    masks = [Dropout(0.5, generator=torch.Generator().manual_seed(seed))(x) != 0 for seed in (7, 7, 8)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("p, training, expected", [(0.5, False, "input"), (0.0, True, "input"), (1.0, True, "zeros")])
def test_dropout_limits(p: float, training: bool, expected: str) -> None:
    layer = Dropout(p, generator=torch.Generator().manual_seed(0)).train(training)
    x = torch.randn(6, 4)
    target = x if expected == "input" else torch.zeros_like(x)
    assert torch.equal(layer(x), target)
    dout = torch.randn(6, 4)
    assert torch.equal(layer.backward(dout), dout if expected == "input" else torch.zeros_like(dout))


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])])
def test_dropout_draws_on_its_generators_device_and_masks_on_the_inputs(device: str) -> None:
    """A CPU generator (a run's seeded one) and an input elsewhere: the draws come from the generator, the mask
    multiplies the input where it is."""
    layer = Dropout(0.5, generator=torch.Generator().manual_seed(0))
    x = torch.ones(8, 6, device=device)
    out = layer(x)
    assert out.device == x.device and out.shape == x.shape
    dx = layer.backward(torch.ones_like(out))
    assert dx.device == x.device
    if device != "meta":  # the same mask as on the CPU, from the same draws
        cpu = Dropout(0.5, generator=torch.Generator().manual_seed(0))(torch.ones(8, 6))
        assert torch.equal(out.cpu(), cpu) and torch.equal(dx.cpu(), cpu)

"""Convolution and pooling: each functional pair against autograd, the fast convolution backward against the naive
im2col one, every layer against autograd, finite differences and torch.nn (forward, state_dict, initialisation bit for
bit), ties in max pooling as torch resolves them, the channels-last fast layout, and the errors for bad arguments and
inputs."""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_matches_torch_nn, assert_passed, make_input, randomize_batchnorm
from torch.autograd.gradcheck import GradcheckError

import nnbackprop as nb
from nnbackprop import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, Dropout, MaxPool2d, Module,
                        check_gradients, check_gradients_fd, init, to_torch)
from nnbackprop import functional as F
from nnbackprop.gradcheck import TOLERANCES
from nnbackprop.layout import FastLayout

F64 = torch.float64
CL = torch.channels_last

# name -> (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
CONVS = {
    "3x3-pad1": (2, 3, 4, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "5x3-stride2x3-dilation": (2, 4, 6, 9, 11, (5, 3), (2, 3), (2, 1), (1, 2), 1),
    "grouped-stride2": (2, 4, 6, 9, 8, (3, 2), (2, 2), (1, 0), (1, 1), 2),
    "depthwise-dilation2": (3, 6, 6, 8, 9, (3, 3), (2, 2), (2, 2), (2, 2), 6),
    "1x1-stride2": (1, 5, 3, 5, 5, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    "no-padding-odd": (2, 3, 5, 7, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    "stride-skips-rows": (2, 2, 3, 8, 8, (3, 3), (3, 3), (0, 0), (1, 1), 1),
    "batch1-kernel-as-large-as-image": (1, 2, 2, 4, 5, (4, 5), (1, 1), (0, 0), (1, 1), 1),
}


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()


def _conv_case(name: str, gen: torch.Generator, device: torch.device | str = "cpu", dtype: torch.dtype = F64,
               layout: str = "contiguous") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple, torch.Tensor]:
    n, c_in, c_out, h, w, k, s, p, d, g = CONVS[name]
    x = make_input((n, c_in, h, w), gen, device=device, dtype=dtype, layout=layout)
    weight = make_input((c_out, c_in // g, *k), gen, device=device, dtype=dtype)
    bias = make_input((c_out,), gen, device=device, dtype=dtype)
    h_out, w_out = (F.pooled_size(size, kk, ss, pp, dd) for size, kk, ss, pp, dd in zip((h, w), k, s, p, d))
    dout = make_input((n, c_out, h_out, w_out), gen, device=device, dtype=dtype)
    return x, weight, bias, (s, p, d, g), dout


# ------------------------------------------------------------------------------------------------ functional pairs


@pytest.mark.parametrize("name", CONVS)
def test_conv2d_pair_matches_autograd(name: str, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
                                      layout: str) -> None:
    x, weight, bias, settings, dout = _conv_case(name, gen, device, dtype, layout)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    ref = TF.conv2d(*leaves, *settings)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    out = F.conv2d_forward(x, weight, bias, *settings)
    grads = F.conv2d_backward(dout, x, weight, *settings)
    tol = TOLERANCES[dtype]
    assert _rel(out, ref) <= tol
    for ours, theirs, what in zip(grads, ref_grads, ("dx", "dW", "db")):
        assert ours.shape == theirs.shape and _rel(ours, theirs) <= tol, what


@pytest.mark.parametrize("name", CONVS)
def test_fast_conv_backward_equals_the_naive_im2col_one(name: str, gen: torch.Generator,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight, _, settings, dout = _conv_case(name, gen)
    naive = F.conv2d_backward_naive(dout, x, weight, *settings)
    monkeypatch.setattr(F, "CHUNK_BYTES", 1)  # one image per product: the chunked path as well as the whole
    for x_in, d_in in [(x, dout), (x.contiguous(memory_format=CL), dout.contiguous(memory_format=CL))]:
        fast = F.conv2d_backward(d_in, x_in, weight, *settings)
        for ours, ref in zip(fast, naive):
            assert _rel(ours, ref) <= 1e-12
    # both formulations of dW, whichever the rule picks for this case
    stride, padding, dilation, groups = settings
    swapped = F._weight_grad_by_swapped_conv(dout, x, weight.shape, stride, padding, dilation, groups)
    assert _rel(swapped, naive[1]) <= 1e-12
    if groups == 1:
        n, c, h, w = x.shape
        padded = torch.zeros((n, h + 2 * padding[0], w + 2 * padding[1], c), dtype=F64).permute(0, 3, 1, 2)
        padded[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = float("nan")
        windows = F._weight_grad_by_windows(dout, x, weight.shape, stride, padding, dilation, padded)
        assert _rel(windows, naive[1]) <= 1e-12  # the buffer's old interior (NaN) is overwritten
        with pytest.raises(ValueError, match="padded must be a channels-last tensor"):
            F._weight_grad_by_windows(dout, x, weight.shape, stride, padding, dilation, padded.contiguous() + 1)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])
def test_the_float32_weight_gradient_by_windows_is_the_float64_one_rounded(gen: torch.Generator, chunk_bytes: int,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In float32 on the CPU the windows' product runs on oneDNN where torch has it: the same sum, rounded as float32
    rounds, image by image (accumulated) or all at once."""
    x, weight, _, settings, dout = _conv_case("3x3-pad1", gen)
    naive = F.conv2d_backward_naive(dout, x, weight, *settings)[1]
    monkeypatch.setattr(F, "CHUNK_BYTES", chunk_bytes)
    stride, padding, dilation, _ = settings
    x32, dout32 = x.float().contiguous(memory_format=CL), dout.float().contiguous(memory_format=CL)
    dW = F._weight_grad_by_windows(dout32, x32, weight.shape, stride, padding, dilation, None)
    assert dW.dtype == torch.float32 and _rel(dW.double(), naive) <= 1e-6
    assert F._ONEDNN_MATMUL is not None or not torch.backends.mkldnn.is_available()


def test_conv2d_backward_writes_into_given_buffers_and_skips_dx(gen: torch.Generator) -> None:
    x, weight, bias, settings, dout = _conv_case("3x3-pad1", gen)
    dx, dW, db = torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)
    got = F.conv2d_backward(dout, x, weight, *settings, dx=dx, dW=dW, db=db)
    assert got[0] is dx and got[1] is dW and got[2] is db
    naive = F.conv2d_backward_naive(dout, x, weight, *settings)
    assert all(_rel(a, b) <= 1e-12 for a, b in zip(got, naive))
    no_dx = F.conv2d_backward(dout, x, weight, *settings, bias=False, input_grad=False)
    assert no_dx[0] is None and no_dx[2] is None and _rel(no_dx[1], naive[1]) <= 1e-12


# name -> (input shape, kernel, stride, padding, dilation, ceil_mode)
POOLS = {
    "2x2": ((2, 3, 6, 8), (2, 2), (2, 2), (0, 0), (1, 1), False),
    "3x3-s2-p1-ceil": ((2, 2, 7, 7), (3, 3), (2, 2), (1, 1), (1, 1), True),
    "overlapping-3x2-dilated": ((2, 3, 9, 7), (3, 2), (1, 2), (1, 0), (2, 1), False),
    "odd-leftover-rows": ((1, 2, 7, 5), (2, 2), (2, 2), (0, 0), (1, 1), False),
    "ceil-2x3": ((2, 2, 5, 8), (2, 3), (3, 2), (1, 1), (1, 2), True),
}


@pytest.mark.parametrize("name", POOLS)
def test_max_pool2d_pair_matches_autograd(name: str, gen: torch.Generator, device: torch.device,
                                          dtype: torch.dtype, layout: str) -> None:
    shape, k, s, p, d, ceil = POOLS[name]
    x = make_input(shape, gen, device=device, dtype=dtype, layout=layout)
    leaf = x.clone().requires_grad_(True)
    ref = TF.max_pool2d(leaf, k, s, p, d, ceil)
    dout = make_input(tuple(ref.shape), gen, device=device, dtype=dtype)
    (ref_dx,) = torch.autograd.grad(ref, [leaf], dout)
    out, indices = F.max_pool2d_forward(x, k, s, p, d, ceil)
    assert torch.equal(out, ref)
    _assert_max_pool_gradient(F.max_pool2d_backward(dout, indices, x.shape), ref_dx, dout)


@pytest.mark.parametrize("values", ["zeros", "plateaus", "nan"])
def test_max_pool2d_resolves_ties_as_torch(values: str, gen: torch.Generator, device: torch.device) -> None:
    """Equal maxima in a window (and windows that overlap on them): the gradient goes where torch sends it."""
    x = {"zeros": torch.zeros(2, 3, 6, 6, dtype=F64),
         "plateaus": torch.randint(0, 3, (2, 3, 7, 6), generator=gen).to(F64),
         "nan": torch.randn(1, 2, 5, 5, generator=gen, dtype=F64).index_put_((torch.tensor([0]), torch.tensor([1]),
                                                                              torch.tensor([2]), torch.tensor([2])),
                                                                             torch.tensor(float("nan"), dtype=F64))}
    x = x[values].to(device)
    for k, s, p in [(3, 1, 1), (2, 2, 0), (3, 2, 1)]:
        leaf = x.clone().requires_grad_(True)
        ref = TF.max_pool2d(leaf, k, s, p)
        dout = torch.randn(ref.shape, generator=gen, dtype=F64).to(device)
        (ref_dx,) = torch.autograd.grad(ref, [leaf], dout)
        out, indices = F.max_pool2d_forward(x, (k, k), (s, s), (p, p))
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
        _assert_max_pool_gradient(F.max_pool2d_backward(dout, indices, x.shape), ref_dx, dout, (k, s, p))


def _assert_max_pool_gradient(dx: torch.Tensor, ref_dx: torch.Tensor, dout: torch.Tensor, case: object = None) -> None:
    """Exactly torch's on the CPU. On CUDA a pixel that several overlapping windows chose sums their gradients by
    atomic adds, in no fixed order, so only up to rounding (a gradient sent to the wrong pixel moves a whole
    ``dout``)."""
    if dx.device.type == "cpu":
        assert torch.equal(dx, ref_dx), case
    else:
        bound = 16 * torch.finfo(dout.dtype).eps * dout.abs().max().item()
        assert (dx - ref_dx).abs().max().item() <= bound, case


# name -> (input shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_POOLS = {
    "2x2": ((2, 3, 6, 8), (2, 2), (2, 2), (0, 0), False, True, None),
    "3x3-s2-p1-ceil-no-pad-count": ((2, 2, 8, 7), (3, 3), (2, 2), (1, 1), True, False, None),
    "3x3-s2-p1-ceil-pad-count": ((2, 2, 8, 7), (3, 3), (2, 2), (1, 1), True, True, None),
    "overlapping-divisor-override": ((1, 2, 5, 6), (3, 3), (1, 1), (0, 0), False, True, 5),
    "2x3-leftover-columns": ((2, 1, 5, 8), (2, 3), (2, 3), (1, 0), False, False, None),
}


@pytest.mark.parametrize("name", AVG_POOLS)
def test_avg_pool2d_pair_matches_autograd(name: str, gen: torch.Generator, device: torch.device,
                                          dtype: torch.dtype, layout: str) -> None:
    shape, *settings = AVG_POOLS[name]
    x = make_input(shape, gen, device=device, dtype=dtype, layout=layout)
    leaf = x.clone().requires_grad_(True)
    ref = TF.avg_pool2d(leaf, *settings)
    dout = make_input(tuple(ref.shape), gen, device=device, dtype=dtype)
    (ref_dx,) = torch.autograd.grad(ref, [leaf], dout)
    tol = TOLERANCES[dtype]
    assert _rel(F.avg_pool2d_forward(x, *settings), ref) <= tol
    assert _rel(F.avg_pool2d_backward(dout, x.shape, *settings), ref_dx) <= tol


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (4, 4), (7, 5), (5, 7), (2, 9)])
def test_adaptive_avg_pool2d_pair_matches_autograd(size: tuple[int, int], gen: torch.Generator,
                                                   device: torch.device, dtype: torch.dtype, layout: str) -> None:
    x = make_input((2, 3, 7, 5), gen, device=device, dtype=dtype, layout=layout)
    leaf = x.clone().requires_grad_(True)
    ref = TF.adaptive_avg_pool2d(leaf, size)
    dout = make_input(tuple(ref.shape), gen, device=device, dtype=dtype)
    (ref_dx,) = torch.autograd.grad(ref, [leaf], dout)
    tol = TOLERANCES[dtype]
    assert _rel(F.adaptive_avg_pool2d_forward(x, size), ref) <= tol
    assert _rel(F.adaptive_avg_pool2d_backward(dout, x.shape), ref_dx) <= tol


def test_global_average_pooling_shortcut_equals_the_averaging_matrices(gen: torch.Generator) -> None:
    dout = torch.randn(3, 4, 1, 1, generator=gen, dtype=F64)
    rows, cols = F._adaptive_pool_matrix(6, 1, dout), F._adaptive_pool_matrix(9, 1, dout)
    assert torch.equal(rows, torch.full((1, 6), 1 / 6, dtype=F64))
    general = torch.matmul(torch.matmul(rows.t(), dout), cols)
    assert _rel(F.adaptive_avg_pool2d_backward(dout, (3, 4, 6, 9)), general) <= 1e-15


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_pair_reduces_over_every_dim_but_channels(training: bool, gen: torch.Generator,
                                                             device: torch.device, dtype: torch.dtype,
                                                             layout: str) -> None:
    x = make_input((4, 3, 5, 6), gen, device=device, dtype=dtype, layout=layout, scale=3.0, shift=1.0)
    gamma, beta = (make_input((3,), gen, device=device, dtype=dtype) for _ in range(2))
    stats = [make_input((3,), gen, device=device, dtype=dtype), torch.rand(3, generator=gen).to(device, dtype) + 0.5]
    leaves = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]
    ref_stats = [s.clone() for s in stats]
    ref = TF.batch_norm(leaves[0], *ref_stats, leaves[1], leaves[2], training, 0.1, 1e-5)
    dout = make_input(tuple(x.shape), gen, device=device, dtype=dtype)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    out, xhat, rstd = F.batchnorm_forward(x, gamma, beta, *stats, training, 0.1, 1e-5)
    grads = F.batchnorm_backward(dout, xhat, rstd, gamma, training)
    tol = TOLERANCES[dtype]
    assert _rel(out, ref) <= tol
    for ours, theirs in zip(grads, ref_grads):
        assert _rel(ours, theirs) <= tol
    for ours, theirs in zip(stats, ref_stats):  # running averages, with the unbiased variance of all N·H·W values
        assert _rel(ours, theirs) <= tol


# ---------------------------------------------------------------------------------------------------------- layers


def _conv(*args, **kwargs) -> Callable[[torch.Generator], Module]:
    return lambda g: Conv2d(*args, **kwargs, dtype=F64, generator=g)


def _bn2d(training: bool) -> Callable[[torch.Generator], Module]:
    return lambda g: randomize_batchnorm(BatchNorm2d(3, momentum=0.2, dtype=F64), g, training)


# name -> (factory(generator), input shape, input scale, input shift)
LAYERS: dict[str, tuple[Callable[[torch.Generator], Module], tuple[int, ...], float, float]] = {
    "conv-3x3-pad1": (_conv(3, 4, 3, padding=1), (2, 3, 7, 6), 1.0, 0.0),
    "conv-strided-dilated-grouped-nobias": (_conv(4, 6, (3, 2), (2, 3), (1, 0), (1, 2), 2, False), (2, 4, 9, 8),
                                            1.0, 0.0),
    "conv-depthwise": (_conv(4, 4, 3, 2, 1, groups=4), (3, 4, 7, 7), 1.0, 0.0),
    "conv-same-batch1": (_conv(2, 3, (5, 3), padding="same"), (1, 2, 6, 5), 1.0, 0.0),
    "conv-valid-kaiming": (_conv(3, 2, 2, padding="valid", init="kaiming"), (2, 3, 5, 4), 1.0, 0.0),
    "maxpool-2": (lambda g: MaxPool2d(2), (2, 3, 6, 8), 1.0, 0.0),
    "maxpool-3-s2-p1-ceil": (lambda g: MaxPool2d(3, 2, 1, ceil_mode=True), (2, 2, 7, 7), 1.0, 0.0),
    "maxpool-dilated": (lambda g: MaxPool2d((3, 2), (1, 2), (1, 0), (2, 1)), (1, 3, 9, 7), 1.0, 0.0),
    "avgpool-2": (lambda g: AvgPool2d(2), (2, 3, 6, 8), 1.0, 0.0),
    "avgpool-3-s2-p1-ceil-nopad": (lambda g: AvgPool2d(3, 2, 1, True, False), (2, 2, 8, 7), 1.0, 0.0),
    "avgpool-divisor": (lambda g: AvgPool2d(3, 1, divisor_override=5), (1, 2, 5, 6), 1.0, 0.0),
    "adaptive-1": (lambda g: AdaptiveAvgPool2d(1), (3, 4, 5, 7), 1.0, 0.0),
    "adaptive-3x2": (lambda g: AdaptiveAvgPool2d((3, 2)), (2, 3, 7, 5), 1.0, 0.0),
    "adaptive-none-4": (lambda g: AdaptiveAvgPool2d((None, 4)), (2, 2, 3, 9), 1.0, 0.0),
    "batchnorm2d-train": (_bn2d(True), (4, 3, 5, 3), 3.0, 1.0),
    "batchnorm2d-train-batch1": (_bn2d(True), (1, 3, 3, 2), 3.0, 1.0),
    "batchnorm2d-eval": (_bn2d(False), (2, 3, 4, 4), 3.0, 1.0),
    "dropout-4d": (lambda g: Dropout(0.3, generator=torch.Generator().manual_seed(1)), (2, 3, 4, 5), 1.0, 0.0),
}
DETERMINISTIC = [name for name in LAYERS if not name.startswith("dropout")]


def _build(name: str, gen: torch.Generator, device: torch.device | str = "cpu", dtype: torch.dtype = F64,
           layout: str = "contiguous") -> tuple[Module, torch.Tensor]:
    factory, shape, scale, shift = LAYERS[name]
    layer = factory(gen).to(device=device, dtype=dtype)
    return layer, make_input(shape, gen, device=device, dtype=dtype, layout=layout, scale=scale, shift=shift)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast-layout"])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_backward_matches_autograd(name: str, fast: bool, gen: torch.Generator, device: torch.device,
                                         dtype: torch.dtype, layout: str) -> None:
    layer, x = _build(name, gen, device, dtype, layout)
    if fast:
        FastLayout(layer)
    assert_passed(check_gradients(layer, x, generator=gen))


@pytest.mark.parametrize("name", LAYERS)
def test_layer_backward_matches_finite_differences(name: str, gen: torch.Generator) -> None:
    layer, x = _build(name, gen)
    assert check_gradients_fd(layer, x, max_seconds=math.inf)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_layer_forward_and_state_match_torch_nn(name: str, gen: torch.Generator, device: torch.device,
                                                dtype: torch.dtype) -> None:
    assert_matches_torch_nn(*_build(name, gen, device, dtype))


@pytest.mark.parametrize("name", [n for n in LAYERS if not n.startswith(("dropout", "batchnorm"))])
def test_layer_repr_names_its_settings_like_torch_nn(name: str, gen: torch.Generator) -> None:
    layer, _ = _build(name, gen)
    assert repr(layer) == repr(to_torch(layer))


def test_conv2d_default_init_equals_torch_nn_conv2d_under_the_same_seed() -> None:
    for args, kwargs in [((3, 8, 3), {}), ((4, 6, (3, 5)), {"groups": 2, "bias": False}), ((16, 16, 1), {})]:
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(1234)
            ours = Conv2d(*args, **kwargs, dtype=dtype)
            after_ours = torch.rand(3)
            torch.manual_seed(1234)
            ref = torch.nn.Conv2d(*args, **kwargs, dtype=dtype)
            after_ref = torch.rand(3)
            assert torch.equal(ours.weight.data, ref.weight.detach())
            assert (ours.bias is None) == (ref.bias is None)
            if ours.bias is not None:
                assert torch.equal(ours.bias.data, ref.bias.detach())
            assert torch.equal(after_ours, after_ref), "Conv2d consumed the global RNG differently from torch.nn"
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = Conv2d(3, 8, 3, generator=g1)
    weight, bias = torch.empty(8, 3, 3, 3), torch.empty(8)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g2)
    torch.nn.init.uniform_(bias, -1 / math.sqrt(27), 1 / math.sqrt(27), generator=g2)
    assert torch.equal(ours.weight.data, weight) and torch.equal(ours.bias.data, bias)


def test_conv2d_init_schemes_repeat_with_a_generator_and_have_their_statistics() -> None:
    layers = {scheme: Conv2d(64, 128, 3, init=scheme, dtype=F64, generator=torch.Generator().manual_seed(0))
              for scheme in init.SCHEMES}
    fan_in, fan_out = 64 * 9, 128 * 9
    assert layers["default"].weight.data.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    assert layers["kaiming"].weight.data.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    assert layers["xavier"].weight.data.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.02)
    assert not layers["kaiming"].bias.data.any() and not layers["xavier"].bias.data.any()
    again = Conv2d(64, 128, 3, init="kaiming", dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.weight.data, layers["kaiming"].weight.data)


def test_batchnorm2d_running_stats_follow_torch_over_several_batches(gen: torch.Generator) -> None:
    ours = BatchNorm2d(4, momentum=0.3, dtype=F64)
    ref = to_torch(ours)
    for step, shape in enumerate([(2, 4, 3, 3), (5, 4, 2, 7), (1, 4, 4, 1)]):
        x = make_input(shape, gen, scale=1 + step, shift=step - 2.0)
        torch.testing.assert_close(ours(x), ref(x).detach())
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_dropout_on_images_drops_elements_and_repeats_its_mask_in_the_fast_layout() -> None:
    x = torch.randn(8, 4, 10, 10, dtype=F64)
    plain = Dropout(0.4, generator=torch.Generator().manual_seed(3))
    out = plain(x)
    kept = out != 0
    assert kept.shape == x.shape and 0.5 < kept.double().mean().item() < 0.7
    torch.testing.assert_close(out[kept], x[kept] / 0.6)
    dout = torch.randn(x.shape, dtype=F64)
    torch.testing.assert_close(plain.backward(dout), dout * kept / 0.6)
    fast = Dropout(0.4, generator=torch.Generator().manual_seed(3))
    FastLayout(fast)
    out_cl = fast(x.contiguous(memory_format=CL))  # a channels-last input draws the same mask
    assert out_cl.is_contiguous(memory_format=CL)
    assert torch.equal(out_cl, out)


# ------------------------------------------------------------------------------------------------ the fast layout


def test_fast_layout_runs_convolutions_channels_last_into_its_buffers(gen: torch.Generator) -> None:
    model = nb.cnn((3, 8, 8), (4, 6), 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    plain = nb.cnn((3, 8, 8), (4, 6), 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    FastLayout(model)
    x = make_input((4, 3, 8, 8), gen)
    outputs: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if name:
            layer.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    for step in range(2):
        torch.testing.assert_close(model(x), plain(x), rtol=1e-13, atol=1e-13)
        dout = make_input((4, 5), gen)
        torch.testing.assert_close(model.backward(dout), plain.backward(dout), rtol=1e-13, atol=1e-13)
        if step == 0:
            first = {name: out.data_ptr() for name, out in outputs.items()}
    for name, out in outputs.items():
        if out.dim() == 4 and out.shape[1] > 1 and out.shape[2:] != (1, 1):
            assert out.is_contiguous(memory_format=CL), name
    buffered = [name for name, ptr in first.items() if outputs[name].data_ptr() == ptr]
    assert {"1", "2", "6"} <= set(buffered)  # batch norm, ReLU and max pooling outputs stay in their buffers
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-13, msg=name)


def test_a_model_that_trained_in_the_fast_layout_pickles_and_copies(gen: torch.Generator) -> None:
    model = nb.cnn((1, 6, 6), (2,), 2, dtype=F64, generator=gen)
    step = nb.make_step(model, nb.CrossEntropyLoss(), nb.SGD(model.parameters(), lr=0.1))
    step(make_input((4, 1, 6, 6), gen), torch.tensor([0, 1, 0, 1]))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        x = make_input((3, 1, 6, 6), gen)
        torch.testing.assert_close(twin.eval()(x), model.eval()(x))


# ---------------------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("shape", [(5, 7), (8, 3, 3, 3), (6, 2, 5, 1), (4, 9, 1, 1)])
def test_init_functions_draw_what_torch_nn_init_draws(shape: tuple[int, ...]) -> None:
    cases = [
        (init.kaiming_uniform_, torch.nn.init.kaiming_uniform_, {"a": math.sqrt(5)}),
        (init.kaiming_uniform_, torch.nn.init.kaiming_uniform_, {"mode": "fan_out", "nonlinearity": "relu"}),
        (init.kaiming_normal_, torch.nn.init.kaiming_normal_, {"nonlinearity": "relu"}),
        (init.kaiming_normal_, torch.nn.init.kaiming_normal_, {"a": 0.2, "mode": "fan_out"}),
        (init.xavier_uniform_, torch.nn.init.xavier_uniform_, {}),
        (init.xavier_uniform_, torch.nn.init.xavier_uniform_, {"gain": init.calculate_gain("tanh")}),
    ]
    for ours, theirs, kwargs in cases:
        a, b = torch.empty(shape), torch.empty(shape)
        ours(a, **kwargs, generator=torch.Generator().manual_seed(7))
        theirs(b, **kwargs, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b), (ours.__name__, kwargs)
    weight = torch.empty(shape)
    assert init.calculate_fan_in_and_fan_out(weight) == torch.nn.init._calculate_fan_in_and_fan_out(weight)
    for nonlinearity, param in [("relu", None), ("tanh", None), ("leaky_relu", 0.2), ("leaky_relu", None),
                                ("sigmoid", None), ("linear", None), ("selu", None)]:
        assert init.calculate_gain(nonlinearity, param) == torch.nn.init.calculate_gain(nonlinearity, param)


def test_default_init_is_what_torch_nn_linear_and_conv2d_reset_parameters_draw() -> None:
    for make in (lambda: torch.nn.Linear(13, 5), lambda: torch.nn.Conv2d(6, 4, 3, groups=2)):
        torch.manual_seed(3)
        ref = make()
        weight, bias = torch.empty_like(ref.weight), torch.empty_like(ref.bias)
        torch.manual_seed(3)
        init.default_(weight, bias)
        assert torch.equal(weight, ref.weight.detach()) and torch.equal(bias, ref.bias.detach())


def test_init_with_a_cpu_generator_gives_the_same_values_on_every_device(device: torch.device) -> None:
    ours = init.kaiming_uniform_(torch.empty(4, 3, device=device), generator=torch.Generator().manual_seed(1))
    ref = torch.nn.init.kaiming_uniform_(torch.empty(4, 3), generator=torch.Generator().manual_seed(1))
    assert ours.device.type == device.type and torch.equal(ours.cpu(), ref)


@pytest.mark.parametrize("call, message", [
    (lambda: init.calculate_fan_in_and_fan_out(torch.empty(3)), "2 or more dimensions"),
    (lambda: init.kaiming_uniform_(torch.empty(2, 2), mode="fan"), "fan_in"),
    (lambda: init.calculate_gain("swish"), "unknown nonlinearity 'swish'"),
    (lambda: init.reset_(torch.empty(2, 2), None, "orthogonal"), "unknown init 'orthogonal'"),
])
def test_init_misuse_is_one_line(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------- errors


CONV = "Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))"
BAD = {
    "conv-channels": (lambda: Conv2d(3, 4, 3)(torch.randn(2, 1, 8, 8)),
                      [CONV, "expected 3 input channels", "(N, 3, H, W)", "got shape (2, 1, 8, 8)"]),
    "conv-flat-input": (lambda: Conv2d(3, 4, 3)(torch.randn(2, 192)),
                        [CONV, "expected input of shape (N, 3, H, W)", "(rank 2)", "x.view(N, C, H, W)"]),
    "conv-one-image": (lambda: Conv2d(3, 4, 3)(torch.randn(3, 8, 8)), ["(N, 3, H, W)", "x.unsqueeze(0)"]),
    "conv-too-small": (lambda: Conv2d(3, 4, 5, dilation=2)(torch.randn(1, 3, 6, 6)),
                       [CONV.replace("(3, 3)", "(5, 5)").replace("))", "), dilation=(2, 2))"),
                        "images of 6x6 (6x6 padded) are smaller than the kernel's extent 9x9"]),
    "conv-dtype": (lambda: Conv2d(3, 4, 3)(torch.randn(1, 3, 5, 5, dtype=F64)),
                   [CONV, "input dtype torch.float64", "parameters' torch.float32"]),
    "conv-integer-images": (lambda: Conv2d(3, 4, 3)(torch.ones(1, 3, 5, 5, dtype=torch.uint8)),
                            ["floating-point", "/ 255"]),
    "pool-rank": (lambda: MaxPool2d(2)(torch.randn(4, 6)), ["MaxPool2d(kernel_size=2, stride=2", "(N, C, H, W)"]),
    "pool-too-small": (lambda: AvgPool2d(4)(torch.randn(1, 2, 3, 8)), ["AvgPool2d", "3x8", "extent 4x4"]),
    "batchnorm2d-channels": (lambda: BatchNorm2d(4)(torch.randn(2, 3, 5, 5)),
                             ["BatchNorm2d(4", "expected 4 input channels", "(2, 3, 5, 5)"]),
    "batchnorm2d-one-value": (lambda: BatchNorm2d(4)(torch.randn(1, 4, 1, 1)),
                              ["BatchNorm2d(4", "more than one value per channel", "(1, 4, 1, 1)", "model.eval()"]),
    "groups": (lambda: Conv2d(4, 6, 3, groups=4), ["Conv2d", "divisible by groups (4)"]),
    "kernel": (lambda: Conv2d(4, 6, (3, 0)), ["kernel_size must be a positive integer or a pair", "(3, 0)"]),
    "padding": (lambda: Conv2d(4, 6, 3, padding=-1), ["padding must be a non-negative integer", "-1"]),
    "padding-word": (lambda: Conv2d(4, 6, 3, padding="full"), ["'valid' or 'same'", "'full'"]),
    "same-strided": (lambda: Conv2d(4, 6, 3, stride=2, padding="same"), ["padding='same' needs stride 1"]),
    "same-even": (lambda: Conv2d(4, 6, 2, padding="same"), ["one side more than the other"]),
    "padding-mode": (lambda: Conv2d(4, 6, 3, padding_mode="reflect"), ["padding_mode 'reflect'", "only 'zeros'"]),
    "init": (lambda: Conv2d(4, 6, 3, init="he"), ["unknown init 'he'"]),
    "channels": (lambda: Conv2d(0, 6, 3), ["in_channels must be a positive integer", "0"]),
    "maxpool-padding": (lambda: MaxPool2d(2, padding=2), ["at most half the kernel"]),
    "avgpool-divisor": (lambda: AvgPool2d(2, divisor_override=0), ["divisor_override must be a positive integer"]),
    "adaptive-size": (lambda: AdaptiveAvgPool2d((0, 2)), ["output_size must be a positive integer", "(0, 2)"]),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_arguments_and_inputs_are_one_line_errors(name: str) -> None:
    call, fragments = BAD[name]
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ------------------------------------------------------------------------------------- finite differences, sampled


class ConvForgetsTheFlip(Conv2d):
    """A ``Conv2d`` whose weight gradient has its kernel taps in the wrong order."""

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        dx = super().backward(dout)
        self.weight.grad = self.weight.grad.flip(2, 3)
        return dx


def test_finite_differences_check_a_sample_when_the_whole_jacobian_would_take_too_long(
        gen: torch.Generator) -> None:
    x = make_input((2, 3, 6, 6), gen)
    progress: list[tuple[int, int]] = []
    with pytest.warns(UserWarning, match=r"a full check needs \d+ forward passes .* checking a random sample of \d+ "
                                         r"of the 3\d\d input and parameter elements") as caught:
        assert check_gradients_fd(Conv2d(3, 4, 3, padding=1, dtype=F64, generator=gen), x, max_seconds=1e-9,
                                  progress=lambda done, total: progress.append((done, total)))
    assert all("\n" not in str(w.message) for w in caught)
    assert progress and progress[-1][0] == progress[-1][1] and [d for d, _ in progress] == sorted({d for d, _ in
                                                                                                    progress})
    wrong = ConvForgetsTheFlip(3, 4, 3, padding=1, dtype=F64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for a sample is not warned about
        assert not check_gradients_fd(wrong, x, max_elements=200, generator=torch.Generator().manual_seed(1))
        with pytest.raises(GradcheckError, match=r"Jacobian mismatch \(sampled\)"):
            check_gradients_fd(wrong, x, max_elements=200, raise_exception=True)
        assert not check_gradients_fd(wrong, x)  # the full check fails it too
    with pytest.raises(ValueError, match="max_elements must be a positive integer"):
        check_gradients_fd(wrong, x, max_elements=0)

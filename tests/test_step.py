"""The training step: FastStep against the readable SimpleStep (the same parameters, optimizer state, losses and counts
after several steps, for every layer, loss, reduction and optimizer setting, and a user's layer), proof that the step
runs the functional.py pairs, its bookkeeping (flat views, state dicts, grad_hook, partial batches), its errors, and the
CUDA options (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from nnbackprop import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, BCEWithLogitsLoss, Conv2d, CrossEntropyLoss, Dropout,
                        Flatten, GELU, LeakyReLU, Linear, MaxPool2d, MSELoss, ReLU, Sequential, Tanh, cnn, make_step,
                        mlp, to_torch)
from nnbackprop.module import Module
from nnbackprop.optim import SGD, Adam, AdamW
from nnbackprop.step import FastStep, SimpleStep, num_correct
from user_layers import Scale, Swish

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
IN, HIDDEN, CLASSES = 36, [24, 16], 10
BATCHES = [32, 32, 32, 32, 32, 20]  # the last one partial


def _model(dtype: torch.dtype = torch.float64, device: str = "cpu", out: int = CLASSES, **options) -> Sequential:
    """The same weights (and dropout generator state) every call."""
    return mlp(IN, HIDDEN, out, dtype=dtype, generator=torch.Generator().manual_seed(1), **options).to(device)


def _batches(dtype: torch.dtype, classes: int = CLASSES, sizes: list[int] = BATCHES, device: str = "cpu",
             float_targets: bool = False):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 1, 6, 6, generator=g, dtype=dtype).to(device),
             (torch.rand(n, classes, generator=g, dtype=dtype) if float_targets else
              torch.randint(0, max(classes, 2), (n,), generator=g)).to(device)) for n in sizes]


def _train(step_class, model: Module, loss_fn, batches, hook=None, lrs=None, optimizer=SGD, **opt):
    defaults = {"lr": 0.1, "momentum": 0.9} if optimizer is SGD else {"lr": 1e-2}
    optimizer = optimizer(model.parameters(), **{**defaults, **opt})
    step = step_class(model, loss_fn, optimizer, hook)
    results = []
    for i, (x, y) in enumerate(batches):
        if lrs is not None:
            optimizer.param_groups[0]["lr"] = lrs[i]
        results.append(step(x, y))
    return model, optimizer, results


def _max_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30)).item()
               for k in a)


def _assert_same_training(simple, fast, dtype: torch.dtype) -> None:
    (m1, o1, r1), (m2, o2, r2) = simple, fast
    tol = TOLERANCE[dtype]
    assert _max_relative(m1.state_dict(), m2.state_dict()) < tol
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        assert s1["state"][k].keys() == s2["state"][k].keys()
        for name in s1["state"][k]:
            torch.testing.assert_close(s2["state"][k][name].double(), s1["state"][k][name].double(), rtol=tol, atol=tol)
    for (loss1, correct1), (loss2, correct2) in zip(r1, r2):
        assert loss2.dim() == 0 and correct2.dim() == 0 and correct2.dtype == torch.int64
        torch.testing.assert_close(loss2.double(), loss1.double(), rtol=tol * 10, atol=tol * 10)
        assert correct2.item() == correct1.item()


def _custom(dtype: torch.dtype = torch.float64, out: int = CLASSES, **_) -> Sequential:
    g = torch.Generator().manual_seed(1)
    return Sequential(Flatten(), Linear(IN, 24, generator=g), Swish(), Scale(24), Linear(24, out, generator=g)).to(
        dtype=dtype)


def _cnn(dtype: torch.dtype = torch.float64, out: int = CLASSES, **options) -> Sequential:
    """A CNN on the 1x6x6 batches: two stages (6x6 -> 3x3 -> 1x1), global average pooling, dropout, a hidden Linear."""
    return cnn((1, 6, 6), (4, 6), out, dtype=dtype, generator=torch.Generator().manual_seed(1), **options)


def _every_conv_layer(dtype: torch.dtype = torch.float64, out: int = CLASSES, **_) -> Sequential:
    """Strided, dilated, grouped and depthwise convolutions, all the pooling layers, 4-D dropout and batch norm."""
    g = torch.Generator().manual_seed(1)
    return Sequential(Conv2d(1, 4, 3, padding=1, generator=g), BatchNorm2d(4), ReLU(), Dropout(0.2, generator=g),
                      Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, generator=g), Tanh(),
                      MaxPool2d(2, 1, ceil_mode=True), Conv2d(6, 6, 2, padding=1, groups=6, bias=False, generator=g),
                      AvgPool2d(2, 1, padding=1, count_include_pad=False), AdaptiveAvgPool2d((2, 1)), Flatten(),
                      Linear(12, out, generator=g)).to(dtype=dtype)


CASES = {  # name: (model options, loss, optimizer settings)
    "relu": ({}, CrossEntropyLoss(), {}),
    "leaky_relu": ({"activation": "leaky_relu"}, CrossEntropyLoss(), {}),
    "sigmoid": ({"activation": "sigmoid"}, CrossEntropyLoss(), {}),
    "tanh": ({"activation": "tanh"}, CrossEntropyLoss(), {}),
    "gelu": ({"activation": "gelu"}, CrossEntropyLoss(), {}),
    "dropout": ({"dropout": 0.3}, CrossEntropyLoss(), {}),
    "batchnorm+dropout": ({"batchnorm": True, "dropout": 0.2, "activation": "tanh"}, CrossEntropyLoss(), {}),
    "cross-entropy sum": ({}, CrossEntropyLoss("sum"), {"lr": 0.003}),
    "mse labels": ({}, MSELoss(), {}),
    "mse float targets, sum": ({}, MSELoss("sum"), {"lr": 0.003}),
    "mse float targets, half sum": ({}, MSELoss("half_sum"), {"lr": 0.003}),
    "bce": ({}, BCEWithLogitsLoss(), {}),
    "bce sum": ({}, BCEWithLogitsLoss("sum"), {"lr": 0.003}),
    "nesterov+decay": ({}, CrossEntropyLoss(), {"nesterov": True, "weight_decay": 1e-2}),
    "dampening+decay": ({}, CrossEntropyLoss(), {"dampening": 0.3, "weight_decay": 1e-2}),
    "no momentum": ({}, CrossEntropyLoss(), {"momentum": 0.0}),
    "adam+decay": ({}, CrossEntropyLoss(), {"optimizer": Adam, "weight_decay": 1e-2}),
    "adamw amsgrad": ({"batchnorm": True}, CrossEntropyLoss(), {"optimizer": AdamW, "amsgrad": True}),
    "user layers": ({"build": _custom}, CrossEntropyLoss(), {}),
    "user layers, adam": ({"build": _custom}, CrossEntropyLoss(), {"optimizer": Adam}),
    "cnn": ({"build": _cnn, "dropout": 0.2, "hidden": [8]}, CrossEntropyLoss(), {}),
    "cnn no batch norm, gelu, adamw": ({"build": _cnn, "batchnorm": False, "activation": "gelu"}, CrossEntropyLoss(),
                                       {"optimizer": AdamW, "weight_decay": 1e-2}),
    "cnn, bce": ({"build": _cnn}, BCEWithLogitsLoss(), {"nesterov": True}),
    "every conv layer": ({"build": _every_conv_layer}, CrossEntropyLoss(), {}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_fast_step_matches_simple_step(case: str, dtype: torch.dtype) -> None:
    model_options, loss, opt = CASES[case]
    model_options = dict(model_options)
    build = model_options.pop("build", _model)
    out = 1 if isinstance(loss, BCEWithLogitsLoss) else CLASSES
    batches = _batches(dtype, out, float_targets=isinstance(loss, MSELoss) and case.startswith("mse float"))
    simple = _train(SimpleStep, build(dtype, out=out, **model_options), copy.deepcopy(loss), batches, **opt)
    fast = _train(FastStep, build(dtype, out=out, **model_options), copy.deepcopy(loss), batches, **opt)
    _assert_same_training(simple, fast, dtype)


@pytest.mark.parametrize("layer", [LeakyReLU(-0.5), LeakyReLU(1.5), GELU("tanh")], ids=lambda layer: layer.name)
def test_fast_step_takes_settings_a_fast_kernel_once_refused(layer: Module) -> None:
    def build(dtype: torch.dtype = torch.float64, out: int = CLASSES) -> Sequential:
        g = torch.Generator().manual_seed(1)
        return Sequential(Flatten(), Linear(IN, 16, generator=g), copy.deepcopy(layer),
                          Linear(16, out, generator=g)).to(dtype=dtype)

    batches = _batches(torch.float64)
    _assert_same_training(_train(SimpleStep, build(), CrossEntropyLoss(), batches),
                          _train(FastStep, build(), CrossEntropyLoss(), batches), torch.float64)


def test_a_cnn_runs_in_the_fast_layout_with_its_images_channels_last() -> None:
    model = _cnn(dropout=0.2)
    step = make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert type(step) is FastStep and step.fallback_reason is None
    seen = {}
    for name, layer in model.named_modules():
        if name:
            layer.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    step(*_batches(torch.float64)[0])
    assert seen["0"].is_contiguous(memory_format=torch.channels_last)  # the first convolution's output, and after it
    assert seen["1"].is_contiguous(memory_format=torch.channels_last) and not seen["1"].is_contiguous()
    conv = model[0]
    assert conv.weight.untyped_storage().data_ptr() == step.layout.flat.data.untyped_storage().data_ptr()
    assert conv.weight.grad.untyped_storage().data_ptr() == step.layout.flat.grad.untyped_storage().data_ptr()


def test_user_layers_live_in_the_flat_buffers() -> None:
    model = _custom()
    step = make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert type(step) is FastStep and step.fallback_reason is None
    step(*_batches(torch.float64)[0])
    flat = step.layout.flat
    scale = model[3].gamma
    assert scale.untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr()
    assert scale.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()


def test_fast_step_follows_lr_changes_eval_mode_and_growing_batches() -> None:
    lrs = [0.1, 0.05, 0.2, 0.01, 0.1, 0.3]
    batches = _batches(torch.float64, sizes=[8, 32, 5, 32, 32, 17])
    runs = []
    for step_class in (SimpleStep, FastStep):
        model = _model(batchnorm=True, dropout=0.2)
        model, optimizer, results = _train(step_class, model, CrossEntropyLoss(), batches[:3], lrs=lrs[:3])
        model.eval()  # dropout off, batch norm on running statistics: a step still updates the weights
        step = step_class(model, CrossEntropyLoss(), optimizer)
        for lr, (x, y) in zip(lrs[3:], batches[3:]):
            optimizer.param_groups[0]["lr"] = lr
            results.append(step(x, y))
        runs.append((model, optimizer, results))
    _assert_same_training(*runs, torch.float64)


def test_grad_hook_gets_the_flat_gradient_and_its_changes_count() -> None:
    batches = _batches(torch.float64)
    seen = []

    def double(flat: torch.Tensor) -> None:
        seen.append(flat.clone())
        flat.mul_(2)

    simple = _train(SimpleStep, _model(), CrossEntropyLoss(), batches, hook=double)
    simple_grads = seen[:]
    seen.clear()
    fast = _train(FastStep, _model(), CrossEntropyLoss(), batches, hook=double)
    _assert_same_training(simple, fast, torch.float64)
    assert len(seen) == len(simple_grads) == len(batches)
    for got, want in zip(seen, simple_grads):
        assert got.shape == (sum(p.data.numel() for p in fast[0].parameters()),)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    unhooked = _train(FastStep, _model(), CrossEntropyLoss(), batches)
    assert _max_relative(unhooked[0].state_dict(), fast[0].state_dict()) > 1e-3  # the hook changed the update

    frozen = _model()
    before = frozen.state_dict()
    _train(FastStep, frozen, CrossEntropyLoss(), batches, hook=lambda flat: flat.zero_(), momentum=0.0)
    assert _max_relative(before, frozen.state_dict()) == 0


def test_parameters_become_views_and_nothing_records_autograd() -> None:
    model = _model()
    before = model.state_dict()
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = FastStep(model, CrossEntropyLoss(), optimizer)
    assert _max_relative(before, model.state_dict()) == 0  # rebinding keeps the values
    bases = {p.data.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(bases) == 1
    with torch.enable_grad():
        loss_sum, n_correct = step(*_batches(torch.float64)[0])
    assert not loss_sum.requires_grad and loss_sum.grad_fn is None
    assert all(not p.data.requires_grad and p.grad is not None and not p.grad.requires_grad
               for p in model.parameters())


def test_results_are_not_overwritten_by_the_next_step() -> None:
    model = _model()
    step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    batches = _batches(torch.float64)
    first = step(*batches[0])
    kept = (first[0].clone(), first[1].clone())
    step(*batches[1])
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1])


def test_resume_from_state_dicts_equals_uninterrupted_training() -> None:
    batches = _batches(torch.float64)
    straight = _train(FastStep, _model(), CrossEntropyLoss(), batches)

    model, optimizer, results = _train(FastStep, _model(), CrossEntropyLoss(), batches[:3])
    model_state, optimizer_state = model.state_dict(), copy.deepcopy(optimizer.state_dict())
    resumed = mlp(IN, HIDDEN, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    resumed_optimizer = SGD(resumed.parameters(), lr=0.5)
    step = FastStep(resumed, CrossEntropyLoss(), resumed_optimizer)
    step(*batches[0])  # a step from other weights and state, overwritten below
    resumed.load_state_dict(model_state)
    resumed_optimizer.load_state_dict(optimizer_state)
    results += [step(x, y) for x, y in batches[3:]]
    _assert_same_training(straight, (resumed, resumed_optimizer, results), torch.float64)


def test_why_not_and_errors_name_the_problem() -> None:
    assert FastStep.why_not(_model(batchnorm=True, dropout=0.1, activation="gelu")) is None

    mixed = Sequential(Linear(4, 3, dtype=torch.float64), Linear(3, 2))
    shared = Sequential(Linear(4, 4), ReLU())
    shared.append(shared[0])
    cases = [(mixed, "one device and dtype"), (shared, "shares a parameter"),
             (Sequential(ReLU(), Tanh()), "with parameters")]
    for model, words in cases:
        assert words in FastStep.why_not(model)
        optimizer = SGD(Linear(2, 2).parameters(), lr=0.1)
        with pytest.raises(ValueError, match=words):
            FastStep(model, CrossEntropyLoss(), optimizer)
        step = make_step(model, CrossEntropyLoss(), optimizer)
        assert type(step) is SimpleStep and words in step.fallback_reason

    model = _model()
    with pytest.raises(ValueError, match="does not update every parameter"):
        FastStep(model, CrossEntropyLoss(), SGD(list(model.parameters())[:2], lr=0.1))
    for option in ("cuda_graph", "tf32"):
        with pytest.raises(ValueError, match="CUDA"):
            FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), **{option: True})

    step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    x, y = _batches(torch.float64)[0]
    bad = [
        ((x.float(), y), "dtype torch.float32 differs"),
        ((x[:, :, :5], y), r"\(N, 36\)"),
        ((x, y.float()), "integer"),
        ((x, y[:-1]), "shape"),
        ((x, torch.full_like(y, CLASSES)), r"\[0, 9\]"),
    ]
    for (bx, by), message in bad:
        with pytest.raises(ValueError, match=message):
            step(bx, by)
    step(x, y)  # the labels are checked at every step, not only the first
    with pytest.raises(ValueError, match="found 10"):
        step(x, torch.full_like(y, CLASSES))


# ---------------------------------------------------------------------------------------------- against autograd


@pytest.mark.parametrize("nesterov, weight_decay", [(False, 0.0), (True, 1e-2)])
def test_simple_step_matches_autograd_and_torch_sgd(nesterov, weight_decay):
    torch.manual_seed(0)
    model = mlp(12, [8, 8], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = to_torch(model)
    step = SimpleStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov,
                                                     weight_decay=weight_decay))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov,
                                weight_decay=weight_decay)
    for _ in range(3):
        x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 3, (10,))
        loss_sum, correct = step(x, y)
        optimizer.zero_grad()
        out = reference(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        optimizer.step()
        assert torch.allclose(loss_sum, torch.nn.functional.cross_entropy(out, y) * 10, rtol=1e-12)
        assert int(correct) == int((out.argmax(1) == y).sum())
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, rtol=1e-10, atol=1e-12), key


def test_grad_hook_sees_one_flat_gradient_and_its_changes_count():
    model = mlp(5, [4], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []

    def hook(flat):
        seen.append(flat.clone())
        flat.mul_(0.5)

    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    SimpleStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=1.0), hook)(x, y)
    twin = mlp(5, [4], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    SimpleStep(twin, CrossEntropyLoss(), SGD(twin.parameters(), lr=0.5))(x, y)
    (flat,) = seen  # halving the gradient at lr 1 is the step at lr 0.5
    assert flat.shape == (sum(p.numel() for p in model.parameters()),)
    assert _max_relative(model.state_dict(), twin.state_dict()) == 0


def test_num_correct():
    assert int(num_correct(torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]]), torch.tensor([1, 1, 1]))) == 2
    assert int(num_correct(torch.tensor([[0.5], [-0.5], [2.0]]), torch.tensor([1, 0, 0]))) == 2
    assert int(num_correct(torch.tensor([0.5, -0.5]), torch.tensor([0, 0]))) == 1


# ------------------------------------------------------------------------------------------------------------ CUDA


def _cuda_dropout_model() -> Sequential:
    model = _model(torch.float32, "cuda", dropout=0.2)
    for layer in model:
        if isinstance(layer, Dropout):
            layer.generator = torch.Generator("cuda").manual_seed(5)  # a graph can capture a CUDA generator only
    return model


@CUDA
@pytest.mark.cuda
def test_cuda_graph_matches_eager_fast_step() -> None:
    sizes = [32] * 8 + [20] * 5  # the partial batch gets its own graph after its warm-up
    batches = _batches(torch.float32, sizes=sizes, device="cuda")
    lrs = [0.1 / (1 + i) for i in range(len(sizes))]  # a schedule: read from device tensors, no recapture
    eager = _train(FastStep, _cuda_dropout_model(), CrossEntropyLoss(), batches, lrs=lrs)
    model = _cuda_dropout_model()
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = FastStep(model, CrossEntropyLoss(), optimizer, cuda_graph=True, graph_warmup=2)
    results = []
    for lr, (x, y) in zip(lrs, batches):
        optimizer.param_groups[0]["lr"] = lr
        results.append(step(x, y))
    assert len(step._graphs) == 2
    _assert_same_training(eager, (model, optimizer, results), torch.float32)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("option", ["tf32"])
def test_cuda_precision_options_stay_close_to_float32(option: str) -> None:
    batches = _batches(torch.float32, device="cuda")
    plain = _train(FastStep, _model(torch.float32, "cuda"), CrossEntropyLoss(), batches)
    model = _model(torch.float32, "cuda")
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9), **{option: True})
    results = [step(x, y) for x, y in batches]
    assert torch.backends.cuda.matmul.allow_tf32 == tf32_before  # tf32 is scoped to the step
    assert _max_relative(plain[0].state_dict(), model.state_dict()) < 3e-2
    for (loss1, _), (loss2, _) in zip(plain[2], results):
        torch.testing.assert_close(loss2, loss1, rtol=3e-2, atol=0)

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
from nnbackprop.errors import BackwardError, ConfigError
from nnbackprop.evaluation import evaluate
from nnbackprop.module import Module, Parameter
from nnbackprop.optim import SGD, Adam, AdamW
from nnbackprop.gradcheck import check_gradients
from nnbackprop.step import FastStep, SimpleStep, forward_backward, full_float32, num_correct, tf32
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
    assert step.graphs.num_graphs == 2 and step.graph_failure is None
    _assert_same_training(eager, (model, optimizer, results), torch.float32)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("option", ["tf32"])
def test_cuda_precision_options_stay_close_to_float32(option: str) -> None:
    batches = _batches(torch.float32, device="cuda")
    plain = _train(FastStep, _model(torch.float32, "cuda"), CrossEntropyLoss(), batches)
    model = _model(torch.float32, "cuda")
    flags_before = _precision_flags()
    step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9), **{option: True})
    results = [step(x, y) for x, y in batches]
    assert _precision_flags() == flags_before  # tf32 is scoped to the step
    assert _max_relative(plain[0].state_dict(), model.state_dict()) < 3e-2
    for (loss1, _), (loss2, _) in zip(plain[2], results):
        torch.testing.assert_close(loss2, loss1, rtol=3e-2, atol=0)


# ------------------------------------------------------------------------------------------ the devices of a model


def test_fast_step_names_a_dropout_generator_on_another_device_and_make_step_falls_back() -> None:
    model = _model(torch.float32, dropout=0.2)
    for layer in model.modules():
        if isinstance(layer, Dropout):
            layer.generator = torch.Generator().manual_seed(0)  # on the CPU
    assert FastStep.why_not(model) is None
    model.to("meta")  # a model on another device than its dropout masks' generator: each step would wait for a copy
    reason = FastStep.why_not(model)
    assert reason is not None and "Dropout(p=0.2)" in reason and "cpu generator" in reason and "meta" in reason
    optimizer = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="draws its masks from a cpu generator"):
        FastStep(model, CrossEntropyLoss(), optimizer)
    step = make_step(model, CrossEntropyLoss(), optimizer)
    assert type(step) is SimpleStep and step.fallback_reason == reason


# ---------------------------------------------------------------------------------------- mixed precision (bf16)

BF16 = torch.bfloat16


def _bf16_batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.to(BF16), y) for x, y in _batches(torch.float32, sizes=[size] * n)]


def test_bf16_fast_step_computes_in_bf16_and_updates_float32_master_weights() -> None:
    """The update, written out by hand: the gradient of the bf16 model, in float32, into float32 momentum and master
    weights; the layers then compute with the master weights rounded to bf16. The learning rate is so small that
    each update is below bf16's resolution of the weights: a bf16 update would leave them where they were."""
    lr, mu = 1e-4, 0.9
    model = _model(torch.float32)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = SGD(model.parameters(), lr=lr, momentum=mu)
    step = FastStep(model, CrossEntropyLoss(), optimizer, dtype=BF16)
    flat = step.layout.flat
    assert all(p.dtype == BF16 and p.untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr()
               for p in model.parameters())
    assert flat.master.dtype == torch.float32 and flat.data.dtype == BF16
    names = [name for name, _ in model.named_parameters()]
    assert torch.equal(flat.master, torch.cat([initial[name].reshape(-1) for name in names]))

    reference = _model(torch.float32).to(BF16)  # computes the gradient of the bf16 weights, as the step's layers do
    master = {name: initial[name].clone() for name in names}
    momentum: dict[str, torch.Tensor] = {}
    batches = _bf16_batches(5)
    for x, y in batches:
        loss_sum, _ = step(x, y)
        assert loss_sum.dtype == BF16
        reference.load_state_dict({name: value.to(BF16) for name, value in master.items()})
        reference.zero_grad()
        forward_backward(reference, CrossEntropyLoss(), x, y)
        for name, p in reference.named_parameters():
            grad = p.grad.float()
            momentum[name] = grad if name not in momentum else mu * momentum[name] + grad
            master[name] = master[name] - lr * momentum[name]

    state = step.model_state_dict()
    for name, p in model.named_parameters():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], master[name], rtol=1e-6, atol=1e-8)
        assert torch.equal(p, state[name].to(BF16))  # the layers compute with the master weights, rounded
        assert optimizer.state[p]["momentum_buffer"].dtype == torch.float32
    moved = torch.cat([(state[n] - initial[n]).reshape(-1) for n in names])
    rounded_moved = torch.cat([(state[n].to(BF16).float() - initial[n].to(BF16).float()).reshape(-1) for n in names])
    assert (moved != 0).float().mean() > 0.9  # the float32 master weights all moved ...
    assert (rounded_moved == 0).float().mean() > 0.5  # ... by less than bf16 can show, for most of them


def test_bf16_master_weights_are_what_a_checkpoint_keeps_and_loads_exactly() -> None:
    model = _model(torch.float32)
    step = FastStep(model, CrossEntropyLoss(), Adam(model.parameters(), lr=1e-3), dtype=BF16)
    batches = _bf16_batches(6)
    for x, y in batches[:3]:
        step(x, y)
    saved = step.model_state_dict()
    assert all(value.dtype == torch.float32 for value in saved.values())
    assert any(not torch.equal(value, value.to(BF16).float()) for value in saved.values())  # more than bf16 holds
    for x, y in batches[3:]:
        step(x, y)
    assert any(not torch.equal(saved[k], v) for k, v in step.model_state_dict().items())
    step.load_model_state_dict(saved)
    restored = step.model_state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(restored[name], saved[name])  # bit for bit, not via bf16
        assert torch.equal(p, saved[name].to(BF16))


def test_bf16_is_refused_where_there_are_no_master_weights() -> None:
    model = _model(torch.float32)
    with pytest.raises(ConfigError) as info:
        make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), fast=False, dtype=BF16)
    assert "dtype need the fast step" in str(info.value) and "\n" not in str(info.value)
    bf16_model = _model(torch.float32).to(BF16)
    with pytest.raises(ConfigError) as info:
        SimpleStep(bf16_model, CrossEntropyLoss(), SGD(bf16_model.parameters(), lr=0.1))
    assert "master weights" in str(info.value) and "dtype=torch.bfloat16" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("step_class", [SimpleStep, FastStep])
def test_autocast_around_a_step_is_refused_in_one_line(step_class) -> None:
    model = _model(torch.float32)
    step = step_class(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    x, y = _batches(torch.float32)[0]
    before = model.state_dict()
    with torch.autocast("cpu", dtype=BF16), pytest.raises(ConfigError) as info:
        step(x, y)
    message = str(info.value)
    assert "torch.autocast" in message and "dtype=torch.bfloat16" in message and "\n" not in message
    assert _max_relative(before, model.state_dict()) == 0
    step(x, y)  # outside autocast it trains


# ------------------------------------------------------------------------------------------------------------ TF32

PRECISION_FLAGS = {"all": torch.backends, "cudnn": torch.backends.cudnn, "mkldnn": torch.backends.mkldnn,
                   "matmul": torch.backends.cuda.matmul, "conv": getattr(torch.backends.cudnn, "conv", None),
                   "rnn": getattr(torch.backends.cudnn, "rnn", None)}
NEW_PRECISION_API = all(hasattr(b, "fp32_precision") for b in PRECISION_FLAGS.values())


def _precision_flags() -> dict:
    if NEW_PRECISION_API:
        return {name: b.fp32_precision for name, b in PRECISION_FLAGS.items()}
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


@pytest.fixture
def precision_flags():
    """torch's float32 precision settings, put back as they were after the test."""
    matmul_precision, flags = torch.get_float32_matmul_precision(), _precision_flags()
    yield
    torch.set_float32_matmul_precision(matmul_precision)
    for name, value in flags.items():
        if NEW_PRECISION_API:
            PRECISION_FLAGS[name].fp32_precision = value
    if not NEW_PRECISION_API:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags["matmul"], flags["cudnn"]


def _user_sets_new_api_tf32() -> None:
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def _user_sets_new_api_ieee() -> None:
    torch.backends.fp32_precision = "ieee"


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch without the fp32_precision API")
@pytest.mark.parametrize("before", [lambda: None, _user_sets_new_api_tf32, _user_sets_new_api_ieee,
                                    lambda: torch.set_float32_matmul_precision("high")],
                         ids=["defaults", "new-api-tf32", "new-api-ieee", "set_float32_matmul_precision"])
def test_tf32_context_uses_the_new_api_and_restores_what_was_there(before, precision_flags) -> None:
    before()
    previous = _precision_flags()
    with tf32(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert _precision_flags() == previous
    with tf32(False):
        assert _precision_flags() == previous
    with pytest.raises(KeyError), tf32(True):
        raise KeyError("a step that fails")
    assert _precision_flags() == previous


def _tf32_anywhere() -> bool:
    """Whether CUDA's float32 matrix products or convolutions may use TF32 under torch's present settings."""
    if NEW_PRECISION_API:
        return "tf32" in (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    return torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32


def _user_allows_tf32() -> None:
    if NEW_PRECISION_API:
        _user_sets_new_api_tf32()
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


class _SeesPrecision(Module):
    """A layer that records, at its forward, whether TF32 was allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_tf32_anywhere())
        return x * 2

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return dout * 2

    def reference_forward(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        return x * 2


def test_the_float32_gradient_check_runs_without_tf32_and_restores_what_was_there(precision_flags) -> None:
    """torch's default lets cuDNN's float32 convolutions use TF32, whose rounding (1e-4) a float32 gradient check would
    count against the layer (it did, on the first GPU this project met); the check turns it off for its own run."""
    _user_allows_tf32()
    previous = _precision_flags()
    with full_float32():
        assert not _tf32_anywhere()
    assert _precision_flags() == previous and _tf32_anywhere()
    layer = _SeesPrecision()
    assert check_gradients(layer, torch.randn(3, 4)).passed
    assert layer.seen == [False] and _precision_flags() == previous


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_tf32_needs_cuda_and_says_so() -> None:
    model = _model(torch.float32)
    with pytest.raises(ValueError, match="tf32 and cuda_graph need the model on a CUDA device, it is on cpu"):
        make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), tf32=True)
    with pytest.raises(ConfigError, match=r"^tf32 need the fast step, which cannot run here \(fast=False\)$"):
        make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), fast=False, tf32=True)


# ----------------------------------------------------------------------------------------- the backward contract


class AssignsGrad(Module):
    """A user's layer that assigns ``weight.grad`` instead of accumulating it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = Parameter(torch.ones(IN, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.save_for_backward(x)
        return x * self.weight

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        (x,) = self.saved_tensors
        self.weight.grad = (dout * x).sum(0)
        return dout * self.weight


class ForgetsGrad(AssignsGrad):
    """A user's layer whose backward never writes its parameter's gradient."""

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return dout * self.weight


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "simple"])
@pytest.mark.parametrize("layer, words", [
    (AssignsGrad, "assigned 1.weight.grad instead of accumulating it: call self.weight.accumulate(dweight)"),
    (ForgetsGrad, "left parameter '1.weight' without a gradient: call self.weight.accumulate(dweight)"),
], ids=["assigns", "forgets"])
def test_a_layer_that_breaks_the_gradient_contract_is_refused_on_the_first_step(layer, words, fast) -> None:
    g = torch.Generator().manual_seed(0)
    model = Sequential(Flatten(), layer(), Linear(IN, CLASSES, dtype=torch.float64, generator=g))
    step = make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), fast=fast)
    assert type(step) is (FastStep if fast else SimpleStep)
    with pytest.raises(BackwardError) as info:
        step(*_batches(torch.float64)[0])
    assert words in str(info.value) and type(model[1]).__name__ in str(info.value)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------------------- optimizer state


def test_adam_state_dict_leaves_the_live_state_alone_and_counts_every_step() -> None:
    model = _model()
    optimizer = Adam(model.parameters(), lr=1e-3)
    step = make_step(model, CrossEntropyLoss(), optimizer)
    assert type(step) is FastStep
    batches = _batches(torch.float64, sizes=[16] * 10)
    for x, y in batches[:5]:
        step(x, y)
    first = optimizer.state_dict()
    assert {float(entry["step"]) for entry in first["state"].values()} == {5.0}
    first["state"][0]["step"].fill_(100)  # the caller's copy
    for x, y in batches[5:]:
        step(x, y)
    second = optimizer.state_dict()
    assert {float(entry["step"]) for entry in second["state"].values()} == {10.0}
    assert second["state"][0]["step"].dtype == torch.float32


def test_load_state_dict_copies_into_the_tensors_a_captured_graph_reads() -> None:
    """A CUDA graph reads the optimizer's flat state and its hyperparameter tensors at fixed addresses: loading a state
    dict (a resume) must copy into those, not replace them. Checked on the CPU, where the addresses are the same."""
    model = _model()
    optimizer = Adam(model.parameters(), lr=1e-3, weight_decay=1e-2)
    step = FastStep(model, CrossEntropyLoss(), optimizer)
    batches = _batches(torch.float64, sizes=[16] * 6)
    for x, y in batches[:3]:
        step(x, y)
    live = {name: (value.data_ptr(), value) for name, value in optimizer.state[model[1].weight].items()}
    scalars = {key: [t.data_ptr() for t in tensors] for key, (_, tensors) in optimizer._scalar_tensors.items()}
    assert scalars

    other = _model()
    other_optimizer = Adam(other.parameters(), lr=5e-3, weight_decay=1e-2)  # another run, another learning rate
    other_step = FastStep(other, CrossEntropyLoss(), other_optimizer)
    _train_with(other_step, batches[3:])
    loaded = copy.deepcopy(other_optimizer.state_dict())
    optimizer.load_state_dict(loaded)
    optimizer.refresh_scalars()  # as a graph replay does first

    for name, (address, tensor) in live.items():
        now = optimizer.state[model[1].weight][name]
        assert now.data_ptr() == address, f"{name} moved"
        assert torch.equal(tensor, loaded["state"][0][name].to(tensor.dtype))
    assert {key: [t.data_ptr() for t in tensors] for key, (_, tensors) in optimizer._scalar_tensors.items()} == scalars
    (lr, *_), = [tensors for _, tensors in optimizer._scalar_tensors.values()]
    assert lr.item() == pytest.approx(5e-3)
    mine = optimizer.state_dict()
    for index, entry in loaded["state"].items():
        for name, value in entry.items():
            assert torch.equal(mine["state"][index][name], value)

    model.load_state_dict(other.state_dict())  # and training goes on from there as the other run's does
    for x, y in batches[:2]:
        step(x, y)
    _train_with(other_step, batches[:2])
    assert _max_relative(other.state_dict(), model.state_dict()) == 0


def _train_with(step, batches) -> list:
    return [step(x, y) for x, y in batches]


# ---------------------------------------------------------------------------------------------- CUDA: the fixes


@CUDA
@pytest.mark.cuda
def test_tf32_changes_a_float32_step_by_more_than_rounding_and_without_it_float32_matches_float64(
        precision_flags) -> None:
    """The gradients of a matmul-heavy step against float64: float32 is within float32 rounding; TF32 (10-bit
    mantissas) is off by much more — so the option really takes effect, and only inside the step."""
    def build(dtype: torch.dtype) -> Sequential:
        g = torch.Generator().manual_seed(1)
        return Sequential(Linear(1024, 1024, generator=g), ReLU(), Linear(1024, 1024, generator=g), ReLU(),
                          Linear(1024, 10, generator=g)).to("cuda", dtype)

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(256, 1024, generator=g).cuda(), torch.randint(0, 10, (256,), generator=g).cuda()

    def gradient(dtype: torch.dtype, **options) -> torch.Tensor:
        model = build(dtype)
        step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), **options)
        step(x.to(dtype), y)
        return step.layout.flat.grad.double()

    exact = gradient(torch.float64)
    flags = _precision_flags()
    plain = (gradient(torch.float32) - exact).norm() / exact.norm()
    in_tf32 = (gradient(torch.float32, tf32=True) - exact).norm() / exact.norm()
    assert _precision_flags() == flags
    assert plain < 1e-5, f"float32 is off float64 by {plain:.1e}"
    assert in_tf32 > 5e-5 and in_tf32 > 10 * plain, f"TF32 {in_tf32:.1e}, float32 {plain:.1e}"


@CUDA
@pytest.mark.cuda
def test_labels_out_of_range_under_cuda_graphs_are_a_label_error() -> None:
    """On a GPU a bad label clamps and sets a flag on the device (no sync); the flag is one tensor written in place,
    so a replayed graph sets it too — after an evaluation pass of the loss in between and with a second graph."""
    model = _model(torch.float32, "cuda")
    loss_fn = CrossEntropyLoss()
    step = FastStep(model, loss_fn, SGD(model.parameters(), lr=0.1, momentum=0.9), cuda_graph=True, graph_warmup=1)
    big = _batches(torch.float32, sizes=[32] * 6, device="cuda")
    small = _batches(torch.float32, sizes=[20] * 4, device="cuda")
    for x, y in big[:4] + small[:3]:  # each size: warm-up (and the momentum buffers' key), capture, replay
        step(x, y)
    assert step.graphs.num_graphs == 2 and step.graph_failure is None
    assert loss_fn.label_error() is None
    evaluate(model, loss_fn, [big[0]])

    for (x, y), bad_label in ((big[4], CLASSES), (small[3], -1)):  # replays of the first graph, then the second
        bad = y.clone()
        bad[3] = bad_label
        loss_sum, _ = step(x, bad)
        assert torch.isnan(loss_sum).item()
        error = loss_fn.label_error()
        assert error is not None and "labels must be in [0, 9] for 10 classes" in error, error
        assert "found some outside that range on the device" in error
        assert loss_fn.label_error() is None  # reading it cleared it
    loss_sum, _ = step(*big[5])
    assert torch.isfinite(loss_sum).item() and loss_fn.label_error() is None
    assert step.graphs.num_graphs == 2 and all(bool(p.isfinite().all()) for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graph_on_the_second_device_trains_there() -> None:
    device = "cuda:1"
    batches = _batches(torch.float32, sizes=[32] * 6, device=device)
    eager = _train(FastStep, _model(torch.float32, device), CrossEntropyLoss(), batches)
    model = _model(torch.float32, device)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = FastStep(model, CrossEntropyLoss(), optimizer, cuda_graph=True, graph_warmup=1)
    results, weights = [], []
    for x, y in batches:
        results.append(step(x, y))
        weights.append(model.state_dict())
    assert step.graphs.num_graphs == 1 and step.graph_failure is None
    for before, after in zip(weights[2:], weights[3:]):  # steps 3-6 are replays: each moved the weights on cuda:1
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.device == torch.device(device) for p in model.parameters())
    _assert_same_training(eager, (model, optimizer, results), torch.float32)


@CUDA
@pytest.mark.cuda
def test_a_replay_after_load_state_dict_continues_from_the_loaded_state() -> None:
    """A resume into a captured step: the graph keeps reading the same tensors, into which the model's and the
    optimizer's load_state_dict copied the loaded values (the learning rate too)."""
    batches = _batches(torch.float32, sizes=[32] * 8, device="cuda")
    model = _model(torch.float32, "cuda")
    optimizer = Adam(model.parameters(), lr=1e-2)
    step = FastStep(model, CrossEntropyLoss(), optimizer, cuda_graph=True, graph_warmup=1)
    for x, y in batches[:4]:
        step(x, y)
    assert step.graphs.num_graphs == 1
    model_state, optimizer_state = model.state_dict(), copy.deepcopy(optimizer.state_dict())
    optimizer.param_groups[0]["lr"] = 5e-2
    for x, y in batches[4:]:
        step(x, y)
    elsewhere = model.state_dict()
    model.load_state_dict(model_state)
    optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    replayed = [step(x, y) for x, y in batches[4:]]
    assert step.graphs.num_graphs == 1 and step.graph_failure is None  # the same graph all along
    assert {float(s["step"]) for s in optimizer.state_dict()["state"].values()} == {8.0}

    reference = _model(torch.float32, "cuda")
    reference_optimizer = Adam(reference.parameters(), lr=1e-2)
    reference_step = FastStep(reference, CrossEntropyLoss(), reference_optimizer)
    reference.load_state_dict(model_state)
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    expected = [reference_step(x, y) for x, y in batches[4:]]
    _assert_same_training((reference, reference_optimizer, expected), (model, optimizer, replayed), torch.float32)
    assert _max_relative(elsewhere, model.state_dict()) > 1e-4  # the run before the load went elsewhere


def test_bf16_batch_norm_keeps_float32_running_averages_and_evaluates_in_bf16() -> None:
    """The running averages are a layer's state, not the optimizer's: they stay float32 (as the master weights),
    and an evaluation returns the layers' dtype, its normalisation computed in float32 and rounded once (as torch's
    kernels do), so it matches the same model all in bf16 to bf16's precision."""
    model = _model(torch.float32, batchnorm=True, dropout=0.1)
    step = FastStep(model, CrossEntropyLoss(), Adam(model.parameters(), lr=1e-3), dtype=BF16)
    batches = _bf16_batches(4)
    for x, y in batches:
        step(x, y)
    running = {name: b for name, b in model.named_buffers() if b.is_floating_point()}
    assert running and all(b.dtype == torch.float32 for b in running.values())
    assert not torch.equal(running["2.running_mean"], torch.zeros_like(running["2.running_mean"]))
    scores = evaluate(model, CrossEntropyLoss(), batches)
    assert 0 < scores.loss < 10
    with torch.no_grad():
        output = model.eval()(batches[0][0])
    assert output.dtype == BF16
    reference = _model(torch.float32, batchnorm=True, dropout=0.1).to(BF16)  # the same model, all in bf16
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(batches[0][0]), output, rtol=2 ** -6, atol=2 ** -8)


def test_a_16_bit_model_and_float16_are_refused_in_one_line():
    """Training in 16 bits keeps float32 master weights: a model built in bfloat16 is refused by both steps, and
    float16 (whose gradients underflow without loss scaling) is refused with the way to bfloat16."""
    from nnbackprop.errors import ConfigError

    model = mlp(4, [3], 2).to(torch.bfloat16)
    for fast in (True, False):
        with pytest.raises(ConfigError, match="build the model in float32"):
            make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), fast=fast)
    model = mlp(4, [3], 2)
    with pytest.raises(ConfigError, match="float16 training needs loss scaling.*dtype=torch.bfloat16"):
        make_step(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), dtype=torch.float16)

"""Whole models: gradients end to end, equivalence with ``torch.nn`` (forward, ``state_dict`` both ways, accumulated
gradients), the module API (``to``, train/eval, ``zero_grad``, ``repr``), and a training step under no-grad mode."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import pytest
import torch
from conftest import CUDA, assert_passed, make_input

from nnbackprop import (GELU, AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, CrossEntropyLoss, Dropout, Flatten,
                        LeakyReLU, Linear, MaxPool2d, Module, ReLU, Sequential, Sigmoid, Tanh, check_gradients,
                        check_gradients_fd, cnn, mlp, to_torch)

F64 = torch.float64


def _mixed(g: torch.Generator) -> Module:
    """Four ``Linear`` layers and every kind of activation, with dropout and batch norm in between."""
    return Sequential(
        Linear(10, 8, dtype=F64, generator=g), ReLU(),
        Linear(8, 8, dtype=F64, generator=g), Sigmoid(), Dropout(0.25, generator=g),
        Linear(8, 6, dtype=F64, generator=g), BatchNorm1d(6, dtype=F64), Tanh(),
        Linear(6, 3, dtype=F64, generator=g), LeakyReLU(0.2), GELU("tanh"),
    )


def _trained_then_eval(g: torch.Generator) -> Module:
    """A batch-norm model that has seen two training batches (non-trivial running statistics), in eval mode."""
    model = mlp(10, [8, 6], 3, batchnorm=True, dropout=0.3, dtype=F64, generator=g)
    with torch.no_grad():  # forwards that no backward follows
        for _ in range(2):
            model(torch.randn(16, 10, generator=g, dtype=F64) * 2 + 1)
    return model.eval()


# name -> (factory(generator) in float64, input shape)
MODELS: dict[str, tuple[Callable[[torch.Generator], Module], tuple[int, ...]]] = {
    "depth1-linear": (lambda g: mlp(6, [], 3, dtype=F64, generator=g), (4, 6)),
    "depth2-tanh-images": (lambda g: mlp(12, [8], 4, activation="tanh", dtype=F64, generator=g), (5, 3, 4)),
    "depth2-sigmoid-batch1": (lambda g: mlp(5, [4], 2, activation="sigmoid", flatten=False, dtype=F64, generator=g),
                              (1, 5)),
    "depth3-batchnorm": (lambda g: mlp(10, [8, 6], 3, batchnorm=True, dtype=F64, generator=g), (6, 10)),
    "depth3-gelu-dropout": (lambda g: mlp(10, [8, 6], 3, activation="gelu", dropout=0.2, dtype=F64, generator=g),
                            (6, 10)),
    "depth4-leaky-batchnorm-dropout-kaiming": (
        lambda g: mlp(10, [8, 8, 6], 4, activation="leaky_relu", batchnorm=True, dropout=0.1, init="kaiming",
                      dtype=F64, generator=g), (6, 10)),
    "depth4-mixed": (_mixed, (5, 10)),
    "depth3-eval-batch1": (_trained_then_eval, (1, 10)),
    "cnn-batchnorm": (lambda g: cnn((2, 6, 5), (3, 4), 3, dtype=F64, generator=g), (4, 2, 6, 5)),
    "cnn-leaky-dropout-hidden-xavier": (
        lambda g: cnn((1, 8, 8), (3, 2, 2), 2, convs_per_stage=1, kernel_size=5, activation="leaky_relu",
                      batchnorm=False, dropout=0.2, hidden=[4], init="xavier", dtype=F64, generator=g), (3, 1, 8, 8)),
}
# Train-mode forwards torch.nn can reproduce (its dropout draws its own masks); every model in eval mode.
TRAIN_DETERMINISTIC = ["depth1-linear", "depth2-tanh-images", "depth2-sigmoid-batch1", "depth3-batchnorm",
                       "cnn-batchnorm"]
FORWARD_CASES = [(name, True) for name in TRAIN_DETERMINISTIC] + [(name, False) for name in MODELS]


def _build(name: str, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = F64,
           ) -> tuple[Module, torch.Tensor]:
    factory, shape = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    model = factory(g).to(device=device, dtype=dtype)
    return model, make_input(shape, g, device=device, dtype=dtype)


@pytest.mark.parametrize("name", MODELS)
def test_model_matches_autograd(name: str, device: torch.device, dtype: torch.dtype) -> None:
    model, x = _build(name, device=device, dtype=dtype)
    assert_passed(check_gradients(model, x, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", MODELS)
def test_model_matches_finite_differences(name: str) -> None:
    model, x = _build(name)
    assert check_gradients_fd(model, x, max_seconds=math.inf)  # every element, however busy the machine


@pytest.mark.parametrize("name, training", FORWARD_CASES)
def test_forward_matches_torch_nn(name: str, training: bool, device: torch.device) -> None:
    model, x = _build(name, device=device)
    model.train(training)
    ref = to_torch(model)
    with torch.no_grad():
        expected = ref(x)
    torch.testing.assert_close(model(x), expected)


# ------------------------------------------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_and_shapes_match_torch_nn(name: str) -> None:
    model, _ = _build(name)
    ours, theirs = model.state_dict(), to_torch(model).state_dict()
    assert list(ours) == list(theirs)
    assert [(v.shape, v.dtype) for v in ours.values()] == [(v.shape, v.dtype) for v in theirs.values()]


@pytest.mark.parametrize("direction", ["torch-into-ours", "ours-into-torch"])
@pytest.mark.parametrize("name", ["depth4-mixed", "depth4-leaky-batchnorm-dropout-kaiming", "depth2-tanh-images"])
def test_state_dict_round_trip_with_torch_nn(name: str, direction: str) -> None:
    ours, x = _build(name, seed=1)
    theirs = to_torch(_build(name, seed=2)[0])
    ours.train()
    theirs.train()
    for k in range(2):  # move the batch-norm running statistics away from their initial values, differently
        ours(x * (k + 1))
        theirs(x - k)
    if direction == "torch-into-ours":
        ours.load_state_dict(theirs.state_dict())
    else:
        theirs.load_state_dict(ours.state_dict())
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    for key in ours_state:
        assert torch.equal(ours_state[key], their_state[key]), key
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        expected = theirs(x)
    torch.testing.assert_close(ours(x), expected)


def _drop(key: str) -> Callable[[dict], Any]:
    return lambda state: state.pop(key)


def _put(key: str, value: torch.Tensor) -> Callable[[dict], Any]:
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_drop("1.weight"), ["missing keys ['1.weight']"]),
        (_drop("2.num_batches_tracked"), ["missing keys ['2.num_batches_tracked']"]),
        (_put("9.weight", torch.zeros(3)), ["unexpected keys ['9.weight']"]),
        (_put("1.weight", torch.zeros(2, 2)), ["size mismatch for '1.weight'", "(2, 2) in the state dict", "(8, 10)"]),
        (_put("2.running_var", torch.ones(7)), ["size mismatch for '2.running_var'", "(7,)", "(8,)"]),
    ],
    ids=["missing-param", "missing-buffer", "unexpected", "param-shape", "buffer-shape"],
)
def test_load_state_dict_rejects_a_mismatched_state(edit: Callable[[dict], Any], expected: list[str]) -> None:
    model = mlp(10, [8], 3, batchnorm=True)
    state = model.state_dict()
    before = model.state_dict()
    state["1.bias"] = state["1.bias"] + 1  # a valid change that must not be loaded when the rest is refused
    edit(state)
    with pytest.raises(RuntimeError) as info:  # as torch.nn.Module.load_state_dict
        model.load_state_dict(state)
    for part in expected:
        assert part in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused load changed the model"


def test_load_state_dict_non_strict_loads_what_matches() -> None:
    model, source = mlp(4, [3], 2), mlp(4, [3], 2)
    state = source.state_dict()
    del state["3.bias"]
    state["extra"] = torch.zeros(1)
    before = model.state_dict()["3.bias"]
    model.load_state_dict(state, strict=False)
    assert torch.equal(model[1].weight.data, source[1].weight.data)
    assert torch.equal(model[3].bias.data, before)


# ---------------------------------------------------------------------------------------------------- module API


def _all_tensors(model: Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, gradient and buffer, by name."""
    for name, p in model.named_parameters():
        yield name, p.data
        if p.grad is not None:
            yield f"{name}.grad", p.grad
    yield from model.named_buffers()


def _forward_backward(model: Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss_fn = CrossEntropyLoss()
    loss = loss_fn(model(x), labels)
    model.backward(loss_fn.backward())
    return loss


def test_to_dtype_casts_parameters_gradients_and_float_buffers() -> None:
    model, x = _build("depth3-batchnorm")
    _forward_backward(model, x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert model.to(torch.float32) is model  # as torch: a dtype alone may be given by position
    for name, t in _all_tensors(model):
        assert t.dtype == (torch.long if name.endswith("num_batches_tracked") else torch.float32), name
    torch.testing.assert_close(model(x.float()), to_torch(model)(x.float()).detach())
    with pytest.raises(ValueError, match="must be floating point"):
        model.to(dtype=torch.int64)


@pytest.mark.parametrize("target", ["meta", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])])
def test_to_device_moves_parameters_gradients_and_buffers(target: str) -> None:
    model, x = _build("depth3-batchnorm")
    _forward_backward(model, x, torch.tensor([0, 1, 2, 0, 1, 2]))
    model(x)
    model.to(target)
    for name, t in _all_tensors(model):
        assert t.device.type == target, name
    with pytest.raises(RuntimeError, match="without a forward"):  # to() drops what forward saved on the old device
        model.backward(torch.zeros(6, 3, dtype=F64, device=target))
    if target == "cuda":
        torch.testing.assert_close(model(x.to(target)).cpu(), model.to("cpu")(x))


def test_train_eval_propagates_to_every_submodule_and_to_torch() -> None:
    model, _ = _build("depth4-mixed")
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    assert not any(m.training for m in to_torch(model).modules())
    assert model.train() is model
    assert all(m.training for m in model.modules())
    assert all(m.training for m in to_torch(model).modules())


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none: bool) -> None:
    model, x = _build("depth3-batchnorm")
    _forward_backward(model, x, torch.tensor([0, 1, 2, 0, 1, 2]))
    model.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p.data))


def test_gradients_accumulate_across_backward_calls_like_torch() -> None:
    model, x = _build("depth3-batchnorm")
    theirs = to_torch(model)
    batches = [(x, torch.tensor([0, 1, 2, 0, 1, 2])), (x.flip(0) * 2, torch.tensor([2, 2, 1, 0, 0, 1]))]
    for xb, yb in batches:
        _forward_backward(model, xb, yb)
        torch.nn.functional.cross_entropy(theirs(xb), yb).backward()
    their_params = dict(theirs.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, their_params[name].grad, msg=name)


def test_repr_shows_the_architecture() -> None:
    assert repr(mlp(4, [3], 2, batchnorm=True, dropout=0.1, activation="gelu")) == "\n".join([
        "Sequential(",
        "  (0): Flatten(start_dim=1, end_dim=-1)",
        "  (1): Linear(in_features=4, out_features=3, bias=True)",
        "  (2): BatchNorm1d(3, eps=1e-05, momentum=0.1)",
        "  (3): GELU(approximate='none')",
        "  (4): Dropout(p=0.1)",
        "  (5): Linear(in_features=3, out_features=2, bias=True)",
        ")",
    ])


def test_cnn_stages_and_head() -> None:
    model = cnn((3, 32, 24), (8, 16), 10, hidden=[12], dropout=0.3, generator=torch.Generator().manual_seed(0))
    kinds = [type(layer) for layer in model]
    stage = [Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU, MaxPool2d]
    assert kinds == stage * 2 + [AdaptiveAvgPool2d, Flatten, Dropout, Linear, ReLU, Dropout, Linear]
    convs = [layer for layer in model if isinstance(layer, Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 8), (8, 16), (16, 16)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert model[-1].in_features == 12 and model[-1].out_features == 10
    assert model(torch.randn(2, 3, 32, 24)).shape == (2, 10)
    plain = cnn((1, 28, 28), (4, 8, 16), 10, convs_per_stage=1, kernel_size=5, batchnorm=False, activation="tanh")
    assert [type(layer) for layer in plain][:3] == [Conv2d, Tanh, MaxPool2d] and plain[0].padding == (2, 2)
    assert all(c.bias is not None for c in plain if isinstance(c, Conv2d)) and plain[-1].in_features == 16
    assert plain(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # 28 -> 14 -> 7 -> 3
    twins = [cnn((3, 8, 8), (4,), 2, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    states = [twin.state_dict()["0.weight"] for twin in twins]
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


@pytest.mark.parametrize("call, message", [
    (lambda: cnn((32, 32), (8,), 10), r"cnn: input_shape must be \(C, H, W\) of one image"),
    (lambda: cnn((3, 32, 0), (8,), 10), r"input_shape must be \(C, H, W\)"),
    (lambda: cnn((3, 32, 32), 8, 10), r"cnn: channels must be a list of widths such as \(32, 64, 128\), got 8"),
    (lambda: cnn((3, 32, 32), (), 10), "channels must name at least one stage"),
    (lambda: cnn((3, 32, 32), (8, 0), 10), r"channels must be positive integers, got \[8, 0\]"),
    (lambda: cnn((3, 32, 32), (8,), 0), "num_classes must be a positive integer"),
    (lambda: cnn((3, 32, 32), (8,), 10, convs_per_stage=0), "convs_per_stage must be a positive integer"),
    (lambda: cnn((3, 32, 32), (8,), 10, kernel_size=4), "kernel_size must be an odd positive integer"),
    (lambda: cnn((3, 32, 32), (8,), 10, activation="swish"), "cnn: unknown activation 'swish'"),
    (lambda: cnn((3, 32, 32), (8,), 10, dropout=1.0), r"cnn: dropout must be a number in \[0, 1\)"),
    (lambda: cnn((3, 32, 32), (8,), 10, batchnorm="yes"), "batchnorm must be True or False"),
    (lambda: cnn((3, 32, 32), (8,), 10, hidden=64), "hidden must be a list of widths"),
    (lambda: cnn((3, 32, 32), (8,), 10, init="he"), "cnn: unknown init 'he'"),
    (lambda: cnn((1, 28, 28), (8, 8, 8, 8, 8), 10),
     "28x28 images are too small for 5 stages .* use at most 4 stages or larger images"),
])
def test_cnn_arguments_are_checked_in_one_line(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_sequential_container() -> None:
    model = Sequential(Linear(3, 2), ReLU())
    assert len(model) == 2 and isinstance(model[0], Linear) and isinstance(model[-1], ReLU)
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    with pytest.raises(TypeError, match="Sequential takes nnbackprop modules, got ReLU"):
        model.append(torch.nn.ReLU())


# ------------------------------------------------------------------------------------------- no-grad training step


def _saved_tensors(module: Module) -> Iterator[torch.Tensor]:
    for m in module.modules():
        for value in m.__dict__["_saved"] or ():
            if isinstance(value, torch.Tensor):
                yield value


def test_a_training_step_records_no_autograd_graph() -> None:
    model, x = _build("depth4-leaky-batchnorm-dropout-kaiming")
    loss_fn = CrossEntropyLoss()
    out = model(x)
    loss = loss_fn(out, torch.tensor([0, 1, 2, 3, 0, 1]))
    saved = [*_saved_tensors(model), *_saved_tensors(loss_fn)]
    assert saved, "the forward pass should have saved tensors for backward"
    dx = model.backward(loss_fn.backward())
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    produced = [out, loss, dx, *saved, *(t for _, t in _all_tensors(model))]
    assert not any(t.requires_grad or t.grad_fn is not None for t in produced)


def test_forward_under_no_grad_saves_nothing_and_leaves_a_pending_forward_intact() -> None:
    model, x = _build("depth3-batchnorm")
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = CrossEntropyLoss()
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        model.backward(torch.zeros(6, 3, dtype=F64))
    reference, _ = _build("depth3-batchnorm")
    expected = _forward_backward(reference, x, labels)
    loss = loss_fn(model(x), labels)
    with torch.no_grad():
        model(x.flip(0) * 3)  # a logging pass between forward and backward
    model.backward(loss_fn.backward())
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)

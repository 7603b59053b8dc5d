"""The module API a user's layer is written against: public names only, the checks every forward/backward gets for
free, hooks, and parameters that are tensors whose gradients accumulate."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import assert_failed, assert_passed
from user_layers import ChannelScale, Scale

import nnbackprop
from nnbackprop import (SGD, Conv2d, CrossEntropyLoss, Flatten, Linear, MaxPool2d, Parameter, ReLU, Sequential,
                        SimpleStep, check_gradients, check_gradients_fd, make_step)

F64 = torch.float64


class ScaleReadingData(Scale):
    """The same layer written with ``self.gamma.data``, as older code does: the checker must still trace it."""

    def forward(self, x):
        self.check_input(x, ndim=2, features=self.gamma.shape[0])
        self.save_for_backward(x)
        return x * self.gamma.data


class DoubleScale(Scale):
    """A subclass that calls ``super().forward`` and ``super().backward``."""

    def forward(self, x):
        return 2 * super().forward(x)

    def backward(self, dout):
        return super().backward(2 * dout)


@pytest.mark.parametrize("layer_class", [Scale, ScaleReadingData, DoubleScale])
def test_a_users_layer_is_checked_against_autograd_and_finite_differences(layer_class):
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    layer = layer_class(4).to(F64)
    assert_passed(check_gradients(layer, x))
    assert check_gradients_fd(layer, x)


def test_a_users_layer_on_images_checks_its_channels_and_trains_in_the_fast_layout():
    x = torch.randn(3, 4, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    layer = ChannelScale(4).to(F64)
    assert_passed(check_gradients(layer, x))
    assert check_gradients_fd(layer, x)
    with pytest.raises(ValueError, match=r"^ChannelScale\(\): expected 4 input channels, shape \(N, 4, H, W\), got "
                                         r"shape \(3, 5, 5, 5\)$"):
        layer(torch.randn(3, 5, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 4, H, W\), got shape \(4, 5, 5\) \(rank 3\)"):
        layer(torch.randn(4, 5, 5, dtype=F64))

    def build():
        g = torch.Generator().manual_seed(1)
        return Sequential(Conv2d(4, 6, 3, padding=1, generator=g), ChannelScale(6), ReLU(), MaxPool2d(2), Flatten(),
                          Linear(24, 3, generator=g)).to(F64)

    y = torch.tensor([0, 2, 1])
    models = [build(), build()]
    steps = [make_step(m, CrossEntropyLoss(), SGD(m.parameters(), lr=0.1, momentum=0.9)) for m in models]
    steps[1] = SimpleStep(models[1], CrossEntropyLoss(), SGD(models[1].parameters(), lr=0.1, momentum=0.9))
    assert steps[0].fallback_reason is None  # the user's layer sees channels-last images there
    for _ in range(3):
        for step in steps:
            step(x, y)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.data, q.data, rtol=1e-12, atol=1e-14, msg=name)


def test_a_wrong_backward_in_a_users_layer_fails_the_check():
    class ScaleForgetsX(Scale):
        def backward(self, dout):
            self.gamma.accumulate(dout.sum(0))
            return dout * self.gamma

    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert_failed(check_gradients(ScaleForgetsX(4).to(F64), x), "gamma")


def test_parameters_are_tensors_that_never_require_grad_and_accumulate():
    p = Parameter(torch.zeros(3))
    assert isinstance(p, torch.Tensor) and isinstance(p, torch.nn.Parameter) and not p.requires_grad
    assert (p + 1).requires_grad is False and type(p + 1) is torch.Tensor
    d = torch.ones(3)
    p.accumulate(d)
    d.add_(5)  # the first gradient is a copy: changing the tensor passed in does not change it
    p.accumulate(torch.ones(3))
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match=r"shape \(3,\).*got \(2,\)"):
        p.accumulate(torch.ones(2))
    with pytest.raises(ValueError, match="float64"):
        p.accumulate(torch.ones(3, dtype=F64))


def _linear() -> Linear:
    return Linear(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("misuse, message", [
    (lambda m, x: m.backward(torch.ones(4, 2, dtype=F64)), r"called without a forward\(\)"),
    (lambda m, x: (m(x), m.backward(torch.ones(4, 2, dtype=F64)), m.backward(torch.ones(4, 2, dtype=F64))),
     r"called without a forward\(\)"),
    (lambda m, x: (m(x), m(2 * x), m.backward(torch.ones(4, 2, dtype=F64))), "after 2 forward passes"),
    (lambda m, x: (m(x), m.backward(torch.ones(4, 3, dtype=F64))), r"shape \(4, 2\).*got shape \(4, 3\)"),
    (lambda m, x: (m(x), m.backward(torch.ones(4, 2))), r"torch.float64.*got shape \(4, 2\) torch.float32"),
    (lambda m, x: (m(x), m.backward(torch.ones(4, 2, dtype=F64, device="meta"))), "on cpu; got .* on meta"),
    (lambda m, x: (m(x), m.backward([1.0, 2.0])), "dout must be a tensor"),
], ids=["before-forward", "twice", "two-forwards", "dout-shape", "dout-dtype", "dout-device", "dout-list"])
def test_misuse_is_refused_naming_the_layer(misuse, message):
    layer = _linear()
    with pytest.raises((RuntimeError, ValueError), match=message) as info:
        misuse(layer, torch.randn(4, 3, dtype=F64))
    assert str(info.value).startswith("Linear(in_features=3, out_features=2, bias=True)")


def test_after_a_refusal_the_next_forward_and_backward_work():
    layer, x = _linear(), torch.randn(4, 3, dtype=F64)
    layer(x)
    layer(x)
    with pytest.raises(RuntimeError, match="after 2 forward passes"):
        layer.backward(torch.ones(4, 2, dtype=F64))
    layer(x)
    assert layer.backward(torch.ones(4, 2, dtype=F64)).shape == (4, 3)


def test_a_failed_forward_forgets_what_it_saved():
    model = Sequential(_linear(), ReLU(), Linear(5, 1, dtype=F64))  # the second Linear does not fit
    with pytest.raises(ValueError, match="expected 5 input features"):
        model(torch.randn(4, 3, dtype=F64))
    with pytest.raises(RuntimeError, match="without a forward"):
        model[0].backward(torch.ones(4, 2, dtype=F64))


def test_hooks_see_every_output_and_gradient_and_can_be_removed():
    layer, x = _linear(), torch.randn(4, 3, dtype=F64)
    seen = []
    forward = layer.register_forward_hook(lambda m, inputs, out: seen.append(("forward", m, inputs[0], out)))
    backward = layer.register_full_backward_hook(lambda m, dx, dout: seen.append(("backward", m, dx[0], dout[0])))
    out = layer(x)
    dout = torch.ones_like(out)
    dx = layer.backward(dout)
    assert [s[0] for s in seen] == ["forward", "backward"] and all(s[1] is layer for s in seen)
    assert seen[0][2] is x and seen[0][3] is out and seen[1][2] is dx and seen[1][3] is dout
    forward.remove()
    backward.remove()
    layer(x)
    layer.backward(dout)
    assert len(seen) == 2


def test_a_module_can_be_renamed_for_its_messages():
    layer = Scale(4)
    assert layer.name == "Scale()"
    layer.name = "encoder.scale"
    with pytest.raises(ValueError, match=r"^encoder.scale: expected 4 input features"):
        layer(torch.randn(2, 3, dtype=F64))


def test_second_order_use_is_refused_in_one_line():
    """The backward is written by hand, to first order: a dout that requires grad (as when differentiating the
    backward itself) is refused, naming the way to second-order gradients."""
    from nnbackprop import CrossEntropyLoss, mlp

    model = mlp(4, [3], 2)
    model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="second-order gradient.*nb.to_torch") as caught:
        model.backward(torch.ones(2, 2, requires_grad=True))
    assert "\n" not in str(caught.value)
    loss_fn = CrossEntropyLoss()
    loss_fn(torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="second-order"):
        loss_fn.backward(torch.ones((), requires_grad=True))


# ---------------------------------------------------------------------------------------------------- encapsulation

PACKAGE = Path(nnbackprop.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _own_dict(node: ast.AST, aliases: set[str]) -> bool:
    """``self.__dict__``, or a name bound to it (``state = self.__dict__``)."""
    return (isinstance(node, ast.Attribute) and node.attr == "__dict__" and _is_self(node.value)) or (
        isinstance(node, ast.Name) and node.id in aliases)


def _foreign_dict(node: ast.AST) -> bool:
    """``obj.__dict__`` of an object other than ``self``."""
    return isinstance(node, ast.Attribute) and node.attr == "__dict__" and not _is_self(node.value)


def private_access_problems(source: str, filename: str) -> list[str]:
    """Where a module of the package reaches into another object's private state that it does not define itself:
    ``obj._name`` (``obj`` not ``self``), a write through ``obj.__dict__[...]`` or ``obj.__dict__.update(...)``,
    ``getattr``/``setattr(obj, "_name")``, or a private name imported from another module of the package. A name is
    the file's own when it is set on ``self`` there, assigned or defined in one of its class bodies, or set through
    ``self.__dict__``. Private names of other libraries (``torch._C``) are their business, not checked here."""
    tree = ast.parse(source, filename)
    external: set[str] = set()
    aliases: set[str] = set()
    own: set[str] = set()
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                            if not alias.name.startswith("nnbackprop"))
        elif isinstance(node, ast.ImportFrom):
            ours = (node.module or "").startswith("nnbackprop") or node.level > 0
            if ours:
                problems += [f"{filename}:{node.lineno}: imports {alias.name} from {node.module}"
                             for alias in node.names if _private(alias.name)]
            else:
                external.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and _own_dict(node.value, set()):
            aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    own.add(item.name)
                targets = item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(
                    item, ast.AnnAssign) else []
                own.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_self(node.value) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and _own_dict(node.func.value, aliases):
            own.update(k.arg for k in node.keywords if k.arg)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and _own_dict(node.value, aliases) \
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            own.add(node.slice.value)

    def check(name: str, obj: ast.AST, line: int, how: str) -> None:
        root = _root(obj)
        if _private(name) and name not in own and not _is_self(obj) and not (
                isinstance(root, ast.Name) and root.id in external):
            problems.append(f"{filename}:{line}: {how} {name} of {ast.unparse(obj)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr != "__dict__":
            check(node.attr, node.value, node.lineno, "reads or writes")
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and _foreign_dict(node.value) \
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            check(node.slice.value, node.value.value, node.lineno, "writes through __dict__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and _foreign_dict(node.func.value):
            for keyword in node.keywords:
                check(keyword.arg or "", node.func.value.value, node.lineno, "writes through __dict__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            check(node.args[1].value, node.args[0], node.lineno, f"{node.func.id}")
    return problems


def test_no_module_of_the_package_reaches_into_another_objects_private_state():
    problems = [problem for path in sorted(PACKAGE.glob("*.py"))
                for problem in private_access_problems(path.read_text(), path.name)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", [
    "def bind(p, grad):\n    p._grad_view = grad\n",
    "def release(model):\n    model._release_saved()\n",
    "def unbind(m):\n    m.__dict__.update(_workspace=None, _scratch={})\n",
    "def unbind(m):\n    m.__dict__['_workspace'] = None\n",
    "def peek(o):\n    return getattr(o, '_flat', None)\n",
    "from nnbackprop.layout import _check_flat\n",
], ids=["attribute", "method", "dict-update", "dict-item", "getattr", "import"])
def test_the_encapsulation_check_finds_reaching_in(source):
    assert private_access_problems(source, "x.py")


@pytest.mark.parametrize("source", [
    "import torch\ntorch._C._cuda_endAllocateToPool(0, None)\n",
    "class A:\n    def __init__(self):\n        self._x = 1\n\n    def same(self, other):\n        return other._x\n",
    "class A:\n    def __init__(self):\n        state = self.__dict__\n        state.update(_saved=None)\n\n"
    "    def release(self, others):\n        for m in others:\n            m.__dict__['_saved'] = None\n",
], ids=["other-library", "same-class", "same-class-dict"])
def test_the_encapsulation_check_leaves_a_classs_own_state_and_other_libraries_alone(source):
    assert private_access_problems(source, "x.py") == []


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_a_parameter_must_be_floating_point(dtype):
    """torch refuses an integer nn.Parameter; ours was accepted and trained."""
    with pytest.raises(TypeError) as info:
        Parameter(torch.ones(3, dtype=dtype))
    assert str(info.value) == (f"Parameter expects a floating-point tensor, got dtype {dtype}: gradient steps need "
                               "real numbers; convert it first, e.g. Parameter(data.float())")

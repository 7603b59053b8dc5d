"""SGD, Adam and AdamW against torch.optim's, per parameter and on the fast layout's flat tensors; their state dicts
against torch's, both ways; torch's schedulers driving them; argument checks."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from nnbackprop.layout import FlatParameters
from nnbackprop.module import Parameter
from nnbackprop.optim import SGD, Adam, AdamW

SHAPES = [(4, 3), (3,), (2, 5), (5,)]
TOLERANCE = 1e-12  # float64, relative to each parameter's size


def _params(seed: int = 0) -> list[Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in SHAPES]


def _gradients(steps: int, seed: int = 1, missing: bool = False) -> list[list[torch.Tensor | None]]:
    """Random gradients; with ``missing``, parameter 1 has none at every third step (it is skipped then)."""
    g = torch.Generator().manual_seed(seed)
    return [[None if missing and i == 1 and t % 3 == 2 else torch.randn(shape, generator=g, dtype=torch.float64)
             for i, shape in enumerate(SHAPES)] for t in range(steps)]


def _run(optimizer: torch.optim.Optimizer, params: list, grads: list, lrs: list[float] | None = None,
         flat: FlatParameters | None = None) -> None:
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            optimizer.param_groups[0]["lr"] = lrs[t]
        for i, (p, grad) in enumerate(zip(params, step_grads)):
            if grad is None:
                p.grad = None
            elif flat is not None:
                p.grad = flat.grad_views[i].copy_(grad)
            else:
                p.grad = grad.clone()
        optimizer.step()


def _assert_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs):
        error = ((a.detach() - b.detach()).abs().max() / b.detach().abs().max()).item()
        assert error <= TOLERANCE, f"relative difference {error:.1e}"


SGD_CONFIGS = [dict(lr=lr, momentum=m, dampening=d, weight_decay=wd, nesterov=n)
               for m, d, n, wd, lr in itertools.product((0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (0.1, 0.03))
               if not (n and (m == 0 or d != 0))]
ADAM_CONFIGS = [dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=ams)
                for lr, betas, eps, wd, ams in itertools.product((1e-3, 0.1), ((0.9, 0.999), (0.5, 0.9)), (1e-8, 1e-3),
                                                                 (0.0, 1e-2), (False, True))]
CASES = ([(SGD, torch.optim.SGD, c, 20) for c in SGD_CONFIGS]
         + [(Adam, torch.optim.Adam, c, 50) for c in ADAM_CONFIGS]
         + [(AdamW, torch.optim.AdamW, c, 50) for c in ADAM_CONFIGS])
IDS = [f"{ours.__name__}-" + "-".join(f"{k}={v}" for k, v in config.items()) for ours, _, config, _ in CASES]


@pytest.mark.parametrize("ours, theirs, config, steps", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["per-parameter", "flat"])
def test_update_matches_torch(ours, theirs, config, steps, layout) -> None:
    params = _params()
    grads = _gradients(steps, missing=layout == "per-parameter")
    lrs = [config["lr"] * (1 + 0.5 * torch.cos(torch.tensor(t * 0.7)).item()) for t in range(steps)]  # changing lr
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    _run(theirs(reference, **config), reference, grads, lrs)
    optimizer = ours(params, **config)
    flat = None
    if layout == "flat":
        flat = FlatParameters(params)
        optimizer.attach_flat(flat, 0)
    _run(optimizer, params, grads, lrs, flat)
    _assert_close(params, reference)
    if flat is not None:
        assert all(p.data_ptr() == v.data_ptr() for p, v in zip(params, flat.data_views)), "the update left the views"


@pytest.mark.parametrize("ours, theirs, config", [(SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
                                                  (Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
                                                  (AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1))])
@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
@pytest.mark.parametrize("layout", ["per-parameter", "flat"])
def test_state_dicts_interchange_with_torch(ours, theirs, config, direction, layout) -> None:
    """Train 5 steps with one, hand its state dict to the other, train 5 more: as 10 steps with torch alone."""
    grads = _gradients(10)
    straight = [p.detach().clone() for p in _params()]
    _run(theirs(straight, **config), straight, grads)

    params = _params()
    ours_optimizer = ours(params, **config)
    flat = None
    if layout == "flat":
        flat = FlatParameters(params)
        ours_optimizer.attach_flat(flat, 0)
    torch_params = [p.detach().clone() for p in params]
    torch_optimizer = theirs(torch_params, **config)
    first, second = (ours_optimizer, torch_optimizer) if direction == "ours-to-torch" else (torch_optimizer,
                                                                                            ours_optimizer)
    first_params, second_params = (params, torch_params) if direction == "ours-to-torch" else (torch_params, params)
    _run(first, first_params, grads[:5], flat=flat if first is ours_optimizer else None)
    with torch.no_grad():
        for a, b in zip(second_params, first_params):
            a.copy_(b)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    _run(second, second_params, grads[5:], flat=flat if second is ours_optimizer else None)
    _assert_close(second_params, straight)


def test_torch_lr_schedulers_drive_it() -> None:
    optimizer = SGD(_params(), lr=1.0, momentum=0.9)
    assert isinstance(optimizer, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    seen = []
    for step_grads in _gradients(4):
        for p, grad in zip(optimizer.param_groups[0]["params"], step_grads):
            p.grad = grad
        optimizer.step()
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert seen == pytest.approx([1.0, 0.8535533905932737, 0.5, 0.14644660940672627])


def test_step_hooks_run_and_gradients_are_left_alone() -> None:
    params = _params()
    optimizer = Adam(params, lr=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    grads = _gradients(1)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    assert calls == ["pre", "post"] and optimizer.has_hooks()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("make, message", [
    (lambda p: SGD(p, lr=-1.0), "Invalid lr"),
    (lambda p: SGD(p, lr=0.1, momentum=float("nan")), "Invalid momentum"),
    (lambda p: SGD(p, lr=0.1, weight_decay=-1e-4), "Invalid weight_decay"),
    (lambda p: SGD(p, lr=0.1, nesterov=True), "Nesterov momentum requires a momentum > 0"),
    (lambda p: SGD(p, lr=0.1, momentum=0.9, dampening=0.5, nesterov=True), "zero dampening"),
    (lambda p: Adam(p, betas=(0.9, 1.0)), "Invalid beta2"),
    (lambda p: Adam(p, betas=(0.9,)), "Invalid betas"),
    (lambda p: AdamW(p, eps=-1.0), "Invalid eps"),
    (lambda p: Adam(p, amsgrad="yes"), "Invalid amsgrad"),
    (lambda p: SGD([], lr=0.1), "empty parameter list"),
])
def test_invalid_arguments_say_which(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make(_params())


@pytest.mark.parametrize("ours", [Adam, AdamW])
def test_adam_on_bfloat16_parameters_keeps_float32_hyperparameters_and_step(ours) -> None:
    """In bf16, β2 = 0.999 rounds to 1 (Adam's second moment would never move and its bias correction divide by zero)
    and a step counter stops at 256: both live in float32, as torch's do."""
    params = [Parameter(p.detach().to(torch.bfloat16)) for p in _params()]
    optimizer = ours(params, lr=1e-3)
    grads = _gradients(300)
    for t, step_grads in enumerate(grads):
        for p, grad in zip(params, step_grads):
            p.grad = grad.to(torch.bfloat16)
        optimizer.step()
        if t == 0:
            assert all(bool(p.isfinite().all()) for p in params), "NaN after one step"
            scalars = [t for _, tensors in optimizer._scalar_tensors.values() for t in tensors]
            assert scalars and {t.dtype for t in scalars} == {torch.float32}
            beta2 = optimizer._scalar_tensors[next(iter(optimizer._scalar_tensors))][1][2]
            assert beta2.item() == pytest.approx(0.999)
    assert all(bool(p.isfinite().all()) and p.dtype == torch.bfloat16 for p in params)
    for p in params:
        state = optimizer.state[p]
        assert state["step"].dtype == torch.float32 and state["step"].item() == 300
        assert state["exp_avg"].dtype == torch.bfloat16  # the moments are the parameter's, as in torch
    reference = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params()]
    torch_optimizer = (torch.optim.Adam if ours is Adam else torch.optim.AdamW)(reference, lr=1e-3)
    for step_grads in grads:
        for p, grad in zip(reference, step_grads):
            p.grad = grad.to(torch.bfloat16)
        torch_optimizer.step()
    for a, b in zip(params, reference):  # torch's Adam on bf16 parameters, to bf16 rounding
        torch.testing.assert_close(a.float(), b.detach().float(), rtol=1e-2, atol=1e-2)


def _stepped(optimizer_class: type, shapes: list[tuple[int, ...]], **config) -> torch.optim.Optimizer:
    """An optimizer that has taken one step over parameters of ``shapes`` (so that it holds state)."""
    params = [Parameter(torch.randn(shape, dtype=torch.float64)) for shape in shapes]
    optimizer = optimizer_class(params, **config)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.float64)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("source, target, message", [
    (lambda: _stepped(SGD, SHAPES, lr=0.1, momentum=0.9), lambda: _stepped(Adam, SHAPES),
     "Adam.load_state_dict: parameter 0 (shape (4, 3)) has state 'momentum_buffer' (shape (4, 3)), which Adam does "
     "not keep (it keeps exp_avg, exp_avg_sq, max_exp_avg_sq, step)"),
    (lambda: _stepped(Adam, SHAPES), lambda: _stepped(SGD, SHAPES, lr=0.1, momentum=0.9),
     "SGD.load_state_dict: parameter 0 (shape (4, 3)) has state 'step' (shape ()), which SGD does not keep (it keeps "
     "momentum_buffer)"),
    (lambda: _stepped(SGD, SHAPES, lr=0.1), lambda: _stepped(Adam, SHAPES),  # no state at all, other settings
     "Adam.load_state_dict: its parameter group 0 lacks the settings amsgrad, betas, eps of Adam (it was saved by "
     "another optimizer)"),
    (lambda: _stepped(Adam, [(4, 3), (3,), (5, 2), (5,)]), lambda: _stepped(Adam, SHAPES),
     "Adam.load_state_dict: parameter 2 has state 'exp_avg' of shape (5, 2), but the parameter has shape (2, 5)"),
    (lambda: _stepped(SGD, [(3, 4), (3,), (2, 5), (5,)], lr=0.1, momentum=0.9),
     lambda: _stepped(SGD, SHAPES, lr=0.1, momentum=0.9),
     "SGD.load_state_dict: parameter 0 has state 'momentum_buffer' of shape (3, 4), but the parameter has shape "
     "(4, 3)"),
], ids=["sgd-into-adam", "adam-into-sgd", "sgd-settings-into-adam", "adam-of-another-model", "sgd-of-another-model"])
def test_another_optimizers_state_is_refused_naming_parameter_state_and_shapes(source, target, message) -> None:
    """Accepted before, and the next step failed deep inside (or trained on nonsense)."""
    optimizer = target()
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError) as info:
        optimizer.load_state_dict(source().state_dict())
    assert str(info.value) == f"{message}; load a state dict that this optimizer class saved for the same model"
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, entry in before["state"].items() for k, v in entry.items())


def test_a_missing_state_or_step_of_the_wrong_kind_is_refused() -> None:
    state = _stepped(Adam, SHAPES).state_dict()
    del state["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(3,\)\) lacks the state 'exp_avg_sq'"):
        _stepped(Adam, SHAPES).load_state_dict(state)
    state = _stepped(Adam, SHAPES).state_dict()
    state["state"][0]["step"] = 3.0
    with pytest.raises(ValueError, match="parameter 0 has state 'step' of a float, where a 0-dim tensor belongs"):
        _stepped(Adam, SHAPES).load_state_dict(state)

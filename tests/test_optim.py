"""SGD against torch.optim.SGD, its two code paths against each other, its state dict; schedules against torch's."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from nnbackprop.lr_scheduler import SCHEDULES, ConstantLR, CosineLR, StepLR, make_scheduler
from nnbackprop.module import Parameter
from nnbackprop.optim import SGD

SHAPES = [(4, 3), (3,), (2, 5), (5,)]
STEPS = 20


def _make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [Parameter(torch.randn(shape, generator=g, dtype=dtype)) for shape in SHAPES]


def _gradients(steps: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=g, dtype=dtype) for shape in SHAPES] for _ in range(steps)]


def _run(optimizer: SGD, params: list[Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = None if grad is None else grad.clone()
        optimizer.step()


def _valid_configs() -> list[dict]:
    configs = []
    for momentum, dampening, nesterov, weight_decay, lr in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (0.1, 0.03)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        configs.append(
            dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        )
    return configs


CONFIGS = _valid_configs()


def _torch_sgd(initial: list[torch.Tensor], grads: list[list[torch.Tensor]], **options) -> list[torch.Tensor]:
    params = [x.clone() for x in initial]
    optimizer = torch.optim.SGD(params, **options)
    for step_grads in grads:
        for x, grad in zip(params, step_grads):
            x.grad = None if grad is None else grad.clone()
        optimizer.step()
    return params


def _torch_has_fused_cpu_sgd() -> bool:
    try:
        _torch_sgd([torch.zeros(1)], [[torch.ones(1)]], lr=0.1, fused=True)
    except (RuntimeError, TypeError):
        return False
    return True


def _assert_matches_torch(config: dict, **torch_options) -> None:
    grads = _gradients(STEPS)
    initial = [p.data.clone() for p in _make_params()]
    theirs = _torch_sgd(initial, grads, **config, **torch_options)
    for foreach in (False, True):
        params = _make_params()
        _run(SGD(params, foreach=foreach, **config), params, grads)
        for ours, reference in zip(params, theirs):
            torch.testing.assert_close(ours.data, reference, rtol=0, atol=1e-12, msg=f"our foreach={foreach}")
            assert not ours.data.requires_grad


@pytest.mark.parametrize("torch_foreach", [False, True], ids=["torch-loop", "torch-foreach"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_matches_torch(config: dict, torch_foreach: bool) -> None:
    """20 steps of both our code paths against torch's single-tensor and foreach SGD, in float64."""
    _assert_matches_torch(config, foreach=torch_foreach)


@pytest.mark.skipif(not _torch_has_fused_cpu_sgd(), reason="this torch has no fused SGD on CPU")
@pytest.mark.parametrize(
    "config",
    [
        dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False),
        dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True),
    ],
    ids=["dampening", "nesterov"],
)
def test_sgd_matches_torch_fused(config: dict) -> None:
    """Against torch's fused kernel too (a few configurations: on a busy CPU its OpenMP launches are slow)."""
    _assert_matches_torch(config, fused=True)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_grad_none_is_skipped_like_torch(foreach: bool) -> None:
    """Parameter 1 has no gradient for the first 5 steps, parameter 3 never: no update, no state, torch agrees."""
    config = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    grads = _gradients(10)
    for step, step_grads in enumerate(grads):
        step_grads[3] = None
        if step < 5:
            step_grads[1] = None
    params = _make_params()
    initial = [p.data.clone() for p in params]
    optimizer = SGD(params, foreach=foreach, **config)
    _run(optimizer, params, grads)

    torch_params = _torch_sgd(initial, grads, **config)
    for ours, theirs in zip(params, torch_params):
        torch.testing.assert_close(ours.data, theirs, rtol=0, atol=1e-12)
    assert torch.equal(params[3].data, initial[3])
    assert params[3] not in optimizer.state
    assert set(optimizer.state) == {params[0], params[1], params[2]}


def test_step_leaves_gradients_untouched() -> None:
    params = _make_params()
    grads = _gradients(1)[0]
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    SGD(params, lr=0.1, momentum=0.9, nesterov=True, foreach=True).step()
    for p, grad in zip(params, grads):
        assert torch.equal(p.grad, grad)


def test_loop_and_foreach_paths_agree_across_dtypes() -> None:
    """Mixed float32/float64 parameters: the multi-tensor path groups by dtype and matches the loop."""

    def make() -> list[Parameter]:
        params = _make_params()
        params[0].data = params[0].data.float()
        params[2].data = params[2].data.float()
        return params

    grads = [[g.to(p.data.dtype) for g, p in zip(step, make())] for step in _gradients(STEPS)]
    results = []
    for foreach in (False, True):
        params = make()
        _run(SGD(params, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, foreach=foreach), params, grads)
        results.append(params)
    for loop, multi in zip(*results):
        assert loop.data.dtype == multi.data.dtype
        torch.testing.assert_close(loop.data, multi.data, rtol=0, atol=0)


@pytest.fixture
def foreach_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of ``torch._foreach_add_``, which every multi-tensor step makes and the loop never does."""
    calls: list[int] = []
    foreach_add_ = torch._foreach_add_

    def counting(*args, **kwargs):
        calls.append(1)
        return foreach_add_(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_add_", counting)
    return calls


def test_foreach_choice(foreach_calls: list[int]) -> None:
    for foreach, expected in ((True, True), (False, False), (None, False)):
        foreach_calls.clear()
        params = _make_params()
        _run(SGD(params, lr=0.1, momentum=0.9, foreach=foreach), params, _gradients(2))
        assert bool(foreach_calls) == expected, f"foreach={foreach} on CPU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_to_foreach_and_matches_cpu(foreach_calls: list[int]) -> None:
    config = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    grads = _gradients(STEPS)
    cpu = _make_params()
    cuda = [Parameter(p.data.cuda()) for p in cpu]
    _run(SGD(cpu, foreach=False, **config), cpu, grads)
    _run(SGD(cuda, **config), cuda, [[g.cuda() for g in step] for step in grads])
    assert foreach_calls, "foreach=None on CUDA must take the multi-tensor path"
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(a.data, b.data.cpu(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_state_dict_round_trip_resumes_exactly(foreach: bool) -> None:
    config = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, foreach=foreach)
    grads = _gradients(STEPS)
    straight = _make_params()
    _run(SGD(straight, **config), straight, grads)

    first = _make_params()
    optimizer = SGD(first, **config)
    _run(optimizer, first, grads[:10])
    saved = optimizer.state_dict()
    saved_params = [p.data.clone() for p in first]
    assert sorted(saved["state"]) == [0, 1, 2, 3] and saved["param_groups"][0]["params"] == [0, 1, 2, 3]
    buffer_at_save = saved["state"][0]["momentum_buffer"].clone()
    _run(optimizer, first, grads[10:11])
    assert torch.equal(saved["state"][0]["momentum_buffer"], buffer_at_save), "state_dict must be a snapshot"

    file = io.BytesIO()
    torch.save({"params": saved_params, "optimizer": saved}, file)
    file.seek(0)
    checkpoint = torch.load(file, weights_only=True)
    resumed = [Parameter(x) for x in checkpoint["params"]]
    fresh = SGD(resumed, lr=1.0, foreach=foreach)
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.param_groups[0]["momentum"] == 0.9 and fresh.param_groups[0]["lr"] == 0.1
    _run(fresh, resumed, grads[10:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a.data, b.data)


def test_load_state_dict_casts_buffers_to_the_parameters() -> None:
    params = _make_params()
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    _run(optimizer, params, _gradients(2))
    float32 = [Parameter(p.data.float()) for p in params]
    target = SGD(float32, lr=0.1, momentum=0.9)
    target.load_state_dict(optimizer.state_dict())
    for p, source in zip(float32, params):
        assert torch.equal(target.state[p]["momentum_buffer"], optimizer.state[source]["momentum_buffer"].float())


def test_load_state_dict_rejects_a_mismatch_and_changes_nothing() -> None:
    params = _make_params()
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    _run(optimizer, params, _gradients(2))
    saved = optimizer.state_dict()

    fewer = SGD(_make_params()[:3], lr=0.5, momentum=0.9)
    with pytest.raises(ValueError, match="4 parameters in the state dict but 3"):
        fewer.load_state_dict(saved)
    assert fewer.param_groups[0]["lr"] == 0.5 and not fewer.state

    other_shapes = [Parameter(torch.zeros(p.shape[::-1] if p.data.dim() == 2 else p.shape, dtype=torch.float64))
                    for p in _make_params()]
    target = SGD(other_shapes, lr=0.5, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum buffer of parameter 0 is \(4, 3\).*shape \(3, 4\)"):
        target.load_state_dict(saved)
    assert target.param_groups[0]["lr"] == 0.5 and not target.state

    with pytest.raises(ValueError, match="keys 'state' and 'param_groups'"):
        target.load_state_dict({"state": {}})
    bad_lr = {"state": {}, "param_groups": [{**saved["param_groups"][0], "lr": -1.0}]}
    with pytest.raises(ValueError, match="Invalid lr"):
        SGD(_make_params(), lr=0.1).load_state_dict(bad_lr)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-0.1), "Invalid lr"),
        (dict(lr=float("nan")), "Invalid lr"),
        (dict(lr=0.1, momentum=-0.5), "Invalid momentum"),
        (dict(lr=0.1, weight_decay=-1e-4), "Invalid weight_decay"),
        (dict(lr=0.1, nesterov=True), "Nesterov momentum requires"),
        (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires"),
        (dict(lr=0.1, foreach="yes"), "Invalid foreach"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SGD(_make_params(), **kwargs)


def test_invalid_parameter_lists() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match="got a Tensor"):
        SGD([torch.zeros(3)], lr=0.1)
    p = _make_params()[0]
    with pytest.raises(ValueError, match="more than once"):
        SGD([p, p], lr=0.1)
    p.grad = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must match the parameter"):
        SGD([p], lr=0.1).step()


def test_zero_grad_and_lr_through_param_groups() -> None:
    params = _make_params()
    optimizer = SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p.data)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)

    before = params[0].data.clone()
    params[0].grad = torch.ones_like(before)
    optimizer.param_groups[0]["lr"] = 0.25
    optimizer.step()
    torch.testing.assert_close(params[0].data, before - 0.25, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- schedules
BASE_LR = 0.1


def _ours_and_torch_lrs(ours_factory, torch_factory, steps: int) -> tuple[list[float], list[float]]:
    optimizer = SGD(_make_params(), lr=BASE_LR)
    scheduler = ours_factory(optimizer)
    torch_optimizer = torch.optim.SGD([torch.zeros(1)], lr=BASE_LR)
    torch_scheduler = torch_factory(torch_optimizer)
    ours, theirs = [], []
    for _ in range(steps):
        ours.append(optimizer.param_groups[0]["lr"])
        assert scheduler.get_last_lr() == [ours[-1]]
        theirs.append(torch_optimizer.param_groups[0]["lr"])
        torch_optimizer.step()
        scheduler.step()
        torch_scheduler.step()
    return ours, theirs


def _linear_warmup(optimizer, warmup_steps: int, then):
    from torch.optim.lr_scheduler import LinearLR, SequentialLR

    warmup = LinearLR(optimizer, start_factor=1 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, then(optimizer)], milestones=[warmup_steps])


@pytest.mark.parametrize("warmup_steps", [0, 4])
@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_schedules_match_torch(schedule: str, warmup_steps: int) -> None:
    total = 30
    if schedule == "step":
        ours_factory = lambda opt: StepLR(opt, step_size=7, gamma=0.3, warmup_steps=warmup_steps)  # noqa: E731
        main = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.3)  # noqa: E731
    else:
        ours_factory = lambda opt: CosineLR(opt, total, min_lr=1e-3, warmup_steps=warmup_steps)  # noqa: E731
        main = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(  # noqa: E731
            opt, T_max=total - warmup_steps, eta_min=1e-3
        )
    torch_factory = main if warmup_steps == 0 else (lambda opt: _linear_warmup(opt, warmup_steps, main))
    ours, theirs = _ours_and_torch_lrs(ours_factory, torch_factory, total + 1)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_cosine_closed_form_and_flat_after_total_steps() -> None:
    scheduler = CosineLR(SGD(_make_params(), lr=BASE_LR), total_steps=10, min_lr=0.01, warmup_steps=2)
    assert scheduler.lr_at(0) == pytest.approx(BASE_LR / 3)
    assert scheduler.lr_at(2) == pytest.approx(BASE_LR)
    assert scheduler.lr_at(6) == pytest.approx(0.01 + 0.5 * (BASE_LR - 0.01))
    assert scheduler.lr_at(10) == pytest.approx(0.01)
    assert scheduler.lr_at(25) == pytest.approx(0.01)


@pytest.mark.parametrize("name", SCHEDULES)
def test_warmup_is_linear_and_monotone(name: str) -> None:
    optimizer = SGD(_make_params(), lr=BASE_LR)
    scheduler = make_scheduler(name, optimizer, total_steps=50, warmup_steps=5, step_size=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR / 6), "construction applies lr_at(0)"
    lrs = [scheduler.lr_at(t) for t in range(6)]
    assert all(a < b for a, b in zip(lrs, lrs[1:]))
    assert lrs == pytest.approx([BASE_LR * (t + 1) / 6 for t in range(6)])
    assert lrs[-1] == BASE_LR


def test_constant_without_warmup_keeps_the_lr() -> None:
    optimizer = SGD(_make_params(), lr=BASE_LR)
    scheduler = ConstantLR(optimizer)
    for _ in range(5):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == BASE_LR and scheduler.last_step == 5


@pytest.mark.parametrize("name", SCHEDULES)
def test_scheduler_state_dict_round_trip(name: str) -> None:
    def make(optimizer):
        return make_scheduler(name, optimizer, total_steps=40, warmup_steps=3, step_size=5, gamma=0.5, min_lr=1e-3)

    straight_optimizer = SGD(_make_params(), lr=BASE_LR)
    straight = make(straight_optimizer)
    for _ in range(17):
        straight.step()

    optimizer = SGD(_make_params(), lr=BASE_LR)
    scheduler = make(optimizer)
    for _ in range(9):
        scheduler.step()
    saved = scheduler.state_dict()
    assert saved["step"] == 9 and saved["schedule"] == name

    fresh_optimizer = SGD(_make_params(), lr=BASE_LR)
    fresh = make(fresh_optimizer)
    fresh.load_state_dict(saved)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for _ in range(8):
        fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == straight_optimizer.param_groups[0]["lr"]
    assert fresh.last_step == 17


def test_scheduler_state_dict_mismatch() -> None:
    saved = CosineLR(SGD(_make_params(), lr=BASE_LR), total_steps=40, warmup_steps=3).state_dict()
    other = CosineLR(SGD(_make_params(), lr=BASE_LR), total_steps=50, warmup_steps=3)
    with pytest.raises(ValueError, match=r"total_steps: saved 40, here 50"):
        other.load_state_dict(saved)
    assert other.last_step == 0
    step = StepLR(SGD(_make_params(), lr=BASE_LR), step_size=5)
    with pytest.raises(ValueError, match=r"schedule: saved 'cosine', here 'step'"):
        step.load_state_dict(saved)
    with pytest.raises(ValueError, match="saved step must be an integer"):
        other.load_state_dict({**saved, "step": -1})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="linear"), "unknown schedule 'linear'; choose one of 'constant', 'step', 'cosine'"),
        (dict(name="step"), "needs step_size"),
        (dict(name="step", step_size=0), "step_size must be an integer >= 1"),
        (dict(name="step", step_size=5, gamma=0.0), "gamma must be a finite number > 0"),
        (dict(name="cosine", warmup_steps=20), "must exceed warmup_steps"),
        (dict(name="cosine", min_lr=1.0), "min_lr .* is above the optimizer's lr"),
        (dict(name="constant", warmup_steps=21), "longer than training"),
        (dict(name="constant", warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    ],
)
def test_make_scheduler_errors(kwargs: dict, message: str) -> None:
    optimizer = SGD(_make_params(), lr=BASE_LR)
    with pytest.raises(ValueError, match=message):
        make_scheduler(kwargs.pop("name"), optimizer, total_steps=20, **kwargs)
    assert optimizer.param_groups[0]["lr"] == BASE_LR


def test_scheduler_needs_one_base_lr() -> None:
    torch_optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)]}], lr=0.2)
    with pytest.raises(ValueError, match="different learning rates"):
        ConstantLR(torch_optimizer)
    with pytest.raises(TypeError, match="param_groups"):
        ConstantLR(object())
    assert math.isclose(ConstantLR(torch.optim.SGD([torch.zeros(1)], lr=0.2), warmup_steps=1).get_last_lr()[0], 0.1)

"""The gradient checker: hand-written backward against ``torch.autograd``, for any layer, loss or model.

:func:`check_gradients` runs a module's ``forward``/``backward`` and, on identical inputs and parameters, autograd
through its :meth:`~nnbackprop.module.Module.reference_forward` — ``torch.nn.functional`` for the built-ins, so a wrong
forward is caught as well as a wrong backward; a user's layer's own ``forward`` otherwise. It compares the output, the
input gradient and every parameter gradient.

Tolerances (:data:`TOLERANCES`) are relative to the gradient's scale, ``err = max|ours − ref| / scale``: 1e-10 in
float64, 1e-5 in float32, and in 16 bits eight roundings of half a unit in the last place (3.1e-2 in bfloat16, 3.9e-3
in float16) or twice torch's own error in that dtype, against float64 autograd — for a model, along the path our
16-bit forward took (which max-pool window won, see :func:`_along`). For the output (or loss) the scale is
``max|ref|``; for a gradient it is the larger of its own ``max|ref|`` and the largest ``max|ref|`` among the gradients
of the same check, so that a gradient that is exactly zero in theory (the bias of a ``Linear`` followed by
``BatchNorm1d``) is judged by its rounding error against the model's gradients instead of against zero.

:func:`check_gradients_fd` instead compares the hand-written backward with central finite differences in float64
(``torch.autograd.gradcheck``, or a random sample of elements when the whole Jacobian would take too long), needing no
reference implementation at all.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

from nnbackprop.layout import LOW_PRECISION
from nnbackprop.losses import Loss
from nnbackprop.module import HIDDEN_FROM_AUTOGRAD, Module, ReferenceForwardError
from nnbackprop.step import full_float32

LOW_PRECISION_ROUNDINGS = 8
"""How many roundings of half a unit in the last place a 16-bit check allows: the reference runs in the same dtype
with its ops in another order, and a gradient that has come through a few layers has been rounded at each."""

TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    # 8 roundings of eps / 2: 3.1e-2 for bfloat16 (eps = 2^-7), 3.9e-3 for float16 (eps = 2^-10)
    torch.bfloat16: LOW_PRECISION_ROUNDINGS * torch.finfo(torch.bfloat16).eps / 2,
    torch.float16: LOW_PRECISION_ROUNDINGS * torch.finfo(torch.float16).eps / 2,
}


@dataclass
class TensorCheck:
    """One compared tensor: ``name`` is ``output``, ``loss``, ``input`` (its gradient) or a parameter's name."""

    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel_err <= self.tolerance


@dataclass
class GradCheckReport:
    """The result of one check: a row per compared tensor, ``passed`` when every row is within tolerance."""

    subject: str
    dtype: torch.dtype
    device: torch.device
    checks: list[TensorCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_rel_err(self) -> float:
        return max((c.max_rel_err for c in self.checks), default=0.0)

    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.passed]

    def __str__(self) -> str:
        lines = [f"{self.subject}  [{str(self.dtype).replace('torch.', '')}, {self.device}]"]
        for c in self.checks:
            lines.append(
                f"  {c.name:<24} {str(c.shape):<16} abs {c.max_abs_err:9.2e}  rel {c.max_rel_err:9.2e}  "
                f"tol {c.tolerance:7.0e}  {'ok' if c.passed else 'FAIL'}"
            )
        return "\n".join(lines)


def compare(name: str, ours: Tensor | None, ref: Tensor | None, tolerance: float, scale: float = 0.0) -> TensorCheck:
    """Compare ``ours`` with the reference ``ref`` (a missing tensor counts as zeros), relative to
    ``max(max|ref|, scale)``."""
    if ours is None and ref is None:
        raise ValueError(f"compare('{name}'): both tensors are missing")
    like = ours if ours is not None else ref
    ours = torch.zeros_like(like) if ours is None else ours.detach()
    ref = torch.zeros_like(like) if ref is None else ref.detach()
    if ours.shape != ref.shape:
        raise ValueError(f"gradient check of '{name}': shape {tuple(ours.shape)} but the reference has "
                         f"{tuple(ref.shape)}")
    ours64, ref64 = ours.double(), ref.double()
    abs_err = (ours64 - ref64).abs().max().item() if ours.numel() else 0.0
    scale = max(ref64.abs().max().item() if ref.numel() else 0.0, scale)
    rel_err = abs_err / max(scale, torch.finfo(torch.float64).tiny)
    if not torch.isfinite(ours64).all() or not torch.isfinite(ref64).all():
        rel_err = abs_err = float("inf") if not torch.equal(ours64.isnan(), ref64.isnan()) else rel_err
    return TensorCheck(name, tuple(ours.shape), abs_err, rel_err if scale else abs_err, tolerance)


def _tolerance(dtype: torch.dtype, rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    if dtype not in TOLERANCES:
        raise ValueError(f"gradient check: no tolerance for dtype {dtype}; pass rtol explicitly")
    return TOLERANCES[dtype]


@full_float32()
def check_gradients(
    module: Module,
    x: Tensor,
    target: Tensor | None = None,
    *,
    dout: Tensor | None = None,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
    subject: str | None = None,
) -> GradCheckReport:
    """Check ``module``'s hand-written backward against autograd on input ``x``.

    For a layer or model: one ``forward(x)`` and ``backward(dout)`` (``dout`` random normal if not given), against
    ``torch.autograd.grad`` of ``reference_forward`` with the same ``x``, parameters and ``dout``. For a
    :class:`~nnbackprop.losses.Loss`: ``forward(x, target)`` and ``backward()``. The module's parameter gradients are
    cleared first and hold the hand-written ones afterwards. On CUDA float32 is checked as float32, without TF32
    (:func:`~nnbackprop.step.full_float32`).

    Returns:
        A :class:`GradCheckReport` with rows ``output`` (or ``loss``), ``input`` and one per parameter.
    """
    tol = _tolerance(x.dtype, rtol)
    report = GradCheckReport(subject or module.name, x.dtype, x.device)
    module.release_saved()  # the check's own forward and backward go together, whatever ran before
    x = x.detach()
    x_ref = x.clone().requires_grad_(True)
    if isinstance(module, Loss):
        if target is None:
            raise ValueError(f"check_gradients({module.name}): a loss needs a target")
        out = module(x, target)
        with torch.enable_grad():
            try:
                ref_out = module.reference_forward(x_ref, target)
            except NotImplementedError:
                raise ReferenceForwardError(f"check_gradients({module.name}): the loss has no reference_forward; write "
                                            "reference_forward(self, input, target) with torch.nn.functional or other "
                                            "differentiable torch ops") from None
        exact = x.dtype in LOW_PRECISION
        if exact:  # the same loss in float64: what 16-bit results are measured against
            with torch.enable_grad():
                x64 = x.double().requires_grad_(True)
                out64 = module.reference_forward(x64, target)
        dx = module.backward()
        _check_connected(module, ref_out)
        (ref_dx,) = torch.autograd.grad(ref_out, [x_ref])
        if exact:
            (dx64,) = torch.autograd.grad(out64, [x64])
            report.checks += _against_exact([("loss", out, ref_out, out64, out64), ("input", dx, ref_dx, dx64, dx64)],
                                            tol)
            return report
        report.checks.append(compare("loss", out, ref_out, tol))
        report.checks += _compare_grads([("input", dx, ref_dx)], tol)
        return report

    module.zero_grad()
    named = list(module.named_parameters())
    params = {name: p.detach().clone().requires_grad_(True) for name, p in named}
    needs_input_grad = module.needs_input_grad
    module.needs_input_grad = True
    low_precision = x.dtype in LOW_PRECISION
    try:
        with _leaf_inputs(module) if low_precision else nullcontext({}) as seen:
            out = module(x).clone()  # in the fast layout backward may reuse the output's buffer
        with torch.enable_grad():
            ref_out = module.reference_forward(x_ref, params)
            if low_precision:  # the same in float64, and in float64 along our forward's path (see _along)
                x64, x_along = (x.double().requires_grad_(True) for _ in range(2))
                params64, params_along = ({name: p.detach().double().requires_grad_(True) for name, p in named}
                                          for _ in range(2))
                out64 = module.reference_forward(x64, params64)
                with _along(seen):
                    out_along = module.reference_forward(x_along, params_along)
        if dout is None:
            dout = torch.randn(out.shape, generator=generator, dtype=out.dtype, device="cpu").to(out.device)
        dx = module.backward(dout)
    finally:
        module.needs_input_grad = needs_input_grad
    _check_connected(module, ref_out)
    ref_grads = torch.autograd.grad(ref_out, [x_ref, *params.values()], dout, allow_unused=True)
    ours = [("input", dx), *((name, p.grad) for name, p in named)]
    _check_reached(module, ours, ref_grads)
    if low_precision:
        grads64 = torch.autograd.grad(out64, [x64, *params64.values()], dout.double(), allow_unused=True)
        along = torch.autograd.grad(out_along, [x_along, *params_along.values()], dout.double(), allow_unused=True)
        rows = [("output", out, ref_out, out64, out64)] + [
            (n, g, r, e, a) for (n, g), r, e, a in zip(ours, ref_grads, grads64, along)]
        report.checks += _against_exact(rows, tol)
        return report
    report.checks.append(compare("output", out, ref_out, tol))
    report.checks += _compare_grads([(n, g, r) for (n, g), r in zip(ours, ref_grads)], tol)
    return report


def _against_exact(rows: list[tuple[str, Tensor | None, Tensor | None, Tensor | None, Tensor | None]], tol: float
                   ) -> list[TensorCheck]:
    """16-bit checks: each row ``(name, ours, autograd's in 16 bits, exact, exact along our path)`` compares ours with
    the exact value along our forward's path (autograd in float64, see :func:`_along`) within ``tol`` or twice
    autograd's own 16-bit error against the exact value, whichever is larger — as close to the truth as torch gets in
    that dtype, give or take."""
    def own_error(name: str, ref: Tensor | None, exact: Tensor | None, scale: float = 0.0) -> float:
        return compare(name, ref, exact, tol, scale).max_rel_err

    name, ours, ref, exact, along = rows[0]
    checks = [compare(name, ours, along, max(tol, 2 * own_error(name, ref, exact)))]
    grads = rows[1:]
    scale = max((e.detach().abs().max().item() for *_, e, _ in grads if e is not None and e.numel()), default=0.0)
    for name, ours, ref, exact, along in grads:
        checks.append(compare(name, ours, along, max(tol, 2 * own_error(name, ref, exact, scale)), scale))
    return checks


@contextmanager
def _leaf_inputs(module: Module) -> Iterator[dict[int, tuple[Module, list[Tensor]]]]:
    """While inside, record a copy of the input of every call of each leaf of ``module`` (a module without children,
    ``module`` itself excepted), keyed by the leaf's ``id``."""
    seen: dict[int, tuple[Module, list[Tensor]]] = {}

    def record(leaf: Module, inputs: tuple, output: Any) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            seen.setdefault(id(leaf), (leaf, []))[1].append(inputs[0].detach().clone())

    handles = [leaf.register_forward_hook(record) for leaf in module.modules()
               if leaf is not module and next(leaf.children(), None) is None]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _along(seen: dict[int, tuple[Module, list[Tensor]]]) -> Iterator[None]:
    """While inside, the ``reference_forward`` of each leaf in ``seen`` computes on the value its input had in our
    16-bit forward (in the reference's dtype), while autograd differentiates through the input it is given
    (``ours + (h − h.detach())``): the float64 reference then follows the path our forward took — which max-pool
    window won, which ReLU was on — and differs from our gradient only by rounding. Without it, a near-tie that 16-bit
    rounding decides the other way (1.5703 against 1.5625 in bfloat16 where float64 has 1.5741 against 1.5818) sends
    a gradient to another pixel, and the check would measure which way a coin fell rather than our arithmetic."""
    for leaf, inputs in seen.values():
        def forced(h: Tensor, params: Any, *, reference: Callable[..., Tensor] = leaf.reference_forward,
                   queue: list[Tensor] = list(inputs)) -> Tensor:
            if queue and isinstance(h, Tensor) and queue[0].shape == h.shape:
                h = queue.pop(0).to(h.dtype) + (h - h.detach())
            return reference(h, params)
        object.__setattr__(leaf, "reference_forward", forced)
    try:
        yield
    finally:
        for leaf, _ in seen.values():
            leaf.__dict__.pop("reference_forward", None)


def _check_connected(module: Module, ref_out: Any) -> None:
    """Refuse a reference output autograd cannot differentiate."""
    if not isinstance(ref_out, Tensor) or not ref_out.requires_grad:
        what = "a tensor not connected to the input or parameters" if isinstance(ref_out, Tensor) else \
            f"a {type(ref_out).__name__}"
        raise ReferenceForwardError(f"check_gradients({module.name}): its reference_forward returned {what}; build "
                                    f"its result from x and params with differentiable torch ops (no "
                                    f"{HIDDEN_FROM_AUTOGRAD})")


def _check_reached(module: Module, ours: list[tuple[str, Tensor | None]], ref_grads: tuple[Tensor | None, ...]) -> None:
    """Refuse a reference that autograd cannot trace back to a tensor whose hand-written gradient is not zero, when a
    layer without a reference_forward of its own (whose forward autograd ran) can be the cause."""
    unreached = [name for (name, grad), ref in zip(ours, ref_grads)
                 if ref is None and grad is not None and grad.numel() and bool(grad.detach().abs().max() > 0)]
    own = [m.name for m in module.modules() if type(m).reference_forward is Module.reference_forward]
    if unreached and own:
        raise ReferenceForwardError(
            f"check_gradients({module.name}): autograd finds no path from the output to {', '.join(unreached)}, whose "
            f"hand-written gradient is not zero: the forward of {', '.join(own)} hides them from autograd "
            f"({HIDDEN_FROM_AUTOGRAD}?); write a reference_forward(self, x, params) with differentiable torch ops")


def _compare_grads(grads: list[tuple[str, Tensor | None, Tensor | None]], tol: float) -> list[TensorCheck]:
    """Compare ``(name, ours, ref)`` gradients, each relative to at least the largest reference gradient's scale."""
    scale = max((r.detach().abs().max().item() for _, _, r in grads if r is not None and r.numel()), default=0.0)
    return [compare(name, ours, ref, tol, scale) for name, ours, ref in grads]


class _HandWritten(torch.autograd.Function):
    """Presents a module's hand-written forward/backward to autograd, so ``gradcheck`` can probe them.

    ``backward`` re-runs ``forward`` (with the random state restored) because a module's cache serves one backward,
    while ``gradcheck`` asks for several vector-Jacobian products of one output.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, tuple[Tensor, ...]]], x: Tensor, *values: Tensor) -> Tensor:
        ctx.run = run
        ctx.save_for_backward(x, *values)
        out, _ = run(x.detach(), [v.detach() for v in values], None)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        x, *values = ctx.saved_tensors
        _, grads = ctx.run(x.detach(), [v.detach() for v in values], dout)
        return (None, *grads)


FD_SECONDS = 30.0
"""How long :func:`check_gradients_fd` may expect a full check to take before it checks a sample instead."""


def check_gradients_fd(module: Module, x: Tensor, target: Tensor | None = None, *, eps: float = 1e-6,
                       atol: float = 1e-5, rtol: float = 1e-4, raise_exception: bool = False,
                       max_elements: int | None = None, max_seconds: float = FD_SECONDS,
                       generator: torch.Generator | None = None,
                       progress: Callable[[int, int], None] | None = None) -> bool:
    """Check the hand-written backward against central finite differences.

    Needs float64 ``x`` and parameters. The random state (torch's global generators, the CPU's and ``x``'s CUDA
    device's, and any ``generator`` attribute of the module's submodules, e.g. dropout's) is restored before every
    evaluation so the function is deterministic, and buffers (batch-norm running averages) are restored afterwards.

    The full check is ``torch.autograd.gradcheck``: the whole Jacobian, two forward passes per input and parameter
    element and one backward per output element. Its cost is estimated first (those passes times a measured forward
    pass); above ``max_seconds`` it would be too slow, so a one-line warning says so and a random sample of the input
    and parameter elements is checked instead — as many as fit in ``max_seconds``, or ``max_elements`` if given
    (which also asks for a sample without the warning). For a sampled element ``e`` the central difference of the
    scalar ``v · f`` (``v`` a random ``dout``) is compared with element ``e`` of the hand-written ``dx``, ``dW``, ...
    for that ``dout``: ``|num − ours| ≤ atol + rtol · |num|``.

    Args:
        generator: the random source of the sample and of ``v``.
        progress: called as ``progress(done, total)`` with the forward passes run so far and the expected total.

    Returns:
        Whether every checked derivative matches; with ``raise_exception`` a mismatch raises
        ``torch.autograd.gradcheck.GradcheckError`` (showing both Jacobians for a full check, the worst element for a
        sample).
    """
    if x.dtype != torch.float64:
        raise ValueError(f"check_gradients_fd needs float64 inputs (finite differences), got {x.dtype}")
    if max_elements is not None and (isinstance(max_elements, bool) or not isinstance(max_elements, int)
                                     or max_elements < 1):
        raise ValueError(f"check_gradients_fd: max_elements must be a positive integer or None, got {max_elements!r}")
    named = list(module.named_parameters())
    generators = [m.generator for m in module.modules() if isinstance(getattr(m, "generator", None), torch.Generator)]
    rng_states = [g.get_state() for g in generators]
    global_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None  # dropout draws there
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    passes = [0, 0]  # forward passes run, expected

    def run(xv: Tensor, values: list[Tensor], dout: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        torch.set_rng_state(global_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, x.device)
        for g, state in zip(generators, rng_states):
            g.set_state(state)
        saved = [p.data for _, p in named]
        needs_input_grad = module.needs_input_grad
        try:
            for (_, p), v in zip(named, values):
                p.data = v
            module.zero_grad()
            module.needs_input_grad = True
            with torch.enable_grad():  # autograd.Function.forward runs without; nnbackprop's forward saves only with
                out = module(xv, target) if isinstance(module, Loss) else module(xv)
                if dout is None:
                    module.release_saved()
                    return out.clone(), ()
                dx = module.backward(dout)
            return out.clone(), (dx.clone(), *(p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                               for _, p in named))
        finally:
            module.needs_input_grad = needs_input_grad
            for (_, p), d in zip(named, saved):
                p.data = d
            passes[0] += 1
            if progress is not None:
                progress(passes[0], max(passes))

    inputs = [x.detach().clone(), *(p.detach().clone() for _, p in named)]
    try:
        seconds = float("inf")
        for _ in range(2):  # the first pass may set up kernels for these shapes: time the second
            start = time.perf_counter()
            out, _ = run(inputs[0], inputs[1:], None)
            seconds = min(seconds, time.perf_counter() - start)
        elements = sum(t.numel() for t in inputs)
        full = 2 * elements + 3 * out.numel()  # gradcheck: 2 per element, a forward and backward per output
        sample = max_elements
        if sample is None and full * seconds > max_seconds:
            sample = max(1, int(max_seconds / max(seconds, 1e-9)) // 2 - 2)
            what = (f"a random sample of {sample} of the {elements}" if sample < elements else
                    f"all {elements}")
            warnings.warn(f"check_gradients_fd({module.name}): a full check needs {full} forward passes of "
                          f"{seconds * 1e3:.1f} ms (about {full * seconds:.0f} s), more than max_seconds="
                          f"{max_seconds:g}; checking {what} input and parameter elements along one random dout "
                          "instead (max_elements= sets the sample)", stacklevel=2)
        if sample is not None:
            passes[1] = passes[0] + 1 + 2 * min(sample, elements)
            return _check_sample(run, inputs, out, sample, eps, atol, rtol, raise_exception, generator)
        passes[1] = passes[0] + full
        with_grad = [t.requires_grad_(True) for t in inputs]
        # gradcheck also runs each backward twice and wants the same result: on CUDA, atomic adds (the gradients of
        # overlapping pooling windows, cuDNN's transposed convolution) sum in no fixed order, so allow rounding there,
        # as torch's own tests of such ops do (GRADCHECK_NONDET_TOL)
        nondet_tol = 1e-12 if x.device.type == "cuda" else 0.0
        return torch.autograd.gradcheck(lambda *a: _HandWritten.apply(run, *a), with_grad, eps=eps, atol=atol,
                                         rtol=rtol, raise_exception=raise_exception, nondet_tol=nondet_tol)
    finally:
        module.zero_grad()
        for name, b in module.named_buffers():
            b.copy_(buffers[name])


def _check_sample(run: Callable[..., tuple[Tensor, tuple[Tensor, ...]]], inputs: list[Tensor], out: Tensor,
                  sample: int, eps: float, atol: float, rtol: float, raise_exception: bool,
                  generator: torch.Generator | None) -> bool:
    """Central differences of ``v · f`` at ``sample`` random elements of ``inputs`` against the hand-written gradient
    for ``dout = v``."""
    v = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
    _, grads = run(inputs[0], inputs[1:], v)
    offsets = [0]
    for t in inputs:
        offsets.append(offsets[-1] + t.numel())
    chosen = torch.randperm(offsets[-1], generator=generator)[:sample].tolist()
    worst: tuple[float, str, float, float] | None = None
    for flat in sorted(chosen):
        which = next(i for i in range(len(inputs)) if flat < offsets[i + 1])
        element = inputs[which].view(-1)
        index = flat - offsets[which]
        original = element[index].item()
        sides = []
        for step in (eps, -eps):
            element[index] = original + step
            sides.append(torch.sum(v * run(inputs[0], inputs[1:], None)[0]).item())
        element[index] = original
        numerical = (sides[0] - sides[1]) / (2 * eps)
        ours = grads[which].reshape(-1)[index].item()
        excess = abs(numerical - ours) - (atol + rtol * abs(numerical))
        if excess > 0 and (worst is None or excess > worst[0]):
            name = "input" if which == 0 else f"parameter {which - 1}"
            worst = (excess, f"{name} element {index}", numerical, ours)
    if worst is None:
        return True
    if raise_exception:
        raise GradcheckError(
            f"Jacobian mismatch (sampled): at {worst[1]} the finite difference of v·f is {worst[2]:.6g}, the "
            f"hand-written gradient {worst[3]:.6g}")
    return False


LAYOUTS = ("plain", "fast")
"""Where :func:`builtin_checks` runs each module: allocating (``plain``), or bound to the fast layout (``fast``,
:class:`~nnbackprop.layout.FastLayout`: workspace buffers, flat parameters and gradients), as the fast step runs it."""


def builtin_checks(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64, seed: int = 0,
    finite_differences: bool = False, layout: str = "plain",
) -> list[GradCheckReport]:
    """Check every built-in layer and loss, and a few whole models, on random inputs of several shapes, in ``layout``.

    With ``finite_differences`` (float64 only), each check is also run through :func:`check_gradients_fd` (the whole
    Jacobian, however long it takes: the shapes are small); a failure there adds a failing ``finite-differences`` row to
    the report.
    """
    from nnbackprop.conv import AdaptiveAvgPool2d, AvgPool2d, Conv2d, MaxPool2d
    from nnbackprop.layers import (GELU, BatchNorm1d, BatchNorm2d, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid,
                                   Tanh)
    from nnbackprop.layout import FastLayout
    from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
    from nnbackprop.model import Sequential, cnn, mlp

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    def labels(n: int, c: int) -> Tensor:
        return torch.randint(0, c, (n,), generator=g).to(device)

    cases: list[tuple[str, Module, Tensor, Tensor | None]] = [
        ("Linear 7->5, N=4", Linear(7, 5, generator=g), randn(4, 7), None),
        ("Linear 3->2 no bias, N=1", Linear(3, 2, bias=False, generator=g), randn(1, 3), None),
        ("Linear 64->32, strided input", Linear(64, 32, generator=g), randn(16, 128)[:, ::2], None),
        ("ReLU (4, 6)", ReLU(), randn(4, 6), None),
        ("LeakyReLU(0.1) (2, 3, 5)", LeakyReLU(0.1), randn(2, 3, 5), None),
        ("LeakyReLU(-1.5) (4, 6)", LeakyReLU(-1.5), randn(4, 6), None),
        ("Sigmoid (4, 6)", Sigmoid(), randn(4, 6), None),
        ("Tanh (3, 7)", Tanh(), randn(3, 7), None),
        ("GELU (4, 6)", GELU(), randn(4, 6), None),
        ("GELU tanh (4, 6)", GELU("tanh"), randn(4, 6), None),
        ("Dropout(0.3) train", Dropout(0.3, generator=torch.Generator(device=device).manual_seed(seed)),
         randn(8, 10), None),
        ("Dropout(0.3) eval", Dropout(0.3).eval(), randn(8, 10), None),
        ("Flatten (3, 2, 4, 5)", Flatten(), randn(3, 2, 4, 5), None),
        ("BatchNorm1d(6) train", BatchNorm1d(6), randn(8, 6) * 3 + 1, None),
        ("BatchNorm1d(6) eval", BatchNorm1d(6).eval(), randn(8, 6), None),
        ("Conv2d 3->4 k3 p1, (2, 3, 7, 6)", Conv2d(3, 4, 3, padding=1, generator=g), randn(2, 3, 7, 6), None),
        ("Conv2d 4->6 g2 k3x2 s2x3 d1x2, no bias",
         Conv2d(4, 6, (3, 2), (2, 3), (1, 0), (1, 2), groups=2, bias=False, generator=g), randn(2, 4, 9, 8), None),
        ("Conv2d depthwise 6 k3 s2 p2 d2", Conv2d(6, 6, 3, 2, 2, 2, groups=6, generator=g), randn(3, 6, 8, 9), None),
        ("Conv2d 1x1 s2, (1, 5, 5, 5)", Conv2d(5, 3, 1, stride=2, generator=g), randn(1, 5, 5, 5), None),
        ("Conv2d 5x3 padding same, N=1", Conv2d(2, 3, (5, 3), padding="same", generator=g), randn(1, 2, 6, 5), None),
        ("Conv2d 3->5 k3 s2, transposed input", Conv2d(3, 5, 3, 2, generator=g),
         randn(7, 9, 3, 2).permute(3, 2, 1, 0), None),
        ("Conv2d 4->4 k3 p1, strided input", Conv2d(4, 4, 3, padding=1, generator=g), randn(2, 4, 6, 10)[..., ::2],
         None),
        ("MaxPool2d(2), (2, 3, 6, 8)", MaxPool2d(2), randn(2, 3, 6, 8), None),
        ("MaxPool2d(3, 2, 1, ceil_mode), 7x7", MaxPool2d(3, 2, 1, ceil_mode=True), randn(2, 2, 7, 7), None),
        ("MaxPool2d k3x2 s1x2 p1x0 d2x1, strided", MaxPool2d((3, 2), (1, 2), (1, 0), (2, 1)),
         randn(2, 3, 9, 14)[..., ::2], None),
        ("AvgPool2d(2), (2, 3, 6, 8)", AvgPool2d(2), randn(2, 3, 6, 8), None),
        ("AvgPool2d(3, 2, 1) ceil, pad not counted",
         AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), randn(2, 2, 8, 7), None),
        ("AvgPool2d(3, 1, divisor_override=5)", AvgPool2d(3, 1, divisor_override=5), randn(1, 2, 5, 6), None),
        ("AdaptiveAvgPool2d(1), (3, 4, 5, 7)", AdaptiveAvgPool2d(1), randn(3, 4, 5, 7), None),
        ("AdaptiveAvgPool2d((3, 2)), 7x5", AdaptiveAvgPool2d((3, 2)), randn(2, 3, 7, 5), None),
        ("BatchNorm2d(3) train, (4, 3, 5, 3)", BatchNorm2d(3), randn(4, 3, 5, 3) * 3 + 1, None),
        ("BatchNorm2d(3) train, N=1", BatchNorm2d(3), randn(1, 3, 3, 2) * 2 - 1, None),
        ("BatchNorm2d(3) eval", BatchNorm2d(3).eval(), randn(2, 3, 4, 4), None),
        ("Dropout(0.3) train, (2, 3, 4, 5)", Dropout(0.3, generator=torch.Generator(device=device).manual_seed(seed)),
         randn(2, 3, 4, 5), None),
        ("CrossEntropyLoss mean", CrossEntropyLoss(), randn(6, 10), labels(6, 10)),
        ("CrossEntropyLoss sum", CrossEntropyLoss("sum"), randn(5, 3) * 20, labels(5, 3)),
        ("MSELoss mean", MSELoss(), randn(4, 3), randn(4, 3)),
        ("MSELoss sum", MSELoss("sum"), randn(4, 3), randn(4, 3)),
        ("MSELoss half_sum, labels", MSELoss("half_sum"), randn(4, 3), labels(4, 3)),
        ("BCEWithLogitsLoss mean", BCEWithLogitsLoss(), randn(8) * 30, labels(8, 2)),
        ("BCEWithLogitsLoss sum (N, 1)", BCEWithLogitsLoss("sum"), randn(8, 1), randn(8).sigmoid()),
        ("MLP 20-16-16-5 relu", mlp(20, [16, 16], 5, generator=g), randn(8, 20), None),
        ("MLP 1x8x8-12-12-12-3 gelu+dropout+bn",
         mlp(64, [12, 12, 12], 3, activation="gelu", dropout=0.2, batchnorm=True,
             generator=torch.Generator(device=device).manual_seed(seed)), randn(8, 1, 8, 8), None),
        ("2-2-2 sigmoid network (the seed article's)",
         Sequential(Linear(2, 2, generator=g), Sigmoid(), Linear(2, 2, generator=g), Sigmoid()), randn(3, 2), None),
        ("CNN 3x8x8 (4, 6) bn+dropout", cnn((3, 8, 8), (4, 6), 3, dropout=0.2, hidden=[5],
                                             generator=torch.Generator(device=device).manual_seed(seed)),
         randn(4, 3, 8, 8), None),
        ("CNN 1x6x7 (3,) no bn, tanh", cnn((1, 6, 7), (3,), 2, activation="tanh", batchnorm=False, generator=g),
         randn(2, 1, 6, 7), None),
    ]
    reports = []
    for name, module, x, target in cases:
        if not isinstance(module, Loss):
            module.to(device=device, dtype=dtype)
        if layout == "fast":
            FastLayout(module)
        report = check_gradients(module, x, target, generator=g, subject=name)
        if finite_differences:
            mismatch = 0.0 if check_gradients_fd(module, x, target, max_seconds=float("inf")) else float("inf")
            report.checks.append(TensorCheck("finite-differences", (), mismatch, mismatch, 0.0))
        reports.append(report)
    return reports

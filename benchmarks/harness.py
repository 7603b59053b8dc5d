"""Timing the whole training step (forward, cross-entropy, backward, SGD-momentum update) of a model, several ways, in
one process.

* **ours**: the step :func:`nnbackprop.make_step` gives (``FastStep``, or ``SimpleStep`` when the fast layout cannot
  hold the model) and, as a detail, the readable ``SimpleStep``;
* **eager**: the same model as ``torch.nn`` (:func:`nnbackprop.to_torch`) + autograd + ``torch.optim.SGD``, in each
  variant the installed torch offers (``default``, ``foreach``, ``fused``; for image models each also channels-last,
  ``+cl``, as torch advises for convolutions); the fastest is the baseline;
* **compiled**: the eager step (default optimizer) under ``torch.compile``, compile time reported apart, or the reason
  it could not run;
* **floor**: only the matrix products the step needs, with the same shapes, found from the model's layers
  (:data:`FLOOR_PRODUCTS`; per ``Linear``: the forward ``addmm``, ``dW = doutᵀ x`` and, except for the first layer with
  parameters, whose input is data, ``dx = dout W``; per ``Conv2d`` the forward convolution and its ``dW``, ``dx``);
* **floor+update**: the floor, then the least memory traffic of the SGD-momentum update: one fused pass
  (``torch.optim.SGD(fused=True)``, else ``foreach=True``) over one flat parameter, gradient and momentum tensor the
  size of the model. ``ours/(floor+update)`` isolates what the step adds beyond that work.

A model comes from one pluggable constructor, :func:`resolve_model`: a :class:`BenchModel` names the model, its input
shape and classes, and builds it from a seeded generator (an MLP from ``"784-512-512-10"``, or a user's
``FILE.py:FUNCTION``).

Every implementation starts from the same weights, and one step of each is checked against one step of ours on the
same batch before anything is timed. The implementations are timed in alternating blocks, so that a shared machine
whose load drifts slows them alike; each gives the summary of its step times (:func:`report.summarize`: median,
quartiles, extremes), taken with CUDA events on a GPU. Each configuration gives a row (a JSON-ready dict).

This harness measures and returns rows; ``step_benchmark.py`` prints and saves them.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor

import nnbackprop as nb
from internals import LOW_PRECISION, ConfigError, checked_torch_model, model_from_file
from internals import full_float32, tf32 as nb_tf32
from report import load_average, summarize

LR = 0.01
MOMENTUM = 0.9
EAGER_VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
"""``torch.optim.SGD`` keyword arguments of each eager variant."""
CHANNELS_LAST = "+cl"
"""Suffix of the eager variants of an image model run channels-last (model and batch), as torch advises for
convolutions on CPUs and tensor cores: ``foreach+cl``, ..."""


# -------------------------------------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark: its name in the table, the shape of one input example, the number of classes, and
    ``build(generator)``, which returns a fresh nnbackprop model with weights drawn from ``generator``."""
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    build: Callable[[torch.Generator], nb.Module]


def mlp_model(spec: str) -> BenchModel:
    """The ReLU MLP ``"784-512-512-10"`` (input, hidden..., classes), without dropout or ``Flatten``."""
    try:
        sizes = [int(s) for s in spec.split("-")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) <= 0:
        raise ValueError(f"model '{spec}': expected layer sizes joined by '-' (e.g. 784-512-512-10) or "
                         "FILE.py:FUNCTION")
    return BenchModel(spec, (sizes[0],), sizes[-1],
                      lambda generator: nb.mlp(sizes[0], sizes[1:-1], sizes[-1], flatten=False, generator=generator))


def cnn_model(spec: str) -> BenchModel:
    """The network of :func:`nnbackprop.cnn` (two 3x3 convolutions per stage, batch norm, ReLU, max pooling; global
    average pooling and the classifier) named ``"cnn:3,64,64:32-64-128-256:2"`` (input shape, stage channels,
    classes)."""
    try:
        _, shape, channels, classes = spec.split(":")
        input_shape = tuple(int(s) for s in shape.split(","))
        widths = tuple(int(s) for s in channels.split("-"))
        num_classes = int(classes)
        ok = len(input_shape) == 3 and min(input_shape + widths + (num_classes,)) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"model '{spec}': a CNN is cnn:C,H,W:CHANNELS:CLASSES, e.g. cnn:3,64,64:32-64-128-256:2")
    return BenchModel(spec, input_shape, num_classes,
                      lambda generator: nb.cnn(input_shape, widths, num_classes, generator=generator))


def file_model(spec: str, input_shape: Sequence[int], num_classes: int) -> BenchModel:
    """The model ``FILE.py:FUNCTION`` returns, called as ``nnbackprop train --model`` calls it: with those of
    ``in_features``, ``input_shape``, ``num_classes`` and ``generator`` it declares."""
    def build(generator: torch.Generator) -> nb.Module:
        return model_from_file(spec, in_features=math.prod(input_shape), input_shape=tuple(input_shape),
                               num_classes=num_classes, generator=generator)

    path, _, function = spec.rpartition(":")
    built = build(torch.Generator().manual_seed(0)).eval()  # a missing file or function, or one that fails, stops here
    x = torch.randn(2, *input_shape)
    try:
        with torch.no_grad():
            out = built(x)
    except Exception as error:  # whatever the user's layers raise
        raise ValueError(f"--model {spec}: the model does not take a batch of shape {tuple(x.shape)} (--input-shape): "
                         f"{type(error).__name__}: {str(error).strip().splitlines()[0]}") from error
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"--model {spec}: the model returns {shape} for a batch of 2, cross-entropy needs "
                         f"(2, {num_classes}) (--num-classes)")
    return BenchModel(f"{Path(path).name}:{function}", tuple(input_shape), num_classes, build)


def resolve_model(spec: str, input_shape: Sequence[int], num_classes: int) -> BenchModel:
    """The model ``spec`` names: ``FILE.py:FUNCTION`` (built for ``input_shape`` and ``num_classes``) or an MLP's layer
    sizes, or ``cnn:C,H,W:CHANNELS:CLASSES`` (which fix both). Another kind of model is one more function returning a
    :class:`BenchModel`, chosen here by its spec.

    Raises:
        ValueError: in one line, naming the spec and what is wrong with it.
    """
    if ".py:" in spec:
        return file_model(spec, input_shape, num_classes)
    if spec.startswith("cnn:"):
        return cnn_model(spec)
    return mlp_model(spec)


def parameter_count(model: nb.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def torch_equivalent(model: nb.Module, input_shape: tuple[int, ...]) -> tuple[torch.nn.Module | None, str | None]:
    """``(nb.to_torch(model), None)`` once checked to compute what ``model`` does, or ``(None, why)`` when a layer
    has no ``torch.nn`` equivalent."""
    try:
        return checked_torch_model(model, input_shape), None
    except ConfigError as error:
        return None, str(error)


def describe(model: BenchModel) -> dict[str, Any]:
    """What will be timed of ``model``: its ``parameters`` count, why ours is not ``FastStep`` (``fast_reason``), why
    there is no eager reference (``eager_skip``), and the layers with parameters the floor leaves out."""
    built = model.build(torch.Generator().manual_seed(0)).eval()
    return {"parameters": parameter_count(built), "fast_reason": nb.FastStep.why_not(built),
            "eager_skip": torch_equivalent(built, model.input_shape)[1],
            "floor_left_out": matmul_floor(built, torch.randn(2, *model.input_shape))[1]}


# --------------------------------------------------------------------------------------------------------- the floor

Products = tuple[Callable[[], None], Callable[[], None]]
"""A layer's matrix products on preallocated tensors: ``(forward, backward)``."""


def linear_products(layer: nb.Linear, x_shape: torch.Size, needs_dx: bool,
                    rand: Callable[..., Tensor]) -> Products:
    """``out = b + x Wᵀ`` (``addmm``); ``dW = doutᵀ x``; ``dx = dout W`` when the layer's input gradient is needed."""
    n, d_in, d_out = math.prod(x_shape[:-1]), layer.in_features, layer.out_features
    x, w, out, dout, dw = rand(n, d_in), rand(d_out, d_in), rand(n, d_out), rand(n, d_out), rand(d_out, d_in)
    b = rand(d_out) if layer.bias is not None else None
    dx = rand(n, d_in) if needs_dx else None

    def forward() -> None:
        if b is not None:
            torch.addmm(b, x, w.t(), out=out)
        else:
            torch.mm(x, w.t(), out=out)

    def backward() -> None:
        torch.mm(dout.t(), x, out=dw)
        if dx is not None:
            torch.mm(dout, w, out=dx)

    return forward, backward


def conv2d_products(layer: nb.Conv2d, x_shape: torch.Size, needs_dx: bool,
                    rand: Callable[..., Tensor]) -> Products:
    """The forward convolution (cuDNN/oneDNN through ``torch.nn.functional.conv2d``), then ``dW`` and, when the
    layer's input gradient is needed, ``dx`` in one ``convolution_backward``, as torch's own backward computes them."""
    padding = layer.padding
    if isinstance(padding, str):  # "valid" or "same" (stride 1): the zeros each side that keep the size
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                        for k, d in zip(layer.kernel_size, layer.dilation))
    x, w = rand(*x_shape), rand(*layer.weight.shape)
    b = rand(layer.out_channels) if layer.bias is not None else None
    out_shape = torch.nn.functional.conv2d(x[:1], w, None, layer.stride, padding, layer.dilation, layer.groups).shape
    dout = rand(x_shape[0], *out_shape[1:])

    def forward() -> None:
        torch.nn.functional.conv2d(x, w, b, layer.stride, padding, layer.dilation, layer.groups)

    def backward() -> None:
        torch.ops.aten.convolution_backward(dout, x, w, None, layer.stride, padding, layer.dilation, False, [0, 0],
                                            layer.groups, [needs_dx, True, False])

    return forward, backward


FLOOR_PRODUCTS: dict[type, Callable[[Any, torch.Size, bool, Callable[..., Tensor]], Products]] = {
    nb.Linear: linear_products,
    nb.Conv2d: conv2d_products,
}
"""The layer types whose matrix products make the floor, each with the function that preallocates and runs them given
the layer, the shape of its input and whether its input gradient is computed."""


def matmul_floor(model: nb.Module, x: Tensor) -> tuple[Callable[[], None], list[str]]:
    """The floor of one step of ``model`` on the batch ``x``: the products of :data:`FLOOR_PRODUCTS` of every layer
    the forward runs, forwards in order then backwards in reverse; and the names of the layers with parameters whose
    work it leaves out (no entry in :data:`FLOOR_PRODUCTS`).

    The shapes are those of a forward pass of a copy of ``model`` on ``x``. As in a training step, the first layer
    with parameters computes no input gradient."""
    gen = torch.Generator(x.device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=gen, device=x.device).to(x.dtype)

    probe = copy.deepcopy(model)
    calls: list[tuple[nb.Module, torch.Size]] = []
    leaves = [m for m in probe.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(lambda m, inputs, out: calls.append((m, inputs[0].shape))) for m in leaves]
    with torch.no_grad():
        probe(x)
    for handle in handles:
        handle.remove()
    products: list[Products] = []
    left_out: list[str] = []
    after_parameters = False
    for layer, shape in calls:
        make = next((f for kind, f in FLOOR_PRODUCTS.items() if isinstance(layer, kind)), None)
        has_parameters = next(layer.parameters(), None) is not None
        if make is not None:
            products.append(make(layer, shape, after_parameters, rand))
        elif has_parameters:
            left_out.append(type(layer).__name__)
        after_parameters = after_parameters or has_parameters

    def run() -> None:
        for forward, _ in products:
            forward()
        for _, backward in reversed(products):
            backward()

    return run, sorted(set(left_out))


def update_floor(num_params: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], Any], str]:
    """One SGD-momentum update over flat ``(num_params,)`` parameter, gradient and momentum tensors, in the fused
    ``torch.optim.SGD`` (else foreach); returns the update and which implementation it is."""
    param = torch.zeros(num_params, dtype=dtype, device=device)
    param.grad = torch.rand(num_params, generator=torch.Generator(device).manual_seed(0), device=device).to(dtype)
    for name in ("fused", "foreach"):
        try:
            optimizer = torch.optim.SGD([param], lr=LR, momentum=MOMENTUM, **EAGER_VARIANTS[name])
            optimizer.step()  # creates the momentum buffer; every later step is the one timed
        except (RuntimeError, ValueError):  # a variant this torch or device lacks
            continue
        return optimizer.step, name
    raise RuntimeError(f"torch.optim.SGD has neither a fused nor a foreach update for {dtype} on {device}")


# ------------------------------------------------------------------------------------------------------------ timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], *, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA: events per call)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, steps: int, warmup: int, rounds: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of ``steps`` calls of each function, taken in ``rounds`` blocks per function that alternate between
    the functions, so that a machine whose load drifts (a shared one) slows them alike. Each function gets ``warmup``
    untimed calls first, and each block one more, so that a block does not start on another function's caches."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        time_ms(fn, steps=0, warmup=warmup, device=device)
    per_block = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    for n in per_block:
        for name, fn in fns.items():
            times[name] += time_ms(fn, steps=n, warmup=1, device=device) if n else []
    return times


# ------------------------------------------------------------------------------------------------------ the steps


def ours_step(model: nb.Module, *, fast: bool = True, **cuda_options: bool) -> nb.SimpleStep:
    """``nb.make_step`` on ``model`` with cross-entropy and SGD-momentum: ``FastStep`` when ``fast`` and the fast layout
    can hold the model (its ``fallback_reason`` says why not), else ``SimpleStep``."""
    optimizer = nb.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return nb.make_step(model, nb.CrossEntropyLoss(), optimizer, fast=fast, **cuda_options)


class TorchStep:
    """The step in ``torch.nn`` + autograd + ``torch.optim.SGD(**optimizer_options)``; ``compile`` wraps it in
    ``torch.compile``; ``autocast`` (``torch.bfloat16``) runs its forward and loss under ``torch.autocast``, torch's
    mixed precision. Returns ``(loss_sum, n_correct)`` on the device, as ours does.

    Attributes:
        failure: why the compiled step could not run (set by :func:`benchmark_config`), else ``None``.
    """

    def __init__(self, model: torch.nn.Module, optimizer_options: Mapping[str, Any], compile: bool = False,
                 autocast: torch.dtype | None = None, channels_last: bool = False) -> None:
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, **optimizer_options)
        self.autocast = autocast
        self._run = torch.compile(self._step) if compile else self._step
        self.failure: str | None = None

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(x.device.type, self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self.model(x)
            loss = TF.cross_entropy(out, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach() * x.shape[0], (out.argmax(1) == y).sum()

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(x, y)

    @torch.no_grad()
    def restart(self, state: Mapping[str, Tensor]) -> None:
        """Back to the weights ``state`` with zero momentum, in place (no recompilation); with dampening 0 the next
        step equals a first step."""
        self.model.load_state_dict(state)
        for entry in self.optimizer.state.values():
            entry["momentum_buffer"].zero_()


UPDATE_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-3, "tf32": 1e-2, torch.bfloat16: 5e-2}
"""How far one step of an implementation may move the weights from where ours moves them, relative to how far ours
moves them (:func:`update_difference`). Rounding alone stays far below: in float32 about 1e-5 for the cats-vs-dogs CNN
at batch 64 (sums over 262,144 terms per channel, taken in another order), in bfloat16 against torch.autocast up to
about 5e-3;
a step that computes something else (a wrong or missing gradient) differs by a sizeable fraction of 1."""


def update_difference(start: Mapping[str, Tensor], ours: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> float:
    """``‖other − ours‖ / ‖ours − start‖`` over the floating-point tensors of three state dicts with the same keys: the
    difference between two steps from ``start``, relative to the size of our step."""
    keys = [k for k in start if start[k].is_floating_point()]
    apart = sum(((other[k].double() - ours[k].double()) ** 2).sum() for k in keys)
    moved = sum(((ours[k].double() - start[k].double()) ** 2).sum() for k in keys)
    return float((apart / moved.clamp_min(1e-300)).sqrt())


def _state(model: torch.nn.Module | nb.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------------- one config


def initial_model(model: BenchModel, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nb.Module:
    return model.build(torch.Generator().manual_seed(seed)).to(device, dtype)


def compiled_step(model: BenchModel, dtype: torch.dtype, device: torch.device | str,
                  seed: int = 0) -> tuple[TorchStep | None, str | None]:
    """A compiled :class:`TorchStep` of ``model`` to share across batch sizes (each batch shape compiles once), or
    ``None`` and why there is none."""
    mixed = dtype in LOW_PRECISION
    init = initial_model(model, torch.float32 if mixed else dtype, torch.device(device), seed)
    reference, why = torch_equivalent(init, model.input_shape)
    if reference is None:
        return None, f"no torch.nn equivalent ({why})"
    return TorchStep(reference, {}, compile=True, autocast=dtype if mixed else None), None


def _within(context: Callable[[], ContextManager[Any]] | None, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run inside a fresh ``context()`` at each call (``fn`` itself without a context, so that the timings of
    what needs none carry no wrapper)."""
    if context is None:
        return fn

    def run(*args: Any) -> Any:
        with context():
            return fn(*args)

    return run


def benchmark_config(
    model: BenchModel,
    batch: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 5,
    compiled: TorchStep | None = None,
    compiled_skip: str | None = None,
    tf32: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one model at one batch size; return its row.

    ``dtype`` ``torch.bfloat16`` times mixed precision: a float32 model on bfloat16 batches, ours with float32 master
    weights (``make_step(dtype=torch.bfloat16)``; there is no simple row, ``SimpleStep`` has no mixed precision),
    eager and compiled under ``torch.autocast``, the floor's products in bfloat16 and its update in float32. ``tf32``
    (CUDA, float32) runs every implementation and the floors with TF32 matrix products and convolutions; without it,
    float32 on CUDA is float32 for all of them (:func:`~nnbackprop.step.full_float32`: torch's default would let only
    cuDNN's convolutions use TF32, which computes eager's and ours' convolution gradients in different precisions).

    Every implementation is built from the same initial weights and takes one step on the same batch, which must give
    ours' parameters; then all are timed together by :func:`time_interleaved`. A model without a ``torch.nn``
    equivalent is timed as ours and simple only (``row["eager_skip"]`` says why).

    ``compiled``: a compiled :class:`TorchStep` of this model (see :func:`compiled_step`); it is restarted from the
    initial weights, compiled (timed apart), checked, then timed; if compiling fails the row gives the reason and
    ``compiled.failure`` keeps it. ``compiled_skip``: why there is no compiled step.

    Raises:
        RuntimeError: when an implementation's first step disagrees with ours beyond the gradient checker's tolerance
            (the timings would compare different computations).
    """
    device = torch.device(device)
    mixed = dtype in LOW_PRECISION
    if tf32 and (device.type != "cuda" or dtype != torch.float32):
        raise ValueError(f"tf32 applies to float32 on CUDA, not to {dtype} on {device}")
    param_dtype = torch.float32 if mixed else dtype
    init = initial_model(model, param_dtype, device, seed)
    gen = torch.Generator(device).manual_seed(seed + 1)
    x = torch.randn(batch, *model.input_shape, generator=gen, device=device, dtype=dtype)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen, device=device)
    row: dict[str, Any] = {"model": model.name, "batch": batch,
                           "dtype": str(dtype).split(".")[-1] + (" tf32" if tf32 else ""),
                           "device": str(device), "parameters": parameter_count(init)}
    steppers: dict[str, Callable[[Tensor, Tensor], Any]] = {}  # name → step(x, y), each past its first step
    checks: dict[str, float] = {}
    precision = {"dtype": dtype if mixed else None, "tf32": tf32}

    def weights(step: Any) -> dict[str, Tensor]:  # ours: the master weights under mixed precision
        return _state(step.model) if isinstance(step, TorchStep) else step.model_state_dict()

    if tf32:  # ours applies TF32 itself
        in_precision, ours_precision = functools.partial(nb_tf32, True), None
    else:
        in_precision = ours_precision = full_float32 if device.type == "cuda" and dtype == torch.float32 else None
    ours = ours_step(copy.deepcopy(init), **precision)
    steppers["ours"] = _within(ours_precision, ours)
    row["ours_step"] = type(ours).__name__ + (f" ({ours.fallback_reason})" if ours.fallback_reason else "")
    steppers["ours"](x, y)
    reference = weights(ours)

    initial = _state(init)
    tolerance = UPDATE_TOLERANCES["tf32" if tf32 else dtype]

    def first_step(name: str, step: Any) -> None:
        run = _within(in_precision, step)
        run(x, y)
        steppers[name] = run
        difference = checks[name] = update_difference(initial, reference, weights(step))
        if not difference <= tolerance:
            raise RuntimeError(f"{name} and ours disagree after one step on {row['model']} at batch {batch}: their "
                               f"updates differ by {difference:.2e} of ours, more than {tolerance:.0e} (a model that "
                               "draws random numbers in its step, e.g. dropout, cannot be compared step for step)")

    if device.type == "cuda" and ours.fallback_reason is None:
        first_step("ours_cuda_graph", ours_step(copy.deepcopy(init), cuda_graph=True, **precision))
    if ours.fallback_reason is None and not mixed:
        first_step("simple", ours_step(copy.deepcopy(init), fast=False))
    row["eager_skip"] = torch_equivalent(init, model.input_shape)[1]
    row["eager_skipped"] = {}
    layouts = ["", CHANNELS_LAST] if x.dim() == 4 else [""]
    variants = [(name + layout, options) for layout in layouts for name, options in EAGER_VARIANTS.items()]
    for name, options in variants if row["eager_skip"] is None else ():
        try:
            step = TorchStep(nb.to_torch(copy.deepcopy(init)), options, autocast=dtype if mixed else None,
                             channels_last=name.endswith(CHANNELS_LAST))
        except (RuntimeError, ValueError) as error:  # a variant this torch or device lacks
            row["eager_skipped"][name] = str(error).strip().splitlines()[0]
            continue
        first_step(f"eager_{name}", step)

    row["compile_s"] = None
    row["compiled_skip"] = compiled_skip if compiled is None else compiled.failure
    if compiled is not None and compiled.failure is None:
        compiled.restart(init.state_dict())
        start = time.perf_counter()
        try:
            for _ in range(2):  # the first step and every later one (the momentum buffers exist) compile apart
                _within(in_precision, compiled)(x, y)
            _synchronize(device)
        except Exception as error:  # e.g. no C compiler, or a platform inductor does not support
            compiled.failure = row["compiled_skip"] = (
                f"torch.compile failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
        else:
            first_calls_s = time.perf_counter() - start
            compiled.restart(init.state_dict())
            first_step("compiled", compiled)

    timers: dict[str, Callable[[], Any]] = {name: functools.partial(step, x, y) for name, step in steppers.items()}
    products, row["floor_left_out"] = matmul_floor(copy.deepcopy(init).to(dtype=dtype) if mixed else init, x)
    update, row["update_floor"] = update_floor(row["parameters"], param_dtype, device)
    timers["floor"] = _within(in_precision, products)
    timers["floor+update"] = _within(in_precision, lambda: (products(), update()))
    times = time_interleaved(timers, steps=steps, warmup=warmup, rounds=rounds, device=device)
    row["load_average"] = (load_average() or [None])[0]
    timings = row["timings"] = {name: summarize(t) for name, t in times.items()}
    ms = {name: t["median"] for name, t in timings.items()}

    eager = [name for name, _ in variants if f"eager_{name}" in ms]
    row["eager_best"] = min(eager, key=lambda n: ms[f"eager_{n}"]) if eager else None
    if "compiled" in ms:
        row["compile_s"] = round(max(first_calls_s - 2 * ms["compiled"] / 1e3, 0.0), 2)

    def over(a: str, b: str) -> float | None:
        return round(ms[a] / ms[b], 3) if a in ms and b in ms else None

    row["eager_over_ours"] = over(f"eager_{row['eager_best']}", "ours")
    row["compiled_over_ours"] = over("compiled", "ours")
    row["ours_over_floor"] = over("ours", "floor")
    row["ours_over_floor_update"] = over("ours", "floor+update")
    row["checks"] = {name: float(f"{value:.2e}") for name, value in checks.items()}
    return row


def benchmark_model(
    model: BenchModel,
    batch_sizes: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 5,
    compile: bool = True,
    tf32: bool = False,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows of :func:`benchmark_config` for each batch size, sharing one compiled torch step (``compile``): each batch
    shape compiles once, and a compiler failure is reported once and skipped after.

    ``on_row`` is called with each row as soon as it is ready (the script prints it).
    """
    compiled, skip = compiled_step(model, dtype, device, seed) if compile else (None, "disabled")
    rows = []
    for batch in batch_sizes:
        row = benchmark_config(model, batch, dtype=dtype, device=device, steps=steps, warmup=warmup, rounds=rounds,
                               compiled=compiled, compiled_skip=skip, tf32=tf32, seed=seed)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows

"""Timing the whole training step (forward, backward, SGD-momentum update) of an MLP, four ways, in one process.

* **ours**: :class:`~nnbackprop.step.FastStep` (and, as a detail, the readable :class:`~nnbackprop.step.SimpleStep`);
* **eager**: the same model as ``torch.nn`` + autograd + ``torch.optim.SGD``, in each variant the installed torch offers
  (``default``, ``foreach``, ``fused``); the fastest is the baseline;
* **compiled**: the eager step (default optimizer) under ``torch.compile``, compile time reported apart, or the reason
  it could not run;
* **floor**: only the matrix products the step needs, with the same shapes and layouts (per ``Linear``: the forward
  ``addmm``, ``dW = doutᵀ x`` and, except for the first layer, ``dx = dout W``).

Every implementation starts from the same weights, and one step of each is checked against one step of ``FastStep``
on the same batch before anything is timed. A time is the median over ``steps`` steps after ``warmup`` steps, taken with
CUDA events on a GPU; the implementations are timed in alternating blocks, so that a shared machine whose load drifts
slows them alike. Each configuration gives a row (a dict, JSON-ready) with the ratios ``eager/ours``,
``compiled/ours`` and ``ours/floor``.

This harness measures and returns rows; ``step_benchmark.py`` beside it prints and saves them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor

from nnbackprop.gradcheck import TOLERANCES
from nnbackprop.losses import CrossEntropyLoss
from nnbackprop.model import Sequential, mlp, to_torch
from nnbackprop.optim import SGD
from nnbackprop.step import FastStep, SimpleStep

LR = 0.01
MOMENTUM = 0.9
EAGER_VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
"""``torch.optim.SGD`` keyword arguments of each eager variant."""


def parse_sizes(spec: str) -> list[int]:
    """``"784-512-512-10"`` → ``[784, 512, 512, 10]`` (input, hidden..., output)."""
    try:
        sizes = [int(s) for s in spec.split("-")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) <= 0:
        raise ValueError(f"model '{spec}': expected layer sizes joined by '-', e.g. 784-512-512-10")
    return sizes


def machine_info(device: torch.device) -> dict[str, Any]:
    """The CPU model, core and thread counts, torch build and, on CUDA, the GPU."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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


# ---------------------------------------------------------------------------------------------------- the four steps


def initial_model(sizes: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0) -> Sequential:
    """The benchmarked MLP (ReLU, no dropout) with seeded weights."""
    return mlp(sizes[0], list(sizes[1:-1]), sizes[-1], flatten=False, dtype=dtype,
               generator=torch.Generator().manual_seed(seed)).to(device)


def ours_step(model: Sequential, *, fast: bool = True, **options: bool) -> Callable:
    """``FastStep`` (``fast``) or ``SimpleStep`` on ``model`` with cross-entropy and SGD-momentum."""
    optimizer = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    if fast:
        return FastStep(model, CrossEntropyLoss(), optimizer, **options)
    return SimpleStep(model, CrossEntropyLoss(), optimizer)


class TorchStep:
    """The step in ``torch.nn`` + autograd + ``torch.optim.SGD(**optimizer_options)``; ``compile`` wraps it in
    ``torch.compile``. Returns ``(loss_sum, n_correct)`` on the device, as ours does.

    Attributes:
        failure: why the compiled step could not run (set by :func:`benchmark_config`), else ``None``.
    """

    def __init__(self, model: torch.nn.Module, optimizer_options: Mapping[str, Any], compile: bool = False) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, **optimizer_options)
        self._run = torch.compile(self._step) if compile else self._step
        self.failure: str | None = None

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
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


def matmul_floor(sizes: Sequence[int], batch: int, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """Only the matrix products of one step, on preallocated random tensors: per ``Linear`` the forward
    ``addmm(b, x, Wᵀ)``, ``dW = doutᵀ x`` and, except for the first layer, ``dx = dout W``."""
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=gen, device=device).to(dtype)

    layers = [
        (rand(batch, d_in), rand(d_out, d_in), rand(d_out), rand(batch, d_out), rand(batch, d_out),
         rand(d_out, d_in), rand(batch, d_in) if i > 0 else None)
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]))
    ]

    def products() -> None:
        for x, weight, bias, out, _, _, _ in layers:
            torch.addmm(bias, x, weight.t(), out=out)
        for x, weight, _, _, dout, dweight, dx in reversed(layers):
            torch.mm(dout.t(), x, out=dweight)
            if dx is not None:
                torch.mm(dout, weight, out=dx)

    return products


def max_relative_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """``max_k max|a_k − b_k| / max|a_k|`` over the parameters of two state dicts with the same keys."""
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30)).item()
               for k in a)


def _parameters(model: torch.nn.Module | Sequential) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------------- one config


def benchmark_config(
    sizes: Sequence[int],
    batch: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 5,
    compiled: TorchStep | None = None,
    compiled_skip: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one model at one batch size; return its row.

    Every implementation is built from the same initial weights and takes one step on the same batch, which must give
    FastStep's parameters; then all are timed together by :func:`time_interleaved`.

    ``compiled``: a compiled :class:`TorchStep` of this model (shared across batch sizes, so each shape compiles once);
    it is restarted from the initial weights, compiled (timed apart), checked, then timed; if compiling fails the row
    gives the reason and ``compiled.failure`` keeps it. ``compiled_skip``: why there is no compiled step.

    Raises:
        RuntimeError: when an implementation's first step disagrees with ``FastStep``'s beyond
            the gradient checker's tolerance (the timings would compare different computations).
    """
    device = torch.device(device)
    init = initial_model(sizes, dtype, device, seed)
    gen = torch.Generator(device).manual_seed(seed + 1)
    x = torch.randn(batch, sizes[0], generator=gen, device=device, dtype=dtype)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen, device=device)
    row: dict[str, Any] = {"model": "-".join(map(str, sizes)), "batch": batch, "dtype": str(dtype).split(".")[-1],
                           "device": str(device)}
    steppers: dict[str, Callable[[Tensor, Tensor], Any]] = {}  # name → step(x, y), each past its first step
    checks: dict[str, float] = {}

    model = copy.deepcopy(init)
    steppers["ours"] = ours_step(model)
    steppers["ours"](x, y)
    reference = _parameters(model)

    def first_step(name: str, step: Callable[[Tensor, Tensor], Any], model: Any) -> None:
        step(x, y)
        steppers[name] = step
        difference = checks[name] = max_relative_difference(reference, _parameters(model))
        if not difference <= TOLERANCES[dtype]:
            raise RuntimeError(f"{name} and FastStep disagree after one step on {row['model']} at batch {batch}: "
                               f"relative parameter difference {difference:.2e} > {TOLERANCES[dtype]:.0e}")

    if device.type == "cuda":
        model = copy.deepcopy(init)
        first_step("ours_cuda_graph", ours_step(model, cuda_graph=True), model)
    model = copy.deepcopy(init)
    first_step("simple", ours_step(model, fast=False), model)
    skipped = {}
    for name, options in EAGER_VARIANTS.items():
        model = to_torch(copy.deepcopy(init))
        try:
            step = TorchStep(model, options)
        except (RuntimeError, ValueError) as error:  # a variant this torch or device lacks
            skipped[name] = f"skipped: {str(error).strip().splitlines()[0]}"
            continue
        first_step(f"eager_{name}", step, model)

    row["compile_s"] = None
    row["compiled_skip"] = compiled_skip if compiled is None else compiled.failure
    if compiled is not None and compiled.failure is None:
        compiled.restart(init.state_dict())
        start = time.perf_counter()
        try:
            for _ in range(2):  # the first step and every later one (the momentum buffers exist) compile apart
                compiled(x, y)
            _synchronize(device)
        except Exception as error:  # e.g. no C compiler, or a platform inductor does not support
            compiled.failure = row["compiled_skip"] = (
                f"torch.compile failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
        else:
            first_calls_s = time.perf_counter() - start
            compiled.restart(init.state_dict())
            first_step("compiled", compiled, compiled.model)

    timers: dict[str, Callable[[], Any]] = {name: functools.partial(step, x, y) for name, step in steppers.items()}
    timers["floor"] = matmul_floor(sizes, batch, dtype, device)
    times = time_interleaved(timers, steps=steps, warmup=warmup, rounds=rounds, device=device)
    ms = {name: round(statistics.median(t), 4) for name, t in times.items()}

    row["ours_ms"] = ms["ours"]
    if device.type == "cuda":
        row["ours_cuda_graph_ms"] = ms["ours_cuda_graph"]
    row["simple_ms"] = ms["simple"]
    row["eager_ms"] = {name: ms.get(f"eager_{name}", skipped.get(name)) for name in EAGER_VARIANTS}
    row["eager_best"] = min((name for name in EAGER_VARIANTS if name not in skipped), key=lambda n: ms[f"eager_{n}"])
    row["eager_best_ms"] = ms[f"eager_{row['eager_best']}"]
    row["compiled_ms"] = ms.get("compiled")
    if "compiled" in ms:
        row["compile_s"] = round(max(first_calls_s - 2 * ms["compiled"] / 1e3, 0.0), 2)
    row["floor_ms"] = ms["floor"]
    row["eager_over_ours"] = round(row["eager_best_ms"] / row["ours_ms"], 3)
    row["compiled_over_ours"] = round(row["compiled_ms"] / row["ours_ms"], 3) if "compiled" in ms else None
    row["ours_over_floor"] = round(row["ours_ms"] / row["floor_ms"], 3)
    row["checks"] = {name: float(f"{value:.2e}") for name, value in checks.items()}
    return row


def benchmark_model(
    sizes: Sequence[int],
    batch_sizes: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 5,
    compile: bool = True,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows of :func:`benchmark_config` for each batch size, sharing one compiled torch step (``compile``): each batch
    shape compiles once, and a compiler failure is reported once and skipped after.

    ``on_row`` is called with each row as soon as it is ready (the script prints it).
    """
    compiled = None
    if compile:
        compiled = TorchStep(to_torch(initial_model(sizes, dtype, device, seed)), {}, compile=True)
    rows = []
    for batch in batch_sizes:
        row = benchmark_config(sizes, batch, dtype=dtype, device=device, steps=steps, warmup=warmup, rounds=rounds,
                               compiled=compiled, compiled_skip=None if compile else "disabled", seed=seed)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows

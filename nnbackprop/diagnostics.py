"""Per-layer diagnostics: how activations and gradients flow through a model while it trains.

Hand-written backprop holds every layer's output and input gradient in its own hands, so watching them costs only
the statistics. :class:`Diagnostics` hooks a model for the steps it is *armed* for — one per log interval by default —
and records on the device, for each layer (named as in ``state_dict``):

* ``out_mean``, ``out_std``: mean and standard deviation of its output;
* ``saturated``: the fraction of outputs at the flat ends of its activation (``|tanh| > 0.99``; sigmoid below 0.01
  or above 0.99; ReLU exactly 0), ``None`` for other layers; ``dead`` (ReLU): the fraction of units that are 0 for
  every example of the batch;
* ``dx_norm``: the norm of the gradient it passes back (``None`` where nothing is passed back: the first layer);

and for each parameter: ``norm`` (of its value after the step), ``grad_norm``, and ``update_ratio``
``‖Δθ‖ / ‖θ‖`` of the step (about 1e-3 is healthy: much smaller and the layer barely learns, much larger and it
thrashes). Nothing is read back to the host until :meth:`Diagnostics.read`, which the training loop calls with its
interval's own read of the loss; unarmed steps run without any hook.

Records are dicts (JSON-ready), one per interval, written one per line to ``layers.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from nnbackprop.files import write_text
from nnbackprop.layers import ReLU, Sigmoid, Tanh
from nnbackprop.module import Module

LAYERS_FILE = "layers.jsonl"
MODES = ("off", "on", "full")
"""``off``: nothing; ``on``: the statistics of one step per log interval; ``full``: of every step, averaged over the
interval (costs a few percent)."""

_LAYER_STATS = ("out_mean", "out_std", "saturated", "dead", "dx_norm")
_PARAMETER_STATS = ("norm", "grad_norm", "update_ratio")


def _saturation(layer: Module, out: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(saturated, dead)`` fractions of a layer's output ``(N, ...)``, ``None`` where they do not apply."""
    if isinstance(layer, ReLU):
        zero = out == 0
        return zero.float().mean(), zero.reshape(out.shape[0], -1).all(0).float().mean()
    if isinstance(layer, Tanh):
        return (out.abs() > 0.99).float().mean(), None
    if isinstance(layer, Sigmoid):
        return ((out < 0.01) | (out > 0.99)).float().mean(), None
    return None, None


class Diagnostics:
    """Records the statistics of the module docstring for ``model``'s layers and ``optimizer``'s parameters.

    Args:
        model: the model; its leaf modules are the layers watched.
        optimizer: the optimizer over its parameters (its step hooks give the update ratio).
        mode: one of :data:`MODES` but ``off``.
        keep_activations: also keep a CPU copy of each layer's output and input gradient of the last armed step of an
            interval (for histograms).

    Use: :meth:`arm` before the step that should be recorded (:meth:`due` says which ones are), then :meth:`read`
    after the interval's last step to get the record.
    """

    def __init__(self, model: Module, optimizer: torch.optim.Optimizer, mode: str = "on",
                 keep_activations: bool = False) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"diagnostics mode must be one of {', '.join(MODES[1:])}, got {mode!r}")
        self.model, self.optimizer, self.mode, self.keep_activations = model, optimizer, mode, keep_activations
        self.layers = [(name, m) for name, m in model.named_modules() if name and next(m.children(), None) is None]
        self.parameters = list(model.named_parameters())
        self._handles: list[RemovableHandle] = []
        self._sums: dict[tuple[str, str], Tensor] = {}  # (name, statistic) → running sum on the device
        self._steps = 0
        self._before: list[Tensor] = []
        self.activations: dict[str, Tensor] = {}
        self.gradients: dict[str, Tensor] = {}

    def due(self, step: int, log_every: int, num_steps: int) -> bool:
        """Whether step ``step`` (1-based, of ``num_steps`` in the epoch) is recorded."""
        return self.mode == "full" or step % log_every == 0 or step == num_steps

    # ------------------------------------------------------------------ recording
    def arm(self) -> None:
        """Hook the model and the optimizer for the next step only (the hooks remove themselves after it)."""
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_hook(
                lambda module, inputs, out, name=name: self._on_forward(name, module, out)))
            self._handles.append(layer.register_full_backward_hook(
                lambda module, dx, dout, name=name: self._on_backward(name, dx[0])))
        self._handles.append(self.optimizer.register_step_pre_hook(lambda *args: self._before_update()))
        self._handles.append(self.optimizer.register_step_post_hook(lambda *args: self._after_update()))

    def _add(self, name: str, statistic: str, value: Tensor | None) -> None:
        if value is None:
            return
        value = value.detach().double()
        key = (name, statistic)
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def _on_forward(self, name: str, layer: Module, out: Any) -> None:
        if not isinstance(out, Tensor):
            return
        out = out.detach()
        self._add(name, "out_mean", out.mean())
        self._add(name, "out_std", out.std() if out.numel() > 1 else None)
        saturated, dead = _saturation(layer, out)
        self._add(name, "saturated", saturated)
        self._add(name, "dead", dead)
        if self.keep_activations:
            self.activations[name] = out.to("cpu", copy=True)

    def _on_backward(self, name: str, dx: Tensor | None) -> None:
        if dx is None:
            return
        self._add(name, "dx_norm", torch.linalg.vector_norm(dx.detach()))
        if self.keep_activations:
            self.gradients[name] = dx.detach().to("cpu", copy=True)

    def _before_update(self) -> None:
        self._before = [p.detach().clone() for _, p in self.parameters]
        for name, p in self.parameters:
            self._add(name, "grad_norm", torch.linalg.vector_norm(p.grad) if p.grad is not None else None)

    def _after_update(self) -> None:
        for (name, p), before in zip(self.parameters, self._before):
            norm_before = torch.linalg.vector_norm(before)
            self._add(name, "norm", torch.linalg.vector_norm(p.detach()))
            self._add(name, "update_ratio", torch.linalg.vector_norm(p.detach() - before) / norm_before)
        self._before = []
        self._steps += 1
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ reading
    def pending(self) -> Tensor:
        """The interval's sums as one float64 tensor on the device, to be read together with the loss."""
        if not self._sums:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack(list(self._sums.values()))

    def read(self, epoch: int, step: int, global_step: int, values: Sequence[float] | None = None) -> dict[str, Any]:
        """The record of the interval that ends at ``step`` of ``epoch`` (statistics averaged over its armed steps),
        and start the next interval. ``values``: :meth:`pending` already read to the host (else it is read here)."""
        if values is None:
            values = self.pending().tolist()
        averages = {key: value / max(self._steps, 1) for key, value in zip(self._sums, values)}
        record: dict[str, Any] = {"epoch": epoch, "step": step, "global_step": global_step, "layers": {},
                                  "parameters": {}}
        for name, layer in self.layers:
            record["layers"][name] = {"type": type(layer).__name__,
                                      **{s: _finite(averages.get((name, s))) for s in _LAYER_STATS}}
        for name, _ in self.parameters:
            record["parameters"][name] = {s: _finite(averages.get((name, s))) for s in _PARAMETER_STATS}
        self._sums, self._steps = {}, 0
        return record

    def close(self) -> None:
        """Remove any hook still in place (a step that failed after :meth:`arm`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def write_layer_records(out_dir: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """``out_dir/layers.jsonl``: one record per line (atomically, as the run's other files)."""
    write_text(Path(out_dir) / LAYERS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def _record_problem(record: Any) -> str | None:
    """What is wrong with ``record`` as a line of ``layers.jsonl``; ``None`` if nothing."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in ("epoch", "step", "global_step"):
        if not isinstance(record.get(key), int) or isinstance(record.get(key), bool):
            return f"{key} = {record.get(key)!r}, expected an integer"
    for section in ("layers", "parameters"):
        entries = record.get(section, {})
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            return f"{section} is not an object of objects"
        for name, values in entries.items():
            for key, value in values.items():
                if key != "type" and value is not None and (isinstance(value, bool)
                                                             or not isinstance(value, (int, float))):
                    return f"{section}[{name!r}][{key!r}] = {value!r}, expected a number or null"
    return None


def read_layer_records(path: str | Path, up_to_epoch: int | None = None) -> list[dict[str, Any]]:
    """The records of a ``layers.jsonl`` file, one dict per non-blank line (those of epochs up to ``up_to_epoch``);
    ``[]`` for a missing or empty file.

    Raises:
        ValueError: a line is not a JSON object with integer ``epoch``, ``step`` and ``global_step`` and numeric (or
            null) per-layer and per-parameter values; the message names the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the layer records ({error}); delete the file to go on without it") \
            from error
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problem: str | None = f"not JSON ({error.msg} at column {error.colno})"
        else:
            problem = _record_problem(record)
        if problem is not None:
            raise ValueError(f"{path}, line {number}: not a layer record: {problem}; delete that line (or the file) "
                             "to go on without it")
        if up_to_epoch is None or record["epoch"] <= up_to_epoch:
            records.append(record)
    return records

"""Export a trained model for use without nnbackprop: ``torch.export`` (``.pt2``) or ONNX (``.onnx``).

:func:`export_run` rebuilds the model of a run (:func:`~nnbackprop.inference.load_model`), converts it to ``torch.nn``
(:func:`~nnbackprop.model.to_torch`: built-in layers map to torch.nn's, a user's module is converted from its own
``forward`` unless it supplies ``to_torch``), checks the conversion against nnbackprop's own forward on random inputs,
and writes the exported program beside a JSON file saying what it expects: the input shape, the normalisation
(``(pixel / 255 - mean) / std`` per channel) and the class names.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnbackprop.errors import ConfigError, MissingExtraError, gist
from nnbackprop.files import atomic_write, write_text
from nnbackprop.model import to_torch
from nnbackprop.module import Module

FORMATS = {"torch": ".pt2", "onnx": ".onnx"}
ONNX_HINT = "pip install 'nnbackprop[onnx]' (onnx, onnxscript and onnxruntime)"
TOLERANCE = 1e-5
"""The largest relative difference allowed between the exported model's outputs and nnbackprop's (float32)."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote: the model file, its description, and how closely it matches (``max_rel_err``)."""

    path: str
    info: str
    format: str
    max_rel_err: float


def checked_torch_model(model: Module, input_shape: tuple[int, ...], *, batch: int = 4, seed: int = 0
                        ) -> torch.nn.Module:
    """``to_torch(model)`` (in ``model``'s train/eval mode, dtype and device), after checking in evaluation mode that it
    computes what ``model`` does on a batch of random inputs of ``input_shape``; ``model`` is left as it was.

    Raises:
        ConfigError: naming the layer that has no torch.nn equivalent, or saying how far the conversion is off.
    """
    training = model.training
    try:
        converted = to_torch(model).eval()
    except Exception as error:  # a user's layer whose own conversion fails
        raise ConfigError(f"the model cannot be converted to torch.nn ({gist(error)}); give the layer that fails a "
                          "to_torch() method returning its torch.nn equivalent") from error
    parameter = next(model.parameters())
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    x = x.to(parameter.device, parameter.dtype)
    with torch.no_grad():
        ours = model.eval()(x)
        model.train(training)
        try:
            theirs = converted(x)
        except Exception as error:  # a forward that needs what a torch.nn module does not have
            raise ConfigError(f"the model's torch.nn conversion fails on an input ({gist(error)}); give the layer "
                              "whose forward uses nnbackprop-only calls a to_torch() method") from error
    error = ((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12)).item()
    if not error <= TOLERANCE:
        raise ConfigError(f"the model's torch.nn conversion computes something else (relative difference "
                          f"{error:.1e}); give the layers with their own forward a to_torch() method")
    return converted.train(training)


def export_run(run: str | Path, fmt: str, out: str | Path | None = None, model: str | None = None) -> Exported:
    """Export the model of a run folder (or checkpoint) in ``fmt`` (``torch`` or ``onnx``) to ``out`` (default: the
    run folder's ``model.pt2`` / ``model.onnx``), with ``out`` + ``.json`` describing its input. The exported model
    takes normalised images ``(N, C, H, W)`` in float32 and returns the logits.

    Raises:
        ConfigError: an unknown format, or a model that cannot be converted (see :func:`checked_torch_model`).
        MissingExtraError: ONNX without its packages.
    """
    from nnbackprop.checkpoint import resolve_checkpoint
    from nnbackprop.inference import load_model

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    checkpoint_path = resolve_checkpoint(run)
    path = Path(out) if out is not None else checkpoint_path.parent / f"model{FORMATS[fmt]}"
    if fmt == "onnx":
        _require_onnx()
    rebuilt, _, checkpoint = load_model(checkpoint_path, "cpu", model)
    data = checkpoint["data"]
    shape = tuple(data["input_shape"])
    converted = checked_torch_model(rebuilt.float(), shape).eval()
    example = (torch.zeros(2, *shape),)  # a batch of 1 would be specialised to 1
    batch = torch.export.Dim("batch")
    try:
        if fmt == "torch":
            program = torch.export.export(converted, example, dynamic_shapes=({0: batch},))
            atomic_write(path, lambda file: torch.export.save(program, file))
        else:
            atomic_write(path, lambda file: file.write(_onnx_bytes(converted, example, batch)))
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        raise ConfigError(f"exporting the model to {fmt} failed: {gist(error)}") from error
    info = {"format": fmt, "file": path.name, "input_shape": list(shape), "input_dtype": "float32",
            "normalisation": "x = (pixel / 255 - mean) / std, per channel", "mean": data["mean"], "std": data["std"],
            "classes": data["classes"], "output": "logits (N, classes), or one logit (N, 1) for a two-class bce model",
            "checkpoint": str(checkpoint_path), "epoch": checkpoint["epoch"], "torch": torch.__version__}
    info_path = path.with_name(path.name + ".json")
    write_text(info_path, json.dumps(info, indent=2) + "\n")
    error = _verify(path, fmt, rebuilt, shape)
    if error > TOLERANCE:
        raise ConfigError(f"{path} computes something else once loaded back (relative difference {error:.1e})")
    return Exported(str(path), str(info_path), fmt, error)


def _onnx_bytes(model: torch.nn.Module, example: tuple[torch.Tensor], batch: Any) -> bytes:
    """The ONNX model of ``model``, its batch dimension left free: through torch.export (``dynamo=True``) where torch
    has it, else (torch before 2.6) through the TorchScript exporter."""
    try:
        program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
        return program.model_proto.SerializeToString()
    except TypeError:  # an older torch.onnx.export, without dynamo= and dynamic_shapes=
        buffer = io.BytesIO()
        torch.onnx.export(model, example, buffer, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        return buffer.getvalue()


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(f"ONNX export needs the onnx and onnxscript packages: {ONNX_HINT}") from error


def _verify(path: Path, fmt: str, model: Module, shape: tuple[int, ...]) -> float:
    """The largest relative difference between the written file's outputs (loaded back: ``torch.export.load``, or
    onnxruntime when installed) and nnbackprop's forward on random inputs; ``nan`` when it cannot be loaded here."""
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
    if fmt == "torch":
        theirs = torch.export.load(path).module()(x)
    else:
        try:
            import onnxruntime
        except ImportError:
            return float("nan")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    return ((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12)).item()


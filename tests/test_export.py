"""Export: ``to_torch`` of any module made of built-in layers or written by a user, a user's own ``to_torch``, the
refusal of what cannot be converted, and ``nnbackprop export`` to torch.export and ONNX, each file loaded back and
checked against nnbackprop's forward."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import SMALL, mnist_dir, run  # noqa: F401  (mnist_dir is a fixture)
from user_layers import Scale, Swish

import nnbackprop as nb
from nnbackprop.errors import ConfigError
from nnbackprop.export import checked_torch_model


class Residual(nb.Module):
    """``x + fc2(relu(fc1(x)))``: a block made of built-in layers, with a forward of its own."""

    def __init__(self, width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nb.Linear(width, width, generator=generator), nb.ReLU(), nb.Linear(
            width, width, generator=generator)
        self.skip_scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ndim=2)
        return self.skip_scale * x + self.fc2(self.act(self.fc1(x)))

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        dh = self.fc2.backward(dout)
        return self.skip_scale * dout + self.fc1.backward(self.act.backward(dh))


class UsesTheWorkspace(nb.Module):
    """A forward that needs what only nnbackprop's modules have."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.hooked else x + 1  # nnbackprop's hooks: a torch.nn module has its own, not these

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return dout


class WithItsOwn(Swish):
    def to_torch(self) -> torch.nn.Module:
        return torch.nn.SiLU()


def model_with(*middle: nb.Module) -> nb.Sequential:
    g = torch.Generator().manual_seed(0)
    return nb.Sequential(nb.Flatten(), nb.Linear(16, 8, generator=g), *middle, nb.Linear(8, 3, generator=g))


@pytest.mark.parametrize("middle", [(Residual(8, torch.Generator().manual_seed(1)),), (Swish(), Scale(8)),
                                    (WithItsOwn(),)], ids=["residual-block", "user-layers", "its-own-to_torch"])
def test_to_torch_converts_modules_of_built_in_layers_and_user_layers(middle):
    model = model_with(*middle)
    converted = nb.to_torch(model)
    x = torch.randn(5, 1, 4, 4)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-6, atol=1e-6)
    assert list(converted.state_dict()) == list(model.state_dict())
    program = torch.export.export(converted.eval(), (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_module_that_cannot_be_converted_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="give the layer whose forward uses nnbackprop-only calls a to_torch"):
        checked_torch_model(model_with(UsesTheWorkspace()), (1, 4, 4))


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_export_a_run_and_load_it_back(tmp_path, mnist_dir, capsys, fmt):  # noqa: F811
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs the optional extra: pip install 'nnbackprop[onnx]'")
    out = tmp_path / "run"
    assert run(capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1", "--out",
               str(out), *SMALL)[0] == 0
    code, printed, err = run(capsys, "export", str(out), "--format", fmt)
    assert code == 0, err
    path = out / ("model.pt2" if fmt == "torch" else "model.onnx")
    info = json.loads((out / (path.name + ".json")).read_text())
    assert info["input_shape"] == [1, 28, 28] and len(info["classes"]) == 10 and len(info["mean"]) == 1
    assert f"exported {path}" in printed and ("max relative difference" in printed or "not checked" in printed)

    from nnbackprop.inference import load_model

    model, _, _ = load_model(out)
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        ours = model(x)
    if fmt == "torch":
        theirs = torch.export.load(path).module()(x)
    else:
        onnxruntime = pytest.importorskip("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_refuses_an_unknown_format_and_a_missing_run(tmp_path, capsys):
    code, _, err = run(capsys, "export", str(tmp_path / "nowhere"))
    assert code == 2 and "not found" in err and len(err.splitlines()) == 1

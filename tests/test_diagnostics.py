"""Per-layer diagnostics: what they record is what the layers and parameters did, the fast and the readable step
record the same, a resumed run continues them, and the TensorBoard logs that carry them."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_training import BASE, toy_data

from nnbackprop import CrossEntropyLoss, Flatten, Linear, ReLU, Sequential, Tanh
from nnbackprop.diagnostics import LAYERS_FILE, Diagnostics, read_layer_records
from nnbackprop.optim import SGD
from nnbackprop.step import FastStep, SimpleStep
from nnbackprop.training import train

F64 = torch.float64


@pytest.mark.parametrize("step_class", [SimpleStep, FastStep])
def test_a_record_holds_what_the_layers_and_parameters_did(step_class):
    g = torch.Generator().manual_seed(0)
    model = Sequential(Flatten(), Linear(12, 8, generator=g), ReLU(), Linear(8, 8, generator=g), Tanh(),
                       Linear(8, 3, generator=g)).to(dtype=F64)
    optimizer = SGD(model.parameters(), lr=0.5, momentum=0.9)
    step = step_class(model, CrossEntropyLoss(), optimizer)
    diagnostics = Diagnostics(model, optimizer)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 12, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)
    step(x, y)  # momentum starts; the next step is the recorded one
    with torch.no_grad():
        hidden = model[1](model[0](x))  # the first Linear's output before the recorded step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    diagnostics.arm()
    step(x, y)
    record = diagnostics.read(epoch=1, step=2, global_step=2)
    relu = torch.relu(hidden)
    layer = record["layers"]["2"]
    assert layer["type"] == "ReLU" and layer["out_mean"] == pytest.approx(relu.mean().item(), rel=1e-12)
    assert layer["out_std"] == pytest.approx(relu.std().item(), rel=1e-12)
    assert layer["saturated"] == pytest.approx((relu == 0).double().mean().item())
    assert layer["dead"] == pytest.approx((relu == 0).all(0).double().mean().item())
    assert record["layers"]["4"]["type"] == "Tanh" and record["layers"]["4"]["dead"] is None
    assert record["layers"]["1"]["dx_norm"] is None and record["layers"]["2"]["dx_norm"] > 0  # the first gets data
    assert list(record["parameters"]) == [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        stats = record["parameters"][name]
        assert stats["norm"] == pytest.approx(p.norm().item(), rel=1e-12)
        assert stats["grad_norm"] == pytest.approx(p.grad.norm().item(), rel=1e-12)
        assert stats["update_ratio"] == pytest.approx(((p - before[name]).norm() / before[name].norm()).item(),
                                                      rel=1e-9)
    diagnostics.arm()
    step(x, y)
    assert diagnostics.read(1, 3, 3)["layers"]["2"]["out_mean"] != layer["out_mean"]  # a new interval, new numbers
    step(x, y)  # unarmed: nothing is recorded, no hook stays behind
    assert diagnostics.pending().numel() == 0
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules()) and not optimizer.has_hooks()


def _records(tmp_path, **changes) -> list[dict]:
    train(BASE.replace(**changes), data=toy_data(), out_dir=tmp_path)
    return read_layer_records(tmp_path / LAYERS_FILE)


def _assert_same_records(a: list[dict], b: list[dict], rel: float) -> None:
    assert [(r["epoch"], r["step"], r["global_step"]) for r in a] == [(r["epoch"], r["step"], r["global_step"])
                                                                       for r in b]
    for ra, rb in zip(a, b):
        for kind in ("layers", "parameters"):
            assert ra[kind].keys() == rb[kind].keys()
            for name in ra[kind]:
                for statistic, value in ra[kind][name].items():
                    other = rb[kind][name][statistic]
                    assert (value is None) == (other is None), (name, statistic)
                    if isinstance(value, float):
                        assert value == pytest.approx(other, rel=rel, abs=1e-12), (name, statistic)


def test_the_fast_and_the_readable_step_record_the_same_numbers(tmp_path):
    options = dict(dtype="float64", dropout=0.2, batchnorm=True, epochs=2)
    fast = _records(tmp_path / "fast", fast=True, **options)
    simple = _records(tmp_path / "simple", fast=False, **options)
    assert len(fast) == 2 * 3 and fast[0]["layers"]["2"]["type"] == "BatchNorm1d"  # log_every 4 of 10 steps: 4, 8, 10
    _assert_same_records(fast, simple, rel=1e-9)


def test_full_mode_averages_every_step_and_off_writes_nothing(tmp_path):
    on, full = _records(tmp_path / "on"), _records(tmp_path / "full", diagnostics="full")
    assert [r["step"] for r in on] == [r["step"] for r in full]
    assert on[0]["layers"]["1"]["out_std"] != full[0]["layers"]["1"]["out_std"]
    assert _records(tmp_path / "off", diagnostics="off") == [] and not (tmp_path / "off" / LAYERS_FILE).exists()


def test_a_resumed_run_continues_its_records(tmp_path):
    from test_training import Recorder

    straight = _records(tmp_path / "straight", dtype="float64")
    with pytest.raises(KeyboardInterrupt):
        train(BASE.replace(dtype="float64"), data=toy_data(), out_dir=tmp_path / "resumed",
              callback=Recorder(stop_after=2))
    train(BASE.replace(dtype="float64"), data=toy_data(), out_dir=tmp_path / "resumed", resume=True)
    _assert_same_records(read_layer_records(tmp_path / "resumed" / LAYERS_FILE), straight, rel=0)


def test_tensorboard_logs_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(BASE.replace(epochs=2, tensorboard=True), data=toy_data(), out_dir=tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= set(tags["scalars"])
    assert {"layers/2/saturated", "parameters/1.weight/update_ratio"} <= set(tags["scalars"])
    assert len(events.Scalars("loss/train")) == 2 and len(events.Scalars("layers/2/dx_norm")) == 6
    assert {"weights/1.weight", "gradients/1.weight", "activations/2", "input_gradients/2"} <= set(tags["histograms"])


def test_tensorboard_missing_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    from nnbackprop.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = main(["train", "--tensorboard", "--out", str(tmp_path / "run"), "--dataset", "mnist", "--data-dir",
                 str(tmp_path / "no-data")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'nnbackprop[tensorboard]'" in err
    assert not (tmp_path / "run").exists()


def test_records_file_errors_name_the_line(tmp_path):
    path = tmp_path / LAYERS_FILE
    assert read_layer_records(path) == []
    record = {"epoch": 1, "step": 4, "global_step": 4, "layers": {}, "parameters": {}}
    path.write_text(json.dumps(record) + "\nnot json\n")
    with pytest.raises(ValueError, match="layers.jsonl, line 2: not a layer record: not JSON"):
        read_layer_records(path)

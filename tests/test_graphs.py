"""The CUDA-graph logic of :class:`~nnbackprop.graphs.GraphedStep`, driven on the CPU through a stand-in for the
``torch.cuda`` calls (:class:`FakeCuda`, the methods of :class:`~nnbackprop.graphs.CudaApi`): which steps run eagerly
and on which stream, when a graph is captured and replayed, what makes a new graph and what drops them, and how a
failed capture is abandoned. The stand-in's graph does what a real one does with the step: capturing records it without
running it, and a replay runs it on the static inputs, writing the captured outputs in place; so a graphed run must
end exactly where the eager one does. (The real CUDA graphs are tested in test_step.py, on a GPU.)"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import pytest
import torch

from nnbackprop import graphs
from nnbackprop.errors import CudaGraphError
from nnbackprop.graphs import GraphedStep
from nnbackprop.layers import Dropout
from nnbackprop.losses import CrossEntropyLoss
from nnbackprop.model import mlp
from nnbackprop.optim import SGD
from nnbackprop.step import FastStep

CAPTURE_ERROR = "operation not permitted when stream is capturing"


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.waited_for: list[str] = []

    def wait_stream(self, other: "FakeStream") -> None:
        self.waited_for.append(other.name)


class FakeGraph:
    """A CUDA graph's interface; the step "captured" is the Python call that a replay runs again."""

    def __init__(self, cuda: "FakeCuda") -> None:
        self.cuda = cuda
        self.calls: list[Any] = []
        self.generators: list[torch.Generator] = []
        self.body: Any = None
        self.outputs: tuple[torch.Tensor, ...] = ()

    def register_generator_state(self, generator: torch.Generator) -> None:
        self.calls.append("register_generator_state")
        self.generators.append(generator)

    def capture_begin(self, capture_error_mode: str | None = None) -> None:
        self.calls.append(("capture_begin", capture_error_mode, self.cuda.current.name))
        self.cuda.capturing = self

    def capture_end(self) -> None:
        self.calls.append("capture_end")
        self.cuda.capturing = None
        if self.cuda.fail_capture_end:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def replay(self) -> None:
        self.calls.append("replay")
        for output, value in zip(self.outputs, self.body()):
            output.copy_(value)

    def reset(self) -> None:
        self.calls.append("reset")

    def pool(self) -> tuple[str, int]:
        return ("pool", id(self))


class GraphWithoutGenerators(FakeGraph):
    """A graph of a torch too old to capture a generator of one's own."""

    def __getattribute__(self, name: str) -> Any:
        if name == "register_generator_state":
            raise AttributeError(name)
        return super().__getattribute__(name)


class FakeCuda:
    """The calls :class:`~nnbackprop.graphs.CudaApi` makes, recorded, with a current stream that ``stream()`` sets
    and restores."""

    def __init__(self, graph_class: type = FakeGraph) -> None:
        self.default = FakeStream("default")
        self.current = self.default
        self.graph_class = graph_class
        self.graphs: list[FakeGraph] = []
        self.log: list[Any] = []
        self.capturing: FakeGraph | None = None
        self.fail_capture_end = False
        self.unusable = False
        self._streams = 0

    def device_context(self) -> Any:
        return nullcontext()

    def synchronize(self) -> None:
        self.log.append("synchronize")

    def new_stream(self) -> FakeStream:
        self._streams += 1
        return FakeStream(f"side{self._streams}")

    def current_stream(self) -> FakeStream:
        return self.current

    @contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def new_graph(self) -> FakeGraph:
        graph = self.graph_class(self)
        self.graphs.append(graph)
        return graph

    def end_allocation(self, graph: FakeGraph) -> None:
        self.log.append(("end_allocation", graph.pool()))

    def check_usable(self) -> None:
        self.log.append("check_usable")
        if self.unusable:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")


class RecordedStep:
    """The eager step as GraphedStep sees it: each call recorded (eager or captured, on which stream); while a graph
    captures, the step is recorded into it instead of run, as CUDA does."""

    def __init__(self, step: FastStep, cuda: FakeCuda) -> None:
        self.step, self.cuda = step, cuda
        self.calls: list[tuple[str, str, int]] = []
        self.fail_in_capture = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        graph = self.cuda.capturing
        self.calls.append(("capture" if graph is not None else "eager", self.cuda.current.name, x.shape[0]))
        if graph is None:
            return self.step(x, y)
        if self.fail_in_capture:
            raise RuntimeError(CAPTURE_ERROR)
        graph.body = lambda: self.step(x, y)  # x, y: the static buffers
        graph.outputs = (torch.zeros((), dtype=x.dtype), torch.zeros((), dtype=torch.int64))
        return graph.outputs


def _model(dropout: float = 0.0, generator: torch.Generator | None = None):
    model = mlp(12, [10], 3, dtype=torch.float64, dropout=dropout, generator=torch.Generator().manual_seed(0))
    for layer in model.modules():
        if isinstance(layer, Dropout):
            layer.generator = generator
    return model


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _graphed(warmup: int = 2, momentum: float = 0.0, cuda: FakeCuda | None = None, **model_options):
    model = _model(**model_options)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=momentum)
    cuda = cuda or FakeCuda()
    run = RecordedStep(FastStep(model, CrossEntropyLoss(), optimizer), cuda)
    graphed = GraphedStep(run, model, optimizer, run.step.layout.workspace, torch.device("cpu"), warmup=warmup,
                          cuda=cuda)
    return graphed, run, cuda, model, optimizer


def _eager_reference(batches, momentum: float = 0.0, changes=None, **model_options):
    """The same steps on a plain FastStep: (results, weights)."""
    model = _model(**model_options)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=momentum)
    step = FastStep(model, CrossEntropyLoss(), optimizer)
    results = []
    for i, (x, y) in enumerate(batches):
        if changes and i in changes:
            changes[i](model, optimizer)
        results.append(tuple(t.clone() for t in step(x, y)))
    return results, model.state_dict()


def _replays(cuda: FakeCuda) -> int:
    return sum(graph.calls.count("replay") for graph in cuda.graphs)


def _assert_same(got, want) -> None:
    (results, weights), (want_results, want_weights) = got, want
    assert len(results) == len(want_results)
    for (loss, correct), (want_loss, want_correct) in zip(results, want_results):
        assert torch.equal(loss, want_loss) and torch.equal(correct, want_correct)
    for key in want_weights:
        assert torch.equal(weights[key], want_weights[key]), key


def test_warm_up_steps_run_eagerly_on_a_side_stream_then_one_capture_then_replays() -> None:
    graphed, run, cuda, model, _ = _graphed(warmup=3)
    batches = [_batch(8, seed) for seed in range(7)]
    results = [tuple(t.clone() for t in graphed(x, y)) for x, y in batches]
    assert [kind for kind, _, _ in run.calls] == ["eager"] * 3 + ["capture"]  # the replays never call the step
    assert all(stream.startswith("side") for _, stream, _ in run.calls)  # never on the caller's stream
    assert cuda.current is cuda.default
    (graph,) = cuda.graphs
    assert graph.calls[0] == ("capture_begin", "thread_local", run.calls[3][1])
    assert graph.calls[1:] == ["capture_end"] + ["replay"] * 4  # the capturing call replays too
    assert graphed.num_graphs == 1 and graphed.failure is None
    _assert_same((results, model.state_dict()), _eager_reference(batches))


def test_each_batch_shape_mode_and_optimizer_structure_gets_its_own_graph() -> None:
    graphed, run, cuda, model, optimizer = _graphed(warmup=2)
    sizes = [8, 8, 8, 8, 5, 5, 5, 5, 8, 8, 8, 8, 8, 8, 8, 8]
    batches = [_batch(n, seed) for seed, n in enumerate(sizes)]

    def to_eval(model, optimizer):
        model.eval()

    def decay(model, optimizer):
        optimizer.param_groups[0]["weight_decay"] = 1e-2

    changes = {10: to_eval, 13: decay}
    results, kinds = [], []
    for i, (x, y) in enumerate(batches):
        if i in changes:
            changes[i](model, optimizer)
        before = len(run.calls)
        results.append(tuple(t.clone() for t in graphed(x, y)))
        kinds.append(run.calls[before][0] if len(run.calls) > before else "replay")
    assert kinds == (["eager", "eager", "capture", "replay"]  # batch 8
                     + ["eager", "eager", "capture", "replay"]  # batch 5: a new key
                     + ["replay", "replay"]  # batch 8 again: its graph
                     + ["eager", "eager", "capture"]  # eval mode: a new key
                     + ["eager", "eager", "capture"])  # weight decay: another branch of the rule, a new key
    assert graphed.num_graphs == 4 == len(cuda.graphs)
    _assert_same((results, model.state_dict()), _eager_reference(batches, changes=changes))


def test_the_optimizer_state_appearing_is_a_new_key() -> None:
    graphed, run, cuda, model, _ = _graphed(warmup=1, momentum=0.9)
    batches = [_batch(8, seed) for seed in range(5)]
    results = [tuple(t.clone() for t in graphed(x, y)) for x, y in batches]
    # step 1 has no momentum buffers yet (its key is never seen again), step 2 warms up the key with them
    assert [kind for kind, _, _ in run.calls] == ["eager", "eager", "capture"]
    assert _replays(cuda) == 3
    _assert_same((results, model.state_dict()), _eager_reference(batches, momentum=0.9))


def test_a_workspace_reallocation_drops_every_graph() -> None:
    graphed, run, cuda, model, _ = _graphed(warmup=1)
    workspace = run.step.layout.workspace
    for seed in range(3):
        graphed(*_batch(8, seed))
    assert graphed.num_graphs == 1
    generation = workspace.generation
    graphed(*_batch(16, 3))  # a larger batch: its eager warm-up reallocates the workspace
    assert workspace.generation > generation
    graphed(*_batch(16, 4))  # the graph of batch 8 read the old buffers: dropped before anything runs
    assert graphed.num_graphs == 1 and run.calls[-1][0] == "capture" and run.calls[-1][2] == 16
    graphed(*_batch(8, 5))  # batch 8 was warmed up before: captured again, on the new buffers
    assert graphed.num_graphs == 2 and run.calls[-1][0] == "capture" and run.calls[-1][2] == 8
    assert len(cuda.graphs) == 3


def test_hooks_make_the_steps_eager_and_their_removal_brings_the_graph_back() -> None:
    graphed, run, cuda, model, optimizer = _graphed(warmup=1)
    for seed in range(3):
        graphed(*_batch(8, seed))
    seen = []
    handle = model[1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    graphed(*_batch(8, 3))
    assert run.calls[-1][0] == "eager" and run.calls[-1][1].startswith("side") and seen == [(8, 10)]
    handle.remove()
    replays = _replays(cuda)
    graphed(*_batch(8, 4))
    assert _replays(cuda) == replays + 1 and len(run.calls) == 3
    handle = optimizer.register_step_post_hook(lambda *args: seen.append("optimizer"))
    graphed(*_batch(8, 5))
    assert run.calls[-1][0] == "eager" and seen[-1] == "optimizer" and _replays(cuda) == replays + 1
    handle.remove()
    assert graphed.num_graphs == 1 and len(cuda.graphs) == 1


def test_dropout_generators_are_registered_with_the_graph() -> None:
    generator = torch.Generator().manual_seed(3)
    graphed, run, cuda, model, _ = _graphed(warmup=1, dropout=0.2, generator=generator)
    for seed in range(3):
        graphed(*_batch(8, seed))
    (graph,) = cuda.graphs
    assert graph.generators == [generator] and graph.calls.index("register_generator_state") < 1


def test_a_torch_that_cannot_capture_a_generator_runs_eagerly_and_says_why() -> None:
    graphed, run, cuda, model, _ = _graphed(warmup=1, cuda=FakeCuda(GraphWithoutGenerators), dropout=0.2,
                                            generator=torch.Generator().manual_seed(3))
    for seed in range(4):
        graphed(*_batch(8, seed))
    assert "give Dropout generator=None" in graphed.failure
    assert [kind for kind, _, _ in run.calls] == ["eager"] * 4 and cuda.graphs[0].calls == []


@pytest.mark.parametrize("where", ["step", "capture_end"])
@pytest.mark.parametrize("torch_version", ["before-fix", "fixed"])
def test_a_failed_capture_is_abandoned_and_the_step_goes_on_eagerly(where, torch_version, monkeypatch) -> None:
    fixed = graphs.FIXED_IN
    monkeypatch.setattr(graphs, "_torch_version", lambda: fixed if torch_version == "fixed" else (fixed[0],
                                                                                                   fixed[1] - 1))
    graphed, run, cuda, model, _ = _graphed(warmup=2)
    run.fail_in_capture = where == "step"
    cuda.fail_capture_end = where == "capture_end"
    batches = [_batch(8, seed) for seed in range(6)]
    results = [tuple(t.clone() for t in graphed(x, y)) for x, y in batches]

    (graph,) = cuda.graphs  # one attempt, never another
    assert graph.calls[0][:2] == ("capture_begin", "thread_local")
    assert graph.calls[1:] == ["capture_end", "reset"]  # the capture ended once, the graph reset, nothing replayed
    ended = [entry for entry in cuda.log if entry[0] == "end_allocation"]
    assert ended == ([] if torch_version == "fixed" else [("end_allocation", graph.pool())])
    assert cuda.log[-1] == "check_usable" and cuda.capturing is None
    assert cuda.current is cuda.default  # the caller's stream again
    expected = CAPTURE_ERROR if where == "step" else "operation failed due to a previous error during capture"
    assert graphed.failure.startswith("RuntimeError: ") and expected in graphed.failure
    after = run.calls[3:]  # the failed call and every later one: eager, on the caller's stream
    assert [kind for kind, _, _ in run.calls[:3]] == ["eager", "eager", "capture"]
    assert after == [("eager", "default", 8)] * 4
    _assert_same((results, model.state_dict()), _eager_reference(batches))


def test_a_capture_that_leaves_cuda_unusable_stops_with_one_line() -> None:
    graphed, run, cuda, model, _ = _graphed(warmup=1)
    run.fail_in_capture = True
    cuda.unusable = True
    graphed(*_batch(8, 0))
    with pytest.raises(CudaGraphError) as info:
        graphed(*_batch(8, 1))
    message = str(info.value)
    assert "\n" not in message and "left CUDA unusable" in message and "illegal memory access" in message
    assert "without --cuda-graph" in message and cuda.current is cuda.default


def test_warmup_must_be_a_positive_integer() -> None:
    model = _model()
    optimizer = SGD(model.parameters(), lr=0.1)
    step = FastStep(model, CrossEntropyLoss(), optimizer)
    for warmup in (0, 1.5, True):
        with pytest.raises(ValueError, match="graph_warmup must be an integer >= 1"):
            GraphedStep(step, model, optimizer, step.layout.workspace, torch.device("cpu"), warmup=warmup,
                        cuda=FakeCuda())

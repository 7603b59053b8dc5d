"""Data-parallel training on CPU (gloo, 127.0.0.1): two ranks equal one process on the same global batches, and a
rank that dies, stalls or never joins makes the others stop with a clear error within a bounded time.

Multi-process tests start this file as a script, one process per rank, with the environment torchrun would set. A
worker's start (importing torch: 2 s on an idle machine, 20 s on a busy one) is measured, and what the test allows
each worker afterwards grows with it: a slow machine is no hang, while a worker that truly hangs is still caught.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT_S

from nnbackprop import CrossEntropyLoss, mlp
import torch.distributed as dist

from nnbackprop.distributed import (
    DistContext, all_reduce_mean_hook, broadcast_module, cleanup, init_distributed, local_batch_size, rank_seed,
    reduce_metrics,
)
from nnbackprop.module import Module
from nnbackprop.optim import SGD

REPO = Path(__file__).resolve().parents[1]
FAIL_TIMEOUT_S = 2.0  # the process group's timeout in the failure tests
TRAIN_TIMEOUT_S = 300.0  # the process group's timeout while the two ranks train
START_S = SUBPROCESS_TIMEOUT_S  # the longest a worker may take to start (import torch), or to wait for the others'
STALL_S = 3600.0  # how long a stalled rank sleeps: far longer than any wait of the test (it is killed at the end)
N, D_IN, CLASSES, GLOBAL_BATCH, EPOCHS = 96, 20, 5, 16, 2
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------------- helpers
def flat_parameters(model: Module) -> torch.Tensor:
    """All parameter values concatenated in ``model.parameters()`` order: ``(P,)``, a copy."""
    return torch.cat([p.data.reshape(-1) for p in model.parameters()])


def parameters_in_sync(ctx: DistContext, model: Module) -> bool:
    """Whether every rank's parameters are bitwise equal to rank 0's; the same answer on every rank (one broadcast
    of the whole model)."""
    if not ctx.distributed:
        return True
    mine = flat_parameters(model)  # (P,)
    reference = mine.clone()
    dist.broadcast(reference, 0)
    mismatches = torch.tensor(int(not torch.equal(mine, reference)), device=ctx.device)
    dist.all_reduce(mismatches, op=dist.ReduceOp.SUM)
    return int(mismatches) == 0


# ---------------------------------------------------------------------------------------------------- training
def train(ctx: DistContext, dtype: torch.dtype, model_seed: int) -> dict:
    """Train an MLP for ``EPOCHS`` epochs of global batches of ``GLOBAL_BATCH``, this rank on its shard of each.

    The step is the training-step protocol written out: zero_grad, forward, mean loss over the local shard, backward,
    flat gradient → hook → back into ``param.grad``, SGD step.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=dtype)  # (N, D_IN), the same on every rank
    y = torch.randint(0, CLASSES, (N,), generator=g)  # (N,)
    b = local_batch_size(GLOBAL_BATCH, ctx.world_size)
    model = mlp(D_IN, [32, 16], CLASSES, dtype=dtype, generator=torch.Generator().manual_seed(model_seed))
    in_sync_at_build = parameters_in_sync(ctx, model)
    broadcast_module(ctx, model)
    loss_fn = CrossEntropyLoss()
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    hook = all_reduce_mean_hook(ctx)
    params = list(model.parameters())
    loss_sum, n_correct = torch.zeros((), dtype=dtype), torch.zeros((), dtype=torch.long)
    for _ in range(EPOCHS):
        for start in range(ctx.rank * b, N, GLOBAL_BATCH):
            xb, yb = x[start:start + b], y[start:start + b]
            optimizer.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            model.backward(loss_fn.backward())
            flat_grads = torch.cat([p.grad.reshape(-1) for p in params])  # (P,)
            if hook is not None:
                hook(flat_grads)
            for p, dp in zip(params, flat_grads.split([p.data.numel() for p in params])):
                p.grad = dp.view_as(p.data)
            optimizer.step()
            loss_sum += loss * len(yb)
            n_correct += (logits.argmax(1) == yb).sum()
    loss_sum, n_correct = reduce_metrics(ctx, loss_sum, n_correct)
    return {"state": model.state_dict(), "loss_sum": loss_sum, "n_correct": n_correct,
            "in_sync_at_build": in_sync_at_build, "in_sync_at_end": parameters_in_sync(ctx, model)}


# ---------------------------------------------------------------------------------------------------- worker side
def worker(mode: str, out_dir: Path, launched: int, launched_at: float) -> None:
    """One rank of a multi-process test; writes what it saw to ``out_dir/rank{RANK}.*``.

    It records how long it took to start (``ready{RANK}``: seconds since ``launched_at``, wall clock), then the
    ``launched`` processes wait for each other to finish importing, so that slow start-up on a busy machine does not
    eat into the short timeout of the failure tests.
    """
    rank = int(os.environ["RANK"])
    (out_dir / f"ready{rank}").write_text(str(time.time() - launched_at))
    deadline = time.monotonic() + START_S
    while len(list(out_dir.glob("ready*"))) < launched and time.monotonic() < deadline:
        time.sleep(0.02)
    if mode == "train":
        ctx = init_distributed("cpu", timeout_s=TRAIN_TIMEOUT_S)
        try:
            torch.set_num_threads(1)
            torch.save({str(dtype): train(ctx, dtype, model_seed=rank) for dtype in (torch.float64, torch.float32)},
                       out_dir / f"rank{rank}.pt")
            cleanup(wait=True)
        finally:
            cleanup()
        threads = [path.read_text().strip() for path in Path("/proc/self/task").glob("*/comm")]
        (out_dir / f"threads{rank}.json").write_text(json.dumps(threads))
        return
    record: dict = {}
    started = time.perf_counter()
    try:
        ctx = init_distributed("cpu", timeout_s=FAIL_TIMEOUT_S)
        if rank == 1 and mode == "die":
            os._exit(3)
        if rank == 1 and mode == "stall":
            time.sleep(STALL_S)
        started = time.perf_counter()
        all_reduce_mean_hook(ctx)(torch.ones(10))
    except RuntimeError as err:
        record = {"error": str(err), "elapsed": time.perf_counter() - started}
    finally:
        (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
        cleanup()


# ---------------------------------------------------------------------------------------------------- test side
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch(mode: str, out_dir: Path, ranks: list[int], world_size: int) -> Iterator[list[subprocess.Popen]]:
    """Start ranks ``ranks`` of a ``world_size``-process group on a free local port; kill whatever is left on exit."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs: list[subprocess.Popen] = []
    try:
        for rank in ranks:
            with open(out_dir / f"rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, mode, str(out_dir), str(len(ranks)), str(time.time())], cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                ))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()


def start_seconds(out_dir: Path, rank: int) -> float:
    """How long the worker of ``rank`` took to start (import torch): how slow the machine is just now."""
    return float((out_dir / f"ready{rank}").read_text())


def allowance(start_s: float) -> float:
    """The seconds a worker that started in ``start_s`` may take for the rest of its work (a second or two on an idle
    machine): at least a minute, and ten times its start-up, so that a busy machine never looks like a hang."""
    return max(60.0, 10 * start_s)


def wait_ok(proc: subprocess.Popen, out_dir: Path, rank: int) -> None:
    """Wait for a worker to start (however long that takes, up to :data:`START_S`), then for it to exit cleanly
    within :func:`allowance` of its start-up time; on failure show the end of its log."""
    deadline = time.monotonic() + START_S
    while not (out_dir / f"ready{rank}").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = (out_dir / f"ready{rank}").exists()
    try:
        code = proc.wait(timeout=allowance(start_seconds(out_dir, rank)) if started else 0.1)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        log = (out_dir / f"rank{rank}.log").read_text(errors="replace")[-3000:]
        what = "exited with " + str(code) if code is not None else "hung" if started else "did not start"
        pytest.fail(f"rank {rank} {what}:\n{log}")


def error_of(out_dir: Path, rank: int) -> tuple[str, float]:
    """The error a failure-test worker met, and the seconds it took to come; asserted to come within
    :data:`FAIL_TIMEOUT_S` and a margin that grows with the machine's load (the worker's start-up time)."""
    record = json.loads((out_dir / f"rank{rank}.json").read_text())
    assert "error" in record, f"rank {rank} finished without the expected error"
    margin = max(10.0, 2 * start_seconds(out_dir, rank))
    assert record["elapsed"] < FAIL_TIMEOUT_S + margin, (
        f"rank {rank} took {record['elapsed']:.1f} s to fail, more than the {FAIL_TIMEOUT_S:g} s timeout and "
        f"{margin:.0f} s of margin")
    return record["error"], record["elapsed"]


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    with launch("train", tmp_path, [0, 1], world_size=2) as procs:
        for rank, proc in enumerate(procs):
            wait_ok(proc, tmp_path, rank)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for dtype in (torch.float64, torch.float32):
        single = train(DistContext(), dtype, model_seed=0)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
        r0, r1 = (r[str(dtype)] for r in ranks)
        assert not r0["in_sync_at_build"], "ranks built with different seeds must start out of sync"
        assert r0["in_sync_at_end"] and r1["in_sync_at_end"]
        for key, value in single["state"].items():
            assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs between the ranks"
            torch.testing.assert_close(r0["state"][key], value, **tol, msg=lambda m: f"{dtype} {key}: {m}")
        torch.testing.assert_close(r0["loss_sum"], single["loss_sum"], **tol)
        assert r0["n_correct"].dtype == torch.long and int(r0["n_correct"]) == int(single["n_correct"])
    if Path("/proc/self/task").is_dir():  # the group is gone with its threads, not left for the interpreter's exit
        for r in (0, 1):
            threads = json.loads((tmp_path / f"threads{r}.json").read_text())
            left = [t for t in threads if "gloo" in t or "tcpstore" in t]
            assert not left, f"rank {r} still runs {left} after cleanup"


@pytest.mark.parametrize("mode", ["die", "stall"])
def test_lost_rank_stops_the_other(tmp_path: Path, mode: str) -> None:
    with launch(mode, tmp_path, [0, 1], world_size=2) as procs:
        wait_ok(procs[0], tmp_path, 0)
    error, _ = error_of(tmp_path, 0)
    assert "rank 0 of 2: the gradient all_reduce failed" in error
    assert f"{FAIL_TIMEOUT_S:g} s timeout" in error


def test_rank_that_never_joins(tmp_path: Path) -> None:
    """Rank 0 alone waits for rank 1; rank 1 alone waits for the master (rank 0): both give up after the timeout."""
    with contextlib.ExitStack() as stack:
        alone = []
        for rank in (0, 1):
            (tmp_path / str(rank)).mkdir()
            alone += stack.enter_context(launch("join", tmp_path / str(rank), [rank], world_size=2))
        for rank, proc in enumerate(alone):
            wait_ok(proc, tmp_path / str(rank), rank)
    for rank in (0, 1):
        error, _ = error_of(tmp_path / str(rank), rank)
        assert f"rank {rank} of 2: the process group at 127.0.0.1:" in error
        assert f"within the {FAIL_TIMEOUT_S:g} s timeout" in error


# ---------------------------------------------------------------------------------------------------- in-process
@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_context(no_torchrun_env: pytest.MonkeyPatch) -> None:
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.backend, ctx.is_main, ctx.distributed) == \
        (0, 1, torch.device("cpu"), None, True, False)
    assert all_reduce_mean_hook(ctx) is None
    metrics = (torch.tensor(2.5), torch.tensor(3))
    assert reduce_metrics(ctx, *metrics) == metrics
    assert parameters_in_sync(ctx, mlp(4, [3], 2))


def test_world_of_one_process_group(no_torchrun_env: pytest.MonkeyPatch) -> None:
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        no_torchrun_env.setenv(name, value)
    try:
        ctx = init_distributed("cpu", timeout_s=TRAIN_TIMEOUT_S)
        assert (ctx.backend, ctx.world_size, ctx.distributed) == ("gloo", 1, True)
        grads = torch.tensor([1.0, -2.0])
        all_reduce_mean_hook(ctx)(grads)
        assert grads.tolist() == [1.0, -2.0]
        loss_sum, n_correct = reduce_metrics(ctx, torch.tensor(2.5, dtype=torch.float32), torch.tensor(7))
        assert (loss_sum.dtype, n_correct.dtype, float(loss_sum), int(n_correct)) == (torch.float32, torch.long, 2.5, 7)
        with pytest.raises(ValueError, match="scalar"):
            reduce_metrics(ctx, torch.ones(2))
        model = mlp(4, [3], 2)
        before = flat_parameters(model)
        broadcast_module(ctx, model)
        assert torch.equal(flat_parameters(model), before) and parameters_in_sync(ctx, model)
        with pytest.raises(RuntimeError, match="already initialised"):
            init_distributed("cpu")
    finally:
        cleanup()


def test_bad_environment(no_torchrun_env: pytest.MonkeyPatch) -> None:
    no_torchrun_env.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        init_distributed("cpu")
    for name, value in dict(WORLD_SIZE="two", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        no_torchrun_env.setenv(name, value)
    with pytest.raises(ValueError, match="WORLD_SIZE='two' must be an integer"):
        init_distributed("cpu")
    no_torchrun_env.setenv("WORLD_SIZE", "2")
    no_torchrun_env.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        init_distributed("cpu", timeout_s=0)


def test_bad_device(no_torchrun_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not supported"):
        init_distributed("meta")
    with pytest.raises(ValueError, match="unknown device"):
        init_distributed("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rank_device(no_torchrun_env: pytest.MonkeyPatch) -> None:
    assert init_distributed("auto").device == torch.device("cuda")
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        no_torchrun_env.setenv(name, value)
    with pytest.raises(ValueError, match="each rank uses cuda:LOCAL_RANK"):
        init_distributed("cuda:0")
    no_torchrun_env.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(RuntimeError, match="visible"):
        init_distributed("cuda")


def test_local_batch_size() -> None:
    assert local_batch_size(128, 4) == 32
    assert local_batch_size(7, 1) == 7
    with pytest.raises(ValueError, match="global batch 130 does not divide among 4 ranks; use a multiple of 4"):
        local_batch_size(130, 4)
    with pytest.raises(ValueError, match="positive"):
        local_batch_size(0, 2)


def test_rank_seed() -> None:
    assert rank_seed(1234, 0) == 1234
    seeds = [rank_seed(1234, r) for r in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [rank_seed(1234, r) for r in range(64)]
    assert rank_seed(1235, 1) not in seeds
    masks = [torch.rand(8, generator=torch.Generator().manual_seed(s)) for s in seeds[:2]]
    assert not torch.equal(*masks)
    with pytest.raises(ValueError):
        rank_seed(0, -1)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))


def test_torchrun_train_matches_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 -m nnbackprop train`` end to end: the two ranks' run ends with the weights of a
    single process on the same global batches (float64, to rounding), and only rank 0 writes results."""
    from datagen import write_fake_mnist

    from nnbackprop.checkpoint import load_checkpoint

    data_dir = tmp_path / "data"
    write_fake_mnist(data_dir, n_train=260, n_test=40)
    common = ["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--val-size", "60", "--hidden", "16,8",
              "--epochs", "2", "--batch-size", "20", "--schedule", "constant", "--dropout", "0", "--shift", "0",
              "--lr", "0.05", "--momentum", "0.9", "--dtype", "float64", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNBACKPROP_DATA": str(tmp_path / "cache")}
    single = subprocess.run([sys.executable, "-m", "nnbackprop", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "nnbackprop"]
    proc = subprocess.Popen([*launcher, *common, "--out", str(tmp_path / "two")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "data-parallel: 2 processes (gloo), global batch 20" in stdout
    assert stdout.count("epoch 2/2") == 1  # rank 0 alone reports
    one, two = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("one", "two"))
    assert two["run"]["world_size"] == 2 and len(two["rng"]["generators"]) == 2
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-12, atol=1e-12)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["test_accuracy"] == s1["test_accuracy"]
    assert abs(s2["test_loss"] - s1["test_loss"]) < 1e-10

    # a single process's checkpoint resumed by two ranks: both refuse it, one line says why
    resume = subprocess.run([*launcher[:-3], f"--master_port={free_port()}", "-m", "nnbackprop", *common,
                             "--out", str(tmp_path / "one"), "--resume", "--epochs", "3"], env=env,
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert resume.returncode != 0
    errors = [line for line in resume.stderr.splitlines() if "nnbackprop: error:" in line]
    assert len(errors) == 1 and "written by 1 process(es); resume it with as many" in errors[0], resume.stderr

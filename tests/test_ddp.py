"""DistributedDataParallel with FusedCPLinear: 2 CPU processes on gloo must produce the gradients
of one process on the concatenated batch."""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cpkernels.convert import convert, cp_layers, task_context

WORLD = 2
BATCH = 6  # per process; the single-process run sees WORLD * BATCH samples
TASKS = 3


def _model():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(10, 16), nn.GELU(), nn.Linear(16, 4)), rank=3, num_tasks=TASKS)
    with torch.no_grad():
        for _, layer in cp_layers(model):
            layer.C.normal_()  # non-zero C, so A and B get gradients too
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * BATCH, 5, 10, generator=g)
    ids = torch.randint(0, TASKS, (WORLD * BATCH,), generator=g)
    y = torch.randn(WORLD * BATCH, 5, 4, generator=g)
    return x, ids, y


def _loss(model, x, ids, y):
    with task_context(model, ids):
        return nn.functional.mse_loss(model(x), y)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x, ids, y = (t[rank * BATCH:(rank + 1) * BATCH] for t in _batch())
        # task_context finds the layers through the DDP wrapper (they are its submodules).
        _loss(model, x, ids, y).backward()
        torch.save({n.removeprefix("module."): g for n, g in _grads(model).items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_gradients_equal_single_process(tmp_path):
    # fork: the children reuse the parent's imports (spawn re-imports torch in each, 2-20 s here
    # depending on load). They call set_num_threads(1) first, as DataLoader workers do, because an
    # OpenMP thread pool does not survive fork.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method=method)
    deadline = time.monotonic() + 180  # a hung collective must fail the test, not stall CI
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    model = _model()
    _loss(model, *_batch()).backward()
    expected = _grads(model)
    assert set(expected) == {f"{layer}.{f}" for layer in ("0", "2") for f in "ABC"}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for name, g in expected.items():
            # DDP averages the two half-batch gradients; the mean loss over equal halves is the
            # full-batch mean, so only the summation order differs (float32 rounding).
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=f"{name} on rank {rank}")

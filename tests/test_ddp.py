"""DistributedDataParallel with FusedCPLinear: 2 CPU processes on gloo must produce the gradients
of one process on the concatenated batch."""
import torch
from torch import nn

from _distributed import requires_gloo, run_workers
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


def _worker(rank, out_dir):
    model = nn.parallel.DistributedDataParallel(_model())
    x, ids, y = (t[rank * BATCH:(rank + 1) * BATCH] for t in _batch())
    # task_context finds the layers through the DDP wrapper (they are its submodules).
    _loss(model, x, ids, y).backward()
    torch.save({n.removeprefix("module."): g for n, g in _grads(model).items()}, f"{out_dir}/rank{rank}.pt")


@requires_gloo
def test_ddp_gradients_equal_single_process(tmp_path):
    run_workers(_worker, WORLD, tmp_path)
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

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with FusedCPLinear: 2 CPU processes on gloo train a
converted model with the gradients (and, after SGD steps, the parameters) of one process on the
concatenated batch. Task ids go through the model's `task_ids=` keyword."""
import pytest
import torch
from torch import nn

from _distributed import requires_gloo, run_workers
from cpkernels import CPConfig, convert, cp_layers

fsdp = pytest.importorskip("torch.distributed.fsdp")

WORLD = 2
BATCH = 4  # per process; the single-process run sees WORLD * BATCH samples
TASKS = 3
STEPS = 2


def _model():
    torch.manual_seed(0)
    # Odd sizes: FSDP pads each shard, and a 7-row A or a 3-row C does not split evenly in two.
    base = nn.Sequential(nn.Linear(10, 7), nn.GELU(), nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))
    model = convert(base, CPConfig(rank=3, num_tasks=TASKS, target_modules=["0", "2"], modules_to_save=["4"]))
    with torch.no_grad():
        for _, layer in cp_layers(model):
            layer.C.normal_()  # non-zero C, so A and B get gradients too
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    # -1: rows without an adapter (base layer only) mixed into the batch.
    return [(torch.randn(WORLD * BATCH, 5, 10, generator=g), torch.randint(-1, TASKS, (WORLD * BATCH,), generator=g),
             torch.randn(WORLD * BATCH, 5, 4, generator=g)) for _ in range(STEPS)]


def _train(model, batches, part=slice(None)):
    """SGD steps; returns the gradients of the first step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = None
    for x, ids, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x[part], task_ids=ids[part]), y[part]).backward()
        if first is None:
            first = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    return first


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for _, layer in cp_layers(model):
        fsdp.fully_shard(layer, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    assert all(hasattr(p, "full_tensor") for p in model.parameters())  # really sharded
    grads = _train(model, _batches(), slice(rank * BATCH, (rank + 1) * BATCH))
    params = {n: _full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"grads": grads, "params": params}, f"{out_dir}/rank{rank}.pt")


@requires_gloo
def test_fsdp2_training_equals_single_process(tmp_path):
    run_workers(_worker, WORLD, tmp_path)
    model = _model()
    expected = _train(model, _batches())
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(expected) == {f"{layer}.{f}" for layer in ("0", "2") for f in "ABC"} | {"4.weight", "4.bias"}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for what, want in (("grads", expected), ("params", params)):
            assert set(got[what]) == set(want)
            for name, value in want.items():
                # FSDP averages the half-batch gradients (reduce-scatter): the full-batch mean up to
                # float32 summation order.
                torch.testing.assert_close(got[what][name], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{what} {name} on rank {rank}")

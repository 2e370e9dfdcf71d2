"""Run a function in WORLD CPU processes on gloo (the DDP and FSDP tests share this)."""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

requires_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                   reason="needs torch.distributed gloo")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, out_dir)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world, out_dir, timeout_s=180):
    """Call fn(rank, out_dir) in `world` processes of one gloo group; fail the test on a hang."""
    # fork: the children reuse the parent's imports (spawn re-imports torch in each, 2-20 s here
    # depending on load). They call set_num_threads(1) first, as DataLoader workers do, because an
    # OpenMP thread pool does not survive fork.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(_entry, args=(fn, world, _free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method=method)
    deadline = time.monotonic() + timeout_s  # a hung collective must fail the test, not stall CI
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s")

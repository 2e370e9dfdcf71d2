"""Shared test configuration.

* Tests marked `gpu` are skipped, with the reason, when no CUDA device exists; they run on the
  device machine through bench/device_check.sh.
* Every test starts from its own fixed seed, so failures reproduce while each test still draws
  fresh random inputs of its own.
* Without a GPU, the Triton kernels run on CPU tensors through the interpreter (the conformance
  suite's triton-interp backend). TRITON_INTERPRET must be set before triton is first imported,
  since triton.jit reads it when the kernels are defined: hence here, before any test module.
  It never changes the automatic backend choice (ops._auto_order never picks triton for CPU tensors).
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/device_check.sh on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: their ops take microseconds, so a second
    thread only adds hand-off cost, and on a loaded 2-core CI machine waiting for it dominates the run.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

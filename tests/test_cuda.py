"""Tests of the `cuda` backend (csrc/cuda/cp_linear_cuda.cu).

The op contract runs on this backend in test_conformance.py; this file keeps what is particular
to csrc/cuda. `test_cuda_kernels_registered` runs everywhere, GPU or not: whenever the extension could have been
built with CUDA, it must carry the CUDA kernels. The others need a GPU (`gpu` marker); they are
skipped on CPU-only machines and run on the device machine by bench/device_check.sh.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cpkernels
from cpkernels import _ext
from cpkernels.reference import cp_linear_reference
from cpkernels.testing import _atol, _detached, make_inputs, poisoned_memory, run_with_grads

OPS = ("cpkernels::cp_linear_fwd", "cpkernels::cp_linear_bwd")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA device; run by bench/device_check.sh on the GPU machine")


def gpu(fn):
    return pytest.mark.gpu(requires_cuda(fn))


def _has_cuda_toolkit() -> bool:
    """An nvcc that setup.py would find (CUDA_HOME, /usr/local/cuda or PATH)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_cuda_kernels_registered():
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU build: setup.py builds no CUDA kernels against it")
    if _ext._C is None:
        if os.environ.get("CPKERNELS_NO_EXT"):
            pytest.skip("CPKERNELS_NO_EXT is set: the extension was deliberately not built")
        pytest.fail(_ext.LOAD_ERROR)
    if not _ext.has_kernel("CUDA"):
        assert not _has_cuda_toolkit(), (
            f"torch {torch.__version__} is a CUDA build and a CUDA toolkit is installed, but the extension "
            f"{_ext._C.__file__} has no CUDA kernels: it was built without csrc/cuda (rebuild it)")
        pytest.skip("no CUDA toolkit (nvcc) here, so the extension was built without CUDA kernels")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} lost its CPU kernel"


# --------------------------------------------------------------------------------------------
# On the GPU (the contract itself, for this backend too, is in test_conformance.py)
# --------------------------------------------------------------------------------------------
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_TASKS = 5


def _op_args(inputs):
    return tuple(inputs[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids"))


def _backward_op(inputs, u=None, scale=0.7):
    x, weight, bias, A, B, C, t = (a.detach() for a in _op_args(inputs))
    if u is None:
        _, u = torch.ops.cpkernels.cp_linear_fwd(x, weight, bias, A, B, C, t, scale)
    grad_y = torch.randn(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype,
                         generator=torch.Generator(x.device).manual_seed(0))
    return torch.ops.cpkernels.cp_linear_bwd(grad_y, x, weight, A, B, C, t, u, scale, [True] * 5)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dC_and_db_are_bitwise_deterministic(dtype):
    # Many rows per task, so that dC sums 256 chunks: a race or an atomic would show. (dx, dA, dB
    # come from cuBLAS, whose reproducibility is cuBLAS's business.)
    inputs = make_inputs(8192, 256, 256, 16, 8, dtype=dtype, device="cuda")
    _, _, _, dC, db = _backward_op(inputs)
    for _ in range(2):
        _, _, _, dC_again, db_again = _backward_op(inputs)
        assert torch.equal(dC, dC_again), "dC differs between two identical backward calls"
        assert torch.equal(db, db_again), "db differs between two identical backward calls"


@gpu
def test_unaligned_saved_u_takes_the_scalar_path_with_identical_results():
    inputs = make_inputs(97, 59, 130, 3, NUM_TASKS, device="cuda", requires_grad=False)
    _, u = torch.ops.cpkernels.cp_linear_fwd(*_op_args(inputs), 0.7)
    storage = torch.empty(u.numel() + 1, dtype=u.dtype, device=u.device)
    shifted = storage[1:].view_as(u).copy_(u)  # contiguous, but 4 bytes off a 16-byte boundary
    assert shifted.data_ptr() % 16 != 0
    for name, a, b in zip(("dx", "dA", "dB", "dC", "db"), _backward_op(inputs, u), _backward_op(inputs, shifted)):
        assert torch.equal(a, b), f"{name}: the unaligned (scalar) path differs from the vectorised one"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_triton(dtype):
    x_like = torch.empty(1, device="cuda")
    if "triton" not in cpkernels.available_backends("cuda"):
        pytest.skip(cpkernels.explain_backend(x_like, backend="triton"))
    inputs = make_inputs(97, 59, 130, 17, NUM_TASKS, dtype=dtype, device="cuda")
    grad_y = torch.randn(97, 130, device="cuda", dtype=torch.float64)
    got = {b: run_with_grads(cpkernels.cp_linear, inputs, grad_y, 0.7, backend=b) for b in ("cuda", "triton")}
    same = run_with_grads(cp_linear_reference, inputs, grad_y, 0.7)
    ref64 = run_with_grads(cp_linear_reference, _detached(inputs, torch.float64), grad_y, 0.7)
    # Each backend may be at most 2× as far from float64 as plain torch, so at most 4× from the other.
    for key in ["y"] + list(ref64[1]):
        pick = (lambda res: res[0]) if key == "y" else (lambda res: res[1][key])  # noqa: E731
        a, b, s, r = pick(got["cuda"]), pick(got["triton"]), pick(same), pick(ref64)
        tol = 4 * (s.double() - r).abs().max().item() + _atol(r, dtype)
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol, f"{key}: cuda and triton differ by {err:.3e} > {tol:.3e}"


BAD_IDS = {1: NUM_TASKS, 50: -1, 95: NUM_TASKS + 1000}  # row -> an id outside [0, NUM_TASKS)


def _inputs_with_bad_ids():
    """Inputs whose C sits between two NaN guard rows, and whose task ids have bad values at BAD_IDS."""
    inputs = make_inputs(97, 59, 130, 3, NUM_TASKS, device="cuda", requires_grad=False)
    C = inputs["C"]
    guarded = torch.full((NUM_TASKS + 2, C.shape[1]), float("nan"), device="cuda")
    guarded[1:-1] = C
    inputs["C"] = guarded[1:-1]  # a read of row -1 or row T would pick up NaN
    bad = inputs["task_ids"].clone()
    for row, task in BAD_IDS.items():
        bad[row] = task
    return inputs, bad, guarded


@gpu
def test_bad_task_id_gets_no_update_and_touches_nothing_out_of_bounds():
    inputs, bad, guarded = _inputs_with_bad_ids()
    guarded_before = guarded.clone()
    x, weight, bias, A, B, C, _ = _op_args(inputs)
    rows = list(BAD_IDS)
    ok = torch.ones(x.shape[0], dtype=torch.bool, device="cuda")
    ok[rows] = False
    with poisoned_memory():
        y, u = torch.ops.cpkernels.cp_linear_fwd(x, weight, bias, A, B, C, bad, 0.7)
        grad_y = torch.randn_like(y)
        dx, dA, dB, dC, db = torch.ops.cpkernels.cp_linear_bwd(grad_y, x, weight, A, B, C, bad, u, 0.7, [True] * 5)
    torch.cuda.synchronize()
    # Loose fp32 tolerances: a masking bug shows as O(1) errors; summation order gives ~1e-6.
    close = functools.partial(torch.testing.assert_close, rtol=1e-4, atol=1e-4)
    # Bad rows: the frozen layer only. Good rows: exactly what they get without the bad ones.
    close(y[rows], torch.nn.functional.linear(x[rows], weight, bias))
    close(y[ok], cp_linear_reference(x[ok], weight, bias, A, B, C, bad[ok], 0.7))
    close(dx[rows], grad_y[rows] @ weight)
    # Gradients of the factors: the bad rows contribute nothing.
    good = {k: v.detach().clone().requires_grad_(k in ("x", "A", "B", "C")) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}
    good["x"] = x[ok].clone().requires_grad_()
    good["task_ids"] = bad[ok]
    y_ok = cp_linear_reference(**good, scale=0.7)
    want_dx, want_dA, want_dB, want_dC = torch.autograd.grad(y_ok, [good[k] for k in ("x", "A", "B", "C")],
                                                             grad_y[ok])
    for name, got, want in (("dx", dx[ok], want_dx), ("dA", dA, want_dA), ("dB", dB, want_dB), ("dC", dC, want_dC)):
        close(got, want, msg=lambda m, name=name: f"{name}: {m}")
    close(db, grad_y.sum(0))
    assert torch.equal(guarded.isnan(), guarded_before.isnan()) and torch.equal(
        guarded[1:-1], guarded_before[1:-1]), "C or its guard rows were written"


_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    from test_cuda import _inputs_with_bad_ids, _op_args
    inputs, bad, _ = _inputs_with_bad_ids()
    x, weight, bias, A, B, C, _ = _op_args(inputs)
    for ids in (bad, bad.int()):
        y, u = torch.ops.cpkernels.cp_linear_fwd(x, weight, bias, A, B, C, ids, 0.7)
        torch.ops.cpkernels.cp_linear_bwd(torch.randn_like(y), x, weight, A, B, C, ids, u, 0.7, [True] * 5)
    torch.cuda.synchronize()
    print("sanitized run finished")
""")


def _compute_sanitizer():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    found = shutil.which("compute-sanitizer") or os.path.join(home, "bin", "compute-sanitizer")
    return found if os.path.exists(found) else None


@gpu
def test_bad_task_id_is_clean_under_compute_sanitizer(tmp_path):
    tool = _compute_sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer is not installed (neither on PATH nor in $CUDA_HOME/bin)")
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an
    # access just past a tensor instead of landing silently in the pool's next block.
    # The child imports the cpkernels this process runs (and this file, for the inputs); its working
    # directory is empty so that a source checkout cannot shadow an installed package.
    path = [os.path.dirname(os.path.dirname(os.path.abspath(cpkernels.__file__))), TESTS_DIR]
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1",
               PYTHONPATH=os.pathsep.join(p for p in path + [os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c",
                           _SANITIZER_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "sanitized run finished" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-4000:]

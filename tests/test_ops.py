"""The op's front door (ops.py): argument validation, backend choice, torch.compile.

What every backend must compute is in test_conformance.py; backend-specific tests are in
test_cpu_backend.py, test_cuda.py and test_triton.py; the task-id rules in test_task_ids.py.
"""
import os
import subprocess
import sys

import pytest
import torch
import numpy as np

import cpkernels
from cpkernels import cp_linear, cp_linear_reference
from cpkernels.testing import make_inputs

def test_autocast_bf16_with_fp32_parameters():
    inp = make_inputs(16, 32, 24, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cp_linear(**inp, backend="cpu")
        y_ref = cp_linear_reference(**{k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point()
                                          else v) for k, v in inp.items()})
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert inp["C"].grad.dtype == torch.float32


def test_torch_compile_fullgraph_cpu():
    inp = make_inputs(0, 24, 20, 4, 3, per_sample_shape=(3, 5))
    x, w, b, A, B, C, t = (inp[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids"))
    compiled = torch.compile(lambda x, t: cp_linear(x, w, b, A, B, C, t, 0.5), fullgraph=True)
    y = compiled(x, t)
    torch.testing.assert_close(y, cp_linear_reference(x, w, b, A, B, C, t, 0.5), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    gA = A.grad.clone()
    A.grad = None
    cp_linear_reference(x, w, b, A, B, C, t, 0.5).square().sum().backward()
    torch.testing.assert_close(gA, A.grad, rtol=1e-4, atol=1e-5)
    # Rank 0 (every component pruned) compiles too, and still gives the factors (empty) gradients.
    r0 = make_inputs(0, 24, 20, 0, 3, per_sample_shape=(3, 5))
    compiled_r0 = torch.compile(lambda x: cp_linear(x, w, b, r0["A"], r0["B"], r0["C"], t, 0.5), fullgraph=True)
    compiled_r0(x).sum().backward()
    assert r0["A"].grad.shape == (20, 0)
    # Inside the graph no IndexError can be raised: a bad id acts as -1 (no adapter), never out of bounds.
    bad = torch.tensor([0, 3, -7])
    with torch.no_grad():
        want = cp_linear_reference(x, w, b, A, B, C, torch.tensor([0, -1, -1]), 0.5)
        torch.testing.assert_close(compiled(x, bad), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Bad input: the right exception type, the argument named, never an out-of-bounds access
# ------------------------------------------------------------------------------------------
def _args(**over):
    inp = make_inputs(5, 6, 4, 3, 2, requires_grad=False)
    inp.update(over)
    return inp


@pytest.mark.parametrize("case,exc,pattern", [
    ("float ids", TypeError, "task_ids must be an integer tensor"),
    ("bool ids", TypeError, "task_ids must be an integer tensor"),
    ("ids shape", ValueError, r"task_ids has shape \(4,\)"),
    ("d_in", ValueError, r"^x has shape \(5, 6\), so d_in=6, but weight has shape \(4, 7\)"),
    ("A rows", ValueError, r"A has shape \(5, 3\).*d_out=4"),
    ("B rank", ValueError, r"B has shape \(6, 2\).*r=3"),
    ("C rank", ValueError, r"C has shape \(2, 4\).*r=3"),
    ("weight dtype", TypeError, r"weight has dtype torch.float64 but x has dtype torch.float32"),
    ("bias shape", ValueError, r"bias has shape \(5,\)"),
    ("weight grad", ValueError, "weight.requires_grad is True"),
    ("x int", TypeError, "x must be float"),
    ("factor int", TypeError, "C must be a floating-point tensor"),
    ("backend", ValueError, "'nope' is not a backend"),
])
def test_bad_input_errors(case, exc, pattern):
    a = _args()
    kw = {}
    if case == "float ids":
        a["task_ids"] = a["task_ids"].float()
    elif case == "bool ids":
        a["task_ids"] = a["task_ids"] > 0
    elif case == "ids shape":
        a["task_ids"] = torch.zeros(4, dtype=torch.long)
    elif case == "d_in":
        a["weight"] = torch.randn(4, 7)
    elif case == "A rows":
        a["A"] = torch.randn(5, 3)
    elif case == "B rank":
        a["B"] = torch.randn(6, 2)
    elif case == "C rank":
        a["C"] = torch.randn(2, 4)
    elif case == "weight dtype":
        a["weight"] = a["weight"].double()
    elif case == "bias shape":
        a["bias"] = torch.randn(5)
    elif case == "weight grad":
        a["weight"].requires_grad_(True)
    elif case == "x int":
        a["x"] = torch.ones(5, 6, dtype=torch.int64)
    elif case == "factor int":
        a["C"] = torch.ones(2, 3, dtype=torch.int64)
    elif case == "backend":
        kw["backend"] = "nope"
    with pytest.raises(exc, match=pattern):
        cp_linear(**a, **kw)


def test_device_mismatch_is_named():
    a = _args()
    a["task_ids"] = a["task_ids"].to("meta")
    with pytest.raises(ValueError, match="task_ids is on meta but x is on cpu"):
        cp_linear(**a)
    a = _args()
    a["B"] = a["B"].to("meta")
    with pytest.raises(ValueError, match="B is on meta but x is on cpu"):
        cp_linear(**a)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="cuda.*not available.*CUDA tensors"):
        cp_linear(**_args(), backend="cuda")


def test_env_var_selects_backend():
    code = ("import torch, cpkernels; print(cpkernels.explain_backend(torch.zeros(1)))")
    env = {**os.environ, "CPKERNELS_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("reference (requested by CPKERNELS_BACKEND)")


@pytest.mark.parametrize("ids", [1.0, "0", [0, 1.0, 0, 1, 0], [0, True, 0, 1, 0], (0, "1", 0, 1, 0)])
def test_task_ids_of_wrong_type_name_the_argument(ids):
    with pytest.raises(TypeError, match="task_ids"):
        cp_linear(**_args(task_ids=ids))


@pytest.mark.parametrize("as_type", [list, tuple])
def test_task_ids_as_a_list_of_ints(as_type):
    """A list or tuple of ints is taken as torch.as_tensor would take it (issue 21)."""
    a = _args()
    ids = a["task_ids"]
    y = cp_linear(**{**a, "task_ids": as_type(ids.tolist())})
    torch.testing.assert_close(y, cp_linear(**a), rtol=0, atol=0)
    with pytest.raises(IndexError, match="row 1 has task id 9"):
        cp_linear(**{**a, "task_ids": as_type([0, 9] + ids.tolist()[2:])})


def test_wrong_shape_is_reported_before_bad_values():
    with pytest.raises(ValueError, match=r"task_ids has shape \(3,\)"):
        cp_linear(**_args(task_ids=torch.tensor([9, 9, 9])))


def test_float64_on_cuda_is_not_sent_to_triton():
    from cpkernels import ops

    assert "triton" not in ops._auto_order("cuda", torch.float64)
    assert ops._auto_order("cuda", torch.bfloat16)[0] == "triton"


# ------------------------------------------------------------------------------------------
# Regression tests of issue 11 (each failed before its fix)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,exc,pattern", [
    (torch.tensor(2.0, requires_grad=True), TypeError, "scale is a tensor that requires grad"),
    ("2", TypeError, "scale must be a real number.*str"),
    (None, TypeError, "scale must be a real number.*NoneType"),
    (True, TypeError, "scale must be a real number.*bool"),
    (torch.ones(2), ValueError, r"scale must be a single number.*\(2,\)"),
])
def test_bad_scale_is_refused(scale, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cp_linear(**_args(), scale=scale)


@pytest.mark.parametrize("scale", [0.5, 2, np.float32(0.5), torch.tensor(0.5)])
def test_scale_accepts_numbers_and_constant_tensors(scale):
    a = _args()
    torch.testing.assert_close(cp_linear(**a, scale=scale), cp_linear_reference(**a, scale=float(scale)))


@pytest.mark.parametrize("name", ["x", "weight", "bias", "A", "C"])
@pytest.mark.parametrize("value", ["list", "numpy", "none", "sparse"])
def test_non_tensor_or_sparse_arguments_are_named(name, value):
    a = _args()
    t = a[name]
    if value == "none":
        if name == "bias":
            return  # bias=None is valid
        a[name] = None
    else:
        a[name] = {"list": t.tolist(), "numpy": t.numpy(), "sparse": t.to_sparse()}[value]
    with pytest.raises(TypeError, match=rf"^{name} must be a (torch.Tensor|dense tensor|floating)"):
        cp_linear(**a)


def test_sparse_task_ids_are_refused():
    with pytest.raises(TypeError, match="task_ids must be a dense tensor"):
        cp_linear(**_args(task_ids=torch.tensor([0, 1, 0, 1, 0]).to_sparse()))


@pytest.mark.parametrize("on_meta", ["x", "weight", "bias", "A", "B", "C", "task_ids"])
def test_raw_op_refuses_one_argument_on_meta(on_meta):
    """torch.ops.cpkernels.* with one argument on meta returned uninitialised CPU memory."""
    a = _args()
    a[on_meta] = a[on_meta].to("meta")
    with pytest.raises((ValueError, RuntimeError), match="is on (meta|cpu) but x is on (cpu|meta)"):
        torch.ops.cpkernels.cp_linear_fwd(*(a[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids")), 1.0)
    if on_meta == "bias":
        return  # the backward op takes no bias
    x, w, A, B, C, t = (a[k] for k in ("x", "weight", "A", "B", "C", "task_ids"))
    gy = torch.ones(5, 4, device="meta" if on_meta == "x" else "cpu")
    u = torch.ones(5, 3)
    with pytest.raises((ValueError, RuntimeError), match="is on (meta|cpu) but x is on (cpu|meta)"):
        torch.ops.cpkernels.cp_linear_bwd(gy, x, w, A, B, C, t, u, 1.0, [True] * 5)


def test_all_meta_inputs_give_shapes():
    """Meta tensors carry no values: nothing to check, and no number to get wrong."""
    a = {k: (v.to("meta") if torch.is_tensor(v) else v) for k, v in _args().items()}
    assert cp_linear(**a).shape == (5, 4) and cp_linear(**a).device.type == "meta"
    assert cp_linear(**{**a, "task_ids": 1}).shape == (5, 4)


def test_source_tree_without_extension_warns_once(tmp_path):
    """Importing a source checkout (no compiled _C) falls back to the slow reference: say so once, at the
    first call that falls back, with the reason and the fix (issue 21). Run on a copy of the package
    without its extension, in a fresh interpreter whose working directory is the copy's parent."""
    import shutil
    from pathlib import Path

    import cpkernels

    src = Path(cpkernels.__file__).resolve().parent
    shutil.copytree(src, tmp_path / "cpkernels", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    code = ("import warnings, cpkernels; from cpkernels.testing import make_inputs\n"
            "warnings.simplefilter('always')\n"
            "inp = make_inputs(5, 6, 4, 3, 2, requires_grad=False)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3): cpkernels.cp_linear(**inp)\n"
            "print(cpkernels.__file__); print(len(w)); print(w[0].message if w else '')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    where, count, message = res.stdout.split("\n", 2)
    assert where.startswith(str(tmp_path))
    assert count == "1"
    assert "slow einsum reference" in message and "no compiled extension" in message
    assert "build_ext --inplace" in message


@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
@pytest.mark.parametrize("form", ["row", "sample", "owned"])
def test_valid_eager_calls_take_the_cpp_host_path(monkeypatch, mode, form):
    """The C++ host path (csrc/host.cpp) must serve valid eager calls: if it silently declined them, every
    result would still be right (the Python path computes the same) and only the speed would be lost.
    So the Python checks are made to fail here, and a valid call must not reach them; an invalid call
    must still reach them and raise the error that names the argument."""
    import cpkernels.ops as ops
    from cpkernels import task_ids as tid

    inp = make_inputs(0, 6, 4, 3, 3, per_sample_shape=(5, 2), requires_grad=mode == "grad")
    assert inp["task_ids"].shape == (5,)  # one task per sample
    if form == "row":
        inp["task_ids"] = torch.tensor([[0, 2], [-1, 1], [2, 2], [1, 0], [0, -1]])
    elif form == "owned":
        inp["task_ids"] = tid.own(inp["task_ids"])
    want = cp_linear_reference(**inp, scale=0.5)
    real = ops._check_inputs

    def refuse(*a, **kw):
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(ops, "_check_inputs", refuse)
    ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    with ctx():
        y = cp_linear(**inp, scale=0.5)
    torch.testing.assert_close(y, want)
    if mode == "grad":
        assert y.grad_fn is not None
        torch.autograd.grad(y.sum(), [inp["x"], inp["A"], inp["B"], inp["C"]])
    monkeypatch.setattr(ops, "_check_inputs", real)
    bad = dict(inp, task_ids=torch.full_like(inp["task_ids"], 3)) if form != "owned" else dict(inp, task_ids=7)
    with pytest.raises(IndexError, match="num_tasks=3"):
        cp_linear(**bad, scale=0.5)


@pytest.mark.parametrize("grad", [False, True])
def test_triton_eager_calls_are_prepared_in_cpp(monkeypatch, grad):
    """The same for the Triton backend (interpreter on CPU tensors): C++ prepares its inputs; with nothing
    to record the launcher is called directly, with grad through the registered op and its autograd."""
    pytest.importorskip("triton")
    import cpkernels.ops as ops

    if "triton" not in cpkernels.available_backends("cpu"):
        pytest.skip(cpkernels.explain_backend(torch.empty(0), "triton"))
    inp = make_inputs(0, 16, 8, 3, 3, per_sample_shape=(6,), requires_grad=grad)
    want = cp_linear_reference(**inp, scale=0.5)
    monkeypatch.setattr(ops, "_check_inputs", lambda *a, **kw: pytest.fail("the Python path ran"))
    y = cp_linear(**inp, scale=0.5, backend="triton")
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    assert (y.grad_fn is not None) == grad

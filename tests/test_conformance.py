"""The op contract (ARCHITECTURE §2), once, for every backend this process can run.

Each test takes a `Backend` and runs the same checks on it: cpu, reference, triton under
TRITON_INTERPRET=1 (CPU tensors; set by conftest.py when there is no GPU), and cuda and triton on a
GPU (marked `gpu`; run by bench/device_check.sh). A new backend gets the whole contract by adding a
line to BACKENDS. Everything is compared with the float64 reference (cpkernels.testing: fresh random
inputs, the flash-attention tolerance rule, NaN-poisoned allocations).

The interpreter is slow and its tl.dot cannot do bfloat16 (triton-lang/triton#11584), so it gets
float32/float16 and small shapes; bfloat16 Triton runs on the GPU.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpkernels
from cpkernels import cp_linear, cp_linear_reference
from cpkernels.testing import (_detached, assert_close_to_reference, assert_within_rule, make_inputs,
                               poisoned_memory, run_with_grads)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
SCALE = 0.7  # not 1, so that a missing or doubled scale shows


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # the backend= argument
    device: str
    dtypes: tuple  # the dtypes it computes in; dtypes[0] is the one most tests use
    small: bool = False  # the Triton interpreter: keep shapes small
    raw_op: str | None = None  # its torch.ops.cpkernels forward op, for opcheck (None: no custom op)

    def __str__(self):
        return f"{self.name}-{self.device}"

    def require(self):
        """Skip, saying why, when this process cannot run the backend; a missing cpu backend is a failure."""
        if self.device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (run bench/device_check.sh on the device machine)")
        if self.name not in cpkernels.available_backends(self.device):
            why = cpkernels.explain_backend(torch.empty(0, device=self.device), self.name)
            if self.name == "cpu":
                pytest.fail(f"the cpu backend must always be built: {why}")
            pytest.skip(why)


GPU = pytest.mark.gpu
BACKENDS = [
    pytest.param(Backend("cpu", "cpu", (F32, F64, BF16), raw_op="cp_linear"), id="cpu"),
    pytest.param(Backend("reference", "cpu", (F32, F64, BF16)), id="reference"),
    pytest.param(Backend("triton", "cpu", (F32, F16), small=True, raw_op="triton_cp_linear"), id="triton-interp"),
    pytest.param(Backend("cuda", "cuda", (F32, BF16, F16, F64), raw_op="cp_linear"), id="cuda", marks=GPU),
    pytest.param(Backend("triton", "cuda", (F32, BF16, F16), raw_op="triton_cp_linear"), id="triton-gpu", marks=GPU),
]
KERNELS = [p for p in BACKENDS if p.values[0].raw_op is not None]
FLOAT64 = [p for p in BACKENDS if F64 in p.values[0].dtypes]


@pytest.fixture(params=BACKENDS)
def be(request) -> Backend:
    request.param.require()
    return request.param


def inputs(be: Backend, lead, d_in, d_out, r, T, *, form="row", dtype=None, bias=True, no_adapter=True,
           **kw) -> dict:
    """make_inputs on be's device, with ids that include -1 (no adapter) and T − 1 where there is room.

    form: "row" (ids of shape lead), "sample" (ids of shape lead[:1]) or "int" (one Python int).
    no_adapter=False keeps every id in [0, T): the regression tests of one defect use it, so that they
    fail for that defect alone on code that predates the -1 semantics.
    """
    inp = make_inputs(0, d_in, d_out, r, T, dtype=dtype or be.dtypes[0], device=be.device, bias=bias,
                      per_sample_shape=lead, **kw)
    if form == "int":
        inp["task_ids"] = T - 1
        return inp
    shape = lead if form == "row" else lead[:1]
    ids = torch.randint(0, T, shape)
    flat = ids.view(-1)
    if flat.numel() >= 3:
        flat[0], flat[flat.numel() // 2] = (-1 if no_adapter else 0), T - 1
    inp["task_ids"] = ids.to(be.device)
    return inp


def check(be: Backend, inp: dict, scale=SCALE, **kw):
    assert_close_to_reference(cp_linear, inp, scale, backend=be.name, **kw)


# ------------------------------------------------------------------------------------------------
# Matches the float64 reference
# ------------------------------------------------------------------------------------------------
# (lead shape, d_in, d_out, r, T, id form, bias): odd sizes, r = 1, 3, 17, every id form.
CASES = [
    ((13,), 59, 37, 1, 3, "row", True),
    ((4, 5), 33, 17, 3, 4, "sample", False),
    ((3, 5), 17, 33, 17, 5, "row", True),
    ((9,), 21, 19, 3, 2, "int", True),
    ((1,), 64, 59, 16, 3, "row", False),
    ((97,), 59, 130, 17, 8, "row", True),
]


@pytest.mark.parametrize("lead,d_in,d_out,r,T,form,bias", CASES, ids=str)
def test_matches_reference(be, lead, d_in, d_out, r, T, form, bias):
    check(be, inputs(be, lead, d_in, d_out, r, T, form=form, bias=bias))


def test_dtypes_poisoned(be):
    """Every dtype the backend computes in, with NaN-filled fresh allocations: nothing unwritten leaks."""
    for dtype in be.dtypes:
        inp = inputs(be, (31,), 59, 37, 17, 5, dtype=dtype)
        with poisoned_memory():
            check(be, inp)


def test_fp32_master_factors_with_half_input(be):
    half = next((d for d in be.dtypes if d in (BF16, F16)), None)
    if half is None:
        pytest.skip(f"{be} computes in no half-precision dtype")
    inp = inputs(be, (31,), 59, 37, 3, 3, dtype=half, factor_dtype=F32)
    check(be, inp)
    y = cp_linear(**inp, backend=be.name)
    y.float().sum().backward()
    assert y.dtype == half and inp["A"].grad.dtype == F32 and inp["x"].grad.dtype == half


def test_strided_inputs(be):
    """Non-contiguous and strided x, A and ids."""
    inp = inputs(be, (7, 9), 33, 21, 3, 4)
    base = torch.randn(7, 9, 2 * 33, dtype=inp["x"].dtype, device=be.device)
    inp["x"] = base[..., ::2].requires_grad_()  # stride 2 along d_in
    inp["A"] = inp["A"].detach().t().contiguous().t().requires_grad_()  # column-major
    ids = torch.randint(0, 4, (7, 18), device=be.device)
    inp["task_ids"] = ids[:, ::2]
    assert not (inp["x"].is_contiguous() or inp["A"].is_contiguous() or inp["task_ids"].is_contiguous())
    check(be, inp)
    inp["x"] = inp["x"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    check(be, inp)


def test_strided_and_expanded_bias(be):
    """A kernel that ignores the bias stride reads the wrong elements (past the end on a GPU)."""
    inp = inputs(be, (7, 9), 33, 21, 3, 4, no_adapter=False)
    inp["bias"] = torch.randn(3 * 21, dtype=inp["x"].dtype, device=be.device)[::3].requires_grad_()
    check(be, inp)
    inp["bias"] = torch.randn(1, dtype=inp["x"].dtype, device=be.device).expand(21)
    check(be, inp)


@pytest.mark.parametrize("trained", [("C",), ("x",), ("bias", "A"), ("B", "C")], ids=str)
def test_only_requested_gradients(be, trained):
    inp = inputs(be, (23,), 33, 19, 3, 4)
    for name in ("x", "bias", "A", "B", "C"):
        inp[name].requires_grad_(name in trained)
    check(be, inp)


def test_empty_batch(be):
    check(be, inputs(be, (0,), 17, 9, 3, 2))
    check(be, inputs(be, (0, 4), 17, 9, 3, 2, form="sample"))


def test_no_input_features(be):
    check(be, inputs(be, (5,), 0, 9, 3, 2, no_adapter=False))  # d_in = 0: y is the bias
    check(be, inputs(be, (0,), 0, 9, 3, 2, no_adapter=False))


def test_rank_zero_gives_empty_factor_gradients(be):
    inp = inputs(be, (6,), 9, 7, 0, 3, no_adapter=False)
    check(be, inp)
    cp_linear(**inp, backend=be.name).sum().backward()
    assert [tuple(inp[k].grad.shape) for k in "ABC"] == [(7, 0), (9, 0), (3, 0)]


# ------------------------------------------------------------------------------------------------
# Task ids: -1 is no adapter, anything else outside [0, T) raises
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [2, 99, -2, 2 ** 40])
def test_bad_task_id_raises_naming_row_and_num_tasks(be, bad):
    inp = inputs(be, (5,), 6, 4, 3, 2, requires_grad=False)
    inp["task_ids"] = torch.tensor([0, 1, bad, -1, 1], device=be.device)
    with pytest.raises(IndexError, match=r"task_ids.*num_tasks=2.*row 2 has task id"):
        cp_linear(**inp, backend=be.name)
    inp["task_ids"] = inp["task_ids"].int() if abs(bad) < 2 ** 31 else inp["task_ids"]
    with pytest.raises(IndexError, match="row 2"):
        cp_linear(**inp, backend=be.name)


@pytest.mark.parametrize("bad", [2, -2, 2 ** 63, -(2 ** 70)])
def test_bad_int_task_id_raises(be, bad):
    inp = inputs(be, (5,), 6, 4, 3, 2, requires_grad=False)
    with pytest.raises(IndexError, match=rf"num_tasks=2.*task_ids={bad}"):
        cp_linear(**{**inp, "task_ids": bad}, backend=be.name)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("form", ["row", "sample"])
def test_task_ids_of_every_integer_width(be, dtype, form):
    """Any integer dtype, signed or unsigned, gives the result of the same ids in int64 (issue 21:
    uint16/32/64 raised "aminmax not implemented"); -1 only where the dtype can hold it."""
    inp = inputs(be, (4, 3), 17, 9, 3, 3, form=form, requires_grad=False, no_adapter=dtype.is_signed)
    want = cp_linear(**inp, scale=SCALE, backend=be.name)
    y = cp_linear(**{**inp, "task_ids": inp["task_ids"].to(dtype)}, scale=SCALE, backend=be.name)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    owned = cpkernels.task_ids.own(inp["task_ids"].to(dtype))
    torch.testing.assert_close(cp_linear(**{**inp, "task_ids": owned}, scale=SCALE, backend=be.name), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype,bad", [(torch.uint8, 3), (torch.uint16, 40000), (torch.uint32, 2 ** 32 - 1),
                                       (torch.uint64, 2 ** 64 - 1), (torch.uint64, 2 ** 63)])
def test_unsigned_ids_out_of_range_are_refused_not_read_as_minus_one(be, dtype, bad):
    """2**64 − 1 in uint64 has the bits of -1 in int64: it must be refused by value, never served as
    'no adapter' (nor may any id of 2**63 and above wrap)."""
    inp = inputs(be, (5,), 6, 4, 3, 3, requires_grad=False)
    ids = torch.tensor([0, 1, 2, 1, 0], dtype=torch.int64)
    as_dtype = ids.to(dtype)
    if dtype == torch.uint64:  # torch cannot make a uint64 tensor of 2**63 and above from a Python int
        as_dtype.view(torch.int64)[3] = bad - 2 ** 64 if bad >= 2 ** 63 else bad
    else:
        as_dtype[3] = bad
    for t in (as_dtype.to(be.device), as_dtype.to(be.device).view(5, 1)[:, 0]):
        with pytest.raises(IndexError, match=f"row 3 has task id {bad}"):
            cp_linear(**{**inp, "task_ids": t}, backend=be.name)
    with pytest.raises(IndexError, match=f"has task id {bad}"):
        cpkernels.task_ids.own(as_dtype.to(be.device)) if bad >= 2 ** 63 else cp_linear(
            **{**inp, "task_ids": cpkernels.task_ids.own(as_dtype.to(be.device))}, backend=be.name)


def test_minus_one_rows_are_the_base_layer(be):
    """Rows with id -1 get x·W0ᵀ + b and add nothing to dA, dB, dC: the factor gradients are those
    of the other rows alone."""
    inp = inputs(be, (29,), 33, 19, 3, 4)
    ids = inp["task_ids"]
    ids[::3] = -1
    keep = ids != -1
    grad_y = torch.randn(29, 19, device=be.device, dtype=torch.float64)
    y, g = run_with_grads(cp_linear, inp, grad_y, SCALE, backend=be.name)
    base = F.linear(inp["x"], inp["weight"], inp["bias"]).detach()
    assert_within_rule("y[-1 rows]", y[~keep], base[~keep].double(), base[~keep])
    only = dict(inp, x=inp["x"].detach()[keep].requires_grad_(), task_ids=ids[keep])
    y_k, g_k = run_with_grads(cp_linear_reference, _detached(only, F64), grad_y[keep], SCALE)
    _, g_same = run_with_grads(cp_linear_reference, only, grad_y[keep], SCALE)
    for name in ("A", "B", "C"):  # (the bias gradient sums every row, base rows included)
        assert_within_rule(f"grad {name}", g[name], g_k[name], g_same[name])


def test_int_ids_minus_one_is_plain_linear(be):
    inp = inputs(be, (7,), 13, 11, 3, 2, requires_grad=False)
    y = cp_linear(**{**inp, "task_ids": -1}, backend=be.name)
    base = F.linear(inp["x"], inp["weight"], inp["bias"])
    assert_within_rule("y", y, base.double(), base)


def test_inference_mode(be):
    """Serving: ids made inside torch.inference_mode have no version counter. (Owned ids: test_task_ids.)"""
    inp = inputs(be, (4, 3), 17, 9, 3, 3, form="sample", requires_grad=False, no_adapter=False)
    want = cp_linear_reference(**inp, scale=SCALE)
    with torch.inference_mode():
        ids = inp["task_ids"].clone()
        for _ in range(2):  # the second call is where a cache would look the tensor up
            y = cp_linear(**{**inp, "task_ids": ids}, scale=SCALE, backend=be.name)
            assert_within_rule("y", y, want.double(), want)


def test_ids_changed_behind_the_version_counter_are_seen(be):
    """A numpy-backed ids tensor edited through numpy, or written through .data, gets its new values."""
    if be.device != "cpu":
        pytest.skip("torch.from_numpy makes CPU tensors")
    inp = inputs(be, (6,), 9, 7, 3, 3, requires_grad=False)
    arr = np.array([0, 1, 2, 0, 1, 2])
    ids = torch.from_numpy(arr)
    cp_linear(**{**inp, "task_ids": ids}, backend=be.name)
    arr[:] = [2, 2, 1, 1, 0, 0]  # no version bump
    got = cp_linear(**{**inp, "task_ids": ids}, backend=be.name)
    torch.testing.assert_close(got, cp_linear_reference(**{**inp, "task_ids": torch.tensor(arr)}))
    ids.data[4] = 7
    with pytest.raises(IndexError, match="row 4 has task id 7"):
        cp_linear(**{**inp, "task_ids": ids}, backend=be.name)
    arr[4] = 9
    with pytest.raises(IndexError, match="row 4 has task id 9"):
        cp_linear(**{**inp, "task_ids": ids}, backend=be.name)


# ------------------------------------------------------------------------------------------------
# Autograd: gradcheck, double backward, forward mode, torch.func
# ------------------------------------------------------------------------------------------------
def _f64_args(be, T=3):
    inp = inputs(be, (6,), 5, 4, 3, T, dtype=F64, no_adapter=False)
    fixed = (inp["weight"], inp["task_ids"])
    args = tuple(inp[k] for k in ("x", "bias", "A", "B", "C"))

    def fn(x, bias, A, B, C):
        return cp_linear(x, fixed[0], bias, A, B, C, fixed[1], SCALE, backend=be.name)
    return fn, args


@pytest.mark.parametrize("be", FLOAT64, indirect=True)
def test_gradcheck_and_gradgradcheck_float64(be):
    fn, args = _f64_args(be)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_double_backward_matches_reference(be):
    """A gradient penalty: the gradients of |∂L/∂x|² + |∂L/∂C|² (create_graph=True), in the backend's dtype."""
    inp = inputs(be, (13,), 17, 11, 3, 4, no_adapter=False)
    names = ("x", "bias", "A", "B", "C")

    def penalty_grads(fn, tensors, **kw):
        t = _detached(tensors)
        y = fn(**t, scale=SCALE, **kw)
        gx, gC = torch.autograd.grad(y.square().sum(), [t["x"], t["C"]], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gC.square().sum(), [t[n] for n in names])

    got = penalty_grads(cp_linear, inp, backend=be.name)
    ref = penalty_grads(cp_linear_reference, _detached(inp, F64))
    same = penalty_grads(cp_linear_reference, inp)
    for name, g, r, s in zip(names, got, ref, same):
        assert_within_rule(f"second-order grad {name}", g, r, s)


def test_forward_mode_ad_and_torch_func(be):
    """jvp (forward_ad and torch.func), torch.func.grad, jacrev and vmap keep the tangent / batch."""
    import torch.autograd.forward_ad as fwAD

    inp = inputs(be, (6,), 5, 4, 3, 3, requires_grad=False, no_adapter=False)
    x, w, b, A, B, C, t = (inp[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids"))
    tx, tA = torch.randn_like(x), torch.randn_like(A)

    def f(fn, x, A):
        return fn(x, w, b, A, B, C, t, SCALE, **({"backend": be.name} if fn is cp_linear else {}))

    def close(got, want, what):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")

    want_y, want_t = torch.func.jvp(lambda x, A: f(cp_linear_reference, x, A), (x, A), (tx, tA))
    got_y, got_t = torch.func.jvp(lambda x, A: f(cp_linear, x, A), (x, A), (tx, tA))
    close(got_y, want_y, "jvp primal")
    close(got_t, want_t, "jvp tangent")
    with fwAD.dual_level():
        out = f(cp_linear, fwAD.make_dual(x, tx), fwAD.make_dual(A, tA))
        close(fwAD.unpack_dual(out).tangent, want_t, "forward_ad tangent")
    close(torch.func.grad(lambda A: f(cp_linear, x, A).square().sum())(A),
          torch.func.grad(lambda A: f(cp_linear_reference, x, A).square().sum())(A), "torch.func.grad")
    close(torch.func.jacrev(lambda A: f(cp_linear, x, A))(A),
          torch.func.jacrev(lambda A: f(cp_linear_reference, x, A))(A), "jacrev")
    xs = torch.randn(2, *x.shape, dtype=x.dtype, device=x.device)
    close(torch.vmap(lambda x: f(cp_linear, x, A))(xs), torch.stack([f(cp_linear_reference, xi, A) for xi in xs]),
          "vmap")


# ------------------------------------------------------------------------------------------------
# The registered ops, determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("be", KERNELS, indirect=True)
def test_opcheck(be):
    inp = inputs(be, (11,), 9, 7, 3, 3, requires_grad=False)
    fwd = getattr(torch.ops.cpkernels, f"{be.raw_op}_fwd").default
    bwd = getattr(torch.ops.cpkernels, f"{be.raw_op}_bwd").default
    # The interpreter runs kernels through numpy and cannot take FakeTensors: skip only the fake test.
    utils = {"test_utils": ("test_schema", "test_autograd_registration")} if be.small else {}
    x, w, b, A, B, C, t = (inp[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids"))
    for a in (x, A, B, C):
        a.requires_grad_(True)
    torch.library.opcheck(fwd, (x, w, b, A, B, C, t, SCALE), **utils)
    torch.library.opcheck(fwd, (x, w, None, A, B, C, t, SCALE), **utils)
    x, A, B, C = (a.detach() for a in (x, A, B, C))
    _, u = fwd(x, w, b, A, B, C, t, SCALE)
    gy = torch.randn(11, 7, device=be.device, dtype=x.dtype)
    for mask in ([True] * 5, [False, True, True, True, False], [True, False, True, False, True]):
        torch.library.opcheck(bwd, (gy, x, w, A, B, C, t, u, SCALE, mask), **utils)


def test_deterministic_bitwise(be):
    inp = inputs(be, (97,), 33, 19, 17, 5)
    grad_y = torch.randn(97, 19, device=be.device)
    with poisoned_memory():  # also turns deterministic algorithms on
        y1, g1 = run_with_grads(cp_linear, inp, grad_y, SCALE, backend=be.name)
        y2, g2 = run_with_grads(cp_linear, inp, grad_y, SCALE, backend=be.name)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


# ------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------------
def _examples(be: Backend) -> int:
    return 3 if be.small else 20  # the interpreter: a few examples (about 2 s each)


# derandomize: the same examples every run (reproducible CI); each test draws its own.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def test_property_permuting_rows(be):

    @settings(PROPERTY, max_examples=_examples(be))
    @given(M=st.integers(1, 24), d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 9),
           T=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
    def prop(M, d_in, d_out, r, T, seed):
        """Permuting the rows of (x, task_ids) permutes the output rows; weight gradients do not change."""
        gen = torch.Generator().manual_seed(seed)
        inp = make_inputs(M, d_in, d_out, r, T, device=be.device, dtype=be.dtypes[0], generator=gen)
        inp["task_ids"] = torch.randint(-1, T, (M,), generator=gen).to(be.device)
        perm = torch.randperm(M, generator=gen).to(be.device)
        grad_y = torch.randn(M, d_out, generator=gen, dtype=torch.float64).to(be.device)
        y, g = run_with_grads(cp_linear, inp, grad_y, SCALE, backend=be.name)
        permuted = dict(inp, x=inp["x"].detach()[perm].requires_grad_(), task_ids=inp["task_ids"][perm])
        y_p, g_p = run_with_grads(cp_linear, permuted, grad_y[perm], SCALE, backend=be.name)
        tol = dict(rtol=1e-4, atol=1e-5)  # fp32; only the summation order may differ
        torch.testing.assert_close(y_p, y[perm], **tol)
        torch.testing.assert_close(g_p["x"], g["x"][perm], **tol)
        for name in ("A", "B", "C", "bias"):
            torch.testing.assert_close(g_p[name], g[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")

    prop()


def test_property_minus_one_rows_equal_linear(be):

    @settings(PROPERTY, max_examples=_examples(be))
    @given(M=st.integers(1, 24), d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 9),
           T=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
    def prop(M, d_in, d_out, r, T, bias, seed):
        gen = torch.Generator().manual_seed(seed)
        inp = make_inputs(M, d_in, d_out, r, T, device=be.device, dtype=be.dtypes[0], bias=bias, generator=gen,
                          requires_grad=False)
        inp["task_ids"] = torch.randint(-1, T, (M,), generator=gen).to(be.device)
        rows = inp["task_ids"] == -1
        y = cp_linear(**inp, scale=SCALE, backend=be.name)
        torch.testing.assert_close(y[rows], F.linear(inp["x"], inp["weight"], inp["bias"])[rows],
                                   rtol=1e-5, atol=1e-6)

    prop()


def test_property_id_form_does_not_matter(be):

    @settings(PROPERTY, max_examples=_examples(be))
    @given(batch=st.integers(1, 5), seq=st.integers(1, 5), d=st.integers(1, 16), r=st.integers(1, 9),
           T=st.integers(1, 4), seed=st.integers(0, 2 ** 16), single=st.booleans())
    def prop(batch, seq, d, r, T, seed, single):
        """int, per-sample and per-row ids that say the same thing give the same results."""
        gen = torch.Generator().manual_seed(seed)
        inp = make_inputs(0, d, d + 1, r, T, device=be.device, dtype=be.dtypes[0], generator=gen,
                          per_sample_shape=(batch, seq))
        task = int(torch.randint(-1, T, (), generator=gen))
        per_sample = (torch.full((batch,), task) if single else torch.randint(-1, T, (batch,), generator=gen))
        per_sample = per_sample.to(be.device)
        forms = [per_sample, per_sample[:, None].expand(batch, seq).contiguous(), per_sample.int()]
        if single:
            forms.append(task)
        grad_y = torch.randn(batch, seq, d + 1, generator=gen, dtype=torch.float64).to(be.device)
        results = [run_with_grads(cp_linear, dict(inp, task_ids=ids), grad_y, SCALE, backend=be.name)
                   for ids in forms]
        # Bitwise on the CPU; on a GPU the autotuner may key its choice on the ids' dtype, and another
        # tile changes the summation order, so there only to fp32 rounding.
        same = torch.equal if be.device == "cpu" else functools.partial(torch.allclose, rtol=1e-5, atol=1e-6)
        (y0, g0), rest = results[0], results[1:]
        for y, g in rest:
            assert same(y, y0)
            for name in g0:
                assert same(g[name], g0[name]), name

    prop()

"""Triton launchers called directly (no ops.py in between), under TRITON_INTERPRET=1 on a CPU.

What the op layer might normalise away (a strided bias, bad task ids) must still be right in the
kernels; the TMA kernel and the fp32 cuBLAS route are checked here against float64 arithmetic.
Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 before any test module imports triton.
"""
import pytest
import torch

pytest.importorskip("triton")

from cpkernels._triton import backward, common, forward  # noqa: E402
from cpkernels.reference import cp_linear_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 5
SCALE = 0.7


def _operands(M, K, N, R, dtype, *, w_is_nk=True, bias="strided", seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype).to(DEVICE)  # noqa
    a = rnd(M, K)
    W = rnd(N, K, std=K ** -0.5)
    w = W.t() if w_is_nk else W.t().contiguous()  # the forward's W0ᵀ view, or a (K × N) row-major w
    p, q, C = rnd(K, R, std=K ** -0.5), rnd(N, R, std=R ** -0.5), rnd(T, R)
    # Every kind of id: valid, -1 ("no adapter"), T and beyond (masked when called directly).
    t = torch.randint(-1, T + 2, (M,), generator=g).to(DEVICE)
    t[:3] = torch.tensor([-1, T, T - 1])
    if bias == "strided":
        b = rnd(3 * N)[::3]
    elif bias == "expanded":
        b = rnd(1).expand(N)
    else:
        b = None
    return a, w, p, q, C, t, b


def _expected(a, w, p, q, C, t, b):
    """out and proj in float64, with rows whose id is outside [0, T) getting no low-rank term."""
    a, w, p, q = (x.double().cpu() for x in (a, w, p, q))
    t = t.cpu()
    ok = ((t >= 0) & (t < T)).double()[:, None]
    c = C.double().cpu()[t.clamp(0, T - 1)] * ok
    proj = a @ p
    out = a @ w + SCALE * (proj * c) @ q.t()
    if b is not None:
        out = out + b.double().cpu()
    return out, proj


def _run_gemm(ops, dtype, shrink_pass, tma, split_k=None):
    a, w, p, q, C, t, b = ops
    M, N, R = a.shape[0], w.shape[1], p.shape[1]
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    proj = torch.full((M, R), float("nan"), dtype=torch.float32, device=DEVICE)
    if shrink_pass:
        forward.shrink(a, p, proj)
    forward.lowrank_gemm(a, w, p, q, C, t, b, out, proj, SCALE, shrink_pass=shrink_pass, tma=tma, split_k=split_k)
    return out, proj


# fp32 (ieee) under the interpreter: its tl.dot is exact enough to compare with 1e-5.
@pytest.mark.parametrize("bias", ["strided", "expanded", None])
@pytest.mark.parametrize("tma", [False, True])
def test_gemm_honours_the_bias_stride(bias, tma):
    ops = _operands(70, 48, 96, 3, torch.float32, bias=bias)
    out, proj = _run_gemm(ops, torch.float32, False, tma)
    want_out, want_proj = _expected(*ops)
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.double().cpu(), want_proj, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,K,N,R,shrink_pass,w_is_nk", [
    (97, 64, 80, 3, False, True),     # forward layout, in-loop projection, edge tiles in M and N
    (70, 48, 96, 17, True, False),    # dX layout (w row-major), shrink pass, K not a tile multiple
    (33, 32, 64, 70, True, True),     # r > 64: two rank chunks in the epilogue
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_kernel_under_the_interpreter(M, K, N, R, shrink_pass, w_is_nk, dtype):
    """The TMA kernel, forced: tensor-descriptor loads with zero-filled edges, the clipped TMA
    store, the persistent loop (3 programs walk every tile), both w layouts, both rank paths."""
    ops = _operands(M, K, N, R, dtype, w_is_nk=w_is_nk)
    out, proj = _run_gemm(ops, dtype, shrink_pass, True)
    want_out, want_proj = _expected(*ops)
    # fp16: inputs exact in fp16, products summed in fp32, output rounded to fp16 (2⁻¹¹ relative).
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=tol, atol=tol)
    if not shrink_pass:
        torch.testing.assert_close(proj.double().cpu(), want_proj, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,K,N,R,shrink_pass,split_k", [
    (7, 130, 59, 3, False, 3),   # decode: odd sizes, K split into 3 ranges of whole K steps
    (40, 97, 64, 17, True, 2),   # rows over two row blocks, shrink pass
    (16, 64, 96, 70, True, 4),   # r > 64 in the epilogue's rank chunks; 2 K steps → only 2 splits
])
def test_split_k_decode_under_the_interpreter(M, K, N, R, shrink_pass, split_k):
    """The decode path: partials per K range summed in split order, then the rank-r term and bias."""
    ops = _operands(M, K, N, R, torch.float32, w_is_nk=True)
    out, proj = _run_gemm(ops, torch.float32, shrink_pass, False, split_k)
    want_out, want_proj = _expected(*ops)
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.double().cpu(), want_proj, rtol=1e-5, atol=1e-5)
    again, _ = _run_gemm(ops, torch.float32, shrink_pass, False, split_k)
    assert torch.equal(out, again)  # a fixed summation order: the same bits


def test_split_count_fills_the_sms():
    # decode at d = 4096 on 132 SMs: 64 column tiles → 5 splits, ≥ 264 programs
    assert forward._split_count(16, 4096, 4096, 132, 16) * 64 >= 2 * 132
    assert forward._split_count(16, 4096, 200, 132, 16) == 1  # K too short to split
    assert forward._split_count(64, 32768, 4096, 132, 64) == 1  # 512 column tiles already fill it


def test_tma_refuses_operands_it_cannot_describe():
    a, w, p, q, C, t, b = _operands(40, 59, 32, 3, torch.float32)  # K = 59: rows not 16-byte aligned
    out = torch.empty(40, 32, device=DEVICE)
    proj = torch.empty(40, 3, device=DEVICE)
    with pytest.raises(ValueError, match="16-byte aligned"):
        forward.lowrank_gemm(a, w, p, q, C, t, b, out, proj, SCALE, shrink_pass=False, tma=True)


def test_automatic_choice_takes_tma_only_where_it_applies():
    meta = lambda *s, dt=torch.bfloat16: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
    a, W, out = meta(8192, 4096), meta(4096, 4096), meta(8192, 4096)
    assert forward._wants_tma(a, W.t(), out, 8192)
    assert not forward._wants_tma(meta(16, 4096), W.t(), meta(16, 4096), 16)  # decode: pointer kernel
    assert not forward._wants_tma(meta(8192, 59), meta(4096, 59).t(), out, 8192)  # unaligned rows
    assert not forward._wants_tma(meta(8192, 4096, dt=torch.float32), meta(4096, 4096, dt=torch.float32).t(),
                                  meta(8192, 4096, dt=torch.float32), 8192)  # tf32: pointer kernel
    old = common.TARGET_ARCH
    common.TARGET_ARCH = 80
    try:
        assert not forward._wants_tma(a, W.t(), out, 8192)  # sm_80 has no TMA
    finally:
        common.TARGET_ARCH = old


# ------------------------------------------------------------------------------------------------
# fp32 without tf32 on a GPU: torch (cuBLAS) does the op; same masking of bad ids
# ------------------------------------------------------------------------------------------------
def test_cublas_route_matches_reference_with_bad_ids():
    """_cublas_fwd/_cublas_bwd are plain torch: checked on CPU tensors against the float64
    reference in which every bad id points at an extra zero row of C."""
    M, d_in, d_out, r = 97, 59, 64, 3
    g = torch.Generator().manual_seed(1)
    x, W, bias = torch.randn(M, d_in, generator=g), torch.randn(d_out, d_in, generator=g) / 8, torch.randn(d_out,
                                                                                                            generator=g)
    A, B, C = torch.randn(d_out, r, generator=g), torch.randn(d_in, r, generator=g) / 8, torch.randn(T, r, generator=g)
    t = torch.randint(0, T, (M,), generator=g)
    t[[0, 5, 50, 96]] = torch.tensor([-1, T, 10 ** 6, -(10 ** 6)])
    gy = torch.randn(M, d_out, generator=g)
    y, u = forward._cublas_fwd(x, W, bias, A, B, C, t, SCALE)
    grads = backward._cublas_bwd(gy, x, W, A, B, C, t, u, SCALE, (True,) * 5)

    C_ext = torch.cat([C, torch.zeros(1, r)]).double().requires_grad_()
    t_ref = torch.where((t < 0) | (t >= T), T, t)
    leaves = [v.double().requires_grad_() for v in (x, W, bias, A, B)]
    y64 = cp_linear_reference(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], C_ext, t_ref, SCALE)
    want = torch.autograd.grad(y64, [leaves[0], leaves[3], leaves[4], C_ext, leaves[2]], gy.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-4, atol=1e-4)
    for name, got, exp in zip(("dx", "dA", "dB", "dC", "db"), grads, want):
        exp = exp[:T] if name == "dC" else exp
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------
# Autotuning and CUDA-graph capture
# ------------------------------------------------------------------------------------------------
def test_capture_never_autotunes_an_untuned_key(monkeypatch):
    """Inside a capture, a key never tuned outside it launches the fixed config (no benchmarking);
    once tuned outside, the capture launches the autotuner (which then only reads its cache)."""
    seen = []
    meta = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    x, W, b = meta(4096, 1024), meta(768, 1024), meta(768)
    A, B, C = meta(768, 16), meta(1024, 16), meta(8, 16)
    t = torch.empty(4096, device="meta", dtype=torch.int64)
    monkeypatch.setattr(forward, "_wants_tma", lambda *a: False)
    common._tuned_keys.clear()

    def run(capturing: bool):
        monkeypatch.setattr(common, "capturing", lambda: capturing)
        seen.clear()
        with common.recording(lambda kernel, grid, args, kw: seen.append(kernel)):
            forward.cp_linear_fwd(x, W, b, A, B, C, t, SCALE)
        return seen[-1]

    with pytest.warns(UserWarning, match="CUDA-graph capture"):
        assert run(True) is forward._lowrank_gemm_kernel  # untuned: the fixed config
    assert run(False) is forward._TUNED[False, 2, True]  # outside capture: the autotuner
    assert not common._tuned_keys  # recording is not tuning: the key stays untuned


def test_autotune_key_holds_precision_and_bias():
    """tf32 and ieee (or with and without bias) must not share a tuned config: different kernels."""
    for tuned in forward._TUNED.values():
        assert {"PRECISION", "HAS_BIAS", "SHRINK_PASS", "R_BLOCK", "M_BUCKET"} <= set(tuned.keys)


def test_host_integer_helpers_match_triton():
    """common.cdiv / next_power_of_2 replace triton's constexpr functions on the host (2-4 µs a call there):
    they must give the same grids and blocks."""
    import triton

    from cpkernels._triton.common import cdiv, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))

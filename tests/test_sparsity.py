"""cpkernels.sparsity: penalties, proximal steps and pruning, against independent float64 formulas."""
import copy

import pytest
import torch
from torch import nn

from cpkernels import sparsity
from cpkernels.convert import convert, cp_layers, merge, parameter_report, task_context


def random_model(dims=(13, 11, 9, 5), rank=5, num_tasks=4, scale=0.7, dtype=torch.float64):
    """A converted MLP with fresh random factors (never zeros; C too, unlike init="cp")."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
        layers += [nn.Linear(d_in, d_out, bias=i % 2 == 0), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    convert(model, rank, num_tasks, scale=scale, task_names=[f"t{i}" for i in range(num_tasks)])
    with torch.no_grad():
        for _, m in cp_layers(model):
            m.A.normal_()
            m.B.normal_(std=m.in_features ** -0.5)
            m.C.normal_()
    return model


def forward(model, x, task_ids):
    with task_context(model, task_ids):
        return model(x)


def factors(model):
    return [(m.A, m.B, m.C) for _, m in cp_layers(model)]


# --------------------------------------------------------------------------------------------
# penalty
# --------------------------------------------------------------------------------------------
def materialised_penalty(model, kind):
    """Norms of the materialised rank-1 tensors a_k∘b_k∘c_k (group) or of each slice c_tk·a_k b_kᵀ (l1)."""
    total = 0
    for A, B, C in factors(model):
        for k in range(A.shape[1]):
            if kind == "group":
                total = total + torch.einsum("i,j,t->ijt", A[:, k], B[:, k], C[:, k]).norm()
            else:
                total = total + sum((C[t, k] * torch.outer(A[:, k], B[:, k])).norm() for t in range(C.shape[0]))
    return total


@pytest.mark.parametrize("kind", sparsity.KINDS)
def test_penalty_value_and_gradient_match_materialised_formula(kind):
    model = random_model(rank=3)
    params = [p for f in factors(model) for p in f]
    got = sparsity.penalty(model, kind)
    want = materialised_penalty(model, kind)
    assert got.dim() == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    g_got = torch.autograd.grad(got, params)
    g_want = torch.autograd.grad(want, params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _Penalty(nn.Module):
    """penalty(model) as a module's forward, so torch.func.functional_call can feed it plain tensors."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self):
        return sparsity.penalty(self.model, self.kind)


@pytest.mark.parametrize("kind", sparsity.KINDS)
def test_penalty_gradcheck_and_scale_invariance(kind):
    module = _Penalty(random_model(dims=(6, 4), rank=3, num_tasks=2), kind)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names == ["model.0.A", "model.0.B", "model.0.C"]

    def pen(A, B, C):
        return torch.func.functional_call(module, dict(zip(names, (A, B, C))), ())

    A0, B0, C0 = (module.get_parameter(n).detach().clone() for n in names)
    assert torch.autograd.gradcheck(pen, tuple(t.clone().requires_grad_(True) for t in (A0, B0, C0)))
    # Moving scale between the factors of a component changes nothing: (αa_k, βb_k, c_k/(αβ)).
    alpha = torch.tensor([2.0, 0.3, 5.0], dtype=A0.dtype)
    beta = torch.tensor([0.1, 7.0, 1.5], dtype=A0.dtype)
    torch.testing.assert_close(pen(A0 * alpha, B0 * beta, C0 / (alpha * beta)), pen(A0, B0, C0), rtol=1e-12, atol=0)


def test_penalty_at_zero_components_has_finite_gradient():
    model = random_model()
    model_cp = nn.Sequential(nn.Linear(5, 4)).double()
    convert(model_cp, 3, 2)  # init="cp": C = 0, every component is zero
    for m in (model, model_cp):
        with torch.no_grad():
            next(iter(cp_layers(m)))[1].C[:, 0] = 0
        for kind in sparsity.KINDS:
            params = [p for f in factors(m) for p in f]
            grads = torch.autograd.grad(sparsity.penalty(m, kind), params)
            assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------
# proximal_step
# --------------------------------------------------------------------------------------------
def test_proximal_group_zeroes_exactly_the_small_components_and_shrinks_the_rest():
    model = random_model(rank=6)
    old = [tuple(p.detach().clone() for p in f) for f in factors(model)]
    # The group threshold on ‖c_k‖ is strength·w_k with w_k = ‖a_k‖·‖b_k‖.
    ratio = torch.cat([C.norm(dim=0) / (A.norm(dim=0) * B.norm(dim=0)) for A, B, C in old])
    strength = ratio.median().item()  # about half the components fall under it
    sparsity.proximal_step(model, strength)
    n_zero = 0
    for (A, B, C), (A0, B0, C0) in zip(factors(model), old):
        assert torch.equal(A, A0) and torch.equal(B, B0), "the shrink belongs on C only"
        tau = strength * A0.norm(dim=0) * B0.norm(dim=0)
        dead = C0.norm(dim=0) <= tau
        n_zero += int(dead.sum())
        assert torch.equal(C[:, dead], torch.zeros_like(C[:, dead]))
        live = ~dead
        torch.testing.assert_close(C.norm(dim=0)[live], C0.norm(dim=0)[live] - tau[live], rtol=1e-12, atol=1e-14)
        # Same direction: c_k is only rescaled.
        torch.testing.assert_close(C[:, live] / C.norm(dim=0)[live], C0[:, live] / C0.norm(dim=0)[live],
                                   rtol=1e-12, atol=1e-14)
    assert 0 < n_zero < ratio.numel()


def test_proximal_l1_soft_thresholds_each_entry_of_C():
    model = random_model(rank=4)
    old = [tuple(p.detach().clone() for p in f) for f in factors(model)]
    ratio = torch.cat([(C.abs() / (A.norm(dim=0) * B.norm(dim=0))).flatten() for A, B, C in old])
    strength = ratio.quantile(0.3).item()
    sparsity.proximal_step(model, strength, kind="l1")
    n_zero = 0
    for (A, B, C), (A0, B0, C0) in zip(factors(model), old):
        assert torch.equal(A, A0) and torch.equal(B, B0)
        tau = strength * A0.norm(dim=0) * B0.norm(dim=0)
        dead = C0.abs() <= tau
        n_zero += int(dead.sum())
        assert (C[dead] == 0).all()
        torch.testing.assert_close(C[~dead], (C0.sign() * (C0.abs() - tau))[~dead], rtol=1e-12, atol=1e-15)
    assert 0 < n_zero < ratio.numel()


def test_proximal_zero_strength_changes_nothing_and_zero_columns_stay_finite():
    model = random_model()
    (_, m), *_ = cp_layers(model)
    with torch.no_grad():
        m.A[:, 1] = 0  # w_1 = 0: a zero component; its threshold is 0
    old = [p.detach().clone() for f in factors(model) for p in f]
    sparsity.proximal_step(model, 0.0)
    assert all(torch.equal(p, q) for p, q in zip((p for f in factors(model) for p in f), old))
    for kind in sparsity.KINDS:
        sparsity.proximal_step(model, 1e-3, kind=kind)
        assert all(torch.isfinite(p).all() for f in factors(model) for p in f)


@pytest.mark.parametrize("kind", sparsity.KINDS)
def test_proximal_gradient_converges_to_the_penalised_optimum(kind):
    """With A, B frozen the problem in C is convex: loss + lam·penalty. Proximal gradient through the
    real forward/backward (lr = 1/Lipschitz) must reach its optimality conditions:
    zero groups have ‖∂L/∂c‖ ≤ lam·w, live ones ∂L/∂c + lam·w·c/‖c‖ = 0 (per entry for l1)."""
    d_in, d_out, T, r, M, s = 16, 12, 3, 4, 192, 0.7  # d >> r and M >> d: well conditioned, fast ISTA
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    convert(model, r, T, scale=s)
    (_, m), = cp_layers(model)
    with torch.no_grad():
        m.A.normal_()
        m.B.normal_()
    m.A.requires_grad_(False)
    m.B.requires_grad_(False)
    A, B = m.A.detach(), m.B.detach()
    w = A.norm(dim=0) * B.norm(dim=0)
    x = torch.randn(M, d_in, dtype=torch.float64)
    t = torch.arange(M) % T
    target = torch.randn(M, d_out, dtype=torch.float64)

    def grad_C():
        loss = 0.5 * (forward(model, x, t) - target).pow(2).sum(-1).mean()
        return torch.autograd.grad(loss, m.C)[0]

    # The loss is quadratic in c_t with Hessian s²·((BᵀX_tᵀX_tB) ⊙ (AᵀA))/M.
    lipschitz = max(torch.linalg.eigvalsh(s ** 2 * ((B.T @ x[t == k].T @ x[t == k] @ B) * (A.T @ A)) / M).max()
                    for k in range(T))
    lr = 1 / lipschitz.item()
    g0 = grad_C()  # at C = 0 (init="cp"): every group is zero for lam >= lam_max
    lam_max = ((g0.norm(dim=0) if kind == "group" else g0.abs()) / w).max().item()
    lam = 0.75 * lam_max  # leaves a mix of zero and live groups (checked over 30 seeds)
    for _ in range(300):  # plain ISTA; measured to reach the optimum to ~1e-15 well before
        g = grad_C()
        with torch.no_grad():
            m.C -= lr * g
        sparsity.proximal_step(model, lr * lam, kind)
    g, C = grad_C(), m.C.detach()
    if kind == "group":
        zero = C.norm(dim=0) == 0
        assert (g[:, zero].norm(dim=0) <= lam * w[zero] * (1 + 1e-9)).all()
        torch.testing.assert_close(g[:, ~zero], -lam * w[~zero] * C[:, ~zero] / C[:, ~zero].norm(dim=0),
                                   rtol=0, atol=1e-10)
    else:
        zero = C == 0
        assert (g.abs() <= lam * w * (1 + 1e-9))[zero].all()
        torch.testing.assert_close(g[~zero], (-lam * w * C.sign())[~zero], rtol=0, atol=1e-10)
    assert zero.any() and not zero.all(), "lam should leave some groups zero and some alive"


# --------------------------------------------------------------------------------------------
# prune and the compression report
# --------------------------------------------------------------------------------------------
def test_prune_keeps_the_output_and_shrinks_ranks_per_layer():
    model = random_model(dims=(59, 97, 13, 7), rank=5, num_tasks=3)
    (n0, l0), (n1, l1), (n2, l2) = cp_layers(model)
    with torch.no_grad():
        l0.C[:, 1] = 0   # dead through C
        l0.A[:, 3] = 0   # dead through A
        l1.C.zero_()     # the whole layer: rank 0
        l2.B[:, 4] *= 1e-12  # norm far under the default tol
    x = torch.randn(2, 17, 59, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 17))  # mixed tasks, one per token
    y_before = forward(model, x, t)
    report = sparsity.prune(model)
    assert [m.rank for _, m in cp_layers(model)] == [3, 0, 4]
    torch.testing.assert_close(forward(model, x, t), y_before, rtol=1e-12, atol=1e-12)

    assert {n: (v["rank_before"], v["rank_after"]) for n, v in report["layers"].items()} == \
        {n0: (5, 3), n1: (5, 0), n2: (5, 4)}
    for name, m in cp_layers(model):
        v = report["layers"][name]
        assert v["params_after"] == m.rank * (m.in_features + m.out_features + m.num_tasks)
        assert v["params_before"] == 5 * (m.in_features + m.out_features + m.num_tasks)
    assert report["before"]["per_task"] == 15 and report["after"]["per_task"] == 7
    pr = parameter_report(model)
    for key in ("per_task", "percent_per_task", "shared_trainable", "amortized_per_task", "base_parameters"):
        assert report["after"][key] == pytest.approx(pr[key]), key
    assert report["after"]["params"] == sum(p.numel() for f in factors(model) for p in f)
    # The pruned model still trains and penalises (rank-0 layers included).
    assert sparsity.penalty(model).item() > 0
    sparsity.proximal_step(model, 1e-3)
    forward(model, x, t).sum().backward()
    assert model[0].A.grad.shape == (97, 3)


def test_prune_tol_and_prune_factors_agree():
    model = random_model()
    norms = sparsity.component_norms(model)
    tol = torch.cat([v.detach() for v in norms.values()]).quantile(0.4).item()
    factor_dict = {n: {k: getattr(m, k).detach().clone() for k in "ABC"} for n, m in cp_layers(model)}
    pruned, report_f = sparsity.prune_factors(factor_dict, tol, base_parameters=1000)
    report_m = sparsity.prune(model, tol)
    assert {n: v["rank_after"] for n, v in report_f["layers"].items()} == \
        {n: m.rank for n, m in cp_layers(model)} == {n: int((v > tol).sum()) for n, v in norms.items()}
    for name, m in cp_layers(model):
        assert factor_dict[name]["A"].shape[1] == 5, "prune_factors must not modify its input"
        for k in "ABC":
            assert torch.equal(pruned[name][k], getattr(m, k).detach())
    assert report_f["after"]["percent_per_task"] == pytest.approx(100 * report_m["after"]["per_task"] / 1000)


def test_compression_report_counts_trained_biases_like_parameter_report():
    model = random_model()
    model[0].bias.requires_grad_(True)
    rep, pr = sparsity.compression_report(model), parameter_report(model)
    for key in ("per_task", "shared_trainable", "amortized_per_task", "base_parameters", "num_tasks"):
        assert rep[key] == pytest.approx(pr[key]), key


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_bad_input_errors():
    model = random_model()
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength"):
            sparsity.proximal_step(model, bad)
    with pytest.raises(TypeError, match="strength"):
        sparsity.proximal_step(model, "0.1")
    with pytest.raises(ValueError, match="tol"):
        sparsity.prune(model, tol=-1)
    for fn in (sparsity.penalty, sparsity.proximal_step):
        with pytest.raises(ValueError, match="kind"):
            fn(model, *((0.1,) if fn is sparsity.proximal_step else ()), kind="l2")
    plain = nn.Sequential(nn.Linear(3, 3))
    for call in (lambda: sparsity.penalty(plain), lambda: sparsity.proximal_step(plain, 0.1),
                 lambda: sparsity.prune(plain)):
        with pytest.raises(ValueError, match="no FusedCPLinear"):
            call()
    with pytest.raises(TypeError, match="nn.Module"):
        sparsity.penalty([plain])
    merge(model, 1)
    for call in (lambda: sparsity.proximal_step(model, 0.1), lambda: sparsity.prune(model)):
        with pytest.raises(ValueError, match="merged task 1"):
            call()
    with pytest.raises(ValueError, match="missing factor"):
        sparsity.penalty({"layer": {"A": torch.ones(2, 1)}})
    with pytest.raises(ValueError, match="ranks differ"):
        sparsity.prune_factors({"l": {"A": torch.ones(3, 2), "B": torch.ones(4, 1), "C": torch.ones(2, 2)}})


# --------------------------------------------------------------------------------------------
# NaN is never hidden (issue 11, item 10)
# --------------------------------------------------------------------------------------------
def test_prune_and_proximal_step_refuse_nan_components():
    """A NaN component used to count as dead (NaN > tol is False) and vanish, leaving clean factors."""
    for poison in ("C", "A"):
        model = random_model()
        name, layer = list(cp_layers(model))[1]
        with torch.no_grad():
            getattr(layer, poison)[0, 2] = float("nan")
        for call in (lambda: sparsity.prune(model), lambda: sparsity.proximal_step(model, 0.1),
                     lambda: sparsity.prune_factors(sparsity.layer_factors(model))):
            with pytest.raises(ValueError, match=rf"layer {name!r}: the norms of components \[2\] are NaN"):
                call()
        assert layer.rank == 5 and torch.isnan(getattr(layer, poison)[0, 2])  # nothing was changed
    # An infinite component is not dead either: it stays (and its NaN-free norm says so).
    model = random_model()
    _, layer = list(cp_layers(model))[0]
    with torch.no_grad():
        layer.C[1, 3] = float("inf")
    sparsity.prune(model)
    assert layer.rank == 5


# --------------------------------------------------------------------------------------------
# compress: truncated CP decomposition (e.g. after from_lora)
# --------------------------------------------------------------------------------------------
def stacked_updates(model):
    """{layer: (T, d_out·d_in)} of materialised ΔW_t in float64 (the independent check)."""
    return {name: torch.stack([m.delta_weight(t, torch.float64).flatten() for t in range(m.num_tasks)])
            for name, m in cp_layers(model)}


def test_compress_recovers_a_redundant_decomposition_exactly():
    """Rank 2 written as rank 4 (each component split in two): compressing to 2 loses nothing."""
    model = random_model(rank=2)
    for _, m in cp_layers(model):
        m.set_factors(torch.cat([m.A, m.A], 1), torch.cat([m.B, m.B], 1), torch.cat([0.3 * m.C, 0.7 * m.C], 1))
    x, ids = torch.randn(7, 13, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 1, 2])
    before = forward(model, x, ids)
    report = sparsity.compress(model, 2)
    assert all(m.rank == 2 for _, m in cp_layers(model)) and report["relative_error"] < 1e-6
    torch.testing.assert_close(forward(model, x, ids), before, atol=1e-8, rtol=0)


def test_compress_reports_the_true_error_and_beats_pruning():
    model = random_model(rank=5)
    exact = stacked_updates(model)
    pruned_only = sparsity.compress(copy.deepcopy(model), 2, iters=0)  # the 2 strongest components
    report = sparsity.compress(model, 2)
    fitted = stacked_updates(model)
    num = sum(float((exact[n] - fitted[n]).norm() ** 2) for n in exact)
    den = sum(float(exact[n].norm() ** 2) for n in exact)
    assert report["relative_error"] == pytest.approx((num / den) ** 0.5, rel=1e-6)
    for name in exact:
        err = float((exact[name] - fitted[name]).norm() / exact[name].norm())
        assert report["layers"][name]["relative_error"] == pytest.approx(err, rel=1e-6)
        assert report["layers"][name]["relative_error"] <= pruned_only["layers"][name]["relative_error"] + 1e-12
    assert 0 < report["relative_error"] < pruned_only["relative_error"]
    assert sparsity.compress(model, 3)["relative_error"] == 0.0  # already at rank 2 <= 3: unchanged
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        sparsity.compress(model, 0)

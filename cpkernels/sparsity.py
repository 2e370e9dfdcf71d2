"""Rank selection by sparsity: a penalty over CP components, its proximal step, and rank pruning.

One adapted layer holds the update tensor ΔW (d_out × d_in × T) as a sum of r rank-1 components,

    ΔW[:, :, t] = s · Σ_k C[t, k] · A[:, k] B[:, k]ᵀ,      component k = a_k ∘ b_k ∘ c_k,

where a_k = A[:, k], b_k = B[:, k], c_k = C[:, k]. Driving whole components to zero lowers the
layer's rank; `prune` then removes them, so each task keeps fewer parameters.

**Scale invariance.** (α·a_k, β·b_k, c_k/(αβ)) is the same component, so a penalty on one factor
alone (say ‖c_k‖) measures the parametrisation, not the model: the optimiser lowers it by growing
a_k and b_k while nothing changes. Every penalty here is therefore a norm of the component tensor
itself, which does not depend on how the scale is split:

* ``kind="group"`` (default): the group lasso over components, Σ_k ‖a_k∘b_k∘c_k‖_F
  = Σ_k ‖a_k‖·‖b_k‖·‖c_k‖. It zeroes whole components, i.e. selects each layer's rank.
* ``kind="l1"``: L1 over the per-task slices, Σ_{t,k} ‖a_k‖·‖b_k‖·|C[t, k]|. This is the L1 norm of
  C once A and B are column-normalised; it zeroes single entries of C (task-specific sparsity: a
  task stops using a shared component) and a whole component once no task uses it.

We weight by the column norms instead of keeping A and B column-normalised because renormalising
after every step would rescale parameters behind the optimiser's back (Adam's moments would no
longer match them). The fixed scale s is left out: it is one constant per layer.

Two ways to train with it (use one, not both):

* add ``lam * penalty(model)`` to the loss (plain subgradient: small, but never exactly zero);
* or call ``proximal_step(model, lr * lam)`` after each ``optimizer.step()`` (proximal gradient:
  components under the threshold become exactly zero). The step shrinks C, the factor that carries
  each task's scale; with A and B held fixed it is the exact prox of ``lr * lam * penalty`` (a
  weighted group lasso / L1 on C), so plain SGD + proximal_step converges to the penalised optimum
  in C (tested). A zeroed component keeps a_k and b_k and grows back while its gradient beats the
  threshold. With init="cp" every component starts at zero, so begin the proximal steps after a
  warm-up (or with a small lam); with Adam, whose steps are not proportional to the gradient, the
  threshold is a heuristic: tune lam on a validation set.

After training, ``prune(model)`` drops the dead components and returns a report.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .factors import LayerFactors, adapter_counts, as_factors, converted_layers, model_factors, parameter_report

__all__ = ["KINDS", "penalty", "proximal_step", "prune", "prune_factors", "compress", "component_norms",
           "layer_factors", "compression_report"]

#: The penalties `penalty` and `proximal_step` know.
KINDS = ("group", "l1")

#: The factors of every layer, ``{name: LayerFactors}`` (see `cpkernels.factors.as_factors`).
layer_factors = as_factors


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # Norms of bf16/fp16 factors are accumulated in fp32; fp64 stays fp64 (tests).
    return torch.promote_types(t.dtype, torch.float32)


def _column_scale(f: LayerFactors) -> torch.Tensor:
    """w_k = ‖a_k‖·‖b_k‖ for every component k, shape (r,); differentiable."""
    dt = _acc_dtype(f.A)
    return torch.linalg.vector_norm(f.A, dim=0, dtype=dt) * torch.linalg.vector_norm(f.B, dim=0, dtype=dt)


def _component_norm(f: LayerFactors) -> torch.Tensor:
    """‖a_k‖·‖b_k‖·‖c_k‖ for every component k of one layer, shape (r,); differentiable."""
    return _column_scale(f) * torch.linalg.vector_norm(f.C, dim=0, dtype=_acc_dtype(f.A))


def _check_no_nan(f: LayerFactors, norms: torch.Tensor) -> None:
    """Refuse NaN components: a comparison with NaN is False, so one would silently count as dead
    (dropped by prune, zeroed by proximal_step) and leave clean-looking factors behind."""
    bad = torch.isnan(norms).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"layer {f.name!r}: the norms of components {bad} are NaN (A, B or C holds NaN); "
                         f"the factors are broken, e.g. by a diverged training step, and nothing was changed")


def component_norms(model_or_factors) -> dict[str, torch.Tensor]:
    """Frobenius norm of every rank-1 component, ‖a_k‖·‖b_k‖·‖c_k‖, per layer: ``{name: (r,)}``.

    Differentiable when given a model (the group penalty is their sum); detach for inspection.
    """
    return {name: _component_norm(f) for name, f in as_factors(model_or_factors).items()}


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Penalty and proximal step
# --------------------------------------------------------------------------------------------
def penalty(model: nn.Module, kind: str = "group") -> torch.Tensor:
    """The sparsity penalty summed over every FusedCPLinear of `model`, as a differentiable scalar.

    ``kind="group"``: Σ_layers Σ_k ‖a_k‖·‖b_k‖·‖c_k‖ (group lasso over rank-1 components).
    ``kind="l1"``: Σ_layers Σ_{t,k} ‖a_k‖·‖b_k‖·|C[t, k]| (L1 on C with A, B column-normalised).
    See the module docstring for why the column norms appear. The result is in fp32 (fp64 for
    fp64 factors) on the first layer's device; the subgradient at a zero column is 0.
    """
    _check_kind(kind)
    total = None
    for f in as_factors(model).values():
        if kind == "group":
            term = _component_norm(f).sum()
        else:
            term = (f.C.abs() * _column_scale(f)).sum()
        total = term if total is None else total + term.to(total.device)
    return total


@torch.no_grad()
def proximal_step(model: nn.Module, strength: float, kind: str = "group") -> None:
    """Apply the proximal operator of ``strength · penalty(model, kind)`` to C, in place.

    Call it after ``optimizer.step()`` with ``strength = lr · lam`` (proximal gradient). A and B
    are held fixed, so the penalty is a (weighted) norm of C, and its prox is exact. With
    w_k = ‖a_k‖·‖b_k‖:

    * ``"group"`` (block soft-thresholding): ‖c_k‖ becomes max(‖c_k‖ − strength·w_k, 0), the
      direction of c_k kept; a component with ‖c_k‖ ≤ strength·w_k becomes exactly zero (c_k = 0).
    * ``"l1"`` (soft-thresholding): |C[t, k]| becomes max(|C[t, k]| − strength·w_k, 0), sign kept.

    Why the threshold carries w_k: it is the same as column-normalising A and B (the scale moves
    into C: c' = w·c, and the optimizer's step on c is a step w² times larger on c') and
    soft-thresholding c' by strength·w². A zero component then stays zero exactly while
    ‖∂L/∂c'_k‖ ≤ lam, the group-lasso optimality condition, which does not depend on how the
    scale is split. strength = 0 leaves the model unchanged.
    """
    _check_kind(kind)
    strength = _check_nonnegative("strength", strength)
    layers = list(model_factors(model, refuse_merged="changing its factors").values())
    if strength == 0:
        return
    for f in layers:  # check every layer before changing any
        _check_no_nan(f, _component_norm(f))
    for f in layers:
        C = f.C.to(_acc_dtype(f.A))
        tau = strength * _column_scale(f)  # (r,): one threshold per component
        if kind == "group":
            norm = torch.linalg.vector_norm(C, dim=0)
            # Where norm > tau >= 0 the division is safe; the other components become exactly 0.
            new_C = C * torch.where(norm > tau, 1 - tau / torch.where(norm > tau, norm, 1), 0)
        else:
            new_C = C.sign() * (C.abs() - tau).clamp_min(0)
        f.C.copy_(new_C)


# --------------------------------------------------------------------------------------------
# Pruning and the compression report
# --------------------------------------------------------------------------------------------
def compression_report(model_or_factors, base_parameters: int | None = None, num_tasks: int | None = None) -> dict:
    """Ranks and adapter parameter counts of a converted model or of a saved-adapter factor dict.

    The counts follow `cpkernels.convert.parameter_report` (the paper's way):

    * ``layers``: {name: {"rank", "params"}}, params = A, B, C (and a trained bias) of that layer;
    * ``rank_total``, ``params`` (the sum over layers);
    * ``shared_trainable``: A and B (and trained biases), which every task uses;
    * ``per_task``: one row of C per layer, i.e. the sum of the ranks;
    * ``amortized_per_task``: shared_trainable / num_tasks + per_task;
    * ``percent_per_task``, ``percent_amortized_per_task``: 100·x / base_parameters (None when
      base_parameters is unknown);
    * ``num_tasks``, ``base_parameters``.

    For a model, base_parameters defaults to `parameter_report`'s; for a dict pass the one from the
    adapter config. num_tasks defaults to the rows of C (pass the config's when only some tasks
    were saved).
    """
    factors = as_factors(model_or_factors)
    if base_parameters is None and isinstance(model_or_factors, nn.Module):
        base_parameters = parameter_report(model_or_factors)["base_parameters"]
    return adapter_counts(factors, num_tasks, base_parameters)


def _live(f: LayerFactors, tol: float) -> torch.Tensor:
    """Boolean mask (r,) of the components whose norm ‖a_k‖·‖b_k‖·‖c_k‖ exceeds `tol`; NaN raises."""
    with torch.no_grad():
        norms = _component_norm(f)
    _check_no_nan(f, norms)
    return norms > tol


def _prune_report(before: dict, after: dict) -> dict:
    per_layer = {
        name: {"rank_before": b["rank"], "rank_after": after["layers"][name]["rank"],
               "params_before": b["params"], "params_after": after["layers"][name]["params"]}
        for name, b in before["layers"].items()
    }
    return {"layers": per_layer, "before": before, "after": after}


def prune(model: nn.Module, tol: float = 1e-8) -> dict:
    """Drop dead rank-1 components from every FusedCPLinear of `model`, in place; return a report.

    A component is dead when its norm ‖a_k‖·‖b_k‖·‖c_k‖ ≤ `tol` (absolute, in the units of the
    factors; `proximal_step` produces exact zeros). Each layer keeps its live components, so ranks
    may end up different per layer, and a layer with none left gets rank 0 ("no update"). The
    output changes by at most s·tol·‖x‖ per dropped component (not at all for exact zeros).

    The factors are replaced through `FusedCPLinear.set_factors` (new Parameters): build the
    optimizer again after pruning.

    Returns ``{"layers": {name: {"rank_before", "rank_after", "params_before", "params_after"}},
    "before": compression_report(...), "after": compression_report(...)}``.
    """
    tol = _check_nonnegative("tol", tol)
    layers = converted_layers(model, refuse_merged="changing its factors")
    before = compression_report(model)
    keeps = [_live(LayerFactors.from_layer(name, m), tol) for name, m in layers]  # all checked before any change
    for (name, m), keep in zip(layers, keeps):
        if not bool(keep.all()):
            with torch.no_grad():
                m.set_factors(m.A[:, keep], m.B[:, keep], m.C[:, keep])
    return _prune_report(before, compression_report(model, before["base_parameters"]))


def prune_factors(factors: dict, tol: float = 1e-8, base_parameters: int | None = None,
                  num_tasks: int | None = None) -> tuple[dict, dict]:
    """`prune` for a ``{layer: {"A", "B", "C"}}`` dict (e.g. from `read_adapters`): returns the
    pruned copy of the dict and the same report as `prune` (see `compression_report` for
    base_parameters and num_tasks). The input is left unchanged."""
    tol = _check_nonnegative("tol", tol)
    factors = as_factors(factors)
    pruned = {}
    for name, f in factors.items():
        keep = _live(f, tol)
        f = f.detach()
        pruned[name] = f.with_factors(f.A[:, keep], f.B[:, keep], f.C[:, keep])
    before = compression_report(factors, base_parameters, num_tasks)
    return pruned, _prune_report(before, compression_report(pruned, base_parameters, num_tasks))


# --------------------------------------------------------------------------------------------
# Truncated decomposition
# --------------------------------------------------------------------------------------------
def _inner(X: tuple, Y: tuple) -> torch.Tensor:
    """⟨X, Y⟩ of two CP tensors given as (A, B, C) factor triples: Σ (AxᵀAy)∘(BxᵀBy)∘(CxᵀCy)."""
    return ((X[0].T @ Y[0]) * (X[1].T @ Y[1]) * (X[2].T @ Y[2])).sum()


def _cp_als(target: tuple, rank: int, iters: int) -> tuple:
    """Rank-`rank` CP fit of the CP tensor `target` = (A0, B0, C0) by alternating least squares.

    Each update is the usual ALS step, A = X₍₁₎(C ⊙ B)·((BᵀB)∘(CᵀC))⁺, but X₍₁₎(C ⊙ B) is
    A0·((B0ᵀB)∘(C0ᵀC)) because X is itself in CP form: everything is (d × r) and (r × r), ΔW is never
    built. Starts from the `rank` components of largest norm, so it begins at the pruned solution and
    can only improve on it.
    """
    A0, B0, C0 = target
    norms = A0.norm(dim=0) * B0.norm(dim=0) * C0.norm(dim=0)
    top = norms.argsort(descending=True)[:rank]
    A, B, C = A0[:, top].clone(), B0[:, top].clone(), C0[:, top].clone()
    for _ in range(iters):
        A = A0 @ ((B0.T @ B) * (C0.T @ C)) @ torch.linalg.pinv((B.T @ B) * (C.T @ C))
        B = B0 @ ((A0.T @ A) * (C0.T @ C)) @ torch.linalg.pinv((A.T @ A) * (C.T @ C))
        C = C0 @ ((A0.T @ A) * (B0.T @ B)) @ torch.linalg.pinv((A.T @ A) * (B.T @ B))
    return A, B, C


def compress(model: nn.Module, rank: int, iters: int = 100) -> dict:
    """Replace every layer of rank > `rank` by a rank-`rank` CP fit of its update tensor, in place.

    Use it after `cpkernels.from_lora`, whose layers have rank Σ r_t: the fit (alternating least
    squares, in float64, from the `rank` strongest components) trades exactness for fewer components.
    Returns ``{"layers": {name: {"rank_before", "rank_after", "relative_error"}}, "relative_error"}``
    where a layer's error is ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over all its tasks stacked (computed from the
    factors' Grams, exact up to float64 rounding of about 1e-8), and the model's is the same over all
    layers. Layers already at or below `rank` are left alone. Rebuild the optimizer afterwards.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    layers = converted_layers(model, refuse_merged="changing its factors")
    report, total_sq, total_err_sq = {}, 0.0, 0.0
    fits = []
    for name, m in layers:
        f = LayerFactors.from_layer(name, m).detach()
        _check_no_nan(f, _component_norm(f))
        # The scale goes into C for the fit (the target is the update itself) and comes out after.
        target = (f.A.double(), f.B.double(), f.C.double() * f.scale)
        norm_sq = float(_inner(target, target))
        if f.rank <= rank:
            fits.append(None)
            report[name] = {"rank_before": f.rank, "rank_after": f.rank, "relative_error": 0.0}
            total_sq += norm_sq
            continue
        fit = _cp_als(target, rank, iters)
        err_sq = max(norm_sq - 2 * float(_inner(target, fit)) + float(_inner(fit, fit)), 0.0)
        fits.append(fit)
        report[name] = {"rank_before": f.rank, "rank_after": rank,
                        "relative_error": math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0}
        total_sq += norm_sq
        total_err_sq += err_sq
    with torch.no_grad():  # every layer fitted before any is changed
        for (name, m), fit in zip(layers, fits):
            if fit is not None:
                m.set_factors(fit[0], fit[1], fit[2] / m.scale if m.scale != 0 else fit[2])
    return {"layers": report, "relative_error": math.sqrt(total_err_sq / total_sq) if total_sq > 0 else 0.0}

"""The reference is the definition of correct, so it is checked against an independent
computation: the task update materialised row by row as W0 + s·A·diag(c_t)·Bᵀ, in float64."""
import pytest
import torch

from cpkernels import cp_linear_reference
from cpkernels.reference import broadcast_task_ids
from cpkernels.testing import make_inputs


def materialised(x, weight, bias, A, B, C, task_ids, scale):
    """y_i = (W0 + s·A·diag(C[t_i])·Bᵀ)·x_i + b, one row at a time with explicit loops over tasks."""
    rows = x.reshape(-1, x.shape[-1])
    t = task_ids.reshape(-1)
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype)
    for task in range(-1, C.shape[0]):  # -1: no adapter, the base layer
        w_t = weight + (scale * A @ torch.diag(C[task]) @ B.T if task >= 0 else 0)
        sel = t == task
        out[sel] = rows[sel] @ w_t.T + (bias if bias is not None else 0)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("M,d_in,d_out,r,T", [(1, 1, 1, 1, 1), (7, 59, 130, 3, 3), (97, 64, 59, 17, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_materialised_update(M, d_in, d_out, r, T, bias):
    inp = make_inputs(M, d_in, d_out, r, T, dtype=torch.float64, bias=bias, requires_grad=False)
    inp["task_ids"][::4] = -1
    got = cp_linear_reference(**inp, scale=0.37)
    want = materialised(**inp, scale=0.37)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_per_sample_ids_broadcast_over_sequence():
    inp = make_inputs(0, 11, 13, 4, 3, dtype=torch.float64, per_sample_shape=(5, 6), requires_grad=False)
    per_token = inp["task_ids"][:, None].expand(5, 6)
    got = cp_linear_reference(**inp, scale=2.0)
    want = materialised(**{**inp, "task_ids": per_token}, scale=2.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_int_task_id_means_one_task():
    inp = make_inputs(9, 5, 6, 2, 4, dtype=torch.float64, requires_grad=False)
    got = cp_linear_reference(**{**inp, "task_ids": 2})
    want = materialised(**{**inp, "task_ids": torch.full((9,), 2)}, scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_broadcast_task_ids_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"task_ids has shape \(3,\).*\(4, 5\)"):
        broadcast_task_ids(torch.zeros(3, dtype=torch.long), torch.Size([4, 5]), "cpu")
    with pytest.raises(TypeError, match="task_ids"):
        broadcast_task_ids(1.5, torch.Size([4]), "cpu")


def test_reference_never_reads_c_out_of_bounds():
    """Called directly with unchecked ids, the reference treats ids outside [0, T) as -1: before, it read
    C[-1] (the last task) for -1 and raised an indexing error for T."""
    inp = make_inputs(4, 5, 6, 2, 3, dtype=torch.float64, requires_grad=False)
    got = cp_linear_reference(**{**inp, "task_ids": torch.tensor([-1, 3, -9, 1])})
    want = materialised(**{**inp, "task_ids": torch.tensor([-1, -1, -1, 1])}, scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

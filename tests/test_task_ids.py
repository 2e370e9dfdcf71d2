"""cpkernels.task_ids: the task-id rules and the check cache (safe by construction)."""
import gc
import weakref

import pytest
import torch

from cpkernels import cp_linear, cp_linear_reference
from cpkernels import task_ids as tid
from cpkernels.testing import make_inputs


def _inputs(T=3, lead=(5,)):
    return make_inputs(0, 6, 4, 3, T, per_sample_shape=lead, requires_grad=False)


@pytest.fixture
def aminmax_calls(monkeypatch):
    """Count the value checks (one aminmax each, the host sync on CUDA)."""
    calls = []
    real = torch.aminmax

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "aminmax", spy)
    return calls


def test_own_copies_and_checks_once_per_batch(aminmax_calls):
    src = torch.tensor([0, 2, -1, 1, 2])
    owned = tid.own(src)
    assert tid.is_owned(owned) and not tid.is_owned(src)
    assert owned.data_ptr() != src.data_ptr() and torch.equal(owned, src)
    assert len(aminmax_calls) == 1
    inp = _inputs(lead=(5, 7))
    for _ in range(12):  # twelve layers of one batch: no further check, no device sync
        y = cp_linear(**{**inp, "task_ids": owned})
    assert len(aminmax_calls) == 1
    torch.testing.assert_close(y, cp_linear_reference(**{**inp, "task_ids": src}))
    src[0] = 7  # the caller's tensor is not the library's
    torch.testing.assert_close(cp_linear(**{**inp, "task_ids": owned}), y, rtol=0, atol=0)


def test_plain_tensors_are_checked_on_every_call():
    """A tensor the library does not own may change between calls: each call reads its values again
    (on the C++ host path as on the Python one)."""
    inp = _inputs()
    ids = inp["task_ids"]
    for bad in (3, 7, -2):
        good = int(ids[2])
        cp_linear(**inp)
        ids[2] = bad
        with pytest.raises(IndexError, match=f"row 2 has task id {bad}"):
            cp_linear(**inp)
        ids[2] = good


def test_owned_ids_are_not_read_again():
    """The other half of the cache: an owned tensor's values are not read per call. (Writing to one
    breaks the contract of own(); here it proves that no check runs: the bad row acts as -1.)"""
    inp = _inputs()
    owned = tid.own(inp["task_ids"])
    owned[2] = 7
    y = cp_linear(**{**inp, "task_ids": owned})
    expected = cp_linear_reference(**{**inp, "task_ids": torch.where(owned == 7, -1, owned)})
    torch.testing.assert_close(y, expected)


def test_owned_range_is_compared_with_each_layers_num_tasks():
    owned = tid.own([0, 3, 1])
    cp_linear(**{**_inputs(T=4, lead=(3,)), "task_ids": owned})
    with pytest.raises(IndexError, match=r"num_tasks=3.*row 1 has task id 3"):
        cp_linear(**{**_inputs(T=3, lead=(3,)), "task_ids": owned})


def test_owned_per_sample_ids_are_flattened_once():
    owned = tid.own(torch.tensor([1, 0]))
    a = tid.resolve(owned, (2, 6), "cpu", 2)
    b = tid.resolve(owned, (2, 6), "cpu", 2)
    assert a is b and a.tolist() == [1] * 6 + [0] * 6
    assert tid.resolve(owned, (2, 3), "cpu", 2).tolist() == [1] * 3 + [0] * 3


@pytest.mark.parametrize("bad,match", [
    ([0, -2], r"row 1 has task id -2"),
    (torch.tensor([[0, 1], [-5, 0]]), r"task_ids\[1, 0\] has task id -5"),
    ([0, 2 ** 63], "row 1 has task id 9223372036854775808"),
])
def test_own_refuses_ids_below_minus_one(bad, match):
    with pytest.raises(IndexError, match=match):
        tid.own(bad)


@pytest.mark.parametrize("bad,exc", [([0, 1.0], TypeError), ([True], TypeError), (torch.tensor([0.0]), TypeError),
                                     ("1", TypeError), (torch.zeros(2, dtype=torch.long, device="meta"), ValueError)])
def test_own_refuses_what_is_not_integer_ids(bad, exc):
    with pytest.raises(exc, match="task_ids"):
        tid.own(bad)


def test_own_works_under_inference_mode():
    inp = _inputs(lead=(5,))
    with torch.inference_mode():
        owned = tid.own(inp["task_ids"])
        y = cp_linear(**{**inp, "task_ids": owned})
        y_again = cp_linear(**{**inp, "task_ids": owned})
    assert torch.equal(y, y_again)
    torch.testing.assert_close(y, cp_linear_reference(**inp))


def test_own_widens_small_integer_dtypes_and_moves_device():
    owned = tid.own(torch.tensor([1, 0], dtype=torch.uint8), device="cpu")
    assert owned.dtype == torch.int64
    assert tid.own(torch.tensor([1], dtype=torch.int32)).dtype == torch.int32


def test_cache_does_not_keep_tensors_alive():
    owned = tid.own(torch.tensor([1, 0]))
    tid.resolve(owned, (2, 6), "cpu", 2)  # caches a flat copy for this shape
    ref = weakref.ref(owned)
    before = len(tid._owned)
    del owned
    gc.collect()
    assert ref() is None and len(tid._owned) == before - 1


def test_unchecked_ids_act_as_minus_one(monkeypatch):
    """CPKERNELS_CHECK_TASK_IDS=off: no check, and a bad id is a base-layer row on every backend."""
    monkeypatch.setenv("CPKERNELS_CHECK_TASK_IDS", "off")
    inp = _inputs(T=3, lead=(5,))
    bad = torch.tensor([0, 3, -4, 2, 100])
    want = cp_linear_reference(**{**inp, "task_ids": torch.tensor([0, -1, -1, 2, -1])})
    for backend in ("cpu", "reference"):
        torch.testing.assert_close(cp_linear(**{**inp, "task_ids": bad}, backend=backend), want)


def test_gather_rows_never_indexes_out_of_bounds():
    C = torch.randn(3, 2)
    rows = tid.gather_rows(C, torch.tensor([2, -1, 3, -7, 0]))
    assert torch.equal(rows[[0, 4]], C[[2, 0]]) and not rows[1:4].any()
    C_nan = torch.full((3, 2), float("nan"))
    assert not tid.gather_rows(C_nan, torch.tensor([-1])).isnan().any()
    assert tid.gather_rows(torch.empty(0, 2), torch.tensor([-1, -1])).shape == (2, 2)


def test_shape_error_names_each_form_once():
    """For a 2-D x, one task per row and one per sample are the same shape: the message gave it twice
    ("expected (5,) (one task per row) or (5,) (one task per sample)")."""
    inp = _inputs()
    with pytest.raises(ValueError) as err:
        cp_linear(**{**inp, "task_ids": torch.zeros(4, dtype=torch.long)})
    assert str(err.value).count("(5,)") == 2 and "one task per sample" not in str(err.value)  # x's shape, expected
    inp = _inputs(lead=(5, 7))
    with pytest.raises(ValueError, match=r"expected \(5, 7\) \(one task per row\) or \(5,\) \(one task per sample\)"):
        cp_linear(**{**inp, "task_ids": torch.zeros(4, dtype=torch.long)})


def test_own_onto_the_meta_device_is_refused_by_name():
    """A meta target has no values to check either: refused like meta ids, not an aminmax error."""
    with pytest.raises(ValueError, match="meta device have no values"):
        tid.own(torch.tensor([0, 1]), device="meta")

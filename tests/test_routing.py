"""Task routing is per call and per thread: `task_context` and the model's `task_ids=` keyword.

Before, task_context wrote the ids onto every layer: two threads serving one model under
task_context(model, 0) and task_context(model, 3) got the other's task in 56 of 80 calls, and after
a context every layer still held ids, so a call outside any context silently ran that task."""
import threading

import pytest
import torch
from torch import nn

from cpkernels import checkpoint_context, convert, cp_layers, task_context

TASKS = 4


def _model():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)),
                    rank=3, num_tasks=TASKS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in cp_layers(model):
            layer.C.copy_(torch.randn(layer.C.shape, generator=g))  # every task gives another output
    return model


def test_two_threads_serving_one_model_each_get_their_own_task():
    model = _model()
    x = torch.randn(16, 24)
    expected = {}
    for t in (0, 3):
        with torch.no_grad(), task_context(model, t):
            expected[t] = model(x)
    assert not torch.allclose(expected[0], expected[3])
    calls, start = 200, threading.Barrier(2)
    wrong, errors = {0: 0, 3: 0}, []

    def serve(task):
        try:
            start.wait()
            for _ in range(calls):
                with torch.no_grad(), task_context(model, task):
                    y = model(x)
                wrong[task] += not torch.equal(y, expected[task])
        except Exception as exc:  # surfaced below: an exception in a thread does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(t,)) for t in (0, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert wrong == {0: 0, 3: 0}, f"calls that got the other thread's task: {wrong} of {calls} each"
    assert all(layer.task_ids is None for _, layer in cp_layers(model))


def test_a_context_in_one_thread_does_not_route_another():
    # Deterministic: while thread A sits inside its context, a call from the main thread outside any
    # context must raise, and nested contexts in A restore A's ids only.
    model = _model()
    x = torch.randn(2, 24)
    inside, release, seen = threading.Event(), threading.Event(), []

    def hold():
        with task_context(model, 2):
            with task_context(model, torch.tensor([1, 3])):
                seen.append(model[0].task_ids.tolist())
            seen.append(model[0].task_ids.tolist())
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert inside.wait(30)
        assert model[0].task_ids is None
        with pytest.raises(ValueError, match="got no task ids"):
            model(x)
    finally:
        release.set()
        thread.join()
    assert seen == [[1, 3], 2]


def test_no_ids_left_after_a_context_or_a_routed_forward():
    model = _model()
    x = torch.randn(3, 24)
    with task_context(model, 1):
        model(x)
    model(x, task_ids=torch.tensor([0, 1, 2]))
    assert all(layer.task_ids is None for _, layer in cp_layers(model))
    with pytest.raises(ValueError, match="'0' got no task ids"):
        model(x)


def test_model_task_ids_keyword_equals_task_context_and_nests():
    model = _model()
    x, ids = torch.randn(3, 24), torch.tensor([3, 0, 2])
    with task_context(model, ids):
        expected = model(x)
        # The keyword routes this call only; the enclosing context is back afterwards.
        assert torch.equal(model(x, task_ids=ids), expected)
        assert not torch.equal(model(x, task_ids=0), expected)
        assert torch.equal(model(x), expected)


def test_routing_only_touches_the_given_model():
    a, b = _model(), _model()
    with task_context(a, 1):
        assert a[0].task_ids is not None and b[0].task_ids is None
        with pytest.raises(ValueError, match="got no task ids"):
            b(torch.randn(2, 24))


def test_inference_mode():
    # Owned ids made under inference_mode are inference tensors, which have no version counter.
    model = _model()
    x = torch.randn(3, 24)
    expected = model(x, task_ids=torch.tensor([1, 2, 3])).detach()
    with torch.inference_mode():
        with task_context(model, torch.tensor([1, 2, 3])):
            torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x, task_ids=torch.tensor([1, 2, 3])), expected)


def test_checkpoint_context_recomputes_with_the_forward_ids():
    # Backward after the context exits (as in transformers.Trainer): without context_fn the
    # recomputed forward has no ids; with checkpoint_context it gets the forward's.
    model = _model()
    x, ids = torch.randn(4, 24), torch.tensor([3, 1, 0, 2])
    with task_context(model, ids):
        (expected,) = torch.autograd.grad(model(x).sum(), model[0].C)
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False, context_fn=checkpoint_context)
    with task_context(model, 0):  # a different context at backward time must not leak in
        (got,) = torch.autograd.grad(out.sum(), model[0].C)
    torch.testing.assert_close(got, expected)
    with task_context(model, ids):
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        out.sum().backward()


def test_deepcopy_routes_the_copy_and_pickle_round_trips(tmp_path):
    import copy
    import inspect

    model = _model()
    x, ids = torch.randn(3, 24), torch.tensor([2, 0, 3])
    with torch.no_grad():
        expected = model(x, task_ids=ids)
        clone = copy.deepcopy(model)
        with torch.no_grad():
            clone[0].C.add_(1.0)  # a copy that is really another model
        assert not torch.equal(clone(x, task_ids=ids), expected)  # routes itself, not the original
        assert torch.equal(model(x, task_ids=ids), expected)
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        assert torch.equal(loaded(x, task_ids=ids), expected)
    assert "task_ids" in inspect.signature(loaded.forward).parameters


def test_checkpoint_context_works_when_backward_runs_on_another_thread():
    # On CUDA, autograd runs backward on its own device threads, which do not see the caller's
    # ContextVar; the recompute must carry its ids itself. A plain thread stands in for one here.
    model = _model()
    x, ids = torch.randn(4, 24), torch.tensor([3, 1, 0, 2])
    with task_context(model, ids):
        (expected,) = torch.autograd.grad(model(x).sum(), model[0].C)
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False, context_fn=checkpoint_context)
        plain = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
        result, errors = {}, []

        def backward():
            try:
                (result["got"],) = torch.autograd.grad(out.sum(), model[0].C)
                torch.autograd.grad(plain.sum(), model[0].C)
            except ValueError as exc:
                errors.append(exc)

        thread = threading.Thread(target=backward)
        thread.start()
        thread.join()
    torch.testing.assert_close(result["got"], expected)
    assert len(errors) == 1 and "got no task ids" in str(errors[0])  # without context_fn: no ids there


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_checkpoint_context_on_autograd_device_threads():
    model = _model().cuda()
    x, ids = torch.randn(4, 24, device="cuda"), torch.tensor([3, 1, 0, 2], device="cuda")
    with task_context(model, ids):
        (expected,) = torch.autograd.grad(model(x).sum(), model[0].C)
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False, context_fn=checkpoint_context)
    (got,) = torch.autograd.grad(out.sum(), model[0].C)
    torch.testing.assert_close(got, expected)


def test_asyncio_tasks_interleaving_keep_their_own_ids():
    # A ContextVar is private to each asyncio task too (thread-local state would not be): two requests
    # served by one event loop, each yielding to the other inside its context.
    import asyncio

    model = _model()
    x = torch.randn(2, 24)
    with torch.no_grad():
        expected = {t: model(x, task_ids=t) for t in (1, 2)}

    def run():
        with torch.no_grad():  # grad mode is per thread, not per asyncio task: never held across an await
            return model(x)

    async def request(task):
        with task_context(model, task):
            await asyncio.sleep(0)  # the other request runs here, inside its own context
            first = run()
            await asyncio.sleep(0)
            return torch.equal(first, expected[task]) and torch.equal(run(), expected[task])

    async def serve():
        return await asyncio.gather(request(1), request(2), request(1))

    assert asyncio.run(serve()) == [True, True, True]

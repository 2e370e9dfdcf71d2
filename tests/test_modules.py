"""FusedCPLinear: the layer against nn.Linear and the float64 reference, init schemes, errors,
factor surgery, autocast, dtype/device moves, deepcopy, state_dict, torch.compile, CUDA graphs."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from cpkernels.modules import FusedCPLinear
from cpkernels.reference import cp_linear_reference
from cpkernels.testing import assert_close_to_reference, make_inputs, poisoned_memory

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _random_layer(d_in, d_out, r, T, *, bias=True, scale=1.0, seed=0, dtype=torch.float32):
    """A layer whose every factor is non-zero (C random), so the update is really exercised."""
    torch.manual_seed(seed)
    layer = FusedCPLinear(d_in, d_out, r, T, bias=bias, scale=scale, dtype=dtype)
    with torch.no_grad():
        layer.C.normal_()
    return layer


def _layer_fn(layer):
    """cp_linear's signature, computed by the layer's forward with the given tensors as its parameters
    (torch.func.functional_call), so that gradients reach the test's tensors."""
    def fn(x, weight, bias, A, B, C, task_ids, scale):
        assert scale == layer.scale
        params = {"weight": weight, "A": A, "B": B, "C": C}
        if bias is not None:
            params["bias"] = bias
        return functional_call(layer, params, (x,), {"task_ids": task_ids})
    return fn


@pytest.mark.parametrize("init", ["cp", "lora"])
@pytest.mark.parametrize("d_in,d_out,r", [(97, 59, 3), (16, 33, 1), (59, 97, 17)])
def test_zero_update_at_init_equals_linear(init, d_in, d_out, r):
    torch.manual_seed(1)
    linear = nn.Linear(d_in, d_out)
    layer = FusedCPLinear.from_linear(linear, rank=r, num_tasks=5, scale=2.0, init=init)
    x = torch.randn(3, 7, d_in)
    ids = torch.randint(0, 5, (3, 7))
    with poisoned_memory():
        y = layer(x, task_ids=ids)
    assert torch.equal(y, linear(x))


@pytest.mark.parametrize("d_in,d_out,r,T", [(97, 59, 3, 4), (59, 97, 17, 3), (33, 16, 1, 1)])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_reference(d_in, d_out, r, T, per_token, bias):
    layer = _random_layer(d_in, d_out, r, T, bias=bias, scale=0.5)
    inputs = make_inputs(0, d_in, d_out, r, T, bias=bias, per_sample_shape=(5, 13),
                         generator=torch.Generator().manual_seed(d_in + r))
    if per_token:  # one task per (batch, seq) position
        inputs["task_ids"] = torch.randint(0, T, (5, 13), generator=torch.Generator().manual_seed(7))
    with poisoned_memory():
        assert_close_to_reference(_layer_fn(layer), inputs, scale=0.5)


def test_task_context_on_a_layer_matches_argument():
    from cpkernels.convert import task_context

    layer = _random_layer(19, 23, 4, 3)
    x, ids = torch.randn(4, 6, 19), torch.tensor([2, 0, 1, 2])
    with task_context(layer, ids):
        assert torch.equal(layer.task_ids, ids)
        assert torch.equal(layer(x), layer(x, task_ids=ids))
        # The argument wins over the context.
        assert torch.equal(layer(x, task_ids=torch.tensor([1, 1, 1, 1])), layer(x, task_ids=1))
    assert layer.task_ids is None
    # Ids stored on a layer would be shared by every thread: the attribute is read-only.
    with pytest.raises(AttributeError, match="read-only.*task_context"):
        layer.task_ids = ids


def test_from_linear_shares_weight_and_freezes_it():
    linear = nn.Linear(11, 7).double()
    layer = FusedCPLinear.from_linear(linear, rank=3, num_tasks=2, scale=0.25)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert layer.A.dtype == layer.B.dtype == layer.C.dtype == torch.float64
    assert layer.A.shape == (7, 3) and layer.B.shape == (11, 3) and layer.C.shape == (2, 3)
    assert all(p.requires_grad for p in (layer.A, layer.B, layer.C))
    with torch.no_grad():
        linear.weight.add_(1.0)  # shared storage: the layer sees it
    assert torch.equal(layer.weight, linear.weight)
    half = FusedCPLinear.from_linear(nn.Linear(4, 5, bias=False, dtype=torch.bfloat16), 2, 3,
                                     factor_dtype=torch.float32)
    assert half.bias is None and half.weight.dtype == torch.bfloat16 and half.A.dtype == torch.float32
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedCPLinear.from_linear(nn.Conv1d(3, 3, 1), 2, 2)


def test_default_init_zero_update_but_gradient_flows():
    torch.manual_seed(2)
    layer = FusedCPLinear(13, 9, 4, 3)
    assert torch.count_nonzero(layer.C) == 0 and torch.count_nonzero(layer.A) == layer.A.numel()
    x = torch.randn(6, 13)
    layer(x, task_ids=torch.tensor([0, 1, 2, 0, 1, 2])).square().sum().backward()
    assert torch.count_nonzero(layer.C.grad) == layer.C.numel()  # every task learns from step one
    assert torch.count_nonzero(layer.A.grad) == 0 and torch.count_nonzero(layer.B.grad) == 0

    lora = FusedCPLinear(13, 9, 4, 3, init="lora")
    assert torch.count_nonzero(lora.A) == 0 and torch.equal(lora.C, torch.ones(3, 4))
    lora(x, task_ids=1).square().sum().backward()
    assert torch.count_nonzero(lora.A.grad) == lora.A.numel() and torch.count_nonzero(lora.C.grad) == 0


def test_constructor_validation():
    with pytest.raises(ValueError, match="init"):
        FusedCPLinear(4, 4, 2, 2, init="zeros")
    with pytest.raises(ValueError, match="num_tasks"):
        FusedCPLinear(4, 4, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        FusedCPLinear(4, 4, -1, 2)


def test_missing_task_ids_names_the_layer():
    layer = FusedCPLinear(5, 4, 2, 2)
    with pytest.raises(ValueError, match="no task ids.*task_context"):
        layer(torch.randn(2, 5))
    layer.layer_name = "encoder.block.3.proj"
    with pytest.raises(ValueError, match=r"'encoder\.block\.3\.proj' got no task ids"):
        layer(torch.randn(2, 5))


def test_task_id_out_of_range_raises_index_error():
    layer = FusedCPLinear(5, 4, 2, 3)
    with pytest.raises(IndexError, match="num_tasks=3"):
        layer(torch.randn(2, 5), task_ids=torch.tensor([0, 3]))


def test_set_factors_changes_rank_and_keeps_flags():
    layer = _random_layer(12, 10, 5, 3, dtype=torch.float64)
    layer.B.requires_grad_(False)
    A, B, C = torch.randn(10, 2), torch.randn(12, 2), torch.randn(3, 2)  # float32 on purpose
    layer.set_factors(A, B, C)
    assert layer.rank == 2 and layer.A.dtype == torch.float64 and isinstance(layer.A, nn.Parameter)
    assert layer.A.requires_grad and not layer.B.requires_grad and layer.C.requires_grad
    assert torch.equal(layer.C, C.double())
    x = torch.randn(4, 12, dtype=torch.float64)
    ref = cp_linear_reference(x, layer.weight, layer.bias, A.double(), B.double(), C.double(), 2)
    torch.testing.assert_close(layer(x, task_ids=2), ref)

    layer.set_factors(torch.empty(10, 0), torch.empty(12, 0), torch.empty(3, 0))  # everything pruned
    assert layer.rank == 0
    assert torch.equal(layer(x, task_ids=1), nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match=r"A \(10, 2\), B \(12, 3\)"):
        layer.set_factors(torch.randn(10, 2), torch.randn(12, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"C \(4, 2\)"):
        layer.set_factors(torch.randn(10, 2), torch.randn(12, 2), torch.randn(4, 2))


def test_delta_weight_is_the_update():
    layer = _random_layer(14, 6, 3, 4, scale=0.7, dtype=torch.float64)
    x = torch.randn(5, 14, dtype=torch.float64)
    for t in range(4):
        expected = 0.7 * layer.A.detach() @ torch.diag(layer.C[t].detach()) @ layer.B.detach().T
        torch.testing.assert_close(layer.delta_weight(t), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer(x, task_ids=t) - nn.functional.linear(x, layer.weight, layer.bias),
                                   x @ layer.delta_weight(t).T)
    assert layer.delta_weight(0, torch.float32).dtype == torch.float32
    with pytest.raises(IndexError, match="num_tasks=4"):
        layer.delta_weight(4)


def test_extra_repr():
    text = repr(FusedCPLinear(8, 3, 2, 5, bias=False, scale=0.5))
    assert text == "FusedCPLinear(in_features=8, out_features=3, rank=2, num_tasks=5, bias=False, scale=0.5)"


def test_autocast_bf16_with_fp32_parameters():
    layer = _random_layer(24, 20, 4, 3)
    x = torch.randn(2, 5, 24, requires_grad=True)
    ids = torch.tensor([2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, task_ids=ids)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (layer.A, layer.B, layer.C))
    assert x.grad.dtype == torch.float32
    # Autocast means: x, weight, bias in bf16, fp32 master factors (the op's documented contract).
    bf = lambda t: t.detach().to(torch.bfloat16)  # noqa: E731
    explicit = functional_call(layer, {"weight": bf(layer.weight), "bias": bf(layer.bias)}, (bf(x),),
                               {"task_ids": ids})
    assert torch.equal(y, explicit)


def test_to_dtype_deepcopy_and_state_dict_round_trip():
    layer = _random_layer(9, 7, 3, 2)
    x = torch.randn(4, 9, dtype=torch.float64)
    layer64 = copy.deepcopy(layer).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer64.parameters())
    assert not layer64.weight.requires_grad and layer64.A.requires_grad
    clone = copy.deepcopy(layer64)
    assert clone.A is not layer64.A and clone.A.data_ptr() != layer64.A.data_ptr()
    assert torch.equal(clone(x, task_ids=1), layer64(x, task_ids=1))

    assert set(layer.state_dict()) == {"weight", "bias", "A", "B", "C"}
    fresh = FusedCPLinear(9, 7, 3, 2)
    fresh.load_state_dict(layer.state_dict())
    assert not fresh.weight.requires_grad  # load_state_dict copies values, flags stay
    x32 = x.float()
    assert torch.equal(fresh(x32, task_ids=torch.tensor([1, 0, 1, 1])), layer(x32, task_ids=torch.tensor([1, 0, 1, 1])))


def test_torch_compile_fullgraph_with_task_ids_argument():
    layer = _random_layer(21, 18, 3, 4)
    compiled = torch.compile(layer, fullgraph=True)
    for seed in range(2):  # a second id tensor must reuse the graph (no specialisation on values)
        x = torch.randn(3, 5, 21, requires_grad=True)
        ids = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(seed))
        y = compiled(x, task_ids=ids)
        torch.testing.assert_close(y, layer(x, task_ids=ids))
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_eager,) = torch.autograd.grad(layer(x, task_ids=ids).sum(), x)
        torch.testing.assert_close(gx, gx_eager)


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_capture():
    layer = _random_layer(256, 128, 8, 4).cuda()
    x = torch.randn(16, 256, device="cuda")
    ids = torch.randint(0, 4, (16,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm up: Triton autotuning and compilation happen outside the capture
            layer(x, task_ids=ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y = layer(x, task_ids=ids)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.randint(0, 4, (16,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            torch.testing.assert_close(y, layer(x, task_ids=ids))


def test_forward_has_its_own_docstring():
    """help(layer.forward) showed nn.Module's boilerplate ("Define the computation performed at every call")."""
    doc = FusedCPLinear.forward.__doc__ or ""
    assert doc != (torch.nn.Module.forward.__doc__ or "") and "task_ids" in doc and "task_context" in doc

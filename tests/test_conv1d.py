"""GPT-2's `transformers.pytorch_utils.Conv1D` (y = x·W + b, W stored (in, out), PEFT's fan_in_fan_out):
converts, matches the original at init, trains, merges, unmerges and exports back to Conv1D.
Before, convert refused it, and its "exclude it" hint left nothing of GPT-2 to convert."""
import pytest
import torch
from torch import nn

from cpkernels import CPConfig, convert, cp_layers, export, merge, task_context, unmerge
from cpkernels.modules import FusedCPLinear
from cpkernels.reference import cp_linear_reference
from test_convert import _randomize_factors


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def _tiny_gpt2(transformers):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_converts_matches_at_init_and_merges(transformers):
    # Before: Conv1D (weight stored (in, out)) was refused, and the "exclude it" hint left nothing to convert.
    from transformers.pytorch_utils import Conv1D

    model = _tiny_gpt2(transformers)
    tokens = torch.randint(0, 100, (3, 9))
    before = model(tokens).logits
    keys = {k: v.shape for k, v in model.state_dict().items()}
    convert(model, CPConfig(rank=4, num_tasks=3))
    names = [n for n, _ in cp_layers(model)]
    assert names == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj",
                                                                          "mlp.c_fc", "mlp.c_proj")]
    assert type(model.lm_head) is nn.Linear  # tied output embeddings: a head, left alone
    assert all(layer.fan_in_fan_out for _, layer in cp_layers(model))
    # The (in, out) layout is kept, so the base keys and shapes stay GPT-2's.
    assert {k: v.shape for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in "ABC"} == keys
    with task_context(model, torch.tensor([2, 0, 1])):
        assert torch.equal(model(tokens).logits, before)  # C = 0: bit-identical at init

    _randomize_factors(model)
    layer = model.transformer.h[0].mlp.c_fc
    x, ids = torch.randn(3, 5, 32, dtype=torch.float64), torch.tensor([1, 2, 0])
    expected = cp_linear_reference(x, layer.weight.T.double(), layer.bias.double(), layer.A.double(),
                                   layer.B.double(), layer.C.double(), ids, layer.scale)
    torch.testing.assert_close(layer(x.float(), task_ids=ids).double(), expected, rtol=1e-4, atol=1e-4)

    with task_context(model, 1):
        task1 = model(tokens).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge(model, 1)
    torch.testing.assert_close(model(tokens).logits, task1, rtol=1e-4, atol=1e-4)
    unmerge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    exported = export(model, 1)
    assert type(exported.transformer.h[0].attn.c_attn) is Conv1D
    torch.testing.assert_close(exported(tokens).logits, task1, rtol=1e-4, atol=1e-4)
    plain = _tiny_gpt2(transformers)
    plain.load_state_dict(exported.state_dict())  # loads into the original architecture
    torch.testing.assert_close(plain(tokens).logits, task1, rtol=1e-4, atol=1e-4)


def test_gpt2_trains_in_mixed_batches(transformers):
    model = convert(_tiny_gpt2(transformers), rank=4, num_tasks=3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    tokens, ids = torch.randint(0, 100, (6, 10), generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for _ in range(8):
        loss = model(tokens, labels=tokens, task_ids=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(layer.A.grad.abs().sum() > 0 for _, layer in cp_layers(model))


def test_from_conv1d_validates_its_input():
    with pytest.raises(TypeError, match="from_conv1d expects a transformers Conv1D"):
        FusedCPLinear.from_conv1d(nn.Linear(3, 4), 2, 2)


def test_gpt2_generate_takes_task_ids(transformers):
    # generate() checks its keyword arguments against inspect.signature(model.forward) and hands
    # task_ids to every decoding step.
    model = _randomize_factors(convert(_tiny_gpt2(transformers), rank=2, num_tasks=3)).eval()
    tokens, ids = torch.randint(1, 100, (2, 5)), torch.tensor([2, 0])
    kw = dict(attention_mask=torch.ones_like(tokens), max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(tokens, task_ids=ids, **kw)
    with task_context(model, ids):
        assert torch.equal(out, model.generate(tokens, **kw))
    with task_context(model, torch.tensor([1, 1])):
        assert not torch.equal(out, model.generate(tokens, **kw))

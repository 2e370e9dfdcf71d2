"""LoRA interop against PEFT itself, in float64: export_lora folders load in peft.PeftModel and match
our output; from_lora turns several PEFT LoRA adapters into one CP layer set that matches each of them,
in one mixed batch."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import cpkernels  # noqa: E402
from cpkernels import CPConfig, convert, export_lora, from_lora, save_adapters  # noqa: E402
from cpkernels.convert import cp_layers  # noqa: E402

# Float64 end to end: only summation order differs between PEFT's path and ours.
ATOL = 1e-10


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=23, max_position_embeddings=32)
    return transformers.BertModel(cfg).double().eval()


def inputs(batch=6, seq=5):
    return torch.randint(0, 61, (batch, seq), generator=torch.Generator().manual_seed(1))


def peft_out(base, folder, ids):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def ours(model, ids, task_ids):
    with torch.no_grad(), cpkernels.task_context(model, task_ids):
        return model(input_ids=ids).last_hidden_state


def test_export_lora_loads_in_peft_and_matches(tmp_path):
    base = tiny_bert()
    model = convert(copy.deepcopy(base), CPConfig(rank=3, num_tasks=3, task_names=["a", "b", "c"], scale=0.5))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in cp_layers(model):
            for p in (layer.A, layer.B, layer.C):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    layers = dict(cp_layers(model))
    q = layers["encoder.layer.0.attention.self.query"]
    q.set_factors(q.A[:, :1], q.B[:, :1], q.C[:, :1])  # pruned: PEFT gets a rank_pattern entry
    layers["encoder.layer.1.output.dense"].scale = 1.25  # and an alpha_pattern entry
    pooler = layers["pooler.dense"]
    pooler.set_factors(pooler.A[:, :0], pooler.B[:, :0], pooler.C[:, :0])  # rank 0: left out

    folders = export_lora(model, tmp_path, tasks=["a", 2])
    assert [f.name for f in folders] == ["a", "c"]
    config = peft.LoraConfig.from_pretrained(str(folders[0]))
    assert config.r == 3 and config.lora_alpha == 1.5 and "pooler" not in config.target_modules
    ids = inputs()
    base_out = peft_out(base, folders[0], ids)  # noqa: F841 (loads without error)
    for folder, t in zip(folders, (0, 2)):
        expected = ours(model, ids, t)
        got = peft_out(base, folder, ids)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The update is really there: a task differs from the base model.
    with torch.no_grad():
        assert (base(input_ids=ids).last_hidden_state - expected).abs().max() > 1e-3


def make_lora(base, tmp_path, name, seed, **kw):
    torch.manual_seed(seed)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():  # PEFT's init_lora_weights=False draws small values; make the update visible
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    lora.save_pretrained(str(tmp_path / name))
    return tmp_path / name


def test_from_lora_matches_each_adapter_in_one_mixed_batch(tmp_path):
    base = tiny_bert()
    folders = [
        make_lora(base, tmp_path, "qa", 10, r=2, lora_alpha=4, target_modules=["query", "value"]),
        make_lora(base, tmp_path, "nli", 11, r=3, lora_alpha=5, target_modules=["query", "key", "dense"],
                  use_rslora=True),
        make_lora(base, tmp_path, "ner", 12, r=1, lora_alpha=2, target_modules=["value"],
                  rank_pattern={"encoder.layer.1.attention.self.value": 4}),
    ]
    model = from_lora(folders, copy.deepcopy(base))
    assert model.cpkernels_config.task_names == ["qa", "nli", "ner"]
    layers = dict(cp_layers(model))
    assert layers["encoder.layer.0.attention.self.query"].rank == 2 + 3  # qa + nli
    assert layers["encoder.layer.1.attention.self.value"].rank == 2 + 4  # qa + ner's rank_pattern
    assert "encoder.layer.0.output.dense" in layers and "pooler.dense" in layers  # nli's "dense" matched them

    ids = inputs()
    expected = [peft_out(base, f, ids) for f in folders]
    for t in range(3):
        torch.testing.assert_close(ours(model, ids, t), expected[t], atol=ATOL, rtol=0)
    task_ids = torch.tensor([0, 2, 1, 1, 0, 2])
    mixed = ours(model, ids, task_ids)  # one batch, every converted layer one launch
    for row, t in enumerate(task_ids.tolist()):
        torch.testing.assert_close(mixed[row], expected[t][row], atol=ATOL, rtol=0)

    # And back: the merged set exports to PEFT folders that reproduce the original adapters.
    back = export_lora(model, tmp_path / "back")
    for folder, want in zip(back, expected):
        torch.testing.assert_close(peft_out(base, folder, ids), want, atol=ATOL, rtol=0)
    # And through our own format, onto a plain base.
    save_adapters(model, tmp_path / "cp")
    again = cpkernels.from_pretrained(copy.deepcopy(base), tmp_path / "cp")
    torch.testing.assert_close(ours(again, ids, task_ids), mixed, atol=0, rtol=0)


def test_from_lora_refuses_what_it_cannot_hold(tmp_path):
    base = tiny_bert()
    plain = make_lora(base, tmp_path, "plain", 1, r=2, target_modules=["query"])
    dora = make_lora(base, tmp_path, "dora", 2, r=2, target_modules=["query"], use_dora=True)
    with pytest.raises(ValueError, match=r"\['use_dora'\] cannot become part of a shared CP layer"):
        from_lora([plain, dora], copy.deepcopy(base))
    with pytest.raises(ValueError, match="already has FusedCPLinear layers"):
        from_lora([plain], from_lora([plain], copy.deepcopy(base)))
    other = tiny_bert()
    other.encoder.layer[0].attention.self.query = torch.nn.Linear(16, 8).double()
    with pytest.raises(ValueError, match=r"layer 'encoder.layer.0.attention.self.query'.*\(16, 16\)"):
        from_lora([plain], other)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        from_lora([tmp_path], copy.deepcopy(base))


def test_gpt2_conv1d_both_ways(tmp_path):
    """GPT-2 stores its Conv1D weights (in, out) (PEFT's fan_in_fan_out); LoRA weights do not care."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    base = transformers.GPT2Model(cfg).double().eval()
    folders = [make_lora(base, tmp_path, f"t{i}", 20 + i, r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"],
                         fan_in_fan_out=True) for i in range(2)]
    model = from_lora(folders, copy.deepcopy(base))
    ids = inputs()
    expected = [peft_out(base, f, ids) for f in folders]
    task_ids = torch.tensor([1, 0, 0, 1, 1, 0])
    mixed = ours(model, ids, task_ids)
    for row, t in enumerate(task_ids.tolist()):
        torch.testing.assert_close(mixed[row], expected[t][row], atol=ATOL, rtol=0)
    back = export_lora(model, tmp_path / "back")
    assert peft.LoraConfig.from_pretrained(str(back[0])).fan_in_fan_out
    for folder, want in zip(back, expected):
        torch.testing.assert_close(peft_out(base, folder, ids), want, atol=ATOL, rtol=0)


def test_export_lora_refusals(tmp_path):
    torch.manual_seed(0)
    model = convert(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)),
                    CPConfig(rank=2, num_tasks=2, task_names=["ok", "../escape"]))
    with pytest.raises(ValueError, match=r"task name '../escape' cannot be a folder name"):
        export_lora(model, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written
    model[1].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"layers \['1'\] train their bias"):
        export_lora(model, tmp_path, tasks="ok")
    model[1].bias.requires_grad_(False)
    with pytest.raises(IndexError, match=r"task 2 is outside \[0, num_tasks=2\)"):
        export_lora(model, tmp_path, tasks=[2])
    cpkernels.merge(model, 0)
    with pytest.raises(ValueError, match=r"before exporting LoRA adapters"):
        export_lora(model, tmp_path)

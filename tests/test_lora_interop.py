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
    model = from_lora(copy.deepcopy(base), folders)
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
        from_lora(copy.deepcopy(base), [plain, dora])
    with pytest.raises(ValueError, match="already has FusedCPLinear layers"):
        from_lora(from_lora(copy.deepcopy(base), [plain]), [plain])
    other = tiny_bert()
    other.encoder.layer[0].attention.self.query = torch.nn.Linear(16, 8).double()
    with pytest.raises(ValueError, match=r"layer 'encoder.layer.0.attention.self.query'.*\(16, 16\)"):
        from_lora(other, [plain])
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        from_lora(copy.deepcopy(base), [tmp_path])


def test_gpt2_conv1d_both_ways(tmp_path):
    """GPT-2 stores its Conv1D weights (in, out) (PEFT's fan_in_fan_out); LoRA weights do not care."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    base = transformers.GPT2Model(cfg).double().eval()
    folders = [make_lora(base, tmp_path, f"t{i}", 20 + i, r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"],
                         fan_in_fan_out=True) for i in range(2)]
    model = from_lora(copy.deepcopy(base), folders)
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


# --------------------------------------------------------------------------------------------
# from_lora(model, folders): the order of from_pretrained(model, path) and PeftModel.from_pretrained
# --------------------------------------------------------------------------------------------
def test_from_lora_old_argument_order_warns_and_still_works(tmp_path):
    base = tiny_bert()
    folder = make_lora(base, tmp_path, "qa", 3, r=2, target_modules=["query"])
    ids = inputs()
    expected = ours(from_lora(copy.deepcopy(base), [folder]), ids, 0)
    with pytest.warns(DeprecationWarning, match=r"from_lora\(folders, model\) is deprecated") as record:
        old = from_lora([folder], copy.deepcopy(base))
    # stacklevel: the warning names the caller's line, so filters on the caller's module apply to it
    # (pyproject ignores DeprecationWarnings "from torch.*"; this one must not look like torch's).
    assert [w.filename for w in record] == [__file__]
    torch.testing.assert_close(ours(old, ids, 0), expected, atol=0, rtol=0)
    with pytest.warns(DeprecationWarning):
        from_lora(str(folder), copy.deepcopy(base))  # a single folder, old order
    for bad in ((folder, folder), (base, copy.deepcopy(base)), ([folder], None), (None, [folder])):
        with pytest.raises(TypeError, match=r"from_lora\(model, folders, task_names=None\) takes the plain base "
                                            r"model \(an nn.Module\) and a list of PEFT LoRA folders"):
            from_lora(*bad)


# --------------------------------------------------------------------------------------------
# Heads (modules_to_save) round trip: export_lora writes them into every task folder
# --------------------------------------------------------------------------------------------
def quick_start_base():
    """The README quick start's model: a layer to convert and a `classifier` head that trains in full."""
    from collections import OrderedDict
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(encoder=torch.nn.Linear(64, 128), act=torch.nn.GELU(),
                                           classifier=torch.nn.Linear(128, 2)))


def quick_start_trained():
    """Converted as in the README, after one optimiser step: factors (C starts at 0) and head are non-trivial."""
    config = CPConfig(rank=4, num_tasks=3, task_names=["cola", "sst2", "mrpc"], modules_to_save=["classifier"])
    model = convert(quick_start_base(), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    x, labels, tasks = torch.randn(32, 64, generator=g), torch.randint(0, 2, (32,), generator=g), \
        torch.randint(0, 3, (32,), generator=g)
    torch.nn.functional.cross_entropy(model(x, task_ids=tasks), labels).backward()
    opt.step()
    return model


def test_export_lora_then_from_lora_round_trips_heads(tmp_path):
    model = quick_start_trained()
    base = quick_start_base()
    assert not torch.equal(model.classifier.weight, base.classifier.weight)  # the head really trained
    folders = export_lora(model, tmp_path)
    back = from_lora(quick_start_base(), folders)
    assert back.cpkernels_config.task_names == ["cola", "sst2", "mrpc"]
    assert back.cpkernels_config.modules_to_save == ["classifier"]
    for key, value in model.classifier.state_dict().items():  # heads are copied bit for bit
        assert torch.equal(back.classifier.state_dict()[key], value)
    assert back.classifier.weight.requires_grad and not back.encoder.weight.requires_grad  # it trains on, as before

    # Not bitwise: export writes lora_A = diag(c_t)·Bᵀ (one float32 rounding per element) and moves s
    # into C, so the sums round differently. Both are the same function, so flash-attention's rule
    # against the float64 model holds: |back − ref64| ≤ 2·|model − ref64| + atol, where atol is one
    # float32 ulp of the output's size (for elements where the original happens to be exact).
    ref64 = copy.deepcopy(model).double()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for t in range(3):
            want = ref64(x.double(), task_ids=t)
            atol = torch.finfo(torch.float32).eps * want.abs().max().item()
            err_back = (back(x, task_ids=t).double() - want).abs().max().item()
            err_model = (model(x, task_ids=t).double() - want).abs().max().item()
            assert err_back <= 2 * err_model + atol, (t, err_back, err_model)
            # PEFT reads the same folders, head included, and computes the same function.
            peft_model = peft.PeftModel.from_pretrained(quick_start_base(), str(folders[t])).eval()
            err_peft = (peft_model(x).double() - want).abs().max().item()
            assert err_peft <= 2 * err_model + atol, (t, err_peft, err_model)
    # And out again: the round trip closes (the head rides along once more).
    again = export_lora(back, tmp_path / "again")
    assert peft.LoraConfig.from_pretrained(str(again[0])).modules_to_save == ["classifier"]


def test_from_lora_refuses_heads_that_differ_between_folders(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    folders = export_lora(quick_start_trained(), tmp_path / "cp")
    weights = folders[1] / "adapter_model.safetensors"
    tensors = st.load_file(str(weights))
    tensors["base_model.model.classifier.bias"] = tensors["base_model.model.classifier.bias"] + 1
    st.save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"disagree on head 'classifier' \(modules_to_save\): \[.*cola'?, "
                                         r".*mrpc'?\] vs \[.*sst2'?\]"):
        from_lora(quick_start_base(), folders)

    # A folder without the head runs with the base model's: that differs from a trained head...
    torch.manual_seed(7)
    plain = peft.get_peft_model(quick_start_base(), peft.LoraConfig(r=2, target_modules=["encoder"]))
    plain.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"disagree on head 'classifier'.*plain \(the base model's 'classifier'"):
        from_lora(quick_start_base(), [folders[0], tmp_path / "plain"])
    # ...but equals an untrained one, which is then loaded (and stays trainable).
    untrained = export_lora(convert(quick_start_base(), CPConfig(rank=2, num_tasks=1, task_names=["fresh"],
                                                                 modules_to_save=["classifier"])), tmp_path / "u")
    model = from_lora(quick_start_base(), [untrained[0], tmp_path / "plain"])
    assert model.cpkernels_config.modules_to_save == ["classifier"]
    assert torch.equal(model.classifier.weight, quick_start_base().classifier.weight)

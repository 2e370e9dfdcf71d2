"""save_adapters / load_adapters / read_adapters: round trips, single-task files, pruned ranks,
clear errors on mismatch, atomic writes."""
import dataclasses
import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")

import cpkernels  # noqa: E402

from cpkernels.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapters, read_adapters, save_adapters  # noqa: E402
from cpkernels.config import CPConfig, model_config  # noqa: E402
from cpkernels.convert import convert, cp_layers, merge, parameter_report, task_context  # noqa: E402
from cpkernels.factors import LayerFactors  # noqa: E402
from cpkernels.io import ChecksumError, MissingChecksumWarning  # noqa: E402
from cpkernels.modules import FusedCPLinear  # noqa: E402

T = 3


def _base(seed=0, width=11):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, width), nn.Tanh(), nn.Linear(width, 5))


def _trained(seed=0, rank=4, **kw):
    """A converted model whose factors are random (as after training) and whose base is _base(0)."""
    model = convert(_base(), rank=rank, num_tasks=T, scale=0.5, task_names=["x", "y", "z"], **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, layer in cp_layers(model):
            for p in (layer.A, layer.B, layer.C):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _fresh(rank=4, **kw):
    return convert(_base(), rank=rank, num_tasks=T, scale=0.5, **kw)


def _outputs(model, x):
    outs = []
    for t in range(T):
        with torch.no_grad(), task_context(model, t):
            outs.append(model(x))
    return outs


def test_round_trip_and_config(tmp_path):
    model = _trained()
    x = torch.randn(4, 7)
    save_adapters(model, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp file left behind
    config = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert config["format_version"] == 2 and config["heads"] == {} and config["modules_to_save"] is None
    assert config["num_tasks"] == T and config["tasks"] == [0, 1, 2]
    assert config["task_names"] == ["x", "y", "z"] and config["scale"] == 0.5 and config["rank"] == 4
    assert config["target_modules"] == "all-linear"
    assert config["base_parameters"] == parameter_report(model)["base_parameters"] == 7 * 11 + 11 + 11 * 5 + 5
    assert config["layers"]["2"] == {"in_features": 11, "out_features": 5, "rank": 4, "bias": True, "scale": 0.5,
                                     "trained_bias": False}

    fresh = _fresh()
    assert not all(torch.equal(a, b) for a, b in zip(_outputs(fresh, x), _outputs(model, x)))
    A_param = fresh[0].A
    load_adapters(fresh, tmp_path / "ad")
    assert fresh[0].A is A_param  # same rank: loaded in place, an optimizer stays valid
    assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh, x), _outputs(model, x)))
    assert model_config(fresh).task_names == ["x", "y", "z"]


def test_read_adapters_without_a_model(tmp_path):
    model = _trained()
    save_adapters(model, tmp_path)
    config, factors = read_adapters(tmp_path)
    assert set(factors) == {"0", "2"} and isinstance(factors["0"], LayerFactors)
    assert factors["0"].bias is None and factors["0"].scale == 0.5 and factors["0"].name == "0"
    for name, layer in cp_layers(model):
        for f in ("A", "B", "C"):
            assert torch.equal(factors[name][f], getattr(layer, f).detach())
    assert read_adapters(tmp_path / WEIGHTS_NAME)[0] == config  # the file itself works too
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        read_adapters(tmp_path / "missing")
    import safetensors.torch
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a cpkernels adapter file"):
        read_adapters(tmp_path / "other.safetensors")


def test_single_task_file_stores_one_row_of_c(tmp_path):
    model = _trained()
    x = torch.randn(4, 7)
    expected = _outputs(model, x)
    save_adapters(model, tmp_path / "y", tasks=["y"])
    save_adapters(model, tmp_path / "z", tasks=[2])
    config, factors = read_adapters(tmp_path / "y")
    assert config["tasks"] == [1] and factors["0"]["C"].shape == (1, 4)
    assert torch.equal(factors["0"]["C"][0], model[0].C[1].detach())

    # Into a fresh model: task y is right; the others had no rows with these A, B, so they are zero
    # (those tasks fall back to the base model).
    fresh = _fresh()
    base_out = _base()(x)
    load_adapters(fresh, tmp_path / "y")
    out = _outputs(fresh, x)
    assert torch.equal(out[1], expected[1])
    assert torch.equal(out[0], base_out.detach()) and torch.equal(out[2], base_out.detach())
    # A second file from the same run has the same A, B: rows already loaded are kept.
    load_adapters(fresh, tmp_path / "z")
    out = _outputs(fresh, x)
    assert torch.equal(out[1], expected[1]) and torch.equal(out[2], expected[2])


def test_pruned_ranks_per_layer(tmp_path):
    model = _trained()
    first = model[0]
    keep = [0, 2]  # as after pruning components 1 and 3 of the first layer
    first.set_factors(first.A[:, keep], first.B[:, keep], first.C[:, keep])
    model[2].set_factors(torch.empty(5, 0), torch.empty(11, 0), torch.empty(T, 0))  # fully pruned
    x = torch.randn(4, 7)
    save_adapters(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["layers"]["0"]["rank"] == 2
    fresh = _fresh()
    load_adapters(fresh, tmp_path)
    assert (fresh[0].rank, fresh[2].rank) == (2, 0)
    assert fresh[0].A.requires_grad and isinstance(fresh[0].A, nn.Parameter)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh, x), _outputs(model, x)))


def test_trained_bias_and_dtype(tmp_path):
    model = _trained()
    model[2].bias.requires_grad_(True)
    with torch.no_grad():
        model[2].bias.add_(1.0)
    save_adapters(model, tmp_path)
    _, factors = read_adapters(tmp_path)
    assert "bias" in factors["2"] and "bias" not in factors["0"]
    fresh = _fresh().double()
    load_adapters(fresh, tmp_path)
    assert fresh[2].A.dtype == torch.float64
    assert torch.equal(fresh[2].bias, model[2].bias.detach().double())
    x = torch.randn(3, 7)
    for got, expected in zip(_outputs(fresh, x.double()), _outputs(model, x)):
        torch.testing.assert_close(got.float(), expected)


def test_mismatches_raise_clear_errors_and_change_nothing(tmp_path):
    save_adapters(_trained(), tmp_path)

    other_tasks = convert(_base(), rank=4, num_tasks=T + 1)
    with pytest.raises(ValueError, match=r"layer '0' has num_tasks=4 \(C is \(4, 4\)\).*num_tasks=3"):
        load_adapters(other_tasks, tmp_path)

    other_shape = convert(_base(width=13), rank=4, num_tasks=T)
    before = [p.detach().clone() for p in other_shape.parameters()]
    with pytest.raises(ValueError, match=r"layer '0'.*\(13, 7\) but .* has \(11, 7\)"):
        load_adapters(other_shape, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, other_shape.parameters()))

    fewer = convert(_base(), rank=4, num_tasks=T, target_modules=["0"])
    with pytest.raises(ValueError, match=r"adapters for layers the model lacks \['2'\]"):
        load_adapters(fewer, tmp_path)

    no_bias = convert(nn.Sequential(nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 5, bias=False)), 4, T)
    model = _trained()
    model[2].bias.requires_grad_(True)
    save_adapters(model, tmp_path / "bias")
    with pytest.raises(ValueError, match=r"layer '2' has no bias .* shape \(5,\)"):
        load_adapters(no_bias, tmp_path / "bias")


def test_save_errors(tmp_path):
    model = _trained()
    with pytest.raises(ValueError, match="tasks must be distinct"):
        save_adapters(model, tmp_path, tasks=[1, 1])
    with pytest.raises(ValueError, match="tasks must be distinct"):
        save_adapters(model, tmp_path, tasks=[3])
    merge(model, 0)
    with pytest.raises(ValueError, match=r"unmerge\(model\) before saving adapters"):
        save_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="no FusedCPLinear"):
        save_adapters(_base(), tmp_path)


def test_interrupted_save_keeps_the_previous_adapters(tmp_path, monkeypatch):
    model = _trained()
    save_adapters(model, tmp_path)
    old = (tmp_path / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        model[0].A.add_(1.0)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    save_adapters(model, tmp_path)  # overwriting works
    assert torch.equal(read_adapters(tmp_path)[1]["0"]["A"], model[0].A.detach())


def test_load_into_merged_model_is_refused(tmp_path):
    # A merged layer serves its weight copy of ΔW and ignores the factors: loading new ones would
    # silently change nothing until unmerge.
    model = _trained()
    save_adapters(model, tmp_path)
    merge(model, 0)
    with pytest.raises(ValueError, match=r"unmerge\(model\) before loading adapters"):
        load_adapters(model, tmp_path)


# --------------------------------------------------------------------------------------------
# Rank, plain models, heads (issue 13)
# --------------------------------------------------------------------------------------------
def test_rank_mismatch_is_refused(tmp_path):
    """A rank-8 model used to take rank-4 adapters silently (set_factors shrank every layer)."""
    save_adapters(_trained(rank=4), tmp_path)
    rank8 = _fresh(rank=8)
    before = [p.detach().clone() for p in rank8.parameters()]
    with pytest.raises(ValueError, match=r"layer '0' has rank 8 \(the model was converted with rank=8\) but .* "
                                         r"holds rank 4 \(saved from a rank=4 conversion\)"):
        load_adapters(rank8, tmp_path)
    assert rank8[0].rank == 8 and all(torch.equal(a, b) for a, b in zip(before, rank8.parameters()))


def _headed_base():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(body=nn.Linear(7, 11), act=nn.Tanh(), mid=nn.Linear(11, 9),
                                     head=nn.Linear(9, 3)))


def test_from_pretrained_rebuilds_a_plain_model_with_heads_and_pruned_ranks(tmp_path):
    # all-linear, but modules_to_save are never converted: they train in full.
    model = convert(_headed_base(), CPConfig(rank=5, num_tasks=T, scale=0.25, task_names=["x", "y", "z"],
                                             modules_to_save=["head"]))
    assert model.head.weight.requires_grad and not isinstance(model.head, FusedCPLinear)
    with torch.no_grad():
        for _, layer in cp_layers(model):
            for p in (layer.A, layer.B, layer.C):
                p.normal_()
        model.head.weight.add_(1.0)  # the head trained
        model.mid.set_factors(model.mid.A[:, :2], model.mid.B[:, :2], model.mid.C[:, :2])  # pruned
    save_adapters(model, tmp_path)
    saved = read_adapters(tmp_path)[0]
    assert saved["heads"] == {"head": ["bias", "weight"]} and saved["modules_to_save"] == ["head"]

    x = torch.randn(6, 7)
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    for loader in (cpkernels.from_pretrained, load_adapters):
        plain = _headed_base()  # the original base: its head is the untrained one
        assert not torch.equal(plain.head.weight, model.head.weight)
        out = loader(plain, tmp_path)
        assert out is plain and isinstance(plain.body, FusedCPLinear) and isinstance(plain.mid, FusedCPLinear)
        assert (plain.body.rank, plain.mid.rank) == (5, 2) and not isinstance(plain.head, FusedCPLinear)
        assert torch.equal(plain.head.weight, model.head.weight)
        assert model_config(plain) == model_config(model)
        assert torch.equal(_route(plain, x, ids), _route(model, x, ids))


def _route(model, x, ids):
    with torch.no_grad(), task_context(model, ids):
        return model(x)


def test_from_pretrained_refuses_a_plain_model_that_does_not_fit(tmp_path):
    model = convert(_headed_base(), rank=3, num_tasks=T, target_modules=["body", "mid"], modules_to_save=["head"])
    save_adapters(model, tmp_path)
    wrong = _headed_base()
    wrong.mid = nn.Linear(11, 8)
    with pytest.raises(ValueError, match=r"layer 'mid'.*\(9, 11\).*Linear \(8, 11\)"):
        cpkernels.from_pretrained(wrong, tmp_path)
    assert not any(isinstance(m, FusedCPLinear) for m in wrong.modules())  # checked before converting
    wrong = _headed_base()
    wrong.head = nn.Linear(9, 4)
    with pytest.raises(ValueError, match=r"head 'head': bias is \(4,\) in the model but \(3,\)"):
        cpkernels.from_pretrained(wrong, tmp_path)
    wrong = _headed_base()
    del wrong.head
    with pytest.raises(ValueError, match=r"holds head 'head'.*no such module"):
        cpkernels.from_pretrained(wrong, tmp_path)
    with pytest.raises(ValueError, match=r"modules_to_save entries \['nothing'\] match no module"):
        model.cpkernels_config = dataclasses.replace(model_config(model), modules_to_save=["nothing"])
        save_adapters(model, tmp_path / "typo")


# --------------------------------------------------------------------------------------------
# Adapter files: config consistency, negative tasks, PEFT, format 1 (issue 11 item 11, issue 13)
# --------------------------------------------------------------------------------------------
def _rewrite(directory, edit, json_edit=None, json_name=CONFIG_NAME, digests=True):
    """Rewrite a saved directory's header config with `edit` (and its json with `json_edit`); with
    ``digests=False`` drop the tensors' checksums, as files written before they existed."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    file = str(directory / WEIGHTS_NAME)
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["cpkernels_adapter_config"])
    edit(config)
    metadata["cpkernels_adapter_config"] = json.dumps(config)
    if not digests:
        del metadata["cpkernels_sha256"]
    save_file(tensors, file, metadata=metadata)
    (directory / CONFIG_NAME).unlink()
    if json_edit is not None:
        json_edit(config)
    (directory / json_name).write_text(json.dumps(config))


def test_json_that_disagrees_with_the_header_is_refused(tmp_path):
    """adapter_config.json used to be ignored silently when it said something else than the header."""
    save_adapters(_trained(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text((tmp_path / CONFIG_NAME).read_text().replace('"scale": 0.5', '"scale": 2.0'))
    for call in (read_adapters, lambda p: load_adapters(_fresh(), p)):
        with pytest.raises(ValueError, match=rf"{CONFIG_NAME} disagrees with the config embedded in "
                                             rf"{WEIGHTS_NAME} \(keys \['layers', 'scale'\]\)"):
            call(tmp_path)
    (tmp_path / CONFIG_NAME).unlink()  # the header alone is enough
    assert read_adapters(tmp_path)[0]["scale"] == 0.5


def test_negative_task_indices_are_refused(tmp_path):
    """tasks=[-1] in a saved config used to load into row T-1 (Python's negative indexing)."""
    save_adapters(_trained(), tmp_path, tasks=[2])

    def negative(config):
        config["tasks"] = [-1]
    _rewrite(tmp_path, negative)
    with pytest.raises(ValueError, match=r"'tasks' must be distinct indices in \[0, num_tasks=3\), got \[-1\]"):
        load_adapters(_fresh(), tmp_path)


def test_peft_is_not_fooled_and_format_1_still_loads(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained()
    save_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):  # was KeyError: 'peft_type'
        peft.PeftModel.from_pretrained(_base(), str(tmp_path))

    def to_format_1(config):
        config["format_version"] = 1
        for key in ("exclude", "modules_to_save", "heads"):
            del config[key]
    _rewrite(tmp_path, to_format_1, json_name="adapter_config.json", digests=False)  # 0.1 wrote none
    x = torch.randn(3, 7)
    with pytest.warns(MissingChecksumWarning):
        fresh = load_adapters(_fresh(), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh, x), _outputs(model, x)))


# --------------------------------------------------------------------------------------------
# Checksums (issue 21 item 2): safetensors checks the layout, not the bytes
# --------------------------------------------------------------------------------------------
def _flip_bit(file, tensor, byte=3, bit=5):
    """Flip one bit inside `tensor`'s data region of a safetensors file (header: u64 size, json)."""
    data = bytearray(file.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + size])[tensor]["data_offsets"]
    assert start + byte < end
    data[8 + size + start + byte] ^= 1 << bit
    file.write_bytes(bytes(data))


def test_a_flipped_bit_is_refused_naming_the_file_and_the_tensor(tmp_path):
    """One flipped bit in adapters.safetensors used to load silently (damaged factors, no word)."""
    from cpkernels.sparsity import compression_report
    config = CPConfig(rank=3, num_tasks=T, modules_to_save=["head"])
    save_adapters(convert(_headed_base(), config), tmp_path)
    file = tmp_path / WEIGHTS_NAME
    for tensor in ("mid.B", "modules_to_save.head.weight"):  # a factor and a head
        good = file.read_bytes()
        _flip_bit(file, tensor)
        target = convert(_headed_base(), config)
        before = [p.detach().clone() for p in target.parameters()]
        match = rf"{file}: tensor '{tensor}' does not match its sha256 checksum"
        for call in (read_adapters, lambda p: cpkernels.from_pretrained(_headed_base(), p),
                     lambda p: load_adapters(target, p), compression_report):
            with pytest.raises(ChecksumError, match=match):
                call(tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))  # nothing was modified
        file.write_bytes(good)
    read_adapters(tmp_path)  # the intact file loads


def test_a_folder_without_checksums_loads_with_one_notice(tmp_path):
    """Folders written before digests existed still load, with one warning per load, naming the file."""
    import warnings
    model = _trained()
    save_adapters(model, tmp_path)
    _rewrite(tmp_path, lambda config: None, json_edit=lambda config: None, digests=False)
    x = torch.randn(3, 7)
    for load in (lambda p: load_adapters(_fresh(), p), lambda p: cpkernels.from_pretrained(_base(), p)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh = load(tmp_path)
        notices = [w for w in caught if issubclass(w.category, MissingChecksumWarning)]
        assert len(notices) == 1 and len(caught) == 1, [str(w.message) for w in caught]
        assert str(tmp_path / WEIGHTS_NAME) in str(notices[0].message) and "\n" not in str(notices[0].message)
        assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh, x), _outputs(model, x)))
    save_adapters(fresh, tmp_path)  # saving again adds them: no notice any more
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_adapters(tmp_path)


def test_a_tensor_added_after_saving_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    save_adapters(_trained(), tmp_path)
    file = tmp_path / WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "extra": torch.ones(2)}, str(file), metadata=metadata)
    with pytest.raises(ChecksumError, match=rf"{file}: tensor 'extra' has no recorded sha256 checksum"):
        read_adapters(tmp_path)

"""The transformers round trip: `save_pretrained` + `AutoModel.from_pretrained` keep only the base
weights (transformers drops A, B, C as "unexpected keys"), so the documented path is
`cpkernels.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir)`, heads included."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import cpkernels  # noqa: E402
from cpkernels import CPConfig  # noqa: E402
from cpkernels.convert import cp_layers  # noqa: E402
from cpkernels.modules import FusedCPLinear  # noqa: E402


def tiny_classifier_dir(path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=23, max_position_embeddings=32, num_labels=3)
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def load(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()


def logits(model, ids, task_ids):
    with torch.no_grad(), cpkernels.task_context(model, task_ids):
        return model(input_ids=ids).logits


def test_save_pretrained_then_from_pretrained_with_adapters_and_head(tmp_path):
    base_dir = tiny_classifier_dir(tmp_path / "base")
    model = cpkernels.convert(load(base_dir), CPConfig(rank=4, num_tasks=3, task_names=["a", "b", "c"],
                                                       modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as after training: factors and the head moved
        for _, layer in cp_layers(model):
            for p in (layer.A, layer.B, layer.C):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=g))
    ids = torch.randint(0, 61, (6, 5), generator=g)
    task_ids = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = logits(model, ids, task_ids)

    # What users try first: transformers alone loses the adapters (the base model comes back).
    model.save_pretrained(tmp_path / "full")
    plain = load(tmp_path / "full")
    assert not any(isinstance(m, FusedCPLinear) for m in plain.modules())

    with pytest.raises(FileNotFoundError, match="transformers save_pretrained folder"):
        cpkernels.from_pretrained(load(base_dir), tmp_path / "full")  # a clear pointer, not a bare miss

    # The documented path: adapters next to the base weights, no manual convert.
    cpkernels.save_adapters(model, tmp_path / "adapters")
    for base in (tmp_path / "full", base_dir):  # the saved full model, or the original base model
        restored = cpkernels.from_pretrained(load(base), tmp_path / "adapters")
        assert restored.cpkernels_config == model.cpkernels_config
        assert torch.equal(restored.classifier.weight, model.classifier.weight)  # the head came back
        assert restored.classifier.weight.requires_grad  # and trains, as modules_to_save says
        torch.testing.assert_close(logits(restored, ids, task_ids), expected, atol=1e-6, rtol=0)
    with torch.no_grad():  # the adapters matter: the base model alone differs
        assert (load(base_dir)(input_ids=ids).logits - expected).abs().max() > 1e-3

"""transformers.Trainer out of the box: a converted model takes a `task_ids` dataset column through
its forward (no remove_unused_columns=False, no compute_loss subclass), and the heads named in
`modules_to_save` train."""
import inspect

import pytest
import torch

from cpkernels import CPConfig, convert, cp_layers

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

TASKS = 3


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def _dataset(n=48, seq=8):
    # The label depends on the task only: the loss can fall only if the ids reach the layers (C[t]).
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 64, (n, seq), generator=g)
    task_ids = torch.randint(0, TASKS, (n,), generator=g)
    labels = (task_ids % 2).tolist()
    return datasets.Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": [[1] * seq] * n,
                                       "task_ids": task_ids.tolist(), "labels": labels})


def test_forward_signature_shows_task_ids():
    model = convert(_bert(), CPConfig(rank=2, num_tasks=TASKS, modules_to_save=["classifier"]))
    params = inspect.signature(model.forward).parameters
    assert "task_ids" in params and "input_ids" in params and "labels" in params and "self" not in params
    tokens = torch.randint(1, 64, (2, 5))
    with pytest.raises(ValueError, match="no task ids"):
        model(input_ids=tokens)  # no context left behind by a previous call either
    model(input_ids=tokens, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no task ids"):
        model(input_ids=tokens)


def test_trainer_trains_task_ids_column_and_head(tmp_path):
    # Before: Trainer dropped the task_ids column (BERT's forward takes **kwargs, not task_ids), every
    # layer raised "got no task ids", and the classifier head stayed frozen.
    model = convert(_bert(), CPConfig(rank=4, num_tasks=TASKS, modules_to_save=["classifier"]))
    head_before = model.classifier.weight.detach().clone()
    factors_before = {n: layer.C.detach().clone() for n, layer in cp_layers(model)}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=16,
        num_train_epochs=4, learning_rate=3e-2, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0)
    data = _dataset()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 12 and after < before - 0.05, (before, after, losses)
    assert not torch.equal(model.classifier.weight, head_before)  # the head trained
    assert all(not torch.equal(layer.C, factors_before[n]) for n, layer in cp_layers(model))

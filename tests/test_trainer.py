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


def test_accelerate_prepare_keeps_the_task_ids_keyword():
    accelerate = pytest.importorskip("accelerate")
    model = convert(_bert(), CPConfig(rank=2, num_tasks=TASKS, modules_to_save=["classifier"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # bf16 autocast: accelerate wraps model.forward; the wrapper must still show (and take) task_ids.
    # The accelerator state is a process-wide singleton (Trainer sets it too): start and end clean.
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        model, opt = accelerator.prepare(model, opt)
        assert "task_ids" in inspect.signature(model.forward).parameters
        tokens = torch.randint(1, 64, (4, 8))
        out = model(input_ids=tokens, task_ids=torch.tensor([0, 1, 2, 0]), labels=torch.tensor([0, 1, 0, 1]))
        accelerator.backward(out.loss)
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    assert model.classifier.weight.grad is not None
    assert all(layer.C.grad is not None and layer.C.grad.abs().sum() > 0 for _, layer in cp_layers(model))


def test_hf_gradient_checkpointing_with_checkpoint_context():
    # Trainer calls backward after forward returned, i.e. after the task_ids= call left its context:
    # the recomputed forward needs context_fn=checkpoint_context to see the ids again.
    from cpkernels import checkpoint_context

    tokens, ids, labels = torch.randint(1, 64, (4, 8)), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0, 1])
    plain = convert(_bert(), CPConfig(rank=2, num_tasks=TASKS, init="lora")).train()
    torch.manual_seed(1)  # the same dropout masks in both runs
    plain(input_ids=tokens, task_ids=ids, labels=labels).loss.backward()
    model = convert(_bert(), CPConfig(rank=2, num_tasks=TASKS, init="lora")).train()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context})
    torch.manual_seed(1)
    model(input_ids=tokens, task_ids=ids, labels=labels).loss.backward()
    for (name, got), (_, want) in zip(cp_layers(model), cp_layers(plain)):
        torch.testing.assert_close(got.A.grad, want.A.grad, msg=name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="got no task ids.*gradient checkpointing"):
        model(input_ids=tokens, task_ids=ids, labels=labels).loss.backward()

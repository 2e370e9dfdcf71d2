"""Whole-model conversion, task routing and merge/export (the parameter report lives in factors.py).

    model = cpkernels.convert(model, rank=8, num_tasks=4)      # nn.Linear -> FusedCPLinear, base frozen
    with cpkernels.task_context(model, task_ids):              # (batch,) ids, or per token
        loss = model(**batch).loss

Which layers `target_modules="all-linear"` converts (PEFT's convention, made explicit):
every nn.Linear except task and LM heads, i.e. the model's output embedding layer
(`get_output_embeddings()`, Hugging Face) and any Linear with a name component in `HEAD_NAMES`
(`classifier`, `pre_classifier`, `lm_head`, `score`, `qa_outputs`, `cls`). A BERT `pooler` is
part of the pre-trained backbone and is converted. Every base parameter is frozen, heads included:
unfreeze the heads you train (`model.classifier.requires_grad_(True)`).
"""
from __future__ import annotations

import contextlib
import copy
import re
import sys
from typing import Iterator

import torch
from torch import nn

from .factors import layer_info, parameter_report, print_parameter_report  # noqa: F401 (re-exported)
from .modules import INITS, FusedCPLinear
from .reference import check_task_ids_dtype

__all__ = ["convert", "cp_layers", "task_context", "merge", "unmerge", "export", "parameter_report",
           "print_parameter_report", "HEAD_NAMES"]

#: Name components that mark a task or LM head, which "all-linear" leaves alone.
HEAD_NAMES = frozenset({"classifier", "pre_classifier", "lm_head", "score", "qa_outputs", "cls"})


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def _name_matcher(spec, arg: str):
    """A predicate on qualified names: a str is a regex (full match), a list holds name suffixes."""
    if spec is None:
        return lambda name: False
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression: {exc}") from None
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(k, str) and k for k in spec):
        keys = tuple(spec)
        return lambda name: any(name == k or name.endswith("." + k) for k in keys)
    raise TypeError(f"{arg} must be a regex string or a list of module-name suffixes, got {spec!r}")


def _hf_conv1d():
    # GPT-2's Conv1D can only be in the model if transformers is already imported.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _is_head(name: str, module: nn.Module, output_embeddings) -> bool:
    return module is output_embeddings or any(part in HEAD_NAMES for part in name.split("."))


def _output_embeddings(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:  # transformers' default for models without an LM head
        return None


def _replace_modules(model: nn.Module, new_for: dict[int, nn.Module]) -> None:
    """Swap every occurrence of the old modules (by id) for their replacements, shared ones included."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_for:
                setattr(parent, child_name, new_for[id(child)])


def _task_names(task_names, num_tasks: int) -> list[str]:
    if task_names is None:
        return [f"task{i}" for i in range(num_tasks)]
    names = list(task_names)
    if len(names) != num_tasks or not all(isinstance(n, str) for n in names) or len(set(names)) != num_tasks:
        raise ValueError(f"task_names must be {num_tasks} distinct strings (num_tasks={num_tasks}), got {names!r}")
    return names


def convert(model: nn.Module, rank: int, num_tasks: int, target_modules="all-linear", exclude=None,
            scale: float = 1.0, task_names=None, init: str = "cp", factor_dtype=None) -> nn.Module:
    """Replace the targeted nn.Linear layers of `model` by FusedCPLinear, in place; return `model`.

    Args:
        rank, num_tasks, scale, init, factor_dtype: passed to `FusedCPLinear.from_linear` (weights
            are shared, not copied).
        target_modules: "all-linear" (every Linear but the heads, see the module docstring), a list of
            module-name suffixes (``["query", "value"]``), or any other string, read as a regex that
            must match the whole qualified name (``r".*\\.attention\\..*"``), as in PEFT.
        exclude: names to leave alone, in the same two forms (suffix list or regex).
        task_names: names of the tasks (default "task0", "task1", ...), stored in
            ``model.cpkernels_config`` and in saved adapters.

    Every parameter of the model is frozen first; only the new A, B, C train. GPT-2 style
    ``transformers.pytorch_utils.Conv1D`` layers (weight stored as (in, out)) are refused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("convert replaces submodules of a model; wrap a lone nn.Linear with "
                        "FusedCPLinear.from_linear(linear, rank, num_tasks)")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    names = _task_names(task_names, num_tasks)
    done = next((n for n, _ in cp_layers(model)), None)
    if done is not None:
        raise ValueError(f"model already contains FusedCPLinear layers (e.g. {done!r}); convert it only once")

    excluded = _name_matcher(exclude, "exclude")
    conv1d = _hf_conv1d()
    if target_modules == "all-linear":
        head = _output_embeddings(model)
        wanted = lambda name, m: not _is_head(name, m, head)  # noqa: E731
    else:
        matches = _name_matcher(target_modules, "target_modules")
        wanted = lambda name, m: matches(name)  # noqa: E731

    # Patterns select among the Linear layers; other modules they happen to match (a GELU inside
    # "blocks.1") are not candidates. Conv1D would silently hide all of GPT-2, so it is refused.
    targets = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear)
        if not name or not (linear or (conv1d is not None and isinstance(module, conv1d))):
            continue
        if not wanted(name, module) or excluded(name):
            continue
        if not linear:
            raise TypeError(
                f"module {name!r} is a transformers Conv1D (GPT-2 style, weight stored as (in, out)); cpkernels "
                f"converts only nn.Linear. Exclude it (exclude=...), or replace the model's Conv1D layers by "
                f"nn.Linear with the transposed weight before converting")
        targets.append((name, module))
    unused = []  # suffixes of a list that matched nothing: most likely typos
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        unused = [k for k in target_modules if not any(_name_matcher([k], "target_modules")(n) for n, _ in targets)]
    if not targets or unused:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        what = f"entries {unused} of " if unused else ""
        raise ValueError(f"{what}target_modules={target_modules!r} (exclude={exclude!r}) matched no nn.Linear; the "
                         f"model's Linear layers are {linears[:12]}{' ...' if len(linears) > 12 else ''}")

    model.requires_grad_(False)
    new_for = {}
    for name, linear in targets:
        layer = FusedCPLinear.from_linear(linear, rank, num_tasks, scale=scale, init=init,
                                          factor_dtype=factor_dtype)
        layer.layer_name = name
        new_for[id(linear)] = layer
    _replace_modules(model, new_for)
    model.cpkernels_config = {
        "rank": rank, "num_tasks": num_tasks, "task_names": names,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "exclude": exclude if exclude is None or isinstance(exclude, str) else list(exclude),
        "scale": float(scale), "init": init,
    }
    return model


def cp_layers(model: nn.Module) -> Iterator[tuple[str, FusedCPLinear]]:
    """(qualified name, layer) for every FusedCPLinear in `model`, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, FusedCPLinear):
            yield name, module


def _layers_or_raise(model: nn.Module) -> list[tuple[str, FusedCPLinear]]:
    layers = list(cp_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FusedCPLinear layers; call cpkernels.convert(model, ...) "
                         f"first")
    return layers


def _unmerged_layers_or_raise(model: nn.Module, action: str) -> list[tuple[str, FusedCPLinear]]:
    """The CP layers, refusing merged ones: their weight holds a copy of the update that `action` reads or changes."""
    layers = _layers_or_raise(model)
    for name, layer in layers:
        if layer.merged_task is not None:
            raise ValueError(f"layer {name!r} holds merged task {layer.merged_task}; call cpkernels.unmerge(model) "
                             f"before {action}")
    return layers


def _task_index(model: nn.Module, task) -> int:
    """A task given by index or by name (model.cpkernels_config["task_names"]) as an index."""
    if isinstance(task, str):
        names = getattr(model, "cpkernels_config", {}).get("task_names", [])
        if task not in names:
            raise ValueError(f"unknown task name {task!r}; the model's tasks are {names}")
        return names.index(task)
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task must be an int or a task name, got {type(task).__name__}")
    return task


# --------------------------------------------------------------------------------------------
# Task routing
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def task_context(model: nn.Module, task_ids):
    """Route every FusedCPLinear of `model` to `task_ids` inside the block; restore the previous ids after.

    `task_ids` is an int or task name (whole batch), a (batch,) integer tensor or list (one task per
    sample, broadcast over the sequence), or a tensor shaped like the layers' inputs minus the
    feature dim (one task per token). Ids are moved to each layer's device once, here. An int
    becomes a 0-d tensor so that torch.compile sees a tensor input instead of recompiling per task.
    Per-sample ids index the first dimension of every converted layer's input, so they suit
    batch-first models (Hugging Face); a sequence-first model needs ids shaped like its inputs.
    Contexts nest. With gradient checkpointing the backward pass re-runs forwards, so call
    ``loss.backward()`` inside the block.
    """
    layers = _layers_or_raise(model)
    if isinstance(task_ids, (str, int)):
        task_ids = torch.tensor(_task_index(model, task_ids))
    elif isinstance(task_ids, (list, tuple)):  # one task per sample, by index or by name
        task_ids = torch.as_tensor([_task_index(model, t) if isinstance(t, str) else t for t in task_ids])
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(f"task_ids must be an int, a task name, a list of ints or names, or an integer tensor, "
                        f"got {type(task_ids).__name__}")
    check_task_ids_dtype(task_ids)
    on_device = {}
    previous = [(layer, layer.task_ids) for _, layer in layers]
    try:
        for name, layer in layers:
            device = layer.weight.device
            if device not in on_device:
                on_device[device] = task_ids.to(device, non_blocking=True)
            layer.task_ids = on_device[device]
            layer.layer_name = layer.layer_name or name
        yield model
    finally:
        for layer, ids in previous:
            layer.task_ids = ids


# --------------------------------------------------------------------------------------------
# Merge / unmerge / export
# --------------------------------------------------------------------------------------------
def merge(model: nn.Module, task) -> None:
    """Add task `task`'s update into every converted layer's weight, in place (see FusedCPLinear.merge).

    The merged model then runs as the base model fine-tuned for that task, without task ids and at
    plain nn.Linear speed; `unmerge` restores the original weights bit for bit.
    """
    layers = _unmerged_layers_or_raise(model, "merging another task")
    task = _task_index(model, task)
    owners = {}
    for name, layer in layers:  # check everything before touching any weight
        layer._check_task(task)
        if id(layer.weight) in owners:
            raise ValueError(f"layers {owners[id(layer.weight)]!r} and {name!r} share one weight tensor; merging "
                             f"would add two updates into it")
        owners[id(layer.weight)] = name
    for _, layer in layers:
        layer.merge(task)


def unmerge(model: nn.Module) -> None:
    """Restore every merged layer's original weight exactly."""
    for _, layer in _layers_or_raise(model):
        layer.unmerge()


def export(model: nn.Module, task) -> nn.Module:
    """A deep copy of `model` for one task, with plain nn.Linear layers holding W0 + ΔW_task.

    The sum is taken in float64 and rounded once. The copy holds no cpkernels object (its state_dict
    loads into the original architecture), so it runs where cpkernels is not installed.
    `model` itself is unchanged (merged or not).
    """
    task = _task_index(model, task)
    for _, layer in _layers_or_raise(model):
        layer._check_task(task)
    if isinstance(model, FusedCPLinear):
        return model.to_linear(task)
    copied = copy.deepcopy(model)
    _replace_modules(copied, {id(layer): layer.to_linear(task) for _, layer in cp_layers(copied)})
    if "cpkernels_config" in copied.__dict__:
        del copied.cpkernels_config
    return copied

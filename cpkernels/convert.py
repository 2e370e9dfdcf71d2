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
import inspect
import re
import sys
from typing import Iterator

import torch
from torch import nn

from .config import CPConfig, model_config
from .factors import layer_info, parameter_report, print_parameter_report  # noqa: F401 (re-exported)
from .modules import ROUTES, FusedCPLinear, refuse_other_tasks
from .task_ids import check_dtype as check_task_ids_dtype
from .task_ids import own as own_task_ids

__all__ = ["convert", "cp_layers", "task_context", "checkpoint_context", "merge", "unmerge", "export",
           "parameter_report", "print_parameter_report", "HEAD_NAMES"]

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


_UNSET = object()  # a keyword the caller did not pass (so that it can be refused next to a CPConfig)


def convert(model: nn.Module, config: CPConfig | int | None = None, num_tasks=_UNSET, target_modules=_UNSET,
            exclude=_UNSET, scale=_UNSET, task_names=_UNSET, init=_UNSET, factor_dtype=None, *, rank=_UNSET,
            modules_to_save=_UNSET) -> nn.Module:
    """Replace the targeted nn.Linear (and GPT-2 Conv1D) layers of `model` by FusedCPLinear, in place.

    Two forms, one meaning::

        convert(model, CPConfig(rank=8, num_tasks=4, modules_to_save=["classifier"]))   # PEFT style
        convert(model, rank=8, num_tasks=4, target_modules=["query", "value"])         # keywords

    The settings (see `CPConfig` for each field):
        rank, num_tasks, scale, init: the factors' shape and start (`FusedCPLinear.from_linear`;
            weights are shared, not copied).
        target_modules: "all-linear" (every Linear but the heads, see the module docstring), a list of
            module-name suffixes (``["query", "value"]``), or any other string, read as a regex that
            must match the whole qualified name (``r".*\\.attention\\..*"``), as in PEFT.
        exclude: names to leave alone, in the same two forms (suffix list or regex).
        task_names: names of the tasks (default "task0", "task1", ...).
        modules_to_save: module-name suffixes of modules that train in full (task heads such as
            ``"classifier"``): they are never converted, and their parameters are unfrozen.
        factor_dtype: A, B, C's dtype (default the weight's), e.g. float32 factors on a bf16 model.

    Every other parameter of the model is frozen; only A, B, C and `modules_to_save` train. The model
    keeps the `CPConfig` in ``model.cpkernels_config``, and its forward accepts ``task_ids=`` (one
    task per sample or per token), which routes the call like `task_context` and shows in
    ``inspect.signature(model.forward)``, so `transformers.Trainer` keeps a ``task_ids`` column.
    GPT-2 style ``transformers.pytorch_utils.Conv1D`` layers (weight stored (in, out)) convert too,
    keeping their layout (``fan_in_fan_out``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("convert replaces submodules of a model; wrap a lone nn.Linear with "
                        "FusedCPLinear.from_linear(linear, rank, num_tasks)")
    config = _make_config(config, rank=rank, num_tasks=num_tasks, target_modules=target_modules, exclude=exclude,
                          scale=scale, task_names=task_names, init=init, modules_to_save=modules_to_save)
    done = next((n for n, _ in cp_layers(model)), None)
    if done is not None:
        raise ValueError(f"model already contains FusedCPLinear layers (e.g. {done!r}); convert it only once")

    target_modules, exclude = config.target_modules, config.exclude
    excluded = _name_matcher(exclude, "exclude")
    saved = _name_matcher(config.modules_to_save, "modules_to_save")
    conv1d = _hf_conv1d()
    if target_modules == "all-linear":
        head = _output_embeddings(model)
        wanted = lambda name, m: not _is_head(name, m, head)  # noqa: E731
    else:
        matches = _name_matcher(target_modules, "target_modules")
        wanted = lambda name, m: matches(name)  # noqa: E731

    # Patterns select among the Linear (and Conv1D) layers; other modules they happen to match (a GELU
    # inside "blocks.1") are not candidates. Modules to save train in full and are never converted.
    targets = []
    for name, module in model.named_modules():
        if not name or not (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))):
            continue
        if wanted(name, module) and not excluded(name) and not _inside(name, saved):
            targets.append((name, module))
    unused = []  # suffixes of a list that matched nothing: most likely typos
    if isinstance(target_modules, list):
        unused = [k for k in target_modules if not any(_name_matcher([k], "target_modules")(n) for n, _ in targets)]
    if not targets or unused:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   or (conv1d is not None and isinstance(m, conv1d))]
        what = f"entries {unused} of " if unused else ""
        raise ValueError(f"{what}target_modules={target_modules!r} (exclude={exclude!r}) matched no nn.Linear; the "
                         f"model's Linear layers are {linears[:12]}{' ...' if len(linears) > 12 else ''}")
    to_save = [(n, m) for n, m in model.named_modules() if n and saved(n)]
    missing = [k for k in config.modules_to_save or () if not any(_name_matcher([k], "")(n) for n, _ in to_save)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")

    model.requires_grad_(False)
    for _, module in to_save:
        module.requires_grad_(True)
    new_for = {}
    for name, module in targets:
        wrap = FusedCPLinear.from_linear if isinstance(module, nn.Linear) else FusedCPLinear.from_conv1d
        layer = wrap(module, config.rank, config.num_tasks, scale=config.scale, init=config.init,
                     factor_dtype=factor_dtype)
        layer.layer_name = name
        new_for[id(module)] = layer
    _replace_modules(model, new_for)
    model.cpkernels_config = config
    _route_forward(model)
    return model


def _make_config(config, **given) -> CPConfig:
    """The CPConfig of a `convert` call, from either form (refusing a mix of both)."""
    passed = {k: v for k, v in given.items() if v is not _UNSET}
    if isinstance(config, CPConfig):
        if passed:
            raise TypeError(f"convert got a CPConfig and the keyword(s) {sorted(passed)}; put every setting in the "
                            f"CPConfig (dataclasses.replace(config, ...))")
        return config
    if isinstance(config, dict):
        raise TypeError("convert takes a CPConfig, not a dict: convert(model, CPConfig.from_dict(d))")
    if config is not None:  # the positional form convert(model, rank, num_tasks)
        if "rank" in passed:
            raise TypeError("convert got rank twice (positionally and as rank=)")
        passed["rank"] = config
    missing = [k for k in ("rank", "num_tasks") if k not in passed]
    if missing:
        raise TypeError(f"convert needs a CPConfig or the keyword(s) {missing}")
    return CPConfig(**passed)


def _inside(name: str, saved) -> bool:
    """True when `name` or one of its parents is a module to save (its Linears train in full)."""
    parts = name.split(".")
    return any(saved(".".join(parts[:i])) for i in range(1, len(parts) + 1))


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
    """A task given by index or by name (model.cpkernels_config.task_names) as an index."""
    if isinstance(task, str):
        config = model_config(model)
        names = config.task_names if config is not None else []
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
    """Route every FusedCPLinear of `model` to `task_ids` inside the block, for the calling thread only.

    `task_ids` is an int or task name (whole batch), a (batch,) integer tensor or list (one task per
    sample, broadcast over the sequence), or a tensor shaped like the layers' inputs minus the
    feature dim (one task per token). Ids are copied to each layer's device once, here. An int
    becomes a 0-d tensor so that torch.compile sees a tensor input instead of recompiling per task.
    Per-sample ids index the first dimension of every converted layer's input, so they suit
    batch-first models (Hugging Face); a sequence-first model needs ids shaped like its inputs.

    The ids live in a `contextvars.ContextVar` (`cpkernels.modules.ROUTES`), not on the layers: two
    threads (or asyncio tasks) running one model in their own contexts each get their own ids;
    contexts nest, and when the block exits the previous routing is back (outside every context a
    layer raises "got no task ids"). A merged model (`merge`) accepts only its merged task.
    With gradient checkpointing the backward pass re-runs forwards: pass
    ``context_fn=cpkernels.checkpoint_context`` to the checkpoint (calling ``loss.backward()`` inside the
    block is enough on the CPU only; on CUDA, autograd's device threads do not see this context).
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
    # Merged layers accept their merged task only: checked here once per merged task (a host read),
    # not in every layer call.
    for task, name in {layer.merged_task: name for name, layer in layers if layer.merged_task is not None}.items():
        refuse_other_tasks(task_ids, task, f"layer {name!r}")
    on_device = {}
    routes = dict(ROUTES.get() or {})  # the enclosing contexts' routes, for layers outside `model`
    for name, layer in layers:
        device = layer.weight.device
        if device not in on_device:
            # A library-owned copy (task_ids.own): checked once here, so the ops skip the per-layer check,
            # and safe from the caller reusing its tensor while a checkpointed backward needs the ids.
            on_device[device] = own_task_ids(task_ids, device)
        routes[id(layer)] = on_device[device]
        layer.layer_name = layer.layer_name or name
    token = ROUTES.set(routes)
    try:
        yield model
    finally:
        ROUTES.reset(token)


def checkpoint_context():
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the recomputed
    forward runs with the task ids of the original forward, even when backward runs after the
    `task_context` block (as in `transformers.Trainer`) or on another thread (autograd's device
    threads). Hugging Face: ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": False, "context_fn": cpkernels.checkpoint_context})``.
    """
    routes = ROUTES.get()  # captured at forward time

    @contextlib.contextmanager
    def recompute():
        token = ROUTES.set(routes)
        try:
            yield
        finally:
            ROUTES.reset(token)

    return contextlib.nullcontext(), recompute()


class _RoutedForward:
    """``model.forward`` of a converted model: the original forward plus a ``task_ids=`` keyword.

    With ``task_ids`` the call runs inside ``task_context(model, task_ids)``; without, it is the
    original forward (inside an enclosing context, or on a merged model). Its ``__signature__`` is
    the original one plus ``task_ids``, which is what `transformers.Trainer`'s column filter
    (``inspect.signature(model.forward)``) reads, so a ``task_ids`` dataset column reaches the model.
    A callable object rather than a closure: ``copy.deepcopy(model)`` then routes the copy, not the
    original, and a pickled model unpickles.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.original = type(module).forward  # the class's function; bound to `module` at each call
        self.__doc__ = self.original.__doc__
        self.__name__ = "forward"

    @property
    def __signature__(self) -> inspect.Signature:
        # Computed when asked (not stored), so that pickling the model never pickles annotations.
        sig = inspect.signature(self.original)
        params = list(sig.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
        return sig.replace(parameters=params[1:])  # without `self`: this is reached as model.forward

    def __call__(self, *args, task_ids=None, **kwargs):
        if task_ids is None:
            return self.original(self.module, *args, **kwargs)
        with task_context(self.module, task_ids):
            return self.original(self.module, *args, **kwargs)


def _route_forward(model: nn.Module) -> None:
    """Give the converted model's forward a ``task_ids=`` keyword, unless it has one already (a model
    that routes itself, e.g. cpkernels.train's MultiTaskModel) or takes none of its own."""
    forward = type(model).forward
    if forward.__name__ == "_forward_unimplemented" or "task_ids" in inspect.signature(forward).parameters:
        return
    model.forward = _RoutedForward(model)


def _unroute_forward(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("forward"), _RoutedForward):
        del model.forward


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
    _replace_modules(copied, {id(layer): _plain_layer(layer, task) for _, layer in cp_layers(copied)})
    if "cpkernels_config" in copied.__dict__:
        del copied.cpkernels_config
    _unroute_forward(copied)
    return copied


def _plain_layer(layer: FusedCPLinear, task: int) -> nn.Module:
    """The layer for one task as the module type it came from: nn.Linear, or a GPT-2 Conv1D."""
    linear = layer.to_linear(task)
    if not layer.fan_in_fan_out:
        return linear
    conv = _hf_conv1d()(layer.out_features, layer.in_features)  # Conv1D(nf=out, nx=in)
    conv.weight = nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=linear.weight.requires_grad)
    conv.bias = linear.bias
    return conv

"""Save and load adapters: the CP factors of a converted model, its heads and its `CPConfig`.

    cpkernels.save_adapters(model, "out/adapters")                      # factors + heads + config
    model = cpkernels.from_pretrained(AutoModel.from_pretrained(base), "out/adapters")   # no convert needed

An adapter directory holds two files:

* ``adapters.safetensors``: per converted layer the tensors ``<layer>.A``, ``<layer>.B``, ``<layer>.C``
  (only the saved tasks' rows of C) and ``<layer>.bias`` when that bias was trained; per module of
  ``modules_to_save`` (task heads) its state_dict under ``modules_to_save.<module>.<key>``. The
  config is embedded in the header, so tensors and config can never come from two different saves,
  and so is the sha256 digest of every tensor, checked on load (a flipped bit is refused, naming the
  file and the tensor; folders saved before digests existed load with one MissingChecksumWarning).
* ``cpkernels_config.json``: the same config, readable. When both exist they must agree.

The directory is self-describing: `from_pretrained` (or `load_adapters` on a plain model) rebuilds
the converted layers from it. The config file is not named adapter_config.json on purpose: that is
PEFT's name, and `peft.PeftModel.from_pretrained` then failed with ``KeyError: 'peft_type'``; now it
says "Can't find 'adapter_config.json'". Directories written by cpkernels 0.1 (format 1, with our
config in adapter_config.json) are still read. For PEFT itself, write LoRA folders with `export_lora`.

Each file is written atomically (`cpkernels.io.atomic_write`). The file format and the reading of a
folder live below this module, in `cpkernels.reader` (and `factors.read_adapters`), so that nothing
imports upward.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .config import CPConfig, model_config
from .convert import convert
from .factors import (LayerFactors, converted_layers, layer_info, model_factors, parameter_report,  # noqa: F401
                      read_adapters, saved_factors)  # read_adapters: re-exported, it lived here
from .io import atomic_write  # re-exported: cpkernels.train imports it from here
from .modules import FusedCPLinear
from .reader import (CONFIG_NAME, FORMAT_VERSION, HEADS_PREFIX, PEFT_WEIGHTS_NAME, WEIGHTS_NAME,  # noqa: F401
                     encode_adapters, read_adapter_folder)
from .reader import safetensors as _safetensors

__all__ = ["save_adapters", "load_adapters", "from_pretrained", "read_adapters", "atomic_write", "export_lora",
           "from_lora", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME"]


def _config_of(model: nn.Module, layers) -> CPConfig:
    """The model's CPConfig; for layers built by hand (no convert), one that rebuilds exactly them."""
    config = model_config(model)
    if config is not None:
        return config
    num_tasks = layers[0][1].num_tasks
    # An exact-name regex, so that from_pretrained converts these layers and no other.
    return CPConfig(rank=max(1, max(m.rank for _, m in layers)), num_tasks=num_tasks, scale=layers[0][1].scale,
                    target_modules="|".join(re.escape(n) for n, _ in layers))


def _suffix_match(name: str, keys) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _heads(model: nn.Module, config: CPConfig) -> dict[str, nn.Module]:
    """{qualified name: module} for `config.modules_to_save`; an entry matching nothing is refused."""
    if not config.modules_to_save:
        return {}
    heads = {n: m for n, m in model.named_modules() if n and _suffix_match(n, config.modules_to_save)}
    unused = [k for k in config.modules_to_save if not any(_suffix_match(n, [k]) for n in heads)]
    if unused:
        raise ValueError(f"modules_to_save entries {unused} match no module of {type(model).__name__}")
    for name, module in heads.items():
        if any(isinstance(m, FusedCPLinear) for m in module.modules()):
            raise ValueError(f"module {name!r} is in modules_to_save but holds converted layers; a head trains in "
                             f"full, so leave it out of target_modules")
    return heads


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def save_adapters(model: nn.Module, path, tasks=None) -> None:
    """Write the CP factors, the heads (`CPConfig.modules_to_save`) and the config of `model` to the
    directory `path` (created if needed).

    `tasks` (indices or names) saves only those rows of C; A and B are always saved whole since
    every task needs them. Trained biases of converted layers are saved too.
    """
    layers = converted_layers(model, refuse_merged="saving adapters")
    num_tasks = layers[0][1].num_tasks
    if any(layer.num_tasks != num_tasks for _, layer in layers):
        raise ValueError("the model's FusedCPLinear layers disagree on num_tasks; cannot save one adapter set")
    config = _config_of(model, layers)
    if tasks is None:
        picked = list(range(num_tasks))
    else:
        items = [tasks] if isinstance(tasks, (int, str)) else list(tasks)
        try:
            picked = [config.task_index(t) for t in items]
        except (IndexError, ValueError, TypeError) as exc:
            raise ValueError(f"tasks must be distinct task indices in [0, num_tasks={num_tasks}) or task names, "
                             f"got {items!r}: {exc}") from None
        if not picked or len(set(picked)) != len(picked):
            raise ValueError(f"tasks must be distinct task indices in [0, num_tasks={num_tasks}) or task names, "
                             f"got {items!r}")
    index = torch.tensor(picked, dtype=torch.long)
    tensors, layer_cfg = {}, {}
    for name, f in model_factors(model).items():
        tensors[f"{name}.A"] = f.A.detach().cpu().contiguous()
        tensors[f"{name}.B"] = f.B.detach().cpu().contiguous()
        tensors[f"{name}.C"] = f.C.detach().cpu()[index].contiguous()
        if f.bias is not None:
            tensors[f"{name}.bias"] = f.bias.detach().cpu().contiguous()
        layer_cfg[name] = {**layer_info(dict(layers)[name]), "trained_bias": f.bias is not None}
    heads = {}
    for head_name, module in _heads(model, config).items():
        state = module.state_dict()
        heads[head_name] = sorted(state)
        for key, t in state.items():
            full = f"{HEADS_PREFIX}{head_name}.{key}"
            if full in tensors:
                raise ValueError(f"the tensor name {full!r} of head {head_name!r} clashes with a converted layer's")
            tensors[full] = t.detach().cpu().contiguous()
    text = json.dumps({"format_version": FORMAT_VERSION, **config.to_dict(), "tasks": picked,
                       "base_parameters": parameter_report(model)["base_parameters"], "layers": layer_cfg,
                       "heads": heads}, indent=2)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, encode_adapters(tensors, text))
    atomic_write(directory / CONFIG_NAME, (text + "\n").encode())


def _read(path) -> tuple[dict, CPConfig, dict[str, LayerFactors], dict[str, dict[str, torch.Tensor]]]:
    saved = read_adapter_folder(path)  # checks digests, config and tensors (cpkernels.reader)
    return saved.config, saved.cp_config, saved_factors(saved), saved.heads


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def _check_layers(model: nn.Module, model_layers: dict, config: dict, factors: dict, source) -> None:
    """Raise a ValueError naming the layer and the shapes for every way the adapters cannot fit."""
    missing = [n for n in model_layers if n not in factors]
    extra = [n for n in factors if n not in model_layers]
    if missing or extra:
        raise ValueError(f"{source} does not match the model's converted layers: model layers without an adapter "
                         f"{missing[:8]}, adapters for layers the model lacks {extra[:8]}")
    own = model_config(model)
    model_rank = own.rank if own is not None else max(m.rank for m in model_layers.values())
    for name, layer in model_layers.items():
        f = factors[name]
        if (layer.out_features, layer.in_features) != (f.out_features, f.in_features):
            raise ValueError(f"layer {name!r}: the model has (out_features, in_features) = "
                             f"{(layer.out_features, layer.in_features)} but {source} has "
                             f"{(f.out_features, f.in_features)}")
        if layer.num_tasks != config["num_tasks"]:
            raise ValueError(f"layer {name!r} has num_tasks={layer.num_tasks} (C is {tuple(layer.C.shape)}) but "
                             f"{source} was saved with num_tasks={config['num_tasks']}; convert the model with "
                             f"num_tasks={config['num_tasks']}")
        # Ranks may differ per layer only by pruning within one conversion rank: a rank-8 model must
        # not silently become rank 4 because someone loaded the wrong adapters.
        if f.rank != layer.rank and config["rank"] != model_rank:
            raise ValueError(f"layer {name!r} has rank {layer.rank} (the model was converted with rank={model_rank}) "
                             f"but {source} holds rank {f.rank} (saved from a rank={config['rank']} conversion); "
                             f"convert with rank={config['rank']}, or call cpkernels.from_pretrained on the "
                             f"unconverted model")
        if f.bias is not None and layer.bias is None:
            raise ValueError(f"layer {name!r} has no bias but {source} holds a trained bias of shape "
                             f"{tuple(f.bias.shape)}")


def _check_heads(model: nn.Module, heads: dict, source) -> dict[str, dict[str, torch.Tensor]]:
    """{head: its state_dict} of the model, checked against the saved heads (names, keys, shapes)."""
    targets = {}
    for head, saved in heads.items():
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"{source} holds head {head!r} (modules_to_save) but the model has no such module") \
                from None
        state = module.state_dict()
        if set(state) != set(saved):
            raise ValueError(f"head {head!r}: the model's module has tensors {sorted(state)} but {source} has "
                             f"{sorted(saved)}")
        for key, t in saved.items():
            if state[key].shape != t.shape:
                raise ValueError(f"head {head!r}: {key} is {tuple(state[key].shape)} in the model but "
                                 f"{tuple(t.shape)} in {source}")
        targets[head] = state
    return targets


def _check_plain(model: nn.Module, config: dict, factors: dict, heads: dict, source) -> None:
    """Before converting a plain model: every saved layer exists as a Linear of the saved shape."""
    for name, f in factors.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source} holds layer {name!r} but the model has no such module") from None
        shape = _linear_shape(module)
        if shape != (f.out_features, f.in_features):
            raise ValueError(f"layer {name!r}: {source} holds an adapter for a Linear of (out, in) = "
                             f"{(f.out_features, f.in_features)}, the model has a {type(module).__name__} "
                             f"{shape or ''}")
        if f.bias is not None and module.bias is None:
            raise ValueError(f"layer {name!r} has no bias but {source} holds a trained bias")
    _check_heads(model, heads, source)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of an nn.Linear or a GPT-2 Conv1D (weight stored (in, out)); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return tuple(module.weight.shape[::-1])
    return None


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load what `save_adapters` wrote into `model`, in place; return `model`.

    A plain (unconverted) model is converted first with the saved `CPConfig`, as `from_pretrained` does.
    A converted model must match: layer names, (out, in) features, num_tasks, and the rank (per layer
    ranks may differ only after pruning within one conversion rank; the layer then gets new factor
    Parameters through `set_factors`: rebuild the optimizer). Each layer's scale is set to the saved one,
    the heads (``modules_to_save``) are loaded, and the saved task names become the model's. When only
    some tasks were saved, the other tasks' rows of C are kept if the saved A and B equal the model's
    (adapters split from one training run), and zeroed otherwise: those rows mean nothing with other
    shared factors. Nothing is modified unless everything fits (a plain model is checked before it is
    converted).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config, cp, factors, heads = _read(path)
    source = f"the adapters at {path}"
    if not any(isinstance(m, FusedCPLinear) for m in model.modules()):
        _check_plain(model, config, factors, heads, source)
        convert(model, cp)
    model_layers = dict(converted_layers(model, refuse_merged="loading adapters"))
    _check_layers(model, model_layers, config, factors, source)
    head_states = _check_heads(model, heads, source)
    tasks = torch.tensor(config["tasks"], dtype=torch.long)
    with torch.no_grad():
        for name, layer in model_layers.items():
            f = factors[name]
            A, B = f.A.to(layer.A), f.B.to(layer.B)
            same_rank = A.shape[1] == layer.rank
            keep = same_rank and torch.equal(A, layer.A) and torch.equal(B, layer.B)
            C = layer.C.detach().clone() if keep else layer.C.new_zeros(layer.num_tasks, A.shape[1])
            C[tasks.to(C.device)] = f.C.to(C)
            if same_rank:  # in place: the Parameters (and an optimizer holding them) stay valid
                layer.A.copy_(A)
                layer.B.copy_(B)
                layer.C.copy_(C)
            else:
                layer.set_factors(A, B, C)
            layer.scale = f.scale
            if f.bias is not None:
                layer.bias.copy_(f.bias)
        for head, state in head_states.items():
            for key, t in heads[head].items():
                state[key].copy_(t)
    own = model_config(model)
    if own is not None:  # the tasks and the scale are now the saved ones; how it was converted stays
        model.cpkernels_config = dataclasses.replace(own, task_names=list(cp.task_names), scale=cp.scale)
    return model


def from_pretrained(model: nn.Module, path) -> nn.Module:
    """`model` with the adapters of `path`: converted with the saved `CPConfig` if it is plain, then
    loaded (factors, scales, heads, task names) as `load_adapters` does; returns `model`.

    The way back from ``transformers``' ``save_pretrained``: it saves the base weights (and drops the
    factors on load), so keep the adapters with `save_adapters` and load them onto the base::

        model = cpkernels.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir)
    """
    return load_adapters(model, path)


# --------------------------------------------------------------------------------------------
# LoRA interop (PEFT adapter folders)
# --------------------------------------------------------------------------------------------
# One CP layer holds T LoRA updates: ΔW_t = s·A·diag(c_t)·Bᵀ = (A)·(diag(s·c_t)·Bᵀ), i.e. PEFT's
# lora_B·lora_A·scaling with lora_B = A (d_out × r), lora_A = diag(c_t)·Bᵀ (r × d_in) and
# scaling = lora_alpha / r = s. The other way, T LoRA adapters side by side are one CP layer of rank
# Σ r_t whose C holds each adapter's scaling on its own block of components and 0 elsewhere.
PEFT_CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def _exact(name: str) -> str:
    r"""A PEFT pattern key that matches the module `name` and nothing else. PEFT matches rank_pattern /
    alpha_pattern keys with re.match(r"(.*\.)?(KEY)$"): the "^" stops "0" from also matching "x.0"."""
    return "^" + re.escape(name)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a dotted suffix of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _folder_name(task_name: str) -> str:
    # A task name becomes a directory: refuse ones that would land elsewhere ("../x", "a/b").
    if not re.fullmatch(r"[\w.+-]+", task_name) or set(task_name) == {"."}:
        raise ValueError(f"task name {task_name!r} cannot be a folder name; rename the task (CPConfig.task_names) "
                         f"to letters, digits, '_', '-', '+' and '.'")
    return task_name


def export_lora(model: nn.Module, path, tasks=None) -> list[Path]:
    """Write one standard PEFT LoRA adapter folder per task under `path` (``path/<task name>/`` with
    adapter_config.json and adapter_model.safetensors); return the folders.

    Each holds lora_A = diag(c_t)·Bᵀ, lora_B = A and lora_alpha = s·r per converted layer (rank_pattern
    and alpha_pattern where layers differ, e.g. after pruning; layers pruned to rank 0 are left out),
    plus the heads of ``modules_to_save`` (under PEFT's keys; `from_lora` reads them back).
    ``peft.PeftModel.from_pretrained(base_model, folder)`` then reproduces the task's output, as does any
    multi-LoRA server that reads PEFT folders. A trained bias of a converted layer has no LoRA equivalent
    and is refused.
    """
    st = _safetensors()
    layers = dict(converted_layers(model, refuse_merged="exporting LoRA adapters"))
    config = _config_of(model, list(layers.items()))
    picked = [config.task_index(t) for t in ([tasks] if isinstance(tasks, (int, str)) else tasks)] \
        if tasks is not None else list(range(config.num_tasks))
    factors = {n: f for n, f in model_factors(model).items() if f.rank > 0}
    if not factors:
        raise ValueError("every converted layer has rank 0 (all pruned): there is no update to export")
    trained = [n for n, f in factors.items() if f.bias is not None]
    if trained:
        raise ValueError(f"layers {trained[:4]} train their bias, which a LoRA adapter cannot hold; export "
                         f"cpkernels.export(model, task) for a plain model instead")
    rank = max(f.rank for f in factors.values())
    scale = next(iter(factors.values())).scale
    heads = {n: m.state_dict() for n, m in _heads(model, config).items()}
    peft_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": rank, "lora_alpha": scale * rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True,
        "target_modules": "|".join(re.escape(n) for n in factors),  # a regex: exactly these modules
        "rank_pattern": {_exact(n): f.rank for n, f in factors.items() if f.rank != rank},
        "alpha_pattern": {_exact(n): f.scale * f.rank for n, f in factors.items() if f.scale * f.rank != scale * rank},
        # GPT-2's Conv1D stores its weight (in, out); PEFT needs to know to merge such layers.
        "fan_in_fan_out": any(layers[n].fan_in_fan_out for n in factors),
        "modules_to_save": sorted(heads) or None,
    }
    folders = []
    root = Path(path)
    names = {t: _folder_name(config.task_names[t]) for t in picked}  # all checked before anything is written
    for t in picked:
        tensors = {}
        for name, f in factors.items():
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (f.B.detach() * f.C.detach()[t]).T.cpu().contiguous()
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = f.A.detach().cpu().contiguous()
        for head, state in heads.items():
            tensors.update({f"{_PEFT_PREFIX}{head}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
        folder = root / names[t]
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / PEFT_WEIGHTS_NAME, st.torch.save(tensors, metadata={"format": "pt"}))
        atomic_write(folder / PEFT_CONFIG_NAME, (json.dumps(peft_config, indent=2) + "\n").encode())
        folders.append(folder)
    return folders


class _Lora(NamedTuple):
    """One PEFT LoRA folder as `_read_lora` found it."""
    name: str                                                   # the folder's name
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # {layer: (lora_A, lora_B, scaling)}
    modules_to_save: list[str]                                  # its config's entries (name suffixes)
    others: dict[str, torch.Tensor]                             # every other tensor, by model key


def _read_lora(folder) -> _Lora:
    """One PEFT LoRA folder, refusing what a CP layer cannot hold (DoRA, biases, embeddings). Tensors that
    are not LoRA weights are kept (under their model keys) for the `modules_to_save` heads, which
    `from_lora` matches against the model; a folder without modules_to_save may hold none."""
    st = _safetensors()
    folder = Path(folder)
    config_file, weights_file = folder / PEFT_CONFIG_NAME, folder / PEFT_WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it needs {PEFT_CONFIG_NAME} and "
                                f"{PEFT_WEIGHTS_NAME} (a .bin adapter: load and save it with PEFT first)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int) or "lora_alpha" not in config:
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r} (r={config.get('r')!r}, "
                         f"lora_alpha={config.get('lora_alpha')!r}); from_lora reads LORA adapters with r and "
                         f"lora_alpha")
    unsupported = [k for k in ("use_dora", "lora_bias", "use_qalora", "target_parameters", "layer_replication",
                               "trainable_token_indices") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise ValueError(f"{config_file}: {unsupported} cannot become part of a shared CP layer (each adapter "
                         f"would need its own); only plain LoRA weights and heads "
                         f"(modules_to_save) convert")
    modules_to_save = config.get("modules_to_save") or []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]  # PEFT accepts a single name too
    if not isinstance(modules_to_save, list) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise ValueError(f"{config_file}: modules_to_save must be a list of module names, got {modules_to_save!r}")
    with st.safe_open(str(weights_file), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pairs, others = {}, {}
    for key in tensors:
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is not None:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensors[key]
        elif modules_to_save:
            # PEFT saves a modules_to_save module's state_dict under the model's own keys (its wrapper's
            # "modules_to_save.<adapter>." is dropped on save and put back on load).
            others[key.removeprefix(_PEFT_PREFIX)] = tensors[key]
        else:
            raise ValueError(f"{weights_file}: tensor {key!r} is not a LoRA lora_A/lora_B weight of a Linear layer")
    layers = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{weights_file}: layer {name!r} has only lora_{''.join(pair)}")
        lora_A, lora_B = pair["A"], pair["B"]
        r = lora_A.shape[0]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != r:
            raise ValueError(f"{weights_file}: layer {name!r} has lora_A {tuple(lora_A.shape)} and lora_B "
                             f"{tuple(lora_B.shape)}; expected (r, in) and (out, r)")
        want_r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        if want_r != r:
            raise ValueError(f"{config_file}: layer {name!r} has rank {r} in its weights but {want_r} in its config")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # PEFT's two rules
        layers[name] = (lora_A, lora_B, float(scaling))
    if not layers:
        raise ValueError(f"{weights_file} holds no LoRA weights")
    return _Lora(folder.name, layers, modules_to_save, others)


def _lora_heads(model: nn.Module, adapters: list[_Lora], folders: list, layer_names) -> dict[str, dict]:
    """{head: state} to load for the modules_to_save of the LoRA folders: one model holds one head per
    module, so every folder must carry the same values; a folder that does not list the head runs
    with the base model's, which then must equal the others'. Consumes the head tensors of `others`."""
    entries = list(dict.fromkeys(e for a in adapters for e in a.modules_to_save))
    matched = [n for n, _ in model.named_modules() if n and _suffix_match(n, entries)]
    unused = [e for e in entries if not any(_suffix_match(n, [e]) for n in matched)]
    if unused:
        raise ValueError(f"the LoRA adapters' modules_to_save entries {unused} match no module of "
                         f"{type(model).__name__}; from_lora needs the base model they were trained on")
    # A module inside another head is saved as part of it (PEFT wraps the outer one).
    heads = [n for n in matched if not any(n.startswith(o + ".") for o in matched)]
    loaded = {}
    for head in heads:
        inside = [n for n in layer_names if n == head or n.startswith(head + ".")]
        if inside:
            raise ValueError(f"layer {inside[0]!r} has LoRA weights but lies inside {head!r}, a modules_to_save "
                             f"head that trains in full; a converted layer cannot sit inside a head")
        own = {k: t.detach() for k, t in model.get_submodule(head).state_dict().items()}
        saved, groups = None, []  # groups: [(state, [folders])] with equal values as loaded (model's dtype)
        for folder, a in zip(folders, adapters):
            if _suffix_match(head, a.modules_to_save):
                missing = [k for k in own if f"{head}.{k}" not in a.others]
                if missing:
                    raise ValueError(f"{folder}: head {head!r} (modules_to_save) lacks the tensors {missing}")
                state = saved = {k: a.others.pop(f"{head}.{k}") for k in own}
                label = str(folder)
            else:
                state, label = own, f"{folder} (the base model's {head!r}: not in its modules_to_save)"
            for ref, members in groups:
                if all(state[k].shape == own[k].shape
                       and torch.equal(state[k].to(own[k].dtype), ref[k].to(own[k].dtype)) for k in own):
                    members.append(label)
                    break
            else:
                groups.append((state, [label]))
        if len(groups) > 1:
            raise ValueError(f"the LoRA adapters disagree on head {head!r} (modules_to_save): "
                             f"{' vs '.join(str(m) for _, m in groups)}; one CP model holds one {head!r} for all "
                             f"tasks, so only heads equal in every folder convert")
        loaded[head] = saved
    for folder, a in zip(folders, adapters):
        if a.others:
            raise ValueError(f"{folder}: tensors {sorted(a.others)[:5]} are neither LoRA lora_A/lora_B weights nor "
                             f"part of a modules_to_save module {a.modules_to_save}")
    return loaded


def from_lora(model: nn.Module, folders, task_names=None) -> nn.Module:
    """Turn T PEFT LoRA adapters trained on one base model into one set of CP layers of `model` (the
    plain base), in place, with no approximation; return `model`. The argument order is
    `from_pretrained`'s and ``peft.PeftModel.from_pretrained``'s: the model, then where the weights are.

    Each layer gets rank Σ_t r_t: A = [lora_B¹ … lora_Bᵀ], B = [lora_A¹ᵀ … lora_Aᵀᵀ], and C[t] holds
    adapter t's scaling (lora_alpha / r) on its own block of components and 0 elsewhere (s = 1). A layer
    that some adapter does not touch gets no block for it. Task t then computes exactly adapter t, and
    one fused launch serves a batch mixing all of them (``task_ids`` per row). Task names default to
    the folder names. Heads (``modules_to_save``, as `export_lora` writes them) are loaded and become the
    model's `CPConfig.modules_to_save` when they are equal in every folder; heads that differ between
    folders are refused (one model holds one head per module). Save the result with `save_adapters`. To
    trade exactness for fewer components, `cpkernels.sparsity.compress(model, rank)` fits a smaller CP
    decomposition and reports its error.

    ``from_lora(folders, model)`` (the order before 0.2) still works for one release, with a
    DeprecationWarning.
    """
    if not isinstance(model, nn.Module) and isinstance(folders, nn.Module) \
            and isinstance(model, (list, tuple, str, os.PathLike)):
        warnings.warn("from_lora(folders, model) is deprecated: call from_lora(model, folders), the order of "
                      "from_pretrained(model, path) and PeftModel.from_pretrained(model, path); the old order "
                      "stops working in the next release", DeprecationWarning, stacklevel=2)
        model, folders = folders, model
    if not isinstance(model, nn.Module) or isinstance(folders, nn.Module):
        raise TypeError(f"from_lora(model, folders, task_names=None) takes the plain base model (an nn.Module) and "
                        f"a list of PEFT LoRA folders, got {type(model).__name__} and {type(folders).__name__}")
    if any(isinstance(m, FusedCPLinear) for m in model.modules()):
        raise ValueError("from_lora converts a plain base model; this one already has FusedCPLinear layers")
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    adapters = [_read_lora(f) for f in folders]
    if not adapters:
        raise ValueError("from_lora needs at least one LoRA folder")
    if task_names is None:
        names = [a.name for a in adapters]
        task_names = names if len(set(names)) == len(names) else None
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = sorted({n for a in adapters for n in a.layers if n not in order})
    if missing:
        raise ValueError(f"the LoRA adapters name layers the model lacks: {missing[:8]}; from_lora needs the "
                         f"base model they were trained on")
    names = sorted({n for a in adapters for n in a.layers}, key=order.__getitem__)
    heads = _lora_heads(model, adapters, folders, names)
    T = len(adapters)
    factors = {}
    for name in names:
        blocks = [(t, a.layers[name]) for t, a in enumerate(adapters) if name in a.layers]
        A = torch.cat([lora_B for _, (_, lora_B, _) in blocks], dim=1)
        B = torch.cat([lora_A.T for _, (lora_A, _, _) in blocks], dim=1)
        C = torch.zeros(T, A.shape[1], dtype=A.dtype)
        start = 0
        for t, (lora_A, _, scaling) in blocks:
            C[t, start:start + lora_A.shape[0]] = scaling
            start += lora_A.shape[0]
        try:
            factors[name] = LayerFactors(name, A, B, C)
        except ValueError as exc:  # adapters of one layer with different (in, out): not one base model
            raise ValueError(f"the LoRA adapters disagree on layer {name!r}: {exc}") from None
    source = f"the LoRA adapters {[str(f) for f in folders]}"
    _check_plain(model, None, factors, heads, source)
    config = CPConfig(rank=max(f.rank for f in factors.values()), num_tasks=T, task_names=task_names,
                      target_modules="|".join(re.escape(n) for n in names), scale=1.0,
                      modules_to_save=sorted(heads) or None)
    convert(model, config)
    head_states = _check_heads(model, heads, source)
    with torch.no_grad():
        for name, layer in converted_layers(model):
            f = factors[name]
            if f.rank == layer.rank:
                for p, v in ((layer.A, f.A), (layer.B, f.B), (layer.C, f.C)):
                    p.copy_(v)
            else:
                layer.set_factors(f.A, f.B, f.C)
        for head, state in head_states.items():
            for key, t in heads[head].items():
                state[key].copy_(t)
    return model

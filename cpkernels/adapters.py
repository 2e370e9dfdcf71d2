"""Save and load the CP factors of a converted model: `adapters.safetensors` + `adapter_config.json`.

The directory holds, per converted layer, the tensors ``<layer>.A``, ``<layer>.B``, ``<layer>.C``
(only the saved tasks' rows of C) and ``<layer>.bias`` when that bias was trained. The config is
written twice: embedded in the safetensors header (the copy that `read_adapters` trusts, so that
tensors and config can never come from two different saves) and as a readable adapter_config.json.
Each file is written atomically: to a temporary file in the same directory, fsync'ed, then
renamed over the old one with os.replace.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .config import model_config
from .io import atomic_write  # re-exported: cpkernels.train imports it from here
from .convert import _task_index, _unmerged_layers_or_raise, layer_info, parameter_report

__all__ = ["save_adapters", "load_adapters", "read_adapters", "atomic_write", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME"]

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
_HEADER_KEY = "cpkernels_adapter_config"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError("saving and loading adapters needs safetensors: pip install safetensors") from exc
    return safetensors


def _selected_tasks(model, tasks, num_tasks: int) -> list[int]:
    if tasks is None:
        return list(range(num_tasks))
    if isinstance(tasks, (int, str)):
        tasks = [tasks]
    picked = [_task_index(model, t) for t in tasks]
    bad = [t for t in picked if not 0 <= t < num_tasks]
    if bad or not picked or len(set(picked)) != len(picked):
        raise ValueError(f"tasks must be distinct task indices in [0, num_tasks={num_tasks}) or task names, "
                         f"got {list(tasks)!r}")
    return picked


def save_adapters(model: nn.Module, path, tasks=None) -> None:
    """Write the CP factors of `model` to the directory `path` (created if needed).

    `tasks` (indices or names) saves only those rows of C; A and B are always saved whole since
    every task needs them. Trained biases of converted layers are saved; other trainable
    parameters (task heads) are not: save them with the rest of your training state.
    """
    st = _safetensors()
    layers = _unmerged_layers_or_raise(model, "saving adapters")
    num_tasks = layers[0][1].num_tasks
    if any(layer.num_tasks != num_tasks for _, layer in layers):
        raise ValueError("the model's FusedCPLinear layers disagree on num_tasks; cannot save one adapter set")
    picked = _selected_tasks(model, tasks, num_tasks)
    base = model_config(model)
    base = base.to_dict() if base is not None else {}
    tensors, layer_cfg = {}, {}
    index = torch.tensor(picked, dtype=torch.long)
    for name, layer in layers:
        tensors[f"{name}.A"] = layer.A.detach().cpu().contiguous()
        tensors[f"{name}.B"] = layer.B.detach().cpu().contiguous()
        tensors[f"{name}.C"] = layer.C.detach().cpu()[index].contiguous()
        trained_bias = layer.bias is not None and layer.bias.requires_grad
        if trained_bias:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
        layer_cfg[name] = {**layer_info(layer), "trained_bias": trained_bias}
    config = {
        "format_version": FORMAT_VERSION,
        "num_tasks": num_tasks,
        "task_names": base.get("task_names", [f"task{i}" for i in range(num_tasks)]),
        "tasks": picked,
        "rank": base.get("rank", max(info["rank"] for info in layer_cfg.values())),
        "target_modules": base.get("target_modules"),
        "scale": base.get("scale", layers[0][1].scale),
        "init": base.get("init"),
        "base_parameters": parameter_report(model)["base_parameters"],
        "layers": layer_cfg,
    }
    text = json.dumps(config, indent=2)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, st.torch.save(tensors, metadata={_HEADER_KEY: text}))
    atomic_write(directory / CONFIG_NAME, (text + "\n").encode())


def read_adapters(path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {layer name: {"A", "B", "C"[, "bias"]}}) from an adapter directory (or its .safetensors
    file), on the CPU, without a model. C holds the rows of ``config["tasks"]``."""
    st = _safetensors()
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no adapter file at {file} (expected a directory written by save_adapters)")
    with st.safe_open(str(file), framework="pt", device="cpu") as f:
        header = (f.metadata() or {}).get(_HEADER_KEY)
        if header is None:
            raise ValueError(f"{file} is not a cpkernels adapter file (no {_HEADER_KEY!r} in its header)")
        config = json.loads(header)
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{file} has adapter format_version {version!r}; this cpkernels reads {FORMAT_VERSION}")
    factors = {}
    for name, info in config["layers"].items():
        parts = ("A", "B", "C") + (("bias",) if info["trained_bias"] else ())
        missing = [p for p in parts if f"{name}.{p}" not in tensors]
        if missing:
            raise ValueError(f"{file}: layer {name!r} lacks tensors {missing}; the file is damaged")
        factors[name] = {p: tensors.pop(f"{name}.{p}") for p in parts}
        r, want = info["rank"], {"A": (info["out_features"], info["rank"]), "B": (info["in_features"], info["rank"]),
                                 "C": (len(config["tasks"]), info["rank"])}
        if info["trained_bias"]:
            want["bias"] = (info["out_features"],)  # else a damaged bias would broadcast silently on load
        got = {p: tuple(factors[name][p].shape) for p in want}
        if got != want:
            raise ValueError(f"{file}: layer {name!r} has shapes {got} but its config says {want} (rank {r})")
    if tensors:
        raise ValueError(f"{file}: tensors {sorted(tensors)[:5]} belong to no layer of the config; the file is damaged")
    return config, factors


def _check_compatible(model_layers: dict, config: dict, factors: dict, source) -> None:
    """Raise a ValueError naming the layer and the shapes for every way the adapters cannot fit."""
    missing = [n for n in model_layers if n not in factors]
    extra = [n for n in factors if n not in model_layers]
    if missing or extra:
        raise ValueError(f"{source} does not match the model's converted layers: model layers without an adapter "
                         f"{missing[:8]}, adapters for layers the model lacks {extra[:8]}")
    for name, layer in model_layers.items():
        info = config["layers"][name]
        if (layer.out_features, layer.in_features) != (info["out_features"], info["in_features"]):
            raise ValueError(f"layer {name!r}: the model has (out_features, in_features) = "
                             f"{(layer.out_features, layer.in_features)} but {source} has "
                             f"{(info['out_features'], info['in_features'])}")
        if layer.num_tasks != config["num_tasks"]:
            raise ValueError(f"layer {name!r} has num_tasks={layer.num_tasks} (C is {tuple(layer.C.shape)}) but "
                             f"{source} was saved with num_tasks={config['num_tasks']}; convert the model with "
                             f"num_tasks={config['num_tasks']}")
        if info["trained_bias"] and layer.bias is None:
            raise ValueError(f"layer {name!r} has no bias but {source} holds a trained bias of shape "
                             f"{tuple(factors[name]['bias'].shape)}")


def load_adapters(model: nn.Module, path) -> None:
    """Load factors saved by `save_adapters` into the converted `model`, in place.

    Layer names, (out, in) features and num_tasks must match; ranks may differ per layer (after
    pruning), in which case the layer gets new factor Parameters through `set_factors` (rebuild the
    optimizer). Each layer's scale is set to the saved one. When only some tasks were saved, the
    other tasks' rows of C are kept if the saved A and B equal the model's (adapters split from one
    training run), and zeroed otherwise: those rows mean nothing with other shared factors.
    Nothing is modified unless every layer fits.
    """
    config, factors = read_adapters(path)
    model_layers = dict(_unmerged_layers_or_raise(model, "loading adapters"))
    _check_compatible(model_layers, config, factors, f"the adapters at {path}")
    tasks = torch.tensor(config["tasks"], dtype=torch.long)
    with torch.no_grad():
        for name, layer in model_layers.items():
            f = factors[name]
            A, B = f["A"].to(layer.A), f["B"].to(layer.B)
            same_rank = A.shape[1] == layer.rank
            keep = same_rank and torch.equal(A, layer.A) and torch.equal(B, layer.B)
            C = layer.C.detach().clone() if keep else layer.C.new_zeros(layer.num_tasks, A.shape[1])
            C[tasks.to(C.device)] = f["C"].to(C)
            if same_rank:  # in place: the Parameters (and an optimizer holding them) stay valid
                layer.A.copy_(A)
                layer.B.copy_(B)
                layer.C.copy_(C)
            else:
                layer.set_factors(A, B, C)
            layer.scale = float(config["layers"][name]["scale"])
            if "bias" in f:
                layer.bias.copy_(f["bias"])
    if model_config(model) is not None:
        model.cpkernels_config = dataclasses.replace(model_config(model), task_names=list(config["task_names"]))

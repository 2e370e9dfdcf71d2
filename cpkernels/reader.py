"""The adapter file format, and reading an adapter folder without a model.

This sits below `factors` (beside `io`): it returns plain tensors and the checked config, and
`factors.read_adapters` builds the `LayerFactors` from them, so that nothing imports upward
(`adapters`, which saves and loads onto a model, sits above both).

``adapters.safetensors`` holds per converted layer ``<layer>.A``, ``<layer>.B``, ``<layer>.C`` (only
the saved tasks' rows) and ``<layer>.bias`` when it was trained, and per head of ``modules_to_save``
its state_dict under ``modules_to_save.<module>.<key>``. Its header carries the config (json) and
the sha256 digest of every tensor (`io.tensor_digests`), checked on every read: safetensors checks
the layout, not the bytes. Files written before digests existed load with one MissingChecksumWarning.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .config import CPConfig
from .io import tensor_digests, verify_digests

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "PEFT_WEIGHTS_NAME", "HEADS_PREFIX", "SavedAdapters",
           "encode_adapters", "read_adapter_folder"]

FORMAT_VERSION = 2  # 2: CPConfig fields (exclude, modules_to_save), heads, cpkernels_config.json
WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "cpkernels_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
HEADS_PREFIX = "modules_to_save."
_OLD_CONFIG_NAME = "adapter_config.json"  # format 1 wrote its config under PEFT's file name
_HEADER_KEY = "cpkernels_adapter_config"
# A header key of its own (not inside the config): the config is also the readable json file, and
# old readers ignore metadata keys they do not know, so no format version bump is needed.
_DIGEST_KEY = "cpkernels_sha256"
_FILE_KEYS = {"format_version", "tasks", "base_parameters", "layers", "heads"}
_LAYER_KEYS = {"in_features", "out_features", "rank", "bias", "scale", "trained_bias"}


def safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError("saving and loading adapters needs safetensors: pip install safetensors") from exc
    return safetensors


def encode_adapters(tensors: dict[str, torch.Tensor], config_text: str) -> bytes:
    """The bytes of an adapters.safetensors file: the tensors, the config and their digests."""
    metadata = {_HEADER_KEY: config_text, _DIGEST_KEY: json.dumps(tensor_digests(tensors))}
    return safetensors().torch.save(tensors, metadata=metadata)


@dataclasses.dataclass
class SavedAdapters:
    """What an adapter folder holds, checked against its config but not yet LayerFactors.

    ``layers`` is {layer: {"A", "B", "C"[, "bias"]}}, ``heads`` {head: {key: tensor}}, ``file`` the
    .safetensors file read (for messages)."""

    file: Path
    config: dict
    cp_config: CPConfig
    layers: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, dict[str, torch.Tensor]]


def _validated(config, file) -> tuple[dict, CPConfig]:
    """Check a saved config (either format) and return it, with its CPConfig."""
    if not isinstance(config, dict):
        raise ValueError(f"{file}: the adapter config is not a json object")
    version = config.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{file} has adapter format_version {version!r}; this cpkernels reads 1 and {FORMAT_VERSION}")
    fields = {f.name for f in dataclasses.fields(CPConfig)}
    if version == 1:  # format 1 wrote None where the model had no config, and had no heads
        config = {**config, "heads": {}, "target_modules": config.get("target_modules") or "all-linear",
                  "init": config.get("init") or "cp"}
    unknown = sorted(set(config) - fields - _FILE_KEYS)
    if unknown:
        raise ValueError(f"{file}: unknown adapter config keys {unknown}")
    try:
        cp = CPConfig.from_dict({k: v for k, v in config.items() if k in fields})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{file}: bad adapter config: {exc}") from None
    tasks = config.get("tasks")
    if (not isinstance(tasks, list) or not tasks or len(set(tasks)) != len(tasks)
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < cp.num_tasks for t in tasks)):
        # A negative index would silently load into row T-1 (Python indexing): refuse it.
        raise ValueError(f"{file}: config 'tasks' must be distinct indices in [0, num_tasks={cp.num_tasks}), "
                         f"got {tasks!r}")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{file}: config 'layers' must name at least one layer, got {layers!r}")
    for name, info in layers.items():
        if not isinstance(info, dict) or set(info) != _LAYER_KEYS:
            raise ValueError(f"{file}: layer {name!r} needs exactly the keys {sorted(_LAYER_KEYS)}, got {info!r}")
    if not isinstance(config.get("heads"), dict):
        raise ValueError(f"{file}: config 'heads' must be a {{module: [keys]}} object")
    return config, cp


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        hint = ""
        if (path / PEFT_WEIGHTS_NAME).is_file():
            hint = " (it looks like a PEFT adapter: load it with cpkernels.from_lora)"
        elif (path / "config.json").is_file():
            hint = (" (it looks like a transformers save_pretrained folder, which holds the base weights: load "
                    "it with AutoModel.from_pretrained, then cpkernels.from_pretrained(model, adapter_dir) with "
                    "the folder written by save_adapters)")
        raise FileNotFoundError(f"no adapter file at {file} (expected a directory written by save_adapters){hint}")
    return file


def _check_side_config(file: Path, raw: dict) -> None:
    """The json next to the weights is what people read and edit; if it says something else than the
    header (which the tensors were saved with), one of them is wrong: refuse, never ignore."""
    for name in (CONFIG_NAME, _OLD_CONFIG_NAME):
        side = file.parent / name
        if side.is_file():
            try:
                side_config = json.loads(side.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{side} is not valid json: {exc}") from None
            if name == _OLD_CONFIG_NAME and "peft_type" in side_config:
                continue  # a PEFT adapter next to ours, not our config
            if side_config != raw:
                diff = sorted(k for k in set(raw) | set(side_config) if raw.get(k) != side_config.get(k))
                raise ValueError(f"{side} disagrees with the config embedded in {file.name} (keys {diff}); the "
                                 f"directory mixes two saves or was edited by hand: save the adapters again")


def read_adapter_folder(path) -> SavedAdapters:
    """Read and check an adapter directory (or its .safetensors file) on the CPU: the tensors against
    their recorded digests, the config in the header against the json beside it and against the
    tensors present. Raises ValueError (ChecksumError for damaged bytes) naming the file."""
    st = safetensors()
    file = _weights_file(Path(path))
    with st.safe_open(str(file), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        header = metadata.get(_HEADER_KEY)
        if header is None:
            raise ValueError(f"{file} is not a cpkernels adapter file (no {_HEADER_KEY!r} in its header)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    recorded = metadata.get(_DIGEST_KEY)
    if recorded is not None:
        try:
            recorded = json.loads(recorded)
        except json.JSONDecodeError:
            recorded = "damaged"  # verify_digests refuses anything but a {name: digest} object
    verify_digests(file, tensor_digests(tensors), recorded, "tensor")
    try:
        raw = json.loads(header)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: the config in its header is not valid json: {exc}") from None
    _check_side_config(file, raw)
    config, cp = _validated(raw, file)
    layers = {}
    for name, info in config["layers"].items():
        parts = ("A", "B", "C") + (("bias",) if info["trained_bias"] else ())
        missing = [p for p in parts if f"{name}.{p}" not in tensors]
        if missing:
            raise ValueError(f"{file}: layer {name!r} lacks tensors {missing}; the file is damaged")
        layers[name] = {p: tensors.pop(f"{name}.{p}") for p in parts}
    heads = {}
    for head, keys in config["heads"].items():
        missing = [k for k in keys if f"{HEADS_PREFIX}{head}.{k}" not in tensors]
        if missing:
            raise ValueError(f"{file}: head {head!r} lacks tensors {missing}; the file is damaged")
        heads[head] = {k: tensors.pop(f"{HEADS_PREFIX}{head}.{k}") for k in keys}
    if tensors:
        raise ValueError(f"{file}: tensors {sorted(tensors)[:5]} belong to no layer of the config; the file is damaged")
    return SavedAdapters(file, config, cp, layers, heads)

"""`CPConfig`: what `cpkernels.convert` did to a model, as a dataclass that round-trips through json.

    config = CPConfig(rank=8, num_tasks=4, task_names=["cola", "sst2", "mrpc", "rte"],
                      modules_to_save=["classifier"])
    model = cpkernels.convert(model, config)        # model.cpkernels_config is this object
    CPConfig.from_json(config.to_json()) == config

Every field is checked once, here, when the object is made (a ValueError or TypeError naming the
field), so the code that reads a config never guesses or falls back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

from .io import atomic_write
from .modules import INITS

__all__ = ["CPConfig", "model_config"]


def _names_or_regex(value, field_name: str, allow_none: bool):
    """A regex string (checked to compile) or a list of non-empty module-name suffixes, as a list."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{field_name}={value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)  # a set has no order; sorting makes the json (and equality) stable
    if isinstance(value, (list, tuple)) and value and all(isinstance(k, str) and k for k in value):
        return list(value)
    none = " or None" if allow_none else ""
    raise TypeError(f"{field_name} must be a regex string or a non-empty list of module-name suffixes{none}, "
                    f"got {value!r}")


def _positive_int(value, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field_name} must be an int >= 1, got {value!r}")
    return value


@dataclass
class CPConfig:
    """How a model is converted: the settings `convert` applies and `save_adapters` writes.

    Fields:
        rank: components per converted layer (r), int >= 1. After pruning, layers may hold fewer.
        num_tasks: T, int >= 1; C has one row per task.
        task_names: T distinct non-empty strings; None becomes ["task0", "task1", ...], so a made
            config always holds T names.
        target_modules: "all-linear" (every nn.Linear but task and LM heads), a list of module-name
            suffixes, or any other string, read as a regex on the whole qualified name (PEFT's rules).
        exclude: modules to leave alone, in the same two forms, or None.
        scale: the fixed factor s of the update (like LoRA's alpha / r), a finite real number.
        init: "cp" or "lora" (see `FusedCPLinear`).
        modules_to_save: module-name suffixes of modules that train in full and are saved with the
            adapters (task heads such as "classifier"), or None.
    """

    rank: int
    num_tasks: int
    task_names: list[str] | None = None
    target_modules: str | list[str] = "all-linear"
    exclude: str | list[str] | None = None
    scale: float = 1.0
    init: str = "cp"
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self):
        _positive_int(self.rank, "rank")
        _positive_int(self.num_tasks, "num_tasks")
        if self.task_names is None:
            self.task_names = [f"task{i}" for i in range(self.num_tasks)]
        else:
            names = self.task_names
            if isinstance(names, str) or not isinstance(names, (list, tuple)):
                raise TypeError(f"task_names must be a list of {self.num_tasks} strings, got {names!r}")
            names = list(names)
            if (len(names) != self.num_tasks or not all(isinstance(n, str) and n for n in names)
                    or len(set(names)) != len(names)):
                raise ValueError(f"task_names must be {self.num_tasks} distinct non-empty strings "
                                 f"(num_tasks={self.num_tasks}), got {names!r}")
            self.task_names = names
        self.target_modules = _names_or_regex(self.target_modules, "target_modules", allow_none=False)
        self.exclude = _names_or_regex(self.exclude, "exclude", allow_none=True)
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number, got {type(scale).__name__} {scale!r}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")
        self.scale = float(scale)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.modules_to_save is not None:
            mods = self.modules_to_save
            if isinstance(mods, str):
                mods = [mods]  # PEFT accepts a single name too
            if not isinstance(mods, (list, tuple)) or not all(isinstance(m, str) and m for m in mods):
                raise TypeError(f"modules_to_save must be a list of module-name suffixes or None, got {mods!r}")
            self.modules_to_save = list(mods)

    def task_index(self, task) -> int:
        """A task given by index or by name as an index in [0, num_tasks); IndexError / ValueError
        otherwise (a negative index is refused, never read as counting from the end)."""
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"unknown task name {task!r}; the tasks are {self.task_names}")
            return self.task_names.index(task)
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int or a task name, got {type(task).__name__}")
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} is outside [0, num_tasks={self.num_tasks})")
        return task

    # ----------------------------------------------------------------------------------------
    # Serialisation
    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A plain dict of json types (lists copied, so editing it leaves the config alone)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CPConfig":
        """Build from `to_dict`'s output; unknown keys are refused (by name), not dropped."""
        if not isinstance(d, dict):
            raise TypeError(f"CPConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CPConfig field(s) {unknown}; the fields are {sorted(known)}")
        missing = [k for k in ("rank", "num_tasks") if k not in d]
        if missing:
            raise ValueError(f"CPConfig needs the field(s) {missing}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CPConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"CPConfig.from_json: not valid json: {exc}") from None
        return cls.from_dict(d)

    def save(self, path) -> Path:
        """Write the json to the file `path` atomically; return the path."""
        path = Path(path)
        atomic_write(path, (self.to_json() + "\n").encode())
        return path

    @classmethod
    def load(cls, path) -> "CPConfig":
        return cls.from_json(Path(path).read_text())


def model_config(model) -> CPConfig | None:
    """`model.cpkernels_config` as a CPConfig (models converted by older code hold a dict), or None."""
    config = getattr(model, "cpkernels_config", None)
    if config is None or isinstance(config, CPConfig):
        return config
    if isinstance(config, dict):
        return CPConfig.from_dict(config)
    raise TypeError(f"model.cpkernels_config must be a CPConfig, got {type(config).__name__}")

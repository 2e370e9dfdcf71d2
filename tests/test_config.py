"""CPConfig: validation naming the field, json round trip, unknown keys refused, atomic save."""
import json
import os

import pytest

from cpkernels.config import CPConfig, model_config


def test_defaults_and_round_trip(tmp_path):
    c = CPConfig(rank=8, num_tasks=3)
    assert c.task_names == ["task0", "task1", "task2"] and c.target_modules == "all-linear"
    assert c.exclude is None and c.scale == 1.0 and c.init == "cp" and c.modules_to_save is None
    full = CPConfig(rank=3, num_tasks=2, task_names=("a", "b"), target_modules=("query", "value"),
                    exclude=r".*pooler.*", scale=2, init="lora", modules_to_save="classifier")
    assert full.task_names == ["a", "b"] and full.target_modules == ["query", "value"]
    assert full.scale == 2.0 and isinstance(full.scale, float) and full.modules_to_save == ["classifier"]
    for cfg in (c, full):
        assert CPConfig.from_dict(cfg.to_dict()) == cfg
        assert CPConfig.from_json(cfg.to_json()) == cfg
        assert json.loads(cfg.to_json()) == cfg.to_dict()
    path = full.save(tmp_path / "cfg.json")
    assert CPConfig.load(path) == full
    assert os.listdir(tmp_path) == ["cfg.json"]  # no temp file left behind
    d = full.to_dict()
    d["task_names"].append("c")  # a copy: the config is unchanged
    assert full.task_names == ["a", "b"]


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(rank=0, num_tasks=2), ValueError, "rank"),
    (dict(rank=True, num_tasks=2), ValueError, "rank"),
    (dict(rank=2.0, num_tasks=2), ValueError, "rank"),
    (dict(rank=2, num_tasks=0), ValueError, "num_tasks"),
    (dict(rank=2, num_tasks=2, task_names=["a"]), ValueError, "task_names"),
    (dict(rank=2, num_tasks=2, task_names=["a", "a"]), ValueError, "task_names"),
    (dict(rank=2, num_tasks=2, task_names="ab"), TypeError, "task_names"),
    (dict(rank=2, num_tasks=2, target_modules="(unclosed"), ValueError, "target_modules"),
    (dict(rank=2, num_tasks=2, target_modules=[]), TypeError, "target_modules"),
    (dict(rank=2, num_tasks=2, target_modules=None), TypeError, "target_modules"),
    (dict(rank=2, num_tasks=2, exclude=[1]), TypeError, "exclude"),
    (dict(rank=2, num_tasks=2, scale="2"), TypeError, "scale"),
    (dict(rank=2, num_tasks=2, scale=float("nan")), ValueError, "scale"),
    (dict(rank=2, num_tasks=2, init="svd"), ValueError, "init"),
    (dict(rank=2, num_tasks=2, modules_to_save=[""]), TypeError, "modules_to_save"),
])
def test_validation_names_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=field):
        CPConfig(**kwargs)


def test_from_dict_refuses_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown CPConfig field\(s\) \['lora_alpha', 'r'\]"):
        CPConfig.from_dict({"rank": 2, "num_tasks": 2, "r": 8, "lora_alpha": 16})
    with pytest.raises(ValueError, match="num_tasks"):
        CPConfig.from_dict({"rank": 2})
    with pytest.raises(ValueError, match="not valid json"):
        CPConfig.from_json("{rank: 2")


def test_model_config_reads_old_dicts():
    class M:
        cpkernels_config = {"rank": 2, "num_tasks": 1, "task_names": ["a"], "target_modules": "all-linear",
                            "exclude": None, "scale": 1.0, "init": "cp"}
    assert model_config(M()) == CPConfig(rank=2, num_tasks=1, task_names=["a"])
    assert model_config(object()) is None

"""cpkernels.eval.report on study 2's shape (per-task metric lists, a token task scored by entity F1 alone,
LoRA-zoo rows, the learning-rate search, the serving table) and on study 1's stored results (unchanged)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cpkernels.eval import report

STORED = Path(__file__).resolve().parents[1] / "docs" / "quality"
TASKS = [{"name": "sent", "metrics": ["accuracy", "macro_f1"]}, {"name": "ner", "metrics": ["f1"]}]
MD = {"config": {"top_layers": 1, "seeds": [0, 1], "steps": 4, "batch_size": 2, "max_length": 8},
      "encoder": {"base_parameters": 10_000, "model": "m", "num_layers": 2}, "commit": "abc", "wall_time_s": 1.0}


def _row(method, setting, sent, ner, marginal=10, amortised=10, seed=0, **extra):
    """sent = (accuracy, macro_f1); ner = entity F1 (with precision and recall, which the report ignores)."""
    return {"method": method, "setting": setting, "seed": seed, "steps": 1, "final_loss": 0.0, "wall_s": 2.0,
            "rank_total": extra.pop("rank_total", None), "params_marginal": marginal, "params_amortised": amortised,
            "metrics": {"sent": {"accuracy": sent[0], "macro_f1": sent[1]},
                        "ner": {"f1": ner, "precision": 0.0, "recall": 1.0}}, **extra}


def _zoo(setting, rank, err, diff, sent, ner, seed=0):
    return _row("lora-zoo", setting, sent, ner, 30, 120, seed, rank_total=6 * rank,
                zoo={"rank": rank, "relative_error": err, "max_abs_diff": diff})


def _study2(probe=(0.70, 0.60), probe_ner=0.40, **extra) -> dict:
    runs = []
    for seed, d in ((0, 0.0), (1, 0.02)):
        runs += [_row("lora", "r=8", (0.90 + d, 0.80), 0.60 + d, 1000, 1000, seed, lr=1e-3),
                 # 1/100 of LoRA's count; 0.5 points short on sent accuracy and ner F1, 1.5 on sent macro-F1
                 _row("cp-multi", "r=4", (0.895 + d, 0.785), 0.595 + d, 10, 90, seed, rank_total=24, lr=3e-3),
                 _row("cp-lasso", "r=16,λ=0.1", (0.88 + d, 0.78), 0.55 + d, 12, 95, seed, rank_total=40, lr=3e-3),
                 _zoo("exact", 16, None, 3e-7 if seed else 1e-7, (0.90 + d, 0.80), 0.60 + d, seed),
                 _zoo("R=8", 8, 0.2, None, (0.85 + d, 0.75), 0.50 + d, seed)]
        if probe is not None:
            runs.append(_row("head", "", (probe[0] + d, probe[1]), probe_ner + d, 5, 5, seed, lr=5e-3))
    results = {**MD, "study": 2, "tasks": TASKS, "runs": runs,
               "lr_search": [{"method": "lora", "setting": "r=8", "lr": lr, "val_score": score, "chosen": chosen,
                              "val_metrics": {"sent": {"accuracy": 0.91, "macro_f1": 0.8}, "ner": {"f1": 0.612}},
                              "wall_s": 3.0}
                             for lr, score, chosen in ((3e-4, 70.0, False), (1e-3, 76.1, True))],
               "serving": {"batch": 10, "tokens": 64, "threads": 2,
                           "rows": [{"name": "plain top layers", "ms": 5.0},
                                    {"name": "PEFT LoRA, T adapters (adapter_names=)", "ms": 20.0},
                                    {"name": "CP set R=8", "ms": 8.0}]}, **extra}
    results["summary"] = report.summarise(results)
    results["hypothesis"] = report.hypothesis(results)
    return results


def _by(results):
    return {e["name"]: e for e in results["summary"]}


def test_summarise_follows_each_tasks_metrics():
    results = _study2()
    assert report.task_metrics(results) == {"sent": ["accuracy", "macro_f1"], "ner": ["f1"]}
    assert report.primary_metric(results, "ner") == "f1"
    lora = _by(results)["lora r=8"]
    assert set(lora["metrics"]["sent"]) == {"accuracy", "macro_f1"} and set(lora["metrics"]["ner"]) == {"f1"}
    assert lora["metrics"]["ner"]["f1"]["mean"] == pytest.approx(61.0)
    # mean score: per seed the mean of sent accuracy and ner F1 ((90+60)/2, (92+62)/2), then over seeds
    assert lora["mean_score"]["mean"] == pytest.approx(76.0) and lora["mean_score"]["std"] == pytest.approx(1.41421356)
    assert "mean_accuracy" not in lora  # the token task has no accuracy
    assert lora["lr"] == 1e-3
    zoo = _by(results)
    assert zoo["lora-zoo exact"]["zoo"] == {"rank": 16, "relative_error": None, "max_abs_diff": 3e-7}
    assert zoo["lora-zoo R=8"]["zoo"] == {"rank": 8, "relative_error": pytest.approx(0.2), "max_abs_diff": None}


def test_hypothesis_scores_the_token_task_on_f1():
    h = _study2()["hypothesis"]
    assert [c["name"] for c in h["candidates"]] == ["cp-multi r=4", "cp-lasso r=16,λ=0.1"]  # no zoo rows
    by = {c["name"]: c for c in h["candidates"]}
    assert set(by["cp-multi r=4"]["gaps"]["ner"]) == {"f1"}
    assert by["cp-multi r=4"]["gaps"]["ner"]["f1"] == pytest.approx(-0.5)
    assert by["cp-multi r=4"]["within_1_point_either_metric"]
    assert not by["cp-multi r=4"]["within_1_point_both_metrics"]  # sent macro-F1 is 1.5 points short
    assert by["cp-lasso r=16,λ=0.1"]["gaps"]["ner"]["f1"] == pytest.approx(-5.0)
    assert not by["cp-lasso r=16,λ=0.1"]["within_1_point_either_metric"]
    assert h["held"] == {"marginal": True, "amortised": True}


@pytest.mark.parametrize("probe, probe_ner, separates, beats", [
    ((0.70, 0.60), 0.40, True, 2),      # far below LoRA on both tasks: the control fails the test
    ((0.895, 0.60), 0.595, False, 0),   # sent accuracy and ner F1 within 1 point: the control passes
    ((0.885, 0.60), 0.595, True, 0),    # sent 1.5 short on both metrics: fails, yet LoRA beats it by < 2 nowhere
    (None, None, None, None),           # no probe row: nothing to say
])
def test_control_separates(probe, probe_ner, separates, beats):
    results = _study2(probe=probe, probe_ner=probe_ner)
    h = results["hypothesis"]
    assert h["control_separates"] is separates
    assert h["lora_beats_probe_by_2"] == beats
    md = report.markdown(results)
    assert ("The control fails the test (separates)" in md) is (separates is True)
    assert ("The control passes too" in md) is (separates is False)
    if probe is None:
        assert h["control"] is None and h["lora_minus_probe"] is None
    else:
        assert h["lora_minus_probe"]["ner"] == pytest.approx(100 * (0.60 - probe_ner))
        assert "| control: head (no encoder update) |" in md


def test_markdown_has_the_study2_tables():
    md = report.markdown(_study2())
    assert "| sent acc | sent F1 | ner entity F1 | mean score |" in md and "mean acc" not in md
    assert "| sent Δacc / ΔF1 | ner Δentity F1 |" in md
    assert "| cp-multi r=4 | 2 | 24 | " in md
    assert "Learning-rate search (seed 0, validation split)" in md
    assert "| lora r=8 | 0.001 | 91.0 | 61.2 | 76.1 | ✓ | 3 |" in md
    assert "| lora r=8 | 0.0003 | 91.0 | 61.2 | 70.0 |  | 3 |" in md
    assert "**LoRA zoo**" in md
    # exact: LoRA's own numbers (Δ 0); R=8: 5 and 10 points lost, relative error 0.2
    assert "| exact | 16 | – | 3.0e-07 | 91.0 ± 1.4 | +0.0 | 61.0 ± 1.4 | +0.0 | 30 | 120 |" in md
    assert "| R=8 | 8 | 0.2 | – | 86.0 ± 1.4 | -5.0 | 51.0 ± 1.4 | -10.0 | 30 | 120 |" in md
    assert "**Serving cost**" in md and "| CP set R=8 | 8.00 | 0.40 |" in md
    assert "| PEFT LoRA, T adapters (adapter_names=) | 20.00 | 1.00 |" in md
    assert "more than 2 points on 2 of 2 tasks" in md


def test_study1_shape_renders_as_before():
    """No metric lists, no study key: the accuracy / macro-F1 columns and "mean acc", no study-2 tables."""
    rows = [{**_row(m, s, (a, 0.7), 0.0), "metrics": {"x": {"accuracy": a, "macro_f1": 0.7}}}
            for m, s, a in (("lora", "r=8", 0.9), ("cp-multi", "r=4", 0.85), ("head", "", 0.895))]
    results = {**MD, "tasks": [{"name": "x"}], "runs": rows}
    results["summary"] = report.summarise(results)
    results["hypothesis"] = report.hypothesis(results)
    assert results["summary"][0]["mean_accuracy"] == results["summary"][0]["mean_score"]
    md = report.markdown(results)
    assert "| x acc | x F1 | mean acc |" in md and "mean score" not in md
    assert "| x Δacc / ΔF1 |" in md and "The control passes too" in md
    assert "Learning-rate search" not in md and "LoRA zoo" not in md and "Serving" not in md
    assert "| lr |" not in md and "LoRA minus the probe" not in md
    assert results["hypothesis"]["control_separates"] is False


def test_write_all_writes_every_figure(tmp_path):
    pytest.importorskip("matplotlib")
    results = _study2()
    report.write_all(results, tmp_path, say=lambda *a: None)
    assert results["figures"] == {"accuracy_vs_params": "accuracy_vs_params.png", "lasso_curve": "lasso_curve.png",
                                  "compression": "compression.png"}
    for name in results["figures"].values():
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["control_separates"] is True and on_disk["figures"] == results["figures"]
    # Without lasso or zoo rows only the main figure is drawn.
    plain = _study2()
    plain["runs"] = [r for r in plain["runs"] if r["method"] not in ("cp-lasso", "lora-zoo")]
    plain["summary"] = report.summarise(plain)
    report.write_all(plain, tmp_path / "plain", say=lambda *a: None)
    assert set(plain["figures"]) == {"accuracy_vs_params"}


def test_refresh_round_trips(tmp_path):
    results = _study2()
    results["summary"] = [{"stale": True}]  # refresh recomputes these from the runs
    results["hypothesis"] = {"stale": True}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert report.main(["--refresh", str(tmp_path)]) == 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    fresh = _study2()
    assert on_disk["summary"] == json.loads(json.dumps(fresh["summary"]))
    assert on_disk["hypothesis"]["control_separates"] is True and on_disk["control_separates"] is True
    assert (tmp_path / "results.md").read_text() == report.markdown(fresh)
    assert report.main(["--refresh", str(tmp_path / "missing")]) == 2


def test_refresh_of_study1_keeps_its_numbers(tmp_path):
    """Study 1's stored results: the same mean accuracies, the same results.md, control_separates False
    (its probe passed the test)."""
    for name in ("results.json", "results.md"):
        shutil.copy(STORED / name, tmp_path / name)
    stored = json.loads((STORED / "results.json").read_text())
    got = report.refresh(tmp_path, say=lambda *a: None)
    assert [e["name"] for e in got["summary"]] == [e["name"] for e in stored["summary"]]
    for new, old in zip(got["summary"], stored["summary"]):
        assert new["mean_accuracy"]["mean"] == pytest.approx(old["mean_accuracy"]["mean"], abs=1e-9)
        assert new["mean_score"]["mean"] == pytest.approx(old["mean_accuracy"]["mean"], abs=1e-9)
    assert got["control_separates"] is False and got["hypothesis"]["control_separates"] is False
    assert json.loads((tmp_path / "results.json").read_text())["control_separates"] is False
    assert (tmp_path / "results.md").read_text() == (STORED / "results.md").read_text()


def test_stored_study1_summary_renders_unchanged():
    """Study 1's stored results render as recorded, also from a summary written before mean_score existed
    (markdown then falls back to the equal mean accuracy)."""
    stored = json.loads((STORED / "results.json").read_text())
    assert report.markdown(stored) == (STORED / "results.md").read_text()
    for entry in stored["summary"]:
        entry.pop("mean_score", None)
    assert report.markdown(stored) == (STORED / "results.md").read_text()


@pytest.mark.parametrize("run", ["", "run1-wide", "run2", "run3"])
def test_stored_study2_runs_recompute_to_what_is_recorded(run):
    """Each recorded study-2 run: its verdicts and results.md follow from its raw rows with today's code, so the
    numbers quoted in the READMEs cannot drift from what the run measured."""
    folder = STORED / "study2" / run
    stored = json.loads((folder / "results.json").read_text())
    fresh = dict(stored, summary=report.summarise(stored))
    fresh["hypothesis"] = report.hypothesis(fresh)
    assert json.loads(json.dumps(fresh["hypothesis"])) == stored["hypothesis"]
    assert report.markdown(fresh) == (folder / "results.md").read_text()
    assert stored["complete"] and not stored["quick"]

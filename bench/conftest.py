"""pytest configuration for the benchmark suite (collected only when bench/ is named: testpaths is tests/).

    pytest bench/ --benchmark-only       # time the installed kernels; ratio table + chart at the end

bench/ is deliberately not a package (no __init__.py): pytest then puts bench/ itself on sys.path,
never the repository root, so `import cpkernels` finds the *installed* package with its compiled
extension instead of the source tree beside bench/, which has none (issue 15: with an __init__.py
here the cpu column silently vanished). The modules import each other as `harness`, `shapes`,
`report`; this file adds bench/ to sys.path itself so that `--import-mode=importlib` works too.

`python -m pytest bench/` from the repository root is the other way in: `python -m` itself puts the
working directory on sys.path. When that entry is the repository root, its cpkernels/ holds no compiled
extension (a fresh clone) and an installed cpkernels exists elsewhere on sys.path, this file drops the
entry before anything imports cpkernels, and the report header says so (issue 21). A source tree with
an in-place build (`cpkernels/_C*.so`) stays in use, and so does a root put there on purpose with
PYTHONPATH.

After pytest-benchmark's own table (narrowed to median, IQR and rounds unless --benchmark-columns
is given) it prints the ratio of every provider to F.linear from this same run, writes
results.json, ratios.txt and ratios.png to --bench-out (default bench/out) and says where.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or os.getcwd()).resolve()  # '' is the working directory
    except OSError:
        return None


def _unshadow_installed_cpkernels() -> str | None:
    """Drop the repository root from sys.path when its extension-less source tree would hide an installed
    cpkernels; return the note for the report header (None when nothing was changed)."""
    source = REPO / "cpkernels"
    if not (source / "__init__.py").is_file() or any(source.glob("_C*")):
        return None  # not a checkout, or an in-place build: the source tree is the one to time
    deliberate = {_resolved(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    shadowing = [p for p in sys.path if _resolved(p) == REPO and REPO not in deliberate]
    if not shadowing or "cpkernels" in sys.modules:
        return None  # not on the path (the `pytest` command), or already imported: nothing to fix here
    rest = [p for p in sys.path if p not in shadowing]
    spec = importlib.machinery.PathFinder.find_spec("cpkernels", rest)
    if spec is None or not spec.origin:
        return None  # only the source tree has cpkernels: keep it (the header then says why no C++ column)
    sys.path[:] = rest
    return (f"note: `python -m` put the repository root {REPO} on sys.path, and its cpkernels/ has no compiled "
            f"extension; removed it so that the installed cpkernels is timed (build in place to time the tree)")


UNSHADOW_NOTE = _unshadow_installed_cpkernels()
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import cpkernels  # noqa: E402

import harness  # noqa: E402
import host  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402

_RECORDS = pytest.StashKey[list]()
_MODEL_RECORDS = pytest.StashKey[list]()
_HOST_TIMES = pytest.StashKey[dict]()


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=str(BENCH_DIR / "out"),
                     help="folder for the ratio table, results.json and ratios.png (default bench/out)")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config):
    config.stash[_RECORDS] = []
    config.stash[_MODEL_RECORDS] = []
    config.stash[_HOST_TIMES] = {}
    args = " ".join(config.invocation_params.args)
    if getattr(config.option, "benchmark_columns", "absent") is None and "--benchmark-columns" not in args:
        config.option.benchmark_columns = ["median", "iqr", "rounds"]  # the full default is 230 columns wide
    if getattr(config.option, "benchmark_name", None) == "normal" and "--benchmark-name" not in args:
        config.option.benchmark_name = "short"


def installed_kernels_line() -> str:
    """Which cpkernels this run times, and whether its compiled extension loaded (and why not)."""
    device = harness.bench_device()
    line = f"cpkernels: {Path(cpkernels.__file__).parent} | backends on {device.type}: " \
           f"{', '.join(cpkernels.available_backends(device.type))}"
    if UNSHADOW_NOTE:
        line += f"\n  {UNSHADOW_NOTE}"
    if cpkernels._ext.LOAD_ERROR:
        line += f"\n  NO cpkernels C++ COLUMN: {cpkernels._ext.LOAD_ERROR}"
    return line


def pytest_report_header(config):
    return installed_kernels_line()


@pytest.fixture
def record_result(request):
    """Append one measured record (the report's format) to this session's list."""
    return request.config.stash[_RECORDS].append


@pytest.fixture
def record_model_result(request):
    """Append one end-to-end model record (bench/models.py's format) to this session's list."""
    return request.config.stash[_MODEL_RECORDS].append


@pytest.fixture
def record_host_time(request):
    """Record µs per call of one provider of one bench/host.py row: record(row, provider, us)."""
    times = request.config.stash[_HOST_TIMES]
    return lambda row, provider, us: times.setdefault(row, {}).__setitem__(provider, us)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    host_times = config.stash.get(_HOST_TIMES, {})
    if host_times:
        records = [host.record(row, host_times.get(row)) for row, _, _ in host.ROWS if row in host_times]
        terminalreporter.write_sep("=", "host cost, decode and generate() (bench/host.py rows), medians from this run")
        terminalreporter.write_line(host.ratio_table({"records": records}))
    model_records = config.stash.get(_MODEL_RECORDS, [])
    if model_records:
        data = {"environment": harness.environment(harness.bench_device()), "records": model_records}
        terminalreporter.write_sep("=", f"end-to-end models ({models.__name__}.py quick sizes), medians from this run")
        terminalreporter.write_line(models.ratio_table(data))
    records = config.stash.get(_RECORDS, [])
    if not any(r["provider"] == "linear" for r in records):
        return  # nothing timed (--benchmark-disable, or F.linear deselected): no ratio to show
    device = harness.bench_device()
    method = "pytest-benchmark pedantic rounds, median; one benchmark after another" + (
        " (timer synchronises CUDA)" if device.type == "cuda" else
        ", so a change in load skews a ratio: on a shared CPU take ratios from bench/report.py (interleaved)")
    data = {"environment": harness.environment(device), "records": records, "method": method, "complete": True}
    table = report.short_table(data)
    out = Path(config.getoption("--bench-out"))
    terminalreporter.write_sep("=", "ratio to F.linear (W0 frozen), medians from this run")
    terminalreporter.write_line(installed_kernels_line())
    terminalreporter.write_line(table)
    try:
        written = report.write_outputs(data, out, table)
    except OSError as exc:  # a read-only checkout must not hide the table above
        terminalreporter.write_line(f"could not write the outputs to {out}: {exc}")
        return
    terminalreporter.write_line(f"wrote {', '.join(str(p) for p in written)}")

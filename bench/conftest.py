"""pytest configuration for the benchmark suite (collected only when bench/ is named: testpaths is tests/).

Keeps the medians of the run and prints, after pytest-benchmark's own tables, the ratio of every
provider to F.linear from this same run (the figure BENCHMARKS.md asks for).
"""
from __future__ import annotations

import pytest

from bench import harness, report

_RECORDS = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[_RECORDS] = []


@pytest.fixture
def record_result(request):
    """Append one measured record (the report's format) to this session's list."""
    return request.config.stash[_RECORDS].append


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    records = config.stash.get(_RECORDS, [])
    if not any(r["provider"] == "linear" for r in records):
        return  # nothing timed (--benchmark-disable, or F.linear deselected): no ratio to show
    device = harness.bench_device()
    method = "pytest-benchmark pedantic rounds, median; one benchmark after another" + (
        " (timer synchronises CUDA)" if device.type == "cuda" else
        ", so a change in load skews a ratio: on a shared CPU take ratios from bench/report.py (interleaved)")
    data = {"environment": harness.environment(device), "records": records, "method": method}
    terminalreporter.write_sep("=", "ratio to F.linear (W0 frozen), medians from this run")
    terminalreporter.write_line(report.short_table(data))

"""pytest-benchmark entries for the host-cost, decode and generation rows of bench/host.py (issue 19).

    pytest bench/test_bench_host.py --benchmark-only     # each row's candidate and baseline
    python bench/host.py                                 # the same rows, interleaved (steadier ratios)

Each benchmark times a loop of calls; the ratio table at the end of the session gives µs per call
and candidate ÷ baseline for every row, against its target.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark (pip install '.[bench]')")

import harness  # noqa: E402
import host  # noqa: E402

DEVICE = harness.bench_device()
ROUNDS = {"generate/token": 5}  # whole generate() calls take ~0.15 s each on 2 cores
DEFAULT_ROUNDS = 30

PARAMS = [pytest.param(row, p, id=f"{row}-{p}") for row, cand, base in host.ROWS for p in (cand, base)]
_built: dict = {}


@pytest.mark.parametrize(("row", "provider"), PARAMS)
def test_host(benchmark, record_host_time, row, provider):
    if row not in _built:  # a row's two providers share one set-up (same weights, same ids)
        _built.clear()
        _built[row] = host.row_steps(row, DEVICE)
    steps, calls, why = _built[row]
    if steps is None:
        pytest.skip(f"{row}: {why}")
    step = steps[provider]
    benchmark.group = row
    if benchmark.disabled:  # smoke mode: one loop
        benchmark.pedantic(step)
        return
    step()  # warm-up
    benchmark.pedantic(step, rounds=ROUNDS.get(row, DEFAULT_ROUNDS), iterations=1, warmup_rounds=1)
    record_host_time(row, provider, 1e6 * benchmark.stats.stats.median / calls)

"""pytest-benchmark suite: every provider x pass x case of bench/shapes.py on this machine's device.

    pytest bench/ --benchmark-only           # measure: the CPU set here, the GPU set on a GPU
    pytest bench/ --benchmark-disable -q     # smoke test: each benchmark runs once, checked

Every CP provider is checked against the float64 reference before it is timed, so a fast but
wrong kernel fails instead of posting a number. Providers that cannot run here are skipped with
the reason. On CUDA the timer synchronises the device and each round runs enough calls (>= 1 ms)
that the synchronisation costs about 1%; input sets rotate so that no call hits a warm L2.
"""
from __future__ import annotations

import math

import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark (pip install '.[bench]')")

import harness  # noqa: E402
import shapes  # noqa: E402

DEVICE = harness.bench_device()
CASES = shapes.cases(DEVICE.type)

#: Measuring time per benchmark: the 57 CPU benchmarks take about 2 minutes on 2 cores (5 at most
#: on a loaded machine); the decode shapes hit MAX_ROUNDS first.
BUDGET_S = {"cpu": 1.0, "cuda": 0.3}
#: Enough rounds for a stable median; the cap bounds the tiny (decode) shapes.
MIN_ROUNDS, MAX_ROUNDS = 5, 200
#: Shortest GPU round: keeps the timer's host synchronisation (~10 µs) near 1% of a round.
MIN_GPU_ROUND_S = 1e-3

pytestmark = pytest.mark.benchmark(timer=harness.clock(DEVICE))

PARAMS = [pytest.param(case, pass_, provider, id=f"{case.id}-{'fwd' if pass_ == 'forward' else 'fwd+bwd'}-{provider}")
          for case in CASES for pass_ in harness.PASSES for provider in harness.PROVIDERS]


_sets_cache: dict = {}


def _input_sets(case):
    """The case's input sets, shared by its providers; only the current case is kept in memory."""
    if case not in _sets_cache:
        _sets_cache.clear()
        _sets_cache[case] = harness.input_sets(case, DEVICE)
    return _sets_cache[case]


def _plan(step) -> tuple[int, int]:
    """(rounds, iterations per round) for pedantic mode, from one timed call after warm-up."""
    t = max(harness.time_once(step, DEVICE), 1e-7)
    iterations = max(1, math.ceil(MIN_GPU_ROUND_S / t)) if DEVICE.type == "cuda" else 1
    rounds = round(BUDGET_S[DEVICE.type] / (t * iterations))
    return max(MIN_ROUNDS, min(MAX_ROUNDS, rounds)), iterations


@pytest.mark.parametrize(("case", "pass_", "provider"), PARAMS)
def test_cp_linear(benchmark, record_result, case, pass_, provider):
    reason = harness.skip_reason(provider, case, pass_, DEVICE.type)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    sets = _input_sets(case)
    harness.check_provider(provider, pass_, sets[0][0])
    step = harness.make_step(provider, pass_, case, sets)
    benchmark.group = f"{case.id} {pass_}"
    benchmark.extra_info.update(provider=provider, case=case.id, shape=str(case.shape), input_sets=len(sets))
    if benchmark.disabled:  # smoke mode: pedantic runs the step once
        benchmark.pedantic(step)
        return
    step()  # warm-up outside timing: compiles (compiled-reference), autotunes (triton), fills caches
    rounds, iterations = _plan(step)
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
    peak = harness.peak_memory_bytes(step, DEVICE) if pass_ == "forward+backward" else None
    benchmark.extra_info["peak_bytes"] = peak
    record_result(harness.result_record(case, provider, pass_, ms=1e3 * benchmark.stats.stats.median,
                                        peak_bytes=peak))

"""pytest-benchmark entries for the end-to-end model benchmarks of bench/models.py (quick batch sizes).

    pytest bench/test_bench_models.py --benchmark-only     # MiniLM-L6 and a small LLaMA, every variant
    python bench/models.py                                 # the full-size, interleaved measurement

The ratio table (inference: to the plain model; training step: to PEFT LoRA) is printed at the end of
the session with the op table. Variants that cannot run here are skipped with the reason.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark (pip install '.[bench]')")

import harness  # noqa: E402
import models  # noqa: E402

DEVICE = harness.bench_device()
MODE = "quick"
ROUNDS = 5  # whole-model steps take 0.05-1 s each on 2 cores; the median of 5 is stable enough here

PARAMS = [pytest.param(m, p, v, id=f"{m}-{'infer' if p == 'inference' else 'train'}-{v}")
          for m in models.MODELS for p in models.PASSES for v in models.VARIANTS]

_built: dict = {}


def _model_state(name):
    """The plain model, its inputs and the variants built so far; only the current model is kept."""
    if name not in _built:
        _built.clear()
        _built[name] = (models.base_model(name, DEVICE), models.make_inputs(name, MODE, DEVICE), {})
    return _built[name]


@pytest.mark.parametrize(("name", "pass_", "variant"), PARAMS)
def test_model(benchmark, record_model_result, name, pass_, variant):
    reason = models.skip_reason(name, variant, pass_)
    if reason:
        pytest.skip(f"{variant}: {reason}")
    plain, inp, built = _model_state(name)
    if variant not in built:
        built[variant] = models.build(name, variant, plain)
    model, run = built[variant]
    step = models.make_step(model, run, pass_, inp)
    benchmark.group = f"{name} {pass_}"
    if benchmark.disabled:  # smoke mode: one step, checked to produce a finite output
        benchmark.pedantic(step)
        return
    step()  # warm-up
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    mem = models.peak_or_saved_bytes(model, run, inp, step, DEVICE) if pass_ == "train step" else None
    record_model_result(dict(model=name, variant=variant, pass_=pass_, ms=1e3 * benchmark.stats.stats.median,
                             mem=mem, skipped=None))

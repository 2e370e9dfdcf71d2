"""The report's arithmetic and verdicts, on hand-made records (fast; no timing involved).

Runs with `pytest bench/ --benchmark-disable` (CI smoke); `--benchmark-only` skips it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import harness
import report


def _rec(case, provider, pass_, ms, peak=None):
    shape, dtype, mix = case.rsplit("-", 2)
    r = dict(case=case, shape=shape, dtype=dtype, mix=mix, provider=provider, ms=ms, peak_bytes=peak, skipped=None,
             error=None)
    r["pass"] = pass_
    return r


def _data(records, device_type="cpu", **env):
    environment = dict(date="2026-01-01 00:00 UTC", device_type=device_type, device="test device", torch="t",
                       triton="tr", peft="p", python="3", commit="abc", cpu_cores=2, load_avg_1m=0.1)
    environment.update(env)
    return {"environment": environment, "method": "hand-made", "records": records, "complete": True}


def _row(table: str, case: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(case + " "))


def test_ratios_are_taken_against_linear_and_marked_against_the_shape_targets():
    case = "cpu-bert-fp32-mixed"  # cpu targets: forward <= 1.05, forward+backward <= 1.10
    records = [_rec(case, "linear", "forward", 10.0), _rec(case, "cpu", "forward", 10.4),
               _rec(case, "reference", "forward", 12.0),
               _rec(case, "linear", "forward+backward", 20.0), _rec(case, "cpu", "forward+backward", 23.0),
               _rec(case, "reference", "forward+backward", 30.0)]
    fwd = _row(report.time_table(records, "forward", "cpu"), case).split()
    assert fwd[1:5] == ["10.000", "1.04", "✔", "1.20"]  # linear ms, cpu 1.04 ✔, reference 1.20 (no target)
    fb = _row(report.time_table(records, "forward+backward", "cpu"), case).split()
    assert fb[1:5] == ["20.000", "1.15", "✘", "1.50"]


def test_triton_must_also_beat_compiled_reference_on_cuda():
    case = "llm-bf16-mixed"  # triton forward target 1.05
    records = [_rec(case, "linear", "forward", 1.0), _rec(case, "triton", "forward", 1.04),
               _rec(case, "compiled-reference", "forward", 1.03)]
    assert "1.04 ✘" in _row(report.time_table(records, "forward", "cuda"), case)
    records[-1]["ms"] = 1.2
    assert "1.04 ✔" in _row(report.time_table(records, "forward", "cuda"), case)


def test_memory_of_fused_backends_must_not_exceed_the_reference():
    case = "llm-bf16-mixed"
    records = [_rec(case, "linear", "forward+backward", 1.0, peak=100), _rec(case, "triton", "forward+backward", 1.1,
                                                                              peak=150),
               _rec(case, "reference", "forward+backward", 1.5, peak=140)]
    assert "1.50 ✘" in _row(report.memory_table(records), case)
    assert report.memory_table([dict(r, peak_bytes=None) for r in records]) is None  # CPU: nothing measured


def test_mixed_over_single():
    records = [_rec("cpu-ffn-fp32-mixed", "cpu", "forward", 10.3), _rec("cpu-ffn-fp32-single", "cpu", "forward", 10.0),
               _rec("cpu-ffn-fp32-mixed", "cpu", "forward+backward", 20.0),
               _rec("cpu-ffn-fp32-single", "cpu", "forward+backward", 20.0)]
    row = report.mixed_single_table(records).splitlines()[-1].split()
    assert row == ["cpu-ffn-fp32", "cpu", "1.030", "✘", "1.000", "✔"]


@pytest.mark.parametrize(("env", "preliminary"), [
    (dict(load_avg_1m=0.2), False), (dict(load_avg_1m=3.0), True),  # results from before others_cpu_share
    # The run's own 2 threads put the load average at ~2 on 2 cores: what other processes used decides.
    (dict(load_avg_1m=2.1, load_avg_1m_end=2.0, others_cpu_share=0.03), False),
    (dict(load_avg_1m=0.1, others_cpu_share=0.45), True),
])
def test_a_shared_cpu_is_flagged_preliminary(env, preliminary):
    records = [_rec("cpu-bert-fp32-mixed", "linear", "forward", 1.0)]
    assert ("PRELIMINARY" in report.short_table(_data(records, **env))) == preliminary


def test_header_states_the_others_share():
    records = [_rec("cpu-bert-fp32-mixed", "linear", "forward", 1.0)]
    assert "other processes' CPU share 3%" in report.short_table(_data(records, others_cpu_share=0.03))


def test_others_cpu_share_subtracts_this_process_tree():
    before = dict(busy_s=100.0, own_s=10.0, wall_s=50.0, cores=2)
    after = dict(busy_s=104.0, own_s=13.0, wall_s=52.0, cores=2)  # 4 s busy in 2 s x 2 cores, 3 s ours
    assert harness.others_cpu_share(before, after) == pytest.approx(0.25)
    assert harness.others_cpu_share(before, dict(after, own_s=15.0)) == 0.0  # never negative
    assert harness.others_cpu_share(None, after) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="cpu_snapshot reads Linux's /proc")
def test_cpu_snapshot_counts_a_live_child_as_this_process():
    """A child's CPU time is ours: torch.compile's worker pool must not read as another user of the machine."""
    spin = "import time\nwhile time.process_time() < 0.5: pass\nprint('done', flush=True)\ninput()"
    before = harness.cpu_snapshot()
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        after = harness.cpu_snapshot()  # the child is alive (waiting on stdin), so not yet reaped
    finally:
        child.communicate("\n", timeout=30)
    assert after["own_s"] - before["own_s"] >= 0.5 - 0.02  # tick granularity
    assert after["busy_s"] - before["busy_s"] >= 0.5 - 0.05


def test_from_json_renders_tables_and_chart(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    case = "cpu-decode-fp32-mixed"
    records = [_rec(case, p, pass_, ms) for pass_ in ("forward", "forward+backward")
               for p, ms in (("linear", 1.0), ("cpu", 1.1), ("reference", 1.3))]
    data = _data(records)
    data["complete"] = False  # a run cut short by its time limit
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    assert report.main(["--from-json", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "out" / "ratios.txt").read_text()
    assert out.rstrip().endswith(table.rstrip())  # the short table is printed last
    assert "INCOMPLETE RUN" in out
    assert "| cpu-decode-fp32-mixed | 1.000 | 1.10 ✔ | 1.30 |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

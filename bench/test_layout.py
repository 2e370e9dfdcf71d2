"""The benchmark suite times the installed kernels, not the source tree beside it (issue 15).

Runs with `pytest bench/ --benchmark-disable` (CI smoke); `--benchmark-only` skips it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "CPKERNELS_BENCH_SYS_PATH_PROBE"


@pytest.mark.skipif(not os.environ.get(PROBE), reason="a probe for the test below, run in its subprocess")
def test_probe_repo_root_not_on_sys_path():
    resolved = {Path(p or ".").resolve() for p in sys.path}
    assert REPO not in resolved, "pytest put the repository root on sys.path: the source tree shadows cpkernels"


def test_pytest_bench_does_not_put_the_repo_root_on_sys_path():
    """An __init__.py in bench/ made pytest insert the repo root into sys.path, so `import cpkernels`
    found the source tree (no compiled _C) and the cpu column vanished. -P keeps `python -m` from
    adding the working directory itself, as the `pytest` command does."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env[PROBE] = "1"
    probe = f"{Path(__file__).name}::test_probe_repo_root_not_on_sys_path"
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", probe, "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable"],
                          cwd=REPO / "bench", env=env, capture_output=True, text=True, timeout=240)
    if "ModuleNotFoundError: No module named 'cpkernels'" in proc.stdout + proc.stderr:
        pytest.skip("cpkernels is not installed in this environment (only importable through PYTHONPATH)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_a_source_tree_without_the_extension_says_so(tmp_path):
    """Python's own message for the missing _C ("partially initialized module ... circular import")
    sent users to the install they had already done; the reason now names the shadowing tree."""
    import shutil

    shutil.copytree(REPO / "cpkernels", tmp_path / "cpkernels",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__", "*.so"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import cpkernels; print(cpkernels._ext.LOAD_ERROR)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.strip() == "None":
        pytest.skip("an editable install supplies _C from its own tree here")
    assert f"imported from {tmp_path / 'cpkernels'}, which holds no compiled extension" in proc.stdout

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


#: One cheap CPU benchmark of the cpu column: it is skipped, with the reason, when the kernels timed
#: are a source tree without the compiled extension.
CPU_CASE = "test_bench_cp_linear.py::test_cp_linear[cpu-decode-fp32-mixed-fwd-cpu]"


def _copy_without_builds(dst: Path) -> Path:
    """The checkout as a fresh clone has it: tracked and unignored files, no _C*.so, no build outputs."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        import shutil

        for rel in filter(None, listed.stdout.split("\0")):
            if (REPO / rel).is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dst / rel)
    else:  # not a git checkout (an sdist): copy the tree, leaving the builds behind
        import shutil

        shutil.copytree(REPO, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "_C*", "*.so", "__pycache__", "build", "out", ".git", "*.egg-info"))
    assert not list((dst / "cpkernels").glob("_C*")) and (dst / "bench" / "conftest.py").is_file()
    return dst


@pytest.mark.slow
def test_both_pytest_forms_time_the_installed_kernels_from_a_fresh_clone(tmp_path):
    """`python -m pytest bench/` from the root of a fresh clone put the root on sys.path, so the source
    tree (no compiled _C) shadowed the installed cpkernels and the cpu column was skipped; the
    `pytest` command did not. Both forms must time the installed package (issue 21, item 3)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the probe is a CPU benchmark case; on a GPU the suite runs the GPU set")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run([sys.executable, "-P", "-c", "import cpkernels; print(cpkernels.__file__); "
                            "print(cpkernels._ext.LOAD_ERROR)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    if where.returncode != 0:
        pytest.skip("cpkernels is importable only from the source tree here (not installed)")
    installed, load_error = where.stdout.splitlines()[-2:]
    installed = Path(installed).parent
    if installed.is_relative_to(REPO):
        pytest.skip(f"cpkernels is installed editable from this tree ({installed}): nothing installed elsewhere")
    if load_error != "None":
        pytest.skip(f"the installed cpkernels has no compiled extension either: {load_error}")
    clone = _copy_without_builds(tmp_path / "clone")
    console = Path(sys.executable).parent / "pytest"
    forms = {"python -m pytest": [sys.executable, "-m", "pytest"]}
    if console.is_file():
        forms["pytest"] = [str(console)]
    for form, command in forms.items():
        proc = subprocess.run([*command, f"bench/{CPU_CASE}", "--benchmark-disable", "-p", "no:cacheprovider",
                               "-rs"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        header = next((line for line in out.splitlines() if line.startswith("cpkernels: ")), "")
        assert header.startswith(f"cpkernels: {installed} |"), (form, out[-3000:])
        assert "backends on cpu: cpu" in header and "NO cpkernels C++ COLUMN" not in out, (form, out[-3000:])
        assert proc.returncode == 0 and "1 passed" in out, (form, out[-3000:])
    assert "pytest" in forms, f"no console script beside {sys.executable}: only `python -m pytest` was checked"

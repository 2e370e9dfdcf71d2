"""cpkernels._buildinfo: results files name the commit they ran at, from a checkout or an installed copy.

The bug this guards: the quality study ran from a fresh `pip install` wrote `"commit": null`, since an
installed copy has no git next to it (and a venv inside another repository would have reported that
repository's HEAD).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpkernels import _buildinfo

REPO = Path(__file__).resolve().parents[1]
needs_checkout = pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a git checkout of cpkernels")


@needs_checkout
def test_git_commit_of_the_checkout():
    commit = _buildinfo.git_commit(REPO)
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit in (sha, sha + "+dirty")


@needs_checkout
def test_git_commit_refuses_a_folder_inside_another_checkout():
    # site-packages inside a venv inside some repository: not that repository's commit.
    assert _buildinfo.git_commit(REPO / "cpkernels") is None


def _load_copy(folder: Path):
    spec = importlib.util.spec_from_file_location("buildinfo_copy", folder / "_buildinfo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_copy_reads_the_recorded_commit(tmp_path):
    pkg = tmp_path / "site-packages" / "cpkernels"
    pkg.mkdir(parents=True)
    shutil.copy(_buildinfo.__file__, pkg)
    copy = _load_copy(pkg)
    assert copy.source_commit() is None  # neither git nor a recorded commit: unknown, not a wrong one
    (pkg / copy.COMMIT_FILE).write_text("0123abcd\n")
    assert copy.source_commit() == "0123abcd"


@needs_checkout
def test_setup_build_py_records_the_commit(tmp_path):
    env = {**os.environ, "CPKERNELS_NO_EXT": "1"}  # build_py only: no compiler needed
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    built = tmp_path / "cpkernels"
    assert (built / _buildinfo.COMMIT_FILE).read_text().strip() == _buildinfo.git_commit(REPO)
    assert _load_copy(built).source_commit() == _buildinfo.git_commit(REPO)

"""Which source commit this copy of cpkernels came from, so that results files can name it.

Stdlib only: setup.py loads this file by path at build time, before torch or cpkernels can be imported.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

#: Written next to this file by setup.py's build_py: the commit an installed (non-editable) copy was built from.
COMMIT_FILE = "_commit.txt"


def git_commit(root: Path) -> str | None:
    """HEAD of the git checkout whose top level is exactly `root`, "+dirty" when the library's sources
    (cpkernels/, csrc/) differ from it; None when `root` is not such a checkout.

    The top-level check matters: an installed copy lives in site-packages, and a virtual environment
    inside some other project's repository would otherwise report that project's commit.
    """
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != Path(root).resolve():
            return None
        sha = git("rev-parse", "HEAD")
        if sha.returncode:
            return None
        dirty = git("status", "--porcelain", "--", "cpkernels", "csrc").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty else "")


def source_commit() -> str | None:
    """The commit of the running cpkernels: git for a source checkout (editable install, PYTHONPATH),
    else the commit recorded at build time, else None."""
    here = Path(__file__).resolve().parent
    commit = git_commit(here.parent)
    if commit:
        return commit
    try:
        return (here / COMMIT_FILE).read_text().strip() or None
    except OSError:
        return None

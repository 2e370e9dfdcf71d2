"""tests/conftest.py itself: the Triton interpreter survives a test module that imports triton first.

Triton must see TRITON_INTERPRET=1 before it is first imported: imported earlier, its kernels run
compiled code paths and fail on CPU tensors ("Cannot call @triton.jit'd outside of the scope of a
kernel"). peft imports triton (through torch._inductor), and any module collected before
tests/test_triton.py may import it at its top, so conftest.py sets the variable once, before collection.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton kernels run compiled, not interpreted")
def test_triton_imported_by_an_earlier_module_keeps_the_interpreter_tests_working(tmp_path):
    first = tmp_path / "test_aaa_imports_triton_first.py"  # named and listed to be collected first
    first.write_text(textwrap.dedent("""\
        import importlib.util
        if importlib.util.find_spec("peft") is not None:
            import peft  # noqa: F401  (what really happened: peft imports triton)
        import triton  # noqa: F401


        def test_nothing():
            pass
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # only conftest.py may set it
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(ROOT), str(first), str(ROOT / "tests" / "test_triton.py"),
         "-k", "test_nothing or test_out_of_range_task_ids_are_masked"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout, res.stdout[-4000:]

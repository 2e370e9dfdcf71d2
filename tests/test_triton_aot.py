"""The AOT compile gate (cpkernels/_triton/aot.py): the Triton kernels compiled for sm_90 with no GPU.

Each run is a subprocess: the gate compiles real kernels, so it must not see TRITON_INTERPRET=1,
which tests/conftest.py sets for this process (no GPU). Triton's on-disk cache makes repeated runs cheap.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], code: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "cpkernels._triton.aot", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| launch")]


def test_gate_passes_and_the_large_m_bf16_gemm_uses_tma_and_wgmma():
    """The odd shape (unaligned strides: pointer kernel) and llm (TMA kernel), bf16, fixed configs."""
    res = _run(["--arch", "90", "--shapes", "odd,llm", "--dtypes", "bf16,fp32", "--modes", "deterministic"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = _rows(res.stdout)
    tma = [r for r in rows if r[0].startswith("llm/bf16") and r[1] == "_tma_gemm_kernel"]
    assert len(tma) == 2, rows  # the forward and dX
    for r in tma:
        assert r[7] == "y" and r[8] == "y", r  # wgmma, TMA
        assert int(r[6]) <= 232_448 and r[4] == "0", r  # fits, no stack (no spills)
    odd = [r for r in rows if r[0].startswith("odd/bf16") and r[1] == "_lowrank_gemm_kernel"]
    assert odd and all(r[4] == "0" for r in odd), odd
    assert any(r[0].startswith("llm/fp32") and r[1] == "cuBLAS (torch)" for r in rows), rows


@pytest.mark.slow
def test_gate_fails_on_a_config_that_cannot_fit_or_spills():
    """Both failure rules fire: the prune is bypassed with a tile that needs > 227 KiB, and the
    aligned list's wide tile is forced onto the unaligned odd shape (it spills there)."""
    code = textwrap.dedent("""
        import io, sys
        from cpkernels._triton import aot, common, forward
        too_big = common.config(256, 256, 64, 4, 8)  # 256 KiB of K-loop buffers
        forward._FIXED[(False, 2, True)] = too_big
        forward._FIXED[(False, 2, False)] = common.config(128, 64, 64, 3, 4)
        forward._wants_tma = lambda *a: False
        ok, rows = aot.run_gate(90, ["odd", "bert"], ["bf16"], ["deterministic"], out=io.StringIO())
        sys.exit(0 if ok else 7)
    """)
    res = _run([], code)
    assert res.returncode == 7, res.stdout[-3000:] + res.stderr[-3000:]


def test_gate_refuses_the_interpreter():
    env_code = "import os, sys; os.environ['TRITON_INTERPRET'] = '1'; from cpkernels._triton import aot; " \
               "sys.exit(aot.main(['--shapes', 'odd']))"
    res = _run([], env_code)
    assert res.returncode != 0 and "TRITON_INTERPRET" in res.stderr + res.stdout


@pytest.mark.slow
def test_gate_sm80_prunes_the_tiles_that_spill_there():
    """sm_80 (A100): no TMA, and the autotune lists lose the 16-bit tiles that spill without wgmma
    (llm in-loop and the unaligned odd shape, autotuned)."""
    res = _run(["--arch", "80", "--shapes", "llm,odd", "--dtypes", "bf16", "--modes", "tuned"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "_tma_gemm_kernel" not in res.stdout
    assert "| pruned |" in res.stdout


@pytest.mark.slow
def test_m_bucket_does_not_multiply_compiled_variants():
    """Batches of 3 and 9 rows share one autotune bucket and one compiled kernel per config (the
    bucket was 4 vs 16 before, specialised differently by Triton: a compile per small M)."""
    code = textwrap.dedent("""
        import sys
        from cpkernels._triton import aot
        keys = []
        for M in (3, 9):
            aot.SHAPES["m%d" % M] = (M, 256, 256, 16, 4)  # K = 256: too short to split, the pointer kernel
            launches, _ = aot.trace("m%d" % M, "bf16", "tuned", 90)
            gemm = [l for l in launches if l.kernel == "_lowrank_gemm_kernel"]
            assert len(gemm) == 2, [l.kernel for l in launches]
            keys.append({aot.compile_key(l, c, 90)[0] for l in gemm for c, pruned in l.configs if not pruned})
        sys.exit(0 if keys[0] == keys[1] else 9)
    """)
    res = _run([], code)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

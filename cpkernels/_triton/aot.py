"""AOT compile gate: compile every launch the Triton launchers can make for a GPU, with no GPU.

    python -m cpkernels._triton.aot --arch 90            # the whole gate (H100/H200)
    python -m cpkernels._triton.aot --arch 80 --shapes odd,llm --dtypes bf16

How it covers what really runs:
  1. It runs the real launchers (forward.cp_linear_fwd, backward.cp_linear_bwd) on `meta` tensors
     for every shape × dtype × mode, with common.launch's recorder installed: each launch is
     recorded (kernel, arguments, constexprs), nothing runs.
  2. An autotuned launch is expanded into every config of its list; configs that the launcher's
     own `early_config_prune` drops are reported as pruned and never compiled, as on the device.
  3. Each (kernel, config) is specialised exactly as Triton's launcher would do it (its own binder:
     divisibility by 16 and == 1 of every integer and pointer; meta tensors sit at address 0, so
     every pointer counts as 16-byte aligned, as torch's allocations are) and compiled with
     triton.compile for GPUTarget("cuda", arch, 32). Identical launches compile once; Triton's
     on-disk cache (TRITON_CACHE_DIR) makes a second run nearly free.
  4. Resources come from the cubin (cuobjdump -res-usage: registers, stack frame) and the
     metadata (shared memory); the PTX says whether wgmma and TMA (cp.async.bulk.tensor) are used.

It fails (exit 1) when
  * a launch has no config that compiles and fits the target's shared memory per block
    (232,448 bytes on sm_90, 166,912 on sm_80): on the device that launch raises;
  * a config the autotuner can pick (not pruned, fits) has a stack frame, i.e. spills, in bf16/fp16;
  * a config passes the prune but does not fit (the prune would let the autotuner compile it for nothing);
  * on sm_90, a large-M bf16/fp16 GEMM launch that takes the TMA kernel lacks wgmma or TMA.
fp32 without tf32 launches no Triton kernel (common.uses_cublas): the gate checks that too.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton

from . import backward, common, forward

# name: (M, d_in, d_out, r, T). The BENCHMARKS.md shapes (decode, bert, llm, llm-r64, llm-mlp)
# take every kernel path: small-M configs, mid-size tiles, the in-loop fusion, the shrink pass with
# one and with several rank chunks. `odd` has sizes that no power of two divides (unaligned strides).
SHAPES = {
    "decode": (16, 4096, 4096, 16, 8),
    "decode-short-k": (16, 256, 4096, 16, 8),  # K too short to split: the small-M autotune lists
    "bert": (8192, 768, 768, 8, 8),
    "llm": (8192, 4096, 4096, 16, 8),
    "llm-r64": (8192, 4096, 4096, 64, 8),
    "llm-r128": (8192, 4096, 4096, 128, 8),
    "llm-mlp": (8192, 4096, 11008, 16, 8),
    "odd": (97, 59, 130, 17, 5),
}
# name: (torch dtype, allow_tf32)
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
          "tf32": (torch.float32, True), "fp32": (torch.float32, False)}
# tuned: autotuned launches; deterministic: the fixed configs; compiled: as under torch.compile,
# where the TMA kernel steps aside for the autotuned pointer kernel.
MODES = ("tuned", "deterministic", "compiled")
SIXTEEN_BIT = ("bf16", "fp16")


@dataclasses.dataclass
class Launch:
    path: str          # shape/dtype/mode/direction#n kernel
    kernel: str
    fn: object         # the JITFunction
    args: tuple
    kwargs: dict       # constexprs and launch options, without the config's
    configs: list      # [(triton.Config or None, pruned: bool)]
    tma_expected: bool  # sm_90, 16-bit, M > 64, rows 16-byte aligned: the GEMM must be the TMA kernel


@dataclasses.dataclass
class Result:
    regs: int = 0
    stack: int = 0
    spill_bytes: int = 0
    smem: int = 0
    wgmma: bool = False
    tma: bool = False
    seconds: float = 0.0
    error: str = ""


# ------------------------------------------------------------------------------------------------
# 1–2. Trace the launchers
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_flags(allow_tf32: bool, mode: str):
    old = torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled()
    old_is_compiling = torch.compiler.is_compiling
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.use_deterministic_algorithms(mode == "deterministic")
    if mode == "compiled":
        torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.use_deterministic_algorithms(old[1])
        torch.compiler.is_compiling = old_is_compiling


def _inputs(M, d_in, d_out, r, T, dtype, device):
    if device == "meta":
        e = lambda *s, dt=dtype: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
        ids = e(M, dt=torch.int64)
    else:
        e = lambda *s, dt=dtype: torch.randn(*s, device=device).to(dt)  # noqa: E731
        ids = torch.randint(-1, T, (M,), device=device)
    return dict(x=e(M, d_in), weight=e(d_out, d_in), bias=e(d_out), A=e(d_out, r), B=e(d_in, r), C=e(T, r),
                task_ids=ids)


def trace(shape: str, dtype_name: str, mode: str, arch: int, device: str = "meta") -> tuple[list[Launch], bool]:
    """The launches the forward and the full backward make; and whether torch (cuBLAS) took the op.

    On "meta" nothing runs. On "cuda" (--device) every launch also runs, and an autotuned launch
    records the one config the autotuner picked (as its only config, never pruned).
    """
    M, d_in, d_out, r, T = SHAPES[shape]
    dtype, allow_tf32 = DTYPES[dtype_name]
    launches: list[Launch] = []

    def record(direction):
        def rec(kernel, grid, args, kwargs):
            if device != "meta":
                from torch.library import wrap_triton
                wrap_triton(kernel)[grid](*args, **kwargs)
                if isinstance(kernel, triton.runtime.Autotuner):
                    picked = kernel.best_config
                    kernel = kernel.fn
                    kwargs = dict(kwargs, **picked.all_kwargs())
            fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            named = dict(zip(fn.arg_names, args))
            if isinstance(kernel, triton.runtime.Autotuner):
                keep = kernel.configs
                if kernel.early_config_prune is not None:
                    keep = kernel.early_config_prune(kernel.configs, named, **kwargs)
                configs = [(c, c not in keep) for c in kernel.configs]
            else:
                configs = [(None, False)]
            is_gemm = fn.__name__.startswith("_lowrank_gemm") or fn.__name__.startswith("_tma_gemm")
            launches.append(Launch(f"{shape}/{dtype_name}/{mode}/{direction}#{len(launches)}", fn.__name__, fn,
                                   args, dict(kwargs), configs, is_gemm and tma_expected))
        return rec

    inp = _inputs(M, d_in, d_out, r, T, dtype, device)
    # 16-byte rows: 8 elements of 16 bits.
    tma_expected = (arch == 90 and mode != "compiled" and dtype_name in SIXTEEN_BIT and M > forward._SMALL_M and d_in % 8 == 0
                    and d_out % 8 == 0 and forward.tma_supported())
    old = common.TARGET_SMEM_LIMIT, common.TARGET_ARCH
    if device == "meta":
        common.TARGET_SMEM_LIMIT, common.TARGET_ARCH = common.SMEM_LIMIT[arch], arch
    try:
        with _torch_flags(allow_tf32, mode):
            with common.recording(record("fwd")):
                y, u = forward.cp_linear_fwd(inp["x"], inp["weight"], inp["bias"], inp["A"], inp["B"], inp["C"],
                                             inp["task_ids"], 0.5)
            with common.recording(record("bwd")):
                backward.cp_linear_bwd(torch.empty_like(y), inp["x"], inp["weight"], inp["A"], inp["B"], inp["C"],
                                       inp["task_ids"], u, 0.5, [True] * 5)
            cublas = common.uses_cublas(inp["x"])
    finally:
        common.TARGET_SMEM_LIMIT, common.TARGET_ARCH = old
    return launches, cublas


# ------------------------------------------------------------------------------------------------
# 3–4. Compile and measure
# ------------------------------------------------------------------------------------------------
def _options_and_constexprs(launch: Launch, cfg) -> dict:
    kw = dict(launch.kwargs)
    if cfg is not None:
        kw.update(cfg.all_kwargs())
    return {k: v for k, v in kw.items() if k != "pre_hook" and v is not None}


def compile_key(launch: Launch, cfg, arch: int):
    """What makes two launches the same compile: the kernel, Triton's specialisation, the options."""
    from triton.compiler import make_backend
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = _options_and_constexprs(launch, cfg)
    bound, spec, _ = binder(*launch.args, **kw)
    options = {k: v for k, v in kw.items() if k not in fn.arg_names}
    return (fn.__name__, repr(spec), repr(sorted(options.items()))), (backend, bound, spec, options)


def _tool(name: str) -> str:
    tool = getattr(getattr(triton.knobs, "nvidia", None), name, None)
    path = getattr(tool, "path", None) if tool is not None else None
    return path or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(fn, backend, bound, spec, options, arch: int) -> Result:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in fn.params]
    signature = {n: s[0] for n, s in zip(names, spec)}
    constexprs = {(i,): bound[n] for i, (n, s) in enumerate(zip(names, spec)) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str) and s[1]}
    opts = backend.parse_options(dict(options)).__dict__
    t0 = time.time()
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=opts)
    except Exception as exc:  # an out-of-resource or a compiler error: reported, and fails the launch
        return Result(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", seconds=time.time() - t0)
    res = Result(smem=int(kernel.metadata.shared), seconds=time.time() - t0)
    ptx = kernel.asm["ptx"]
    res.wgmma = "wgmma.mma_async" in ptx
    res.tma = "cp.async.bulk.tensor" in ptx
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
        if m:
            res.regs, res.stack = int(m[1]), int(m[2]) + int(m[3])
        if res.stack:  # the exact spill bytes, from ptxas -v (only where there is a stack frame)
            ptx_path = os.path.join(d, "k.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                                  ptx_path, "-o", os.path.join(d, "k2.cubin")], capture_output=True, text=True).stderr
            res.spill_bytes = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return res


# ------------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------------
def _cfg_name(cfg) -> str:
    if cfg is None:
        return "fixed"
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} s{cfg.num_stages} w{cfg.num_warps}"


def _fixed_name(launch: Launch) -> str:
    k = launch.kwargs
    dims = [k[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K", "BLOCK") if n in k]
    return "x".join(map(str, dims)) + f" s{k.get('num_stages', 3)} w{k.get('num_warps', 4)}"


def run_gate(arch: int, shapes, dtypes, modes, jobs: int = 1, out=sys.stdout) -> tuple[bool, list[dict]]:
    limit = common.SMEM_LIMIT[arch]
    rows: list[dict] = []
    failures: list[str] = []
    cache: dict = {}
    pending = []  # (launch, cfg, pruned, key, payload)
    for shape in shapes:
        for dt in dtypes:
            for mode in modes:
                launches, cublas = trace(shape, dt, mode, arch)
                if dt == "fp32":
                    if launches or not cublas:
                        failures.append(f"{shape}/fp32/{mode}: fp32 without tf32 must go to cuBLAS, "
                                        f"got {len(launches)} Triton launches")
                    rows.append(dict(path=f"{shape}/fp32/{mode}", kernel="cuBLAS (torch)", config="-",
                                     status="ok"))
                    continue
                for launch in launches:
                    for cfg, pruned in launch.configs:
                        key, payload = (None, None) if pruned else compile_key(launch, cfg, arch)
                        pending.append((launch, cfg, pruned, key, payload))
    todo = {}
    for launch, cfg, pruned, key, payload in pending:
        if key is not None and key not in todo:
            todo[key] = (launch.fn, *payload)
    print(f"sm_{arch}: {len(pending)} (launch, config) pairs, {len(todo)} distinct compiles", file=out, flush=True)
    t0 = time.time()
    for i, (key, (fn, backend, bound, spec, options)) in enumerate(todo.items()):
        cache[key] = compile_one(fn, backend, bound, spec, options, arch)
        if (i + 1) % 20 == 0:
            print(f"  compiled {i + 1}/{len(todo)} in {time.time() - t0:.0f} s", file=out, flush=True)

    by_launch: dict[str, list] = {}
    for launch, cfg, pruned, key, _ in pending:
        by_launch.setdefault(launch.path, []).append((launch, cfg, pruned, cache.get(key)))
    for path, entries in by_launch.items():
        launch = entries[0][0]
        dt = path.split("/")[1]
        fitting = 0
        for _, cfg, pruned, res in entries:
            name = _cfg_name(cfg) if cfg is not None else _fixed_name(launch)
            row = dict(path=path, kernel=launch.kernel, config=name)
            if pruned:
                rows.append(dict(row, status="pruned"))
                continue
            row.update(dataclasses.asdict(res))
            status = "ok"
            if res.error or res.smem > limit:
                status = "FAIL: does not fit" if not res.error else f"FAIL: {res.error}"
                if cfg is not None:
                    failures.append(f"{path} {launch.kernel} {name}: passes the prune but does not fit "
                                    f"({res.smem} > {limit} bytes{'; ' + res.error if res.error else ''})")
            else:
                fitting += 1
                if dt in SIXTEEN_BIT and res.stack:
                    status = f"FAIL: spills ({res.stack} B stack)"
                    failures.append(f"{path} {launch.kernel} {name}: {res.stack} bytes of stack (spills) in {dt}")
                if arch == 90 and dt in SIXTEEN_BIT and launch.kernel.startswith("_tma_gemm") and not (
                        res.wgmma and res.tma):
                    status = "FAIL: no wgmma/TMA"
                    failures.append(f"{path} {launch.kernel} {name}: wgmma={res.wgmma} tma={res.tma}")
            rows.append(dict(row, status=status))
        if fitting == 0:
            failures.append(f"{path} {launch.kernel}: no config fits {limit} bytes of shared memory on sm_{arch}")
        if launch.tma_expected and not launch.kernel.startswith("_tma_gemm"):
            failures.append(f"{path}: the large-M {dt} GEMM took the pointer kernel, not the TMA one")

    print_table(rows, arch, out)
    for f in failures:
        print("FAIL", f, file=out)
    print(f"sm_{arch}, triton {triton.__version__}: {'PASS' if not failures else f'{len(failures)} FAILURES'} "
          f"({len(todo)} compiles, {time.time() - t0:.0f} s)", file=out, flush=True)
    return not failures, rows


def check_device(arch: int, shapes, dtypes, rows: list[dict], out=sys.stdout) -> bool:
    """On a GPU: run the same launches for real (autotuned) and check that every config the
    autotuner picked, and every fixed config, is one the gate passed for that launch path."""
    ok_configs = {(r["path"], r["kernel"], r["config"]) for r in rows if r.get("status") == "ok"}
    failures = []
    for shape in shapes:
        for dt in dtypes:
            if dt == "fp32":
                continue
            launches, _ = trace(shape, dt, "tuned", arch, device="cuda")
            torch.cuda.synchronize()
            for launch in launches:
                cfg = launch.configs[0][0]
                name = _cfg_name(cfg) if cfg is not None else _fixed_name(launch)
                verdict = "ok" if (launch.path, launch.kernel, name) in ok_configs else "NOT PASSED BY THE GATE"
                print(f"device picked: {launch.path} {launch.kernel} {name}: {verdict}", file=out)
                if verdict != "ok":
                    failures.append(launch.path)
    print(f"device check: {'PASS' if not failures else f'{len(failures)} launches used configs the gate did not pass'}",
          file=out, flush=True)
    return not failures


def print_table(rows, arch, out=sys.stdout) -> None:
    print("\n| launch (shape/dtype/mode/pass#n) | kernel | config | regs | stack B | spill B | smem B | wgmma | TMA "
          "| status |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        if "regs" in r:
            print(f"| {r['path']} | {r['kernel']} | {r['config']} | {r['regs']} | {r['stack']} | {r['spill_bytes']} "
                  f"| {r['smem']} | {'y' if r['wgmma'] else '-'} | {'y' if r['tma'] else '-'} | {r['status']} |",
                  file=out)
        else:
            print(f"| {r['path']} | {r['kernel']} | {r['config']} | | | | | | | {r['status']} |", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpkernels._triton.aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(common.SMEM_LIMIT))
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.add_argument("--device", action="store_true",
                   help="then run the same launches on this GPU (autotuned) and check that every config picked "
                        "is one the gate passed (bench/device_check.sh)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("the AOT gate compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    ok, rows = run_gate(a.arch, a.shapes.split(","), a.dtypes.split(","), a.modes.split(","))
    if a.device:
        if not torch.cuda.is_available():
            print("--device needs a CUDA device", file=sys.stderr)
            return 2
        if tuple(torch.cuda.get_device_capability()) != (a.arch // 10, a.arch % 10):
            print(f"--device: this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
                  f"not sm_{a.arch}", file=sys.stderr)
            return 2
        ok = check_device(a.arch, a.shapes.split(","), a.dtypes.split(","), rows) and ok
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(arch=a.arch, triton=triton.__version__, ok=ok, rows=rows), f, indent=1)
        os.replace(tmp, a.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

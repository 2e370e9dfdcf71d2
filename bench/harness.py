"""What the pytest suite and the report share: providers, inputs, the correctness guard, timing.

A *provider* is one way to compute the layer: the cpkernels backends (`triton`, `cuda`, `cpu`),
the einsum `reference`, `compiled-reference` (torch.compile of it), `linear` (F.linear with W0
frozen: the floor every ratio is taken against) and `peft-lora` (a per-task LoRA on nn.Linear).
A *step* is a zero-argument callable that runs one forward, or one forward+backward (grads for
x, A, B, C; W0 and bias frozen), cycling through rotating input sets.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import itertools
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cpkernels
from cpkernels.ops import _why_unavailable
from cpkernels.testing import assert_close_to_reference, make_inputs

from shapes import SCALE, Case, dtype_name

PROVIDERS = ("triton", "cuda", "cpu", "reference", "compiled-reference", "linear", "peft-lora")
FUSED = ("triton", "cuda", "cpu")
PASSES = ("forward", "forward+backward")
#: Arguments that get gradients in the forward+backward pass (W0 and bias stay frozen).
TRAINED = ("x", "A", "B", "C")
#: Providers that implement the cp_linear contract and so can be checked against the reference.
CP_PROVIDERS = FUSED + ("reference", "compiled-reference")

#: Upper bound on rotating input sets: enough to defeat a 50 MB L2 at the smallest GPU shape
#: (decode needs 3), while bounding the memory and set-up time of the rotation.
MAX_INPUT_SETS = 8

REPO = Path(__file__).resolve().parents[1]


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Which providers run here
# --------------------------------------------------------------------------------------------
def skip_reason(provider: str, case: Case, pass_: str, device_type: str) -> str | None:
    """None when `provider` can be measured for this case and pass here, else why not."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "triton" and device_type == "cpu":
        return "Triton runs CPU tensors only in the interpreter (TRITON_INTERPRET=1): a test tool, not a benchmark"
    if provider in FUSED:
        return _why_unavailable(provider, device_type)
    if provider == "peft-lora":
        if importlib.util.find_spec("peft") is None:
            return "peft is not installed (pip install peft)"
        if case.mix == "mixed" and pass_ == "forward+backward":
            return "PEFT's mixed-batch forward (adapter_names=) is inference-only: it raises in training mode"
    return None


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def input_set_count(case: Case, device: torch.device) -> int:
    """How many input sets to rotate through so that no call finds its data still in the cache.

    On the GPU the sets together span twice the L2 cache (an LRU cache has then evicted a set
    before it comes back). On the CPU inputs are not rotated: the GEMMs are compute-bound at the
    CPU shapes and every provider sees the same warm caches, so the ratios stay fair.
    """
    if device.type != "cuda":
        return 1
    s = case.shape
    per_set = (s.M * s.d_in + s.d_out * s.d_in + 2 * s.M * s.d_out) * case.dtype.itemsize  # x, W0, y, dY
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * l2 / per_set)))


def input_sets(case: Case, device: torch.device, n: int | None = None,
               seed: int = 0) -> list[tuple[dict, torch.Tensor]]:
    """`n` independent (cp_linear kwargs, grad_y) pairs for `case`; x, A, B, C require grad."""
    n = input_set_count(case, device) if n is None else n
    g = torch.Generator().manual_seed(seed)
    s = case.shape
    sets = []
    for _ in range(n):
        inp = make_inputs(s.M, s.d_in, s.d_out, s.r, s.T, dtype=case.dtype, device=device, task_mix=case.mix,
                          requires_grad=False, generator=g)
        for name in TRAINED:
            inp[name].requires_grad_(True)
        grad_y = torch.randn(s.M, s.d_out, generator=g).to(device=device, dtype=case.dtype)
        sets.append((inp, grad_y))
    return sets


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def compiled_reference():
    """torch.compile of the reference, made once; it compiles once per shape, outside any timing.

    dynamic=False specialises each graph to its shape (the best case for compile). Each
    (shape, dtype, grad mode) is one more compiled graph of the same function, so the recompile
    limit (8 by default) is raised above the number of cases; past it dynamo would silently
    run the reference eagerly.
    """
    cfg = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit_name, max(getattr(cfg, limit_name), 256))
    return torch.compile(cpkernels.cp_linear_reference, dynamic=False)


def cp_function(provider: str):
    """The cp_linear-signature callable of a CP provider (the correctness guard calls it too)."""
    if provider in FUSED:
        return functools.partial(cpkernels.cp_linear, backend=provider)
    if provider == "reference":
        return cpkernels.cp_linear_reference
    if provider == "compiled-reference":
        return compiled_reference()
    raise ValueError(f"{provider!r} does not implement the cp_linear contract")


class _OneLinear(torch.nn.Module):
    """nn.Linear holding the benchmark's frozen W0 and bias (shared storage, no copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        self.linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.linear.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        return self.linear(x)


def peft_lora_model(inp: dict, case: Case):
    """A PEFT LoRA of rank r on nn.Linear: one adapter per task for a mixed batch, else one.

    The adapters are cast to the benchmark dtype, like the CP factors (PEFT upcasts half-precision
    adapters to fp32 by default); `.to` leaves the frozen W0, already in that dtype, uncopied.
    """
    import peft

    cfg = peft.LoraConfig(r=case.shape.r, lora_alpha=case.shape.r, lora_dropout=0.0, target_modules=["linear"])
    model = peft.get_peft_model(_OneLinear(inp["weight"], inp["bias"]), cfg, adapter_name="task0")
    for k in range(1, case.shape.T if case.mix == "mixed" else 1):
        model.add_adapter(f"task{k}", cfg)
    return model.to(case.dtype)


def _call(provider: str, case: Case, pass_: str, inp: dict):
    """(run: () -> y, the tensors that get gradients) for one input set."""
    if provider == "linear":
        return (lambda: F.linear(inp["x"], inp["weight"], inp["bias"])), [inp["x"]]
    if provider == "peft-lora":
        model = peft_lora_model(inp, case)
        model.train(pass_ == "forward+backward")  # PEFT allows adapter_names= only in eval mode
        x = inp["x"]
        wrt = [x] + [p for p in model.parameters() if p.requires_grad]
        if case.mix == "mixed":
            names = [f"task{t}" for t in inp["task_ids"].tolist()]
            return (lambda: model(x, adapter_names=names)), wrt
        return (lambda: model(x)), wrt
    fn = cp_function(provider)
    return (lambda: fn(**inp, scale=SCALE)), [inp[n] for n in TRAINED]


def make_step(provider: str, pass_: str, case: Case, sets: list[tuple[dict, torch.Tensor]]):
    """A zero-argument callable running one `pass_` of `provider`, rotating through `sets`."""
    calls = itertools.cycle([(*_call(provider, case, pass_, inp), grad_y) for inp, grad_y in sets])
    if pass_ == "forward":
        def step():
            run, _, _ = next(calls)
            with torch.no_grad():
                run()
    elif pass_ == "forward+backward":
        def step():
            run, wrt, grad_y = next(calls)
            torch.autograd.grad(run(), wrt, grad_y)
    else:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    return step


def check_provider(provider: str, pass_: str, inp: dict) -> None:
    """Refuse to time a wrong result: a CP provider must match the float64 reference.

    The forward pass is checked under no_grad, as it is timed (torch.compile makes another graph
    there). `linear` and `peft-lora` compute other functions, so they have nothing to compare with.
    """
    if provider not in CP_PROVIDERS:
        return
    with torch.no_grad() if pass_ == "forward" else contextlib.nullcontext():
        assert_close_to_reference(cp_function(provider), inp, SCALE, grad=pass_ == "forward+backward")


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------
def synced_clock() -> float:
    """perf_counter after the queued CUDA work is done, so a timed round covers the device's work."""
    torch.cuda.synchronize()
    return time.perf_counter()


def clock(device: torch.device):
    return synced_clock if device.type == "cuda" else time.perf_counter


def time_once(step, device: torch.device) -> float:
    """Seconds for one call of `step` (after its warm-up)."""
    tick = clock(device)
    t0 = tick()
    step()
    return tick() - t0


def gpu_median_ms(step, rep_ms: int) -> float:
    """triton.testing.do_bench: warm-up, L2 flushed before each call, CUDA events, median."""
    from triton.testing import do_bench

    return float(do_bench(step, warmup=25, rep=rep_ms, return_mode="median"))


def interleaved_median_ms(steps: dict, budget_s: float, min_rounds: int = 5, max_rounds: int = 50) -> dict:
    """Median ms per step, calling the steps round-robin: on a shared CPU a change in load then
    hits every provider alike instead of whichever happened to run at that moment."""
    one_round = sum(time_once(s, torch.device("cpu")) for s in steps.values())
    rounds = max(min_rounds, min(max_rounds, math.ceil(budget_s / max(one_round, 1e-9))))
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(v) for name, v in samples.items()}


def peak_memory_bytes(step, device: torch.device) -> int | None:
    """Peak bytes allocated by one (warmed-up) step above what was live before it; None off CUDA
    (torch keeps no statistics for its CPU allocator, and tracemalloc does not see it)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def result_record(case: Case, provider: str, pass_: str, **fields) -> dict:
    """One result as the report's JSON stores it: ms (median) and peak_bytes, or why there is none."""
    rec = dict(case=case.id, shape=case.shape.id, dtype=dtype_name(case.dtype), mix=case.mix, provider=provider,
               ms=None, peak_bytes=None, skipped=None, error=None)
    rec["pass"] = pass_  # a keyword in Python, so not a dict() argument
    rec.update(fields)
    return rec


# --------------------------------------------------------------------------------------------
# Where a number was measured
# --------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ; CPKERNELS_COMMIT overrides (a copy without .git)."""
    if os.environ.get("CPKERNELS_COMMIT"):
        return os.environ["CPKERNELS_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """The header every result carries: device, versions, commit, date (and the CPU's load)."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_cores"] = os.cpu_count()
        env["device"] = f"{_cpu_name()}, {env['cpu_cores']} cores, {env['torch_threads']} torch threads"
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return env


def _proc_stat_fields(path: str) -> list[str]:
    """The fields of a /proc/PID/stat line after the command name (which may hold spaces or parentheses)."""
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_snapshot() -> dict | None:
    """Busy CPU seconds of the whole machine and of this process tree, with the wall clock (Linux only).

    Two snapshots give the share of the CPU that *other* processes used in between (`others_cpu_share`).
    The 1-minute load average cannot tell that: the benchmark's own threads load every core it measures
    on, so on a 2-core machine a quiet run looked as shared as a busy one. This process's own time
    counts its reaped children, and its live descendants (torch.compile's worker pool) are added.
    """
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy; steal
        # (the hypervisor running someone else) is, since it takes time from the measurement too.
        busy_ticks = sum(cpu[:8]) - cpu[3] - cpu[4]
        children: dict[int, list[int]] = {}
        times: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = _proc_stat_fields(f"/proc/{entry.name}/stat")
            except OSError:  # the process ended while we listed /proc
                continue
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)  # fields[1] is ppid
            times[pid] = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    except (OSError, ValueError, IndexError):
        return None
    own_ticks, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        own_ticks += times.get(pid, 0)
        todo.extend(children.get(pid, ()))
    hz = os.sysconf("SC_CLK_TCK")
    return {"busy_s": busy_ticks / hz, "own_s": own_ticks / hz, "wall_s": time.monotonic(),
            "cores": os.cpu_count() or 1}


def others_cpu_share(before: dict | None, after: dict | None) -> float | None:
    """The fraction of all cores' time between two `cpu_snapshot`s that other processes kept busy."""
    if before is None or after is None:
        return None
    wall = after["wall_s"] - before["wall_s"]
    if wall <= 0:
        return None
    others = (after["busy_s"] - before["busy_s"]) - (after["own_s"] - before["own_s"])
    return max(0.0, others) / (wall * after["cores"])


def write_run(out: Path, name: str, data: dict, table: str, started: float) -> None:
    """Write OUT/NAME.json (atomically) and OUT/NAME.txt, then print the run's header and its table last."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / f"{name}.json")  # a reader never sees a half-written file
    (out / f"{name}.txt").write_text(table + "\n")
    env = data["environment"]
    print(f"\ndevice: {env['device']} | torch {env['torch']} | peft {env['peft']} | commit {env['commit']} | "
          f"{env['date']}\nmethod: {data['method']}\nwrote {out / (name + '.json')}, {out / (name + '.txt')} "
          f"({time.perf_counter() - started:.0f} s)\n")
    print(table)

"""Host cost per call, decode and generation: where the work in front of the kernels decides the speed.

    python bench/host.py [--quick] [--out DIR] [--threads 2]

Rows (issue 19; targets in TARGETS, ratios taken in the same run, round-robin interleaved):
  host/inference, host/no_grad, host/grad   cp_linear ÷ F.linear at a tiny shape (M = 1, 64 -> 64,
                                            r = 8, T = 8): the cost of the call itself. "grad": x and the
                                            factors require grad, so both build an autograd node.
  decode/op                                 cp_linear ÷ F.linear, M = 16, 768 -> 768, r = 8, T = 8,
                                            inference mode, ids owned by the library (task_ids.own)
  decode/module                             FusedCPLinear ÷ nn.Linear, same shape and ids
  generate/token                            time per token of generate() on a converted small LLaMA
                                            (random weights, 4 layers, hidden 512, batch 4 with four
                                            different tasks, 32 greedy tokens) ÷ the plain model's
On a GPU the same rows time back-to-back calls with one synchronisation per timed loop, so they show
what a launch-bound decode loop sees.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cpkernels
import harness

TINY = dict(M=1, d_in=64, d_out=64, r=8, T=8)
DECODE = dict(M=16, d_in=768, d_out=768, r=8, T=8)
GENERATE = dict(layers=4, hidden=512, ffn=1376, heads=8, vocab=1000, batch=4, prompt=8, new_tokens=32)
#: Target ratio per row (issue 19).
TARGETS = {"host/inference": 3.0, "host/no_grad": 3.0, "host/grad": 4.0, "decode/op": 1.3, "decode/module": 1.3,
           "generate/token": 1.10}
#: Seconds of interleaved measuring per row, and the calls per timed sample (a sample of one µs-sized call
#: would mostly time perf_counter itself).
BUDGET_S = {"full": 4.0, "quick": 1.0}
CALLS_PER_SAMPLE = {"host": 200, "decode": 50, "generate": 1}


def _factors(d_in, d_out, r, T, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    A, B, C = make(d_out, r), make(d_in, r) / math.sqrt(d_in), make(T, r)
    return [t.requires_grad_(requires_grad) for t in (A, B, C)]


def op_steps(mode: str, shape: dict, device: torch.device, owned: bool) -> dict:
    """{"cp_linear": step, "F.linear": step} for one shape, each a loop of calls in `mode`."""
    M, d_in, d_out, r, T = (shape[k] for k in ("M", "d_in", "d_out", "r", "T"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, d_in, generator=g).to(device).requires_grad_(mode == "grad")
    linear = torch.nn.Linear(d_in, d_out).to(device).requires_grad_(False)
    W, b = linear.weight, linear.bias
    A, B, C = _factors(d_in, d_out, r, T, device, requires_grad=mode == "grad")
    ids = torch.randint(0, T, (M,), generator=g).to(device)
    ids = cpkernels.task_ids.own(ids) if owned else ids
    n = CALLS_PER_SAMPLE["host" if M == 1 else "decode"]
    ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]

    def loop(fn):
        def step():
            with ctx():
                for _ in range(n):
                    fn()
        return step

    return {"cp_linear": loop(lambda: cpkernels.cp_linear(x, W, b, A, B, C, ids, 0.5)),
            "F.linear": loop(lambda: F.linear(x, W, b))}, n


def module_steps(shape: dict, device: torch.device) -> tuple[dict, int]:
    """FusedCPLinear (owned ids) against the nn.Linear it wraps, in inference mode."""
    M, d_in, d_out, r, T = (shape[k] for k in ("M", "d_in", "d_out", "r", "T"))
    linear = torch.nn.Linear(d_in, d_out).to(device)
    layer = cpkernels.FusedCPLinear.from_linear(linear, rank=r, num_tasks=T, scale=0.5)
    with torch.no_grad():
        for p in (layer.A, layer.B, layer.C):
            p.normal_()
    x = torch.randn(M, d_in, generator=torch.Generator().manual_seed(2)).to(device)
    ids = cpkernels.task_ids.own(torch.randint(0, T, (M,), generator=torch.Generator().manual_seed(3)).to(device))
    n = CALLS_PER_SAMPLE["decode"]

    def loop(fn):
        def step():
            with torch.inference_mode():
                for _ in range(n):
                    fn()
        return step

    return {"FusedCPLinear": loop(lambda: layer(x, ids)), "nn.Linear": loop(lambda: linear(x))}, n


def generate_steps(device: torch.device):
    """generate() of the plain and the converted LLaMA; None and the reason when transformers is missing."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed (pip install transformers)"
    s = GENERATE
    cfg = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                   num_key_value_heads=s["heads"], max_position_embeddings=256)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg).to(device).eval()
    import copy

    converted = cpkernels.convert(copy.deepcopy(plain), rank=8, num_tasks=4)
    with torch.no_grad():
        for _, layer in cpkernels.cp_layers(converted):
            layer.C.normal_()  # non-zero updates, so the converted model does the real work
    prompt = torch.randint(0, s["vocab"], (s["batch"], s["prompt"]), generator=torch.Generator().manual_seed(4))
    prompt = prompt.to(device)
    tasks = torch.arange(s["batch"]) % 4  # four different tasks in the batch
    kw = dict(max_new_tokens=s["new_tokens"], min_new_tokens=s["new_tokens"], do_sample=False,
              attention_mask=torch.ones_like(prompt), pad_token_id=0)

    def run_plain():
        with torch.inference_mode():
            plain.generate(prompt, **kw)

    def run_converted():
        with torch.inference_mode(), cpkernels.task_context(converted, tasks.to(device)):
            converted.generate(prompt, **kw)

    return {"converted": run_converted, "plain": run_plain}, None


def _interleaved_us(steps: dict, per_step: int, budget_s: float, device: torch.device) -> dict:
    """Median µs per call of each step's loop, the steps called round-robin (see harness)."""
    for step in steps.values():
        step()  # warm-up
    tick = harness.clock(device)
    one_round = 0.0
    for step in steps.values():
        t0 = tick()
        step()
        one_round += tick() - t0
    rounds = max(7, min(400, math.ceil(budget_s / max(one_round, 1e-9))))
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = tick()
            step()
            samples[name].append((tick() - t0) / per_step)
    return {name: 1e6 * statistics.median(v) for name, v in samples.items()}


#: (row, candidate, baseline) in the order they are measured and shown.
ROWS = (("host/inference", "cp_linear", "F.linear"), ("host/no_grad", "cp_linear", "F.linear"),
        ("host/grad", "cp_linear", "F.linear"), ("decode/op", "cp_linear", "F.linear"),
        ("decode/module", "FusedCPLinear", "nn.Linear"), ("generate/token", "converted", "plain"))


def row_steps(row: str, device: torch.device):
    """({provider: step}, calls per step, why not) for one row; steps is None when it cannot run here."""
    if row.startswith("host/"):
        steps, n = op_steps(row.split("/")[1], TINY, device, owned=False)
    elif row == "decode/op":
        steps, n = op_steps("inference", DECODE, device, owned=True)
    elif row == "decode/module":
        steps, n = module_steps(DECODE, device)
    elif row == "generate/token":
        # generate() runs one prompt pass and new_tokens - 1 decode steps; dividing by new_tokens gives
        # "per token" figures, and the same divisor on both sides leaves the ratio as measured.
        steps, why = generate_steps(device)
        return steps, GENERATE["new_tokens"], why
    else:
        raise ValueError(f"row must be one of {[r for r, _, _ in ROWS]}, got {row!r}")
    return steps, n, None


def record(row: str, times: dict | None = None, skipped: str | None = None) -> dict:
    """One row's result: µs per call of candidate and baseline (or why not measured), ratio and target."""
    _, cand, base = next(r for r in ROWS if r[0] == row)
    rec = dict(row=row, candidate=cand, baseline=base, us=None, base_us=None, ratio=None, target=TARGETS[row],
               skipped=skipped)
    if times and cand in times and base in times:
        rec.update(us=times[cand], base_us=times[base], ratio=times[cand] / times[base])
    return rec


def measure(mode: str = "full", device: torch.device | None = None, log=print) -> dict:
    """Every row, each with its candidate and baseline interleaved; records as `record` makes them."""
    device = device or harness.bench_device()
    records = []
    log(f"== host cost per call (M = {TINY['M']}, {TINY['d_in']} -> {TINY['d_out']}, r = {TINY['r']}); decode "
        f"(M = {DECODE['M']}, {DECODE['d_in']} -> {DECODE['d_out']}, r = {DECODE['r']}, T = {DECODE['T']}, owned "
        f"ids, inference mode); generate() (LLaMA, {GENERATE['layers']} layers, hidden {GENERATE['hidden']}, "
        f"batch {GENERATE['batch']} with 4 tasks, {GENERATE['new_tokens']} greedy tokens)")
    for row, _, _ in ROWS:
        steps, n, why = row_steps(row, device)
        budget = BUDGET_S[mode] * (4 if row.startswith("generate") else 1)
        rec = record(row, _interleaved_us(steps, n, budget, device) if steps else None, why)
        records.append(rec)
        log(f"   {row:<16} " + (f"{rec['candidate']} {rec['us']:.2f} µs, {rec['baseline']} {rec['base_us']:.2f} µs: "
                                f"{rec['ratio']:.2f}x" if rec["ratio"] else f"not measured: {why}"))
    return {"environment": harness.environment(device), "mode": mode, "records": records,
            "method": "median of round-robin interleaved timed loops (perf_counter"
                      + (", synchronised" if device.type == "cuda" else "") + "), µs per call"}


def ratio_table(data: dict, markdown: bool = False) -> str:
    rows = []
    for r in data["records"]:
        if r["ratio"] is None:
            rows.append([r["row"], f"{r['candidate']} ÷ {r['baseline']}", "-", "-", "-", f"≤ {r['target']:g}",
                         f"not measured: {r['skipped']}"])
            continue
        ok = "✔" if r["ratio"] <= r["target"] else "✘"
        rows.append([r["row"], f"{r['candidate']} ÷ {r['baseline']}", f"{r['us']:.2f}", f"{r['base_us']:.2f}",
                     f"{r['ratio']:.2f}", f"≤ {r['target']:g}", ok])
    header = ["row", "ratio of", "µs", "base µs", "ratio", "target", ""]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter measurements (CI, README)")
    ap.add_argument("--out", default=str(harness.REPO / "bench" / "out"), help="output folder (default bench/out)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    data = measure("quick" if args.quick else "full")
    harness.write_run(Path(args.out), "host", data, ratio_table(data), t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

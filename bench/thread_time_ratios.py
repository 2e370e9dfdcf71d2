"""Same-run, interleaved ratios to F.linear in *thread CPU time*, for a CPU that other jobs share.

    python bench/thread_time_ratios.py [--threads 1] [--rounds 15]

With one torch thread, MKL and at::parallel_for run on the calling thread, so `time.thread_time` is the
whole cost of a call minus the time the thread spent descheduled: far steadier than wall time when the
load average is several times the core count. Per CPU shape it prints, as ratios to F.linear measured
in the same interleaved rounds: the raw op (`torch.ops.cpkernels.cp_linear_fwd`), the ATen composition the
cpu backend used before the fused rank-r kernels (mm(x, B), gather, mm(v, [A|b]ᵀ), addmm_), the public
`cp_linear` forward, and its forward+backward (grads for x, A, B, C). bench/RESULTS.md records its runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import cpkernels

SHAPES = ((2048, 768, 768, 8), (2048, 768, 3072, 16), (16, 768, 768, 8))  # cpu-bert, cpu-ffn, cpu-decode
NUM_TASKS, SCALE = 8, 0.5


def medians(steps: dict, rounds: int, clock) -> dict:
    samples = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            t0 = clock()
            f()
            samples[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (10x more at M = 16)")
    ap.add_argument("--wall", action="store_true", help="perf_counter instead of thread CPU time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.thread_time
    op = torch.ops.cpkernels.cp_linear_fwd
    for M, K, N, r in SHAPES:
        x, W, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        A, B, C = torch.randn(N, r), torch.randn(K, r), torch.randn(NUM_TASKS, r)
        t = torch.randint(0, NUM_TASKS, (M,))
        Ab = torch.cat([A, b[:, None]], 1)

        def old_aten():
            v = torch.cat([SCALE * torch.mm(x, B) * C[t], torch.ones(M, 1)], 1)
            torch.mm(v, Ab.t()).addmm_(x, W.t())

        fwd = {"linear": lambda: F.linear(x, W, b), "op": lambda: op(x, W, b, A, B, C, t, SCALE),
               "old_aten": old_aten, "cp": lambda: cpkernels.cp_linear(x, W, b, A, B, C, t, SCALE, backend="cpu")}
        xg, Ag, Bg, Cg = (z.clone().requires_grad_() for z in (x, A, B, C))
        gy = torch.randn(M, N)
        fb = {"linear": lambda: torch.autograd.grad(F.linear(xg, W, b), [xg], gy),
              "cp": lambda: torch.autograd.grad(cpkernels.cp_linear(xg, W, b, Ag, Bg, Cg, t, SCALE, backend="cpu"),
                                                [xg, Ag, Bg, Cg], gy)}
        rounds = args.rounds * (10 if M <= 16 else 1)
        with torch.no_grad():
            for f in fwd.values():
                f()  # warm-up
            m = medians(fwd, rounds, clock)
        for f in fb.values():
            f()
        m2 = medians(fb, rounds, clock)
        print(f"M={M} N={N} r={r} linear {m['linear'] * 1e3:.3f} ms | op {m['op'] / m['linear']:.3f} "
              f"old-aten {m['old_aten'] / m['linear']:.3f} cp {m['cp'] / m['linear']:.3f} | fwd+bwd linear "
              f"{m2['linear'] * 1e3:.3f} ms cp {m2['cp'] / m2['linear']:.3f}", flush=True)


if __name__ == "__main__":
    main()

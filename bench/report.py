"""Run the benchmark comparison in one process and report ratios to F.linear from that run.

    python bench/report.py [--out DIR] [--quick] [--shapes decode,llm] [--mix mixed] [--providers cpu,linear]
    python bench/report.py --from-json bench/out/results.json     # re-render a (partial) run

Writes DIR/results.json (after every case, so a run cut short still leaves data), ratios.png
(bar chart, log scale, line at 1.0, targets marked), results.md (the tables with ✔/✘, ready
for bench/RESULTS.md) and ratios.txt; prints the short ratio table last. The host-cost, decode and
generate() rows of bench/host.py (issue 19) run after the op cases and close the table (--no-host: skip).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# bench/ is a folder of scripts, not a package: `python bench/report.py` puts bench/ (never the repo
# root) on sys.path, so `cpkernels` is the installed package with its compiled extension, not the
# source tree next to it. (Set PYTHONPATH=. to measure an in-place build of the checkout.)
import harness
import host
import shapes
from harness import FUSED, PASSES, PROVIDERS

SHAPES_BY_ID = {s.id: s for s in shapes.GPU_SHAPES + shapes.CPU_SHAPES}
#: Measuring time per (case, pass) on the CPU, where all providers are interleaved round-robin.
CPU_BUDGET_S = {"full": 6.0, "quick": 2.0}
#: do_bench measuring window per provider and pass on the GPU (its default is 100 ms).
GPU_REP_MS = {"full": 100, "quick": 50}
#: A CPU on which other processes kept more than this share of all cores busy was shared while measuring.
OTHERS_SHARE = 0.2
#: For results written before `others_cpu_share` was recorded: a 1-minute load average above this
#: fraction of the cores (it counts the run's own threads, so it over-flags small machines).
LOADED_FRACTION = 0.5
#: Short column names keep the ratio table under 100 columns; the chart's legend spells them out.
COLUMN = {"compiled-reference": "compile(ref)", "peft-lora": "peft"}
LEGEND = {"cpu": "cpkernels cpu (C++)", "cuda": "cpkernels cuda (C++)", "triton": "cpkernels triton",
          "reference": "einsum reference", "compiled-reference": "torch.compile(reference)",
          "peft-lora": "PEFT LoRA (T adapters, adapter_names= when mixed)"}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def _method(device: torch.device, quick: bool) -> str:
    mode = "quick" if quick else "full"
    if device.type == "cuda":
        return (f"triton.testing.do_bench median (warm-up 25 ms, rep {GPU_REP_MS[mode]} ms, L2 flushed before "
                f"each call), input sets rotated to span 2x L2; forward under no_grad; forward+backward = "
                f"autograd.grad for x, A, B, C (W0, bias frozen); peak memory = max_memory_allocated over one "
                f"forward+backward above the live inputs")
    return (f"median of round-robin interleaved calls (perf_counter, ~{CPU_BUDGET_S[mode]:g} s per case and pass), "
            f"inputs not rotated; forward under no_grad; forward+backward = autograd.grad for x, A, B, C "
            f"(W0, bias frozen); peak memory not measured on CPU")


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300]


def measure(args, out: Path) -> dict:
    device = harness.bench_device()
    mode = "quick" if args.quick else "full"
    cpu_before = harness.cpu_snapshot()
    data = {"environment": harness.environment(device), "method": _method(device, args.quick), "records": [],
            "complete": False}
    print(_header(data), flush=True)
    providers = args.providers or PROVIDERS
    for case in shapes.cases(device.type, quick=args.quick, shape_ids=args.shapes, mixes=args.mix):
        print(f"\n== {case.id}: {case.shape}, {shapes.dtype_name(case.dtype)}, {case.mix} tasks", flush=True)
        sets = harness.input_sets(case, device)
        for pass_ in PASSES:
            steps = {}
            for provider in providers:
                why_not = harness.skip_reason(provider, case, pass_, device.type)
                rec = harness.result_record(case, provider, pass_, skipped=why_not)
                data["records"].append(rec)
                if rec["skipped"]:
                    continue
                try:
                    harness.check_provider(provider, pass_, sets[0][0])
                    step = harness.make_step(provider, pass_, case, sets)
                    step()  # warm-up outside timing: compiles, autotunes, fills the allocator's cache
                    steps[provider] = (step, rec)
                except Exception as exc:  # one broken provider must not stop the comparison
                    rec["error"] = _short_error(exc)
            if device.type == "cuda":
                for step, rec in steps.values():
                    try:
                        rec["ms"] = harness.gpu_median_ms(step, GPU_REP_MS[mode])
                    except Exception as exc:
                        rec["error"] = _short_error(exc)
            elif steps:
                medians = harness.interleaved_median_ms({p: s for p, (s, _) in steps.items()}, CPU_BUDGET_S[mode])
                for provider, (_, rec) in steps.items():
                    rec["ms"] = medians[provider]
            if pass_ == "forward+backward":
                for step, rec in steps.values():
                    if rec["ms"] is not None:
                        rec["peak_bytes"] = harness.peak_memory_bytes(step, device)
            done = [r for r in data["records"] if r["case"] == case.id and r["pass"] == pass_]
            print(f"   {pass_:<17}" + "  ".join(f"{r['provider']} {r['ms']:.3f} ms" for r in done
                                                 if r["ms"] is not None), flush=True)
            for r in done:
                if r["error"]:
                    print(f"   {pass_:<17}{r['provider']}: ERROR {r['error']}", flush=True)
        del sets, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _write_json(data, out)
    if not getattr(args, "no_host", False):
        print("", flush=True)
        data["host"] = host.measure("quick" if args.quick else "full", device)
        _write_json(data, out)
    if device.type == "cpu":
        share = harness.others_cpu_share(cpu_before, harness.cpu_snapshot())
        data["environment"]["others_cpu_share"] = None if share is None else round(share, 3)
    data["complete"] = True
    _write_json(data, out)
    return data


def _write_json(data: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / "results.json")  # a reader never sees a half-written file


# --------------------------------------------------------------------------------------------
# Ratios and tables
# --------------------------------------------------------------------------------------------
def _cases_in_order(records) -> list[str]:
    return list(dict.fromkeys(r["case"] for r in records))


def _index(records) -> dict:
    return {(r["case"], r["pass"], r["provider"]): r for r in records}


def _shape_of(records) -> dict:
    return {r["case"]: SHAPES_BY_ID[r["shape"]] for r in records}


def _measured_providers(records) -> list[str]:
    seen = {r["provider"] for r in records if r["ms"] is not None}
    return [p for p in PROVIDERS if p in seen]


def ratio_rows(records, key: str = "ms") -> dict:
    """{(case, pass): {provider: value / linear's value}} for every measured provider."""
    idx = _index(records)
    table = {}
    for case in _cases_in_order(records):
        for pass_ in PASSES:
            base = idx.get((case, pass_, "linear"), {}).get(key)
            row = {}
            for p in PROVIDERS:
                v = idx.get((case, pass_, p), {}).get(key)
                row[p] = v / base if (v is not None and base) else None
            table[(case, pass_)] = row
    return table


def _fmt(ratio) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.0f}" if ratio >= 100 else f"{ratio:.1f}" if ratio >= 10 else f"{ratio:.2f}"


def _time_checks(provider, shape, pass_, row, device_type) -> list[bool]:
    """The targets of bench/shapes.py that apply to one cell: absolute ceilings and 'faster than' peers."""
    oks = []
    target = shape.targets.get(provider)
    if target is not None:
        oks.append(row[provider] <= target[PASSES.index(pass_)])
    for fused, peer, dev in shapes.FASTER_THAN:
        if provider == fused and dev == device_type and row.get(peer) is not None:
            oks.append(row[provider] < row[peer])
    return oks


def _mark(oks) -> str:
    return "" if not oks else " ✔" if all(oks) else " ✘"


def _render(header, rows, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows])


def time_table(records, pass_: str, device_type: str, markdown=False) -> str:
    ratios = ratio_rows(records)
    idx = _index(records)
    providers = [p for p in _measured_providers(records) if p != "linear"]
    header = ["case", "linear ms"] + [COLUMN.get(p, p) for p in providers] + ["targets"]
    rows = []
    for case in _cases_in_order(records):
        row = ratios[(case, pass_)]
        if row["linear"] is None:
            continue
        shape = _shape_of(records)[case]
        cells = [case, f"{idx[(case, pass_, 'linear')]['ms']:.3f}"]
        for p in providers:
            marks = _mark(_time_checks(p, shape, pass_, row, device_type)) if row[p] is not None else ""
            cells.append(_fmt(row[p]) + marks)
        targets = [f"{p}≤{t[PASSES.index(pass_)]:g}" for p, t in shape.targets.items() if p in providers]
        rows.append(cells + [" ".join(targets) or "-"])
    return _render(header, rows, markdown)


def memory_table(records, markdown=False) -> str | None:
    """Peak memory of forward+backward as a ratio to F.linear's; None when nothing was measured (CPU)."""
    if not any(r["peak_bytes"] is not None for r in records):
        return None
    ratios = ratio_rows(records, key="peak_bytes")
    idx = _index(records)
    providers = [p for p in _measured_providers(records) if p != "linear"]
    header = ["case", "linear MiB"] + [COLUMN.get(p, p) for p in providers]
    rows = []
    for case in _cases_in_order(records):
        row = ratios[(case, "forward+backward")]
        base = idx.get((case, "forward+backward", "linear"), {}).get("peak_bytes")
        if not base:
            continue
        cells = [case, f"{base / 2**20:.1f}"]
        for p in providers:
            oks = [row[p] <= row[shapes.MEMORY_NOT_ABOVE]] if (
                p in FUSED and row[p] is not None and row[shapes.MEMORY_NOT_ABOVE] is not None) else []
            cells.append(_fmt(row[p]) + _mark(oks))
        rows.append(cells)
    return _render(header, rows, markdown)


def mixed_single_table(records, markdown=False) -> str | None:
    """Time of a mixed-task batch over a single-task batch, same shape and dtype, for the cpkernels backends."""
    idx = _index(records)
    rows = []
    for case in _cases_in_order(records):
        if not case.endswith("-mixed"):
            continue
        single = case[: -len("mixed")] + "single"
        for p in FUSED:
            cells = [case[: -len("-mixed")], p]
            for pass_ in PASSES:
                m = idx.get((case, pass_, p), {}).get("ms")
                s = idx.get((single, pass_, p), {}).get("ms")
                cells.append("-" if not (m and s) else f"{m / s:.3f}" + _mark([m / s <= shapes.MIXED_OVER_SINGLE_MAX]))
            if cells[2:] != ["-", "-"]:
                rows.append(cells)
    if not rows:
        return None
    return _render(["shape", "backend", "forward mixed/single", "fwd+bwd mixed/single"], rows, markdown)


def _header(data: dict) -> str:
    env = data["environment"]
    lines = [f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | peft {env['peft']} | "
             f"python {env['python']} | commit {env['commit']} | {env['date']}",
             f"method: {data['method']}"]
    if env.get("others_cpu_share") is not None:
        lines[0] += f" | other processes' CPU share {env['others_cpu_share']:.0%}"
    warning = _load_warning(env)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def _load_warning(env: dict) -> str | None:
    if env.get("device_type") != "cpu":
        return None
    cores = env.get("cpu_cores") or 1
    advice = ("re-run on a quiet machine for final numbers (on a shared one, --threads 1 avoids parallel "
              "regions that wait a scheduler tick for a descheduled thread)")
    share = env.get("others_cpu_share")
    if share is not None:
        if share > OTHERS_SHARE:
            return (f"PRELIMINARY: the machine was shared while measuring (other processes kept {share:.0%} of "
                    f"{cores} cores busy); {advice}")
        return None
    loads = [v for v in (env.get("load_avg_1m"), env.get("load_avg_1m_end")) if v is not None]
    if loads and max(loads) > LOADED_FRACTION * cores:
        return (f"PRELIMINARY: the machine was shared while measuring (1-min load average up to {max(loads)} on "
                f"{cores} cores); {advice}")
    return None


def short_table(data: dict, markdown=False) -> str:
    """The ratio tables (forward, forward+backward, memory, mixed/single), with the run's header."""
    records, device_type = data["records"], data["environment"]["device_type"]
    h = "#### " if markdown else ""
    parts = [_header(data) if not markdown else "", ""]
    for pass_ in PASSES:
        table = time_table(records, pass_, device_type, markdown)
        if len(table.splitlines()) > (2 if markdown else 1):  # a pass with no measured row gets no empty table
            parts += [f"{h}{pass_}: time ÷ F.linear time (W0 frozen), same run", table, ""]
    mem = memory_table(records, markdown)
    parts += ([f"{h}peak memory of forward+backward ÷ F.linear's", mem, ""] if mem else
              ["peak memory: n/a on CPU (torch keeps no statistics for its CPU allocator; tracemalloc does not "
               "see it)", ""])
    mixed = mixed_single_table(records, markdown)
    if mixed:
        parts += [f"{h}mixed-task batch ÷ single-task batch (target ≤ {shapes.MIXED_OVER_SINGLE_MAX})", mixed, ""]
    if data.get("host"):
        parts += [f"{h}host cost per call, decode and generate(): candidate ÷ baseline, same run (bench/host.py)",
                  host.ratio_table(data["host"], markdown), ""]
    notes = "✔/✘: ratio ≤ the row's target (bench/shapes.py, bench/host.py)"
    if device_type == "cuda":
        notes += "; triton also faster than compiled-reference, cuda than reference; fused peak memory ≤ reference's"
    parts.append(notes)
    return "\n".join(parts).strip("\n")


def detail_table(data: dict) -> str:
    """Absolute medians (ms) of every provider, plus why the others were not measured."""
    records = data["records"]
    idx = _index(records)
    providers = _measured_providers(records)
    rows = [[case, pass_] + [f"{idx[(case, pass_, p)]['ms']:.3f}" if idx.get((case, pass_, p), {}).get("ms")
                             else "-" for p in providers]
            for case in _cases_in_order(records) for pass_ in PASSES]
    lines = ["median ms per call:", _render(["case", "pass"] + providers, rows, markdown=False)]
    reasons = {}
    for r in records:
        why = r["skipped"] or (f"ERROR {r['error']}" if r["error"] else None)
        if why:
            reasons.setdefault((r["provider"], why), []).append(f"{r['case']}/{r['pass']}")
    for (p, why), where in reasons.items():
        lines.append(f"not measured: {p} ({len(where)}x): {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------------
def plot(data: dict, path: Path) -> None:
    """Bar chart of the ratio to F.linear per case and provider (log scale), line at 1.0, targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    records, env = data["records"], data["environment"]
    cases = _cases_in_order(records)
    shape_of = _shape_of(records)
    providers = [p for p in _measured_providers(records) if p != "linear"]
    panels = [(p, ratio_rows(records)) for p in PASSES]
    if any(r["peak_bytes"] is not None for r in records):
        panels.append(("peak memory (forward+backward)", ratio_rows(records, key="peak_bytes")))
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(20.0, max(8.0, 0.45 * len(cases) * max(1, len(providers)))),
                                                      3.6 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(providers))
    # tab10 without its red, which marks the targets.
    colors = [c for c in plt.get_cmap("tab10").colors if c != plt.get_cmap("tab10").colors[3]]
    for ax, (title, table) in zip(axes[:, 0], panels):
        key = title if title in PASSES else "forward+backward"
        target_drawn = False
        for j, p in enumerate(providers):
            xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(cases))]
            ys = [table[(c, key)][p] for c in cases]
            ax.bar([x for x, y in zip(xs, ys) if y], [y for y in ys if y], width, label=LEGEND.get(p, p),
                   color=colors[PROVIDERS.index(p)])  # a provider keeps its colour across charts
            if title not in PASSES:
                continue
            for x, c in zip(xs, cases):
                target = shape_of[c].targets.get(p)
                if target:
                    ax.plot(x, target[PASSES.index(key)], marker="_", markersize=16, mew=2.5, color="red",
                            label=None if target_drawn else "target (bench/shapes.py)")
                    target_drawn = True
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="F.linear = 1")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 3, 5 rather than 2×10⁰
        ax.yaxis.set_major_formatter(plain)
        lo, hi = ax.get_ylim()
        # Label every minor tick within a decade; over more, only 2s and 5s, or they would overlap.
        sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in ("2", "5") else "")
        ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else sparse)
        ax.set_ylabel("ratio to F.linear (lower is better)")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: no bar hidden
    fig.suptitle(f"cpkernels vs F.linear (W0 frozen), same run: {env['device']}\n"
                 f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(harness.REPO / "bench" / "out"), help="output folder (default bench/out)")
    ap.add_argument("--quick", action="store_true", help="primary dtype only, shorter measurements")
    ap.add_argument("--shapes", type=_csv, help="comma-separated shape ids (default: the device's whole set)")
    ap.add_argument("--mix", type=_csv, help=f"comma-separated task mixes to measure, of {','.join(shapes.TASK_MIXES)} "
                                             f"(default: each shape's own)")
    ap.add_argument("--providers", type=_csv, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--from-json", help="re-render tables and chart from a results.json instead of measuring")
    ap.add_argument("--no-host", action="store_true", help="skip the host-cost, decode and generate() rows "
                                                           "(bench/host.py)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 steadies the "
                                                "ratios on a CPU that other work shares")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before measuring, so the header records it
    for m in args.mix or ():
        if m not in shapes.TASK_MIXES:
            ap.error(f"--mix: {m!r} is not one of {shapes.TASK_MIXES}")
    for p in args.providers or ():
        if p not in PROVIDERS:
            ap.error(f"--providers: {p!r} is not one of {PROVIDERS}")
    known = {s.id for s in shapes.shapes_for(harness.bench_device().type)}
    for s in args.shapes or ():
        if s not in known and not args.from_json:
            ap.error(f"--shapes: {s!r} is not a shape of this device; choose from {sorted(known)}")
    if "linear" not in (args.providers or PROVIDERS):
        ap.error("--providers must include linear: every ratio is taken against it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    data = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args, out)
    table = short_table(data)
    written = write_outputs(data, out, table)
    print("\n" + detail_table(data))
    if not data.get("complete", True):
        print("\nINCOMPLETE RUN: the measurement stopped early; the tables hold the cases that finished")
    print(f"\nwrote {', '.join(str(p) for p in written)} ({time.perf_counter() - t0:.0f} s)\n")
    print(table)
    return 0


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees a half-written file


def write_outputs(data: dict, out: Path, table: str) -> list:
    """Write results.json, ratios.txt, results.md and ratios.png (when matplotlib is there) to `out`;
    return what was written, and a note instead of the chart when it could not be drawn."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(data, out)
    _write_text(out / "ratios.txt", table + "\n")
    _write_text(out / "results.md",
                f"### {data['environment']['date']}: {data['environment']['device']}\n\n"
                + "\n".join(f"- {line}" for line in _header(data).splitlines()) + "\n\n"
                + short_table(data, markdown=True) + "\n")
    written = [out / "results.json", out / "ratios.txt", out / "results.md"]
    try:
        tmp = out / "ratios.tmp.png"
        plot(data, tmp)
        os.replace(tmp, out / "ratios.png")
        written.append(out / "ratios.png")
    except ImportError as exc:  # the tables matter more than the picture
        written.append(f"no chart ({exc}; pip install matplotlib)")
    return written


if __name__ == "__main__":
    sys.exit(main())

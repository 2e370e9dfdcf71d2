"""Analyse saved adapters without the base model: compression report, task similarity, figures.

    python -m cpkernels.analyze ADAPTER_DIR [--out DIR] [--tol 1e-8]

ADAPTER_DIR is a directory written by `cpkernels.save_adapters` (adapters.safetensors and
cpkernels_config.json). The command prints each layer's stored rank and its live rank (components
whose norm exceeds --tol, i.e. what `cpkernels.sparsity.prune` would keep), the parameters per task
and their percentage of the base model, the per-task update norms and the task-similarity table.
With --out it also writes task_similarity.png, layer_ranks.png and report.json into DIR.
Exit status 2 with a one-line message on bad input (missing directory or files, bad config).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..adapters import read_adapters
from ..analysis import format_similarity_table, plot_layer_ranks, plot_task_similarity, task_similarity, \
    task_update_norms
from ..io import atomic_write
from ..sparsity import prune_factors

__all__ = ["main", "analyze"]


def analyze(adapter_dir, out=None, tol: float = 1e-8) -> dict:
    """Run the analysis on a saved-adapter directory; return the report dict (printed by `main`).

    With `out`, writes task_similarity.png, layer_ranks.png and report.json there.
    """
    # Each layer carries its own saved scale (they may differ); it weighs the layer in the summed similarity.
    config, factors = read_adapters(adapter_dir)
    _, pruning = prune_factors(factors, tol, config["base_parameters"], config["num_tasks"])
    # C holds the rows of the saved tasks (all of them unless save_adapters(tasks=[...]) chose some).
    names = [config["task_names"][i] for i in config["tasks"]]
    sim = task_similarity(factors)
    norms = task_update_norms(factors)
    report = {
        "adapter_dir": str(adapter_dir),
        "task_names": names,
        "tol": tol,
        "compression": pruning,
        "layer_shapes": {n: [f.in_features, f.out_features] for n, f in factors.items()},
        "task_update_norms": dict(zip(names, norms.tolist())),
        "task_similarity": sim.tolist(),
    }
    if out is not None:
        out = Path(out)
        report["written"] = [
            str(plot_task_similarity(sim, names, out / "task_similarity.png")),
            str(plot_layer_ranks(pruning, out / "layer_ranks.png",
                                 title=f"Rank per layer (live = component norm > {tol:g})")),
        ]
        atomic_write(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
        report["written"].append(str(out / "report.json"))
    return report


def _per_task_line(label: str, rep: dict, key: str) -> str:
    pct = rep[f"percent_{key}"]
    pct = f" = {pct:.4g}% of {rep['base_parameters']:,} base parameters" if pct is not None else ""
    return f"  {label:<30} {rep[key]:>12,.0f}{pct}"


def format_report(report: dict) -> str:
    """The human-readable text `main` prints."""
    comp = report["compression"]
    before, after = comp["before"], comp["after"]
    width = max(5, *(len(n) for n in comp["layers"]))
    names = report["task_names"]
    lines = [f"cpkernels adapters: {report['adapter_dir']}",
             f"{len(names)} task(s): {', '.join(names)}; {len(comp['layers'])} layers",
             "",
             f"Ranks (live = components with norm > {report['tol']:g}, what sparsity.prune keeps)",
             f"  {'layer':<{width}} {'d_in':>6} {'d_out':>6} {'rank':>5} {'live':>5}"]
    for name, v in comp["layers"].items():
        d_in, d_out = report["layer_shapes"][name]
        lines.append(f"  {name:<{width}} {d_in:>6} {d_out:>6} {v['rank_before']:>5} {v['rank_after']:>5}")
    lines += [f"  {'total':<{width}} {'':>6} {'':>6} {before['rank_total']:>5} {after['rank_total']:>5}",
              "",
              "Parameters (stored -> live)",
              f"  {'adapters (A, B, C, biases)':<30} {before['params']:>12,} -> {after['params']:,}",
              _per_task_line("per task (C rows), stored", before, "per_task"),
              _per_task_line("per task (C rows), live", after, "per_task"),
              _per_task_line("amortized per task, stored", before, "amortized_per_task"),
              _per_task_line("amortized per task, live", after, "amortized_per_task"),
              "  (amortized = shared A, B / num_tasks + C rows, the paper's count)",
              "",
              "Task update norms ||dW_t||_F (all layers)"]
    lines += [f"  {n}: {v:.4g}" for n, v in report["task_update_norms"].items()]
    lines += ["", "Task similarity (cosine of dW_t; inner products summed over layers)"]
    lines += ["  " + row for row in format_similarity_table(report["task_similarity"], names).splitlines()]
    if report.get("written"):
        lines += ["", "Wrote " + ", ".join(report["written"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpkernels.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory written by cpkernels.save_adapters")
    parser.add_argument("--out", metavar="DIR", help="write task_similarity.png, layer_ranks.png, report.json here")
    parser.add_argument("--tol", type=float, default=1e-8,
                        help="components with norm <= tol count as dead (default: %(default)g)")
    args = parser.parse_args(argv)
    adapter_dir = Path(args.adapter_dir)
    if not adapter_dir.exists():
        parser.error(f"ADAPTER_DIR {str(adapter_dir)!r} does not exist")
    if not adapter_dir.is_dir():
        parser.error(f"ADAPTER_DIR {str(adapter_dir)!r} is not a directory (expected the output of save_adapters)")
    try:
        report = analyze(adapter_dir, args.out, args.tol)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"cannot analyse {str(adapter_dir)!r}: {type(exc).__name__}: {exc}")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

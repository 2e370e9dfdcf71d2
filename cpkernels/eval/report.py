"""Tables, figures and the hypothesis verdict of the quality study (`cpkernels.eval.quality`)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..adapters import atomic_write

__all__ = ["HYPOTHESIS", "summarise", "hypothesis", "markdown", "ablation_markdown", "plot_accuracy_vs_params",
           "write_all"]

#: Stated before the recorded run (README "Evidence on real text", docs/quality/README.md).
HYPOTHESIS = ("CP multi-task at <= 1/10 of per-task LoRA's parameters per task comes within 1 point (accuracy or "
              "macro-F1) of per-task LoRA on each task.")
RATIO = 0.1        # "<= 1/10 of LoRA's parameters per task"
TOLERANCE = 1.0    # "within 1 point", in percentage points


def _key(row) -> str:
    return f"{row['method']} {row['setting']}".strip()


def summarise(results: dict) -> list[dict]:
    """One entry per method and setting: mean and std over seeds of every task metric, counts, wall time."""
    groups: dict[str, list] = {}
    for row in results["runs"]:
        groups.setdefault(_key(row), []).append(row)
    base = results["encoder"]["base_parameters"]
    tasks = [t["name"] for t in results["tasks"]]
    out = []
    for name, rows in groups.items():
        entry = {"name": name, "method": rows[0]["method"], "setting": rows[0]["setting"],
                 "seeds": [r["seed"] for r in rows], "metrics": {}}
        for t in tasks:
            entry["metrics"][t] = {}
            for m in ("accuracy", "macro_f1"):
                v = 100 * np.array([r["metrics"][t][m] for r in rows])
                entry["metrics"][t][m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                          "values": v.tolist()}
        acc = 100 * np.array([np.mean([r["metrics"][t]["accuracy"] for t in tasks]) for r in rows])
        entry["mean_accuracy"] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0}
        for count in ("marginal", "amortised"):
            v = float(np.mean([r[f"params_{count}"] for r in rows]))
            entry[f"params_{count}"] = v
            entry[f"percent_{count}"] = 100 * v / base
        ranks = [r["rank_total"] for r in rows if r.get("rank_total") is not None]
        entry["rank_total"] = float(np.mean(ranks)) if ranks else None
        entry["wall_s"] = float(np.mean([r["wall_s"] for r in rows]))
        entry["steps"] = rows[0]["steps"]
        out.append(entry)
    return out


def hypothesis(results: dict) -> dict:
    """Test HYPOTHESIS against the per-task LoRA row, for each CP multi-task setting and each count."""
    summary = results.get("summary") or summarise(results)
    tasks = [t["name"] for t in results["tasks"]]
    lora = next((e for e in summary if e["method"] == "lora"), None)
    if lora is None:
        return {"statement": HYPOTHESIS, "tested": False, "why": "no LoRA row in this run"}
    def compare(e: dict) -> dict:
        gaps = {t: {m: e["metrics"][t][m]["mean"] - lora["metrics"][t][m]["mean"] for m in ("accuracy", "macro_f1")}
                for t in tasks}
        # "within 1 point (accuracy or macro-F1)": on each task, either metric within 1 point of LoRA.
        within_either = all(max(g["accuracy"], g["macro_f1"]) >= -TOLERANCE for g in gaps.values())
        within_both = all(min(g["accuracy"], g["macro_f1"]) >= -TOLERANCE for g in gaps.values())
        ratio = {c: e[f"params_{c}"] / lora[f"params_{c}"] for c in ("marginal", "amortised")}
        return {"name": e["name"], "gaps": gaps, "within_1_point_either_metric": within_either,
                "within_1_point_both_metrics": within_both, "param_ratio_to_lora": ratio,
                "cheap_enough": {c: r <= RATIO for c, r in ratio.items()}}

    candidates = [compare(e) for e in summary if e["method"] in ("cp-multi", "cp-lasso")]
    held = {c: any(x["cheap_enough"][c] and x["within_1_point_either_metric"] for x in candidates)
            for c in ("marginal", "amortised")}
    # The control: the same test applied to the linear probe (no encoder update at all). If the probe
    # passes too, the test cannot tell CP from not adapting the encoder, and a "held" says little.
    probe = next((e for e in summary if e["method"] == "head"), None)
    return {"statement": HYPOTHESIS, "tested": True, "held": held, "candidates": candidates,
            "lora": lora["name"], "control": compare(probe) if probe else None}


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def markdown(results: dict) -> str:
    """The results table (mean ± std over seeds) and the hypothesis verdict, as Markdown."""
    tasks = [t["name"] for t in results["tasks"]]
    cfg = results["config"]
    lines = []
    if results.get("quick"):
        lines += [f"**{results['note']}**", ""]
    if not results.get("complete", True):
        lines += [f"**PARTIAL: the run was stopped before every method had run with every seed "
                  f"({', '.join(map(str, cfg['seeds']))}); column n gives the seeds each row has.**", ""]
    lines += [f"Encoder {results['encoder']['model']}, top {cfg['top_layers']} of "
              f"{results['encoder']['num_layers']} layers adapted; seeds "
              f"{', '.join(map(str, cfg['seeds']))}; {cfg['steps']} multi-task steps × {cfg['batch_size']} rows "
              f"(per-task methods: {cfg['steps'] // len(tasks)} steps per task); max length {cfg['max_length']}; "
              f"commit `{results.get('commit')}`. Test split; accuracy / macro-F1 in %, mean ± std over seeds. "
              f"Parameters per task include the task's head; % of the {results['encoder']['base_parameters']:,} "
              "encoder parameters.", ""]
    # "CP rank": the CP components summed over the adapted layers (after pruning for cp-lasso), the
    # x-axis of the rank-selection curve; "–" for methods without a CP update.
    head = "| method | n | CP rank | " + " | ".join(f"{t} acc | {t} F1" for t in tasks) + \
        " | mean acc | params/task marginal | params/task amortised | % amortised | wall s/seed |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for e in results["summary"]:
        cells = [e["name"], str(len(e["seeds"])), "–" if e.get("rank_total") is None else f"{e['rank_total']:.0f}"]
        for t in tasks:
            cells += [_pm(e["metrics"][t]["accuracy"]), _pm(e["metrics"][t]["macro_f1"])]
        cells += [_pm(e["mean_accuracy"]), f"{e['params_marginal']:,.0f}", f"{e['params_amortised']:,.0f}",
                  f"{e['percent_amortised']:.3f}", f"{e['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    h = results["hypothesis"]
    lines += ["", f"**Hypothesis** (stated before the run): {h['statement']}", ""]
    if not h["tested"]:
        lines.append(f"Not tested: {h['why']}.")
        return "\n".join(lines) + "\n"
    lines.append(f"| CP setting | ratio to LoRA, marginal | ratio, amortised | "
                 + " | ".join(f"{t} Δacc / ΔF1" for t in tasks) + " | within 1 pt (either metric) |")
    lines.append("|" + "---|" * (4 + len(tasks)))
    for c in h["candidates"]:
        gaps = [f"{c['gaps'][t]['accuracy']:+.1f} / {c['gaps'][t]['macro_f1']:+.1f}" for t in tasks]
        lines.append(f"| {c['name']} | {c['param_ratio_to_lora']['marginal']:.4f} | "
                     f"{c['param_ratio_to_lora']['amortised']:.3f} | " + " | ".join(gaps) +
                     f" | {'yes' if c['within_1_point_either_metric'] else 'no'} |")
    control = h.get("control")
    if control:
        gaps = [f"{control['gaps'][t]['accuracy']:+.1f} / {control['gaps'][t]['macro_f1']:+.1f}" for t in tasks]
        lines.append(f"| control: {control['name']} (no encoder update) | {control['param_ratio_to_lora']['marginal']:.4f} | "
                     f"{control['param_ratio_to_lora']['amortised']:.3f} | " + " | ".join(gaps) +
                     f" | {'yes' if control['within_1_point_either_metric'] else 'no'} |")
    lines += ["", f"Verdict, counting parameters per task as marginal: **{'held' if h['held']['marginal'] else 'did not hold'}**; "
              f"as amortised: **{'held' if h['held']['amortised'] else 'did not hold'}**."]
    if control and control["within_1_point_either_metric"]:
        lines += ["", "**The control passes too:** the linear probe alone, with no encoder update, also comes within "
                  "1 point of per-task LoRA on every task, so at this budget the test does not separate CP from "
                  "not adapting the encoder; read the verdict with that in mind."]
    return "\n".join(lines) + "\n"


def ablation_markdown(results: dict) -> str:
    """The ablation rows (one seed): per-task accuracy / macro-F1 and the setting that changed."""
    tasks = [t["name"] for t in results["tasks"]]
    lines = [f"Ablation, seed {results['config']['seeds'][0]}, commit `{results.get('commit')}` (one seed: "
             "differences under ~1-2 points are within seed noise).", "",
             "| setting | " + " | ".join(f"{t} acc | {t} F1" for t in tasks) + " | mean acc |",
             "|" + "---|" * (2 + 2 * len(tasks))]
    for e in results["summary"]:
        cells = [e["name"]] + [f"{e['metrics'][t][m]['mean']:.1f}" for t in tasks for m in ("accuracy", "macro_f1")]
        lines.append("| " + " | ".join(cells + [f"{e['mean_accuracy']['mean']:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_params(results: dict, path) -> Path:
    """Mean test accuracy over tasks against % trainable parameters per task (log x), one point per setting.

    CP multi-task settings appear twice: filled at the amortised count, hollow at the marginal count.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"cp-multi": "tab:blue", "cp-lasso": "tab:cyan", "lora": "tab:red", "head": "tab:gray",
              "full": "tab:green", "cp-single": "tab:purple"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    seen = set()
    for e in results["summary"]:
        m = e["method"]
        y, err = e["mean_accuracy"]["mean"], e["mean_accuracy"]["std"]
        label = m if m not in seen else None
        seen.add(m)
        ax.errorbar(e["percent_amortised"], y, yerr=err, fmt="o", color=colors.get(m, "k"), label=label, capsize=3)
        if m in ("cp-multi", "cp-lasso"):
            ax.errorbar(e["percent_marginal"], y, yerr=err, fmt="o", mfc="none", color=colors[m], capsize=3,
                        label=f"{m} (marginal count)" if f"{m}-marginal" not in seen else None)
            seen.add(f"{m}-marginal")
            ax.plot([e["percent_marginal"], e["percent_amortised"]], [y, y], ":", color=colors[m], lw=1)
        ax.annotate(e["setting"], (e["percent_amortised"], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    # The group-lasso settings form the rank-selection curve: join them in order of their size.
    lasso = sorted((e["percent_amortised"], e["mean_accuracy"]["mean"]) for e in results["summary"]
                   if e["method"] == "cp-lasso")
    if len(lasso) > 1:
        ax.plot(*zip(*lasso), "-", color=colors["cp-lasso"], lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters per task, % of the encoder (log scale)")
    ax.set_ylabel("test accuracy, mean over tasks (%)")
    title = "Accuracy vs parameters per task"
    ax.set_title(title + (" (QUICK run: not claimed)" if results.get("quick") else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(Path(path), buf.getvalue())
    return Path(path)


def write_all(results: dict, output_dir: Path, say=print) -> None:
    """results.json, results.md, accuracy_vs_params.png and task_similarity.png (atomic writes)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    try:
        figures["accuracy_vs_params"] = plot_accuracy_vs_params(results, output_dir / "accuracy_vs_params.png").name
        if results.get("task_similarity"):
            from ..analysis import plot_task_similarity

            sim = results["task_similarity"]
            figures["task_similarity"] = plot_task_similarity(
                sim["matrix"], [t["name"] for t in results["tasks"]], output_dir / "task_similarity.png",
                title=f"Task similarity (cos ΔW_t), CP multi-task r={sim['rank']}, seed {results['config']['seeds'][0]}",
            ).name
    except ImportError as exc:  # matplotlib is optional: the numbers are in the JSON anyway
        say(f"  no figures: {exc}")
    results["figures"] = figures
    atomic_write(output_dir / "results.json", (json.dumps(results, indent=1, default=str) + "\n").encode())
    table = markdown(results)
    atomic_write(output_dir / "results.md", table.encode())
    say(table)
    say(f"written to {output_dir}/ (results.json, results.md, {', '.join(figures.values())}); "
        f"wall time {results['wall_time_s']:.0f} s")

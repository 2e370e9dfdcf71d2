"""Regenerate the README's example figure, docs/task_similarity.png.

A toy multi-task problem whose answer is known. Three frozen linear "heads" (query, key, value)
get teacher updates of rank 3, 1 and 2, shared by four tasks: "review-a" and "review-b" use nearly
the same mix of components, "topic" mostly another one, and "negation" the first with the opposite
sign. A student converted with rank 8 everywhere is trained with SGD and proximal group-lasso
steps, pruned, and analysed. The script prints the ranks before/after pruning and both similarity
tables (student and teacher), and writes the student's heatmap.

Deterministic (fixed seeds, float64, CPU, about two seconds). From the repository root:

    python docs/make_example_figure.py
"""
from pathlib import Path

import torch
from torch import nn

from cpkernels import analysis, sparsity
from cpkernels.convert import convert, cp_layers, task_context

OUT = Path(__file__).resolve().parent / "task_similarity.png"
TASKS = ["review-a", "review-b", "topic", "negation"]
# Teacher weights of the shared components (columns), one row per task.
MIX = torch.tensor([[1.0, 0.6, 0.1],
                    [0.9, 0.7, 0.0],
                    [0.1, 0.2, 1.0],
                    [-1.0, 0.0, 0.3]], dtype=torch.float64)
TEACHER_RANKS = {"query": 3, "key": 1, "value": 2}


class Heads(nn.Module):
    """Three linear maps of one input, concatenated: each layer's update is identifiable on its own."""

    def __init__(self, d_in=32, d_out=16):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(d_in, d_out) for _ in range(3))

    def forward(self, x):
        return torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)


def base_model() -> nn.Module:
    torch.manual_seed(0)  # teacher and student share the same frozen base weights
    return Heads().double()


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    teacher = convert(base_model(), rank=3, num_tasks=len(TASKS), task_names=TASKS)
    for name, layer in cp_layers(teacher):
        r = TEACHER_RANKS[name]
        layer.set_factors(0.5 * torch.randn(layer.out_features, r, dtype=torch.float64),
                          0.5 * torch.randn(layer.in_features, r, dtype=torch.float64), MIX[:, :r])
    student = convert(base_model(), rank=8, num_tasks=len(TASKS), task_names=TASKS)

    x = torch.randn(512, 32, dtype=torch.float64)
    t = torch.arange(512) % len(TASKS)  # a mixed-task batch
    with torch.no_grad(), task_context(teacher, t):
        target = teacher(x)

    # Proximal gradient: an SGD step on the loss, then the exact prox of lr·lam·penalty on C.
    lr, lam, warmup, steps = 3e-2, 0.1, 100, 400
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        with task_context(student, t):
            loss = (student(x) - target).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warmup:  # init="cp" starts every component at zero: let them grow first
            sparsity.proximal_step(student, lr * lam)
    report = sparsity.prune(student)

    print(f"final training loss: {loss.item():.3g} (target mean square: {target.pow(2).sum(-1).mean().item():.3g})")
    print("rank per layer (before -> after pruning; teacher):")
    for name, v in report["layers"].items():
        print(f"  {name:<6} {v['rank_before']} -> {v['rank_after']}   ({TEACHER_RANKS[name]})")
    print(f"per task: {report['before']['per_task']} -> {report['after']['per_task']} parameters")
    sim = analysis.task_similarity(student)
    print("student similarity:\n" + analysis.format_similarity_table(sim, TASKS))
    print("teacher similarity:\n" + analysis.format_similarity_table(analysis.task_similarity(teacher), TASKS))
    print("wrote", analysis.plot_task_similarity(sim, TASKS, OUT,
                                                 title="Task similarity (toy example): cosine of ΔW_t"))


if __name__ == "__main__":
    main()

"""Task interaction: how alike are the tasks' updates ΔW_t = s·A·diag(c_t)·Bᵀ?

All quantities come from the r×r Gram matrices of the shared factors, never from ΔW itself:

    ⟨ΔW_u, ΔW_t⟩_F = s² · Σ_jk c_uj c_tk (a_j·a_k)(b_j·b_k) = s² · c_uᵀ ((AᵀA) ⊙ (BᵀB)) c_t,

which costs O((d_in + d_out)·r² + T²·r) per layer instead of O(T·d_in·d_out).

Across layers the inner products are **summed**: the aggregated similarity is the cosine between
the model-wide updates (every layer's ΔW_t flattened and concatenated), so layers whose updates
are larger weigh more. ``per_layer=True`` gives each layer's own T×T matrix.

Everything is computed in float64 and returned on the CPU: the matrices are T×T, and the
cosine of nearly orthogonal updates loses digits in low precision. A task whose update is zero
has similarity 0 with every task, itself included (the cosine is undefined there; 0 says "no
shared structure"). A task whose factors hold NaN gets NaN: a broken adapter never looks like
an unrelated one.

Accepts a converted model, a saved-adapter directory, or the ``{layer: LayerFactors}`` of
`cpkernels.adapters.read_adapters`, so saved adapters are analysed without the base model.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from .factors import LayerFactors, as_factors
from .io import atomic_write
from .sparsity import compression_report

__all__ = ["task_gram", "task_similarity", "task_update_norms", "format_similarity_table",
           "plot_task_similarity", "plot_layer_ranks"]


# --------------------------------------------------------------------------------------------
# Gram matrices, similarity, norms
# --------------------------------------------------------------------------------------------
def _layer_gram(f: LayerFactors) -> torch.Tensor:
    A, B, C = (t.detach().double() for t in (f.A, f.B, f.C))
    G = (A.T @ A) * (B.T @ B)
    return (f.scale ** 2) * (C @ G @ C.T)


def task_gram(model_or_factors, per_layer: bool = False):
    """The T×T Frobenius inner products ⟨ΔW_u, ΔW_t⟩, summed over layers (float64, CPU).

    With ``per_layer=True``, a dict ``{layer name: T×T}`` in model order.
    """
    grams = {name: _layer_gram(f).cpu() for name, f in as_factors(model_or_factors).items()}
    if per_layer:
        return grams
    return torch.stack(list(grams.values())).sum(0)


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    # Rounding can leave a tiny negative diagonal for a (near-)zero task; such a task counts as zero.
    # NaN stays NaN (clamp_min, the division and clamp all propagate it): only an exact zero norm
    # gives the documented 0, never a broken (NaN) factor.
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    sim = torch.where(denom == 0, 0, gram / torch.where(denom == 0, 1, denom))
    return sim.clamp(-1, 1)  # |cos| ≤ 1 exactly; rounding can overshoot by an ulp


def task_similarity(model_or_factors, per_layer: bool = False):
    """T×T cosine similarity of the task updates ΔW_t (float64, CPU); see the module docstring.

    Aggregated over layers by summing the inner products, or ``{layer name: T×T}`` with
    ``per_layer=True``. Zero-norm tasks get similarity 0; a task whose factors hold NaN gets NaN.
    """
    gram = task_gram(model_or_factors, per_layer)
    if per_layer:
        return {name: _cosine(g) for name, g in gram.items()}
    return _cosine(gram)


def task_update_norms(model_or_factors, per_layer: bool = False):
    """‖ΔW_t‖_F per task, shape (T,) (float64, CPU): over all layers (the norm of the concatenated
    update), or ``{layer name: (T,)}`` with ``per_layer=True``."""
    gram = task_gram(model_or_factors, per_layer)
    norm = lambda g: g.diagonal().clamp_min(0).sqrt()  # noqa: E731
    if per_layer:
        return {name: norm(g) for name, g in gram.items()}
    return norm(gram)


def format_similarity_table(sim, task_names, digits: int = 2) -> str:
    """The similarity matrix as a fixed-width text table with task names on both axes."""
    sim = _check_square(sim, task_names)
    width = max(digits + 4, *(len(n) for n in task_names))
    head = " " * width + "".join(f" {n:>{width}}" for n in task_names)
    rows = [f"{n:<{width}}" + "".join(f" {v:>{width}.{digits}f}" for v in row.tolist())
            for n, row in zip(task_names, sim)]
    return "\n".join([head, *rows])


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, imported lazily: it is an optional dependency)
# --------------------------------------------------------------------------------------------
def _check_square(sim, task_names) -> torch.Tensor:
    sim = torch.as_tensor(sim, dtype=torch.float64).cpu()
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square T×T matrix, got shape {tuple(sim.shape)}")
    if len(task_names) != sim.shape[0]:
        raise ValueError(f"task_names has {len(task_names)} names but sim is {tuple(sim.shape)}")
    return sim


def _new_figure(width: float, height: float):
    # A bare Figure with the Agg canvas: no pyplot, so no global state, no display, and the
    # user's matplotlib backend is left alone.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is in the bench/dev extras
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    """Render the figure and write it to `path` atomically (the adapters' temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write(path, buffer.getvalue())
    return path


# Cell labels stay readable up to this many tasks; beyond, the colours alone tell the story.
_MAX_ANNOTATED_TASKS = 16


def plot_task_similarity(sim, task_names, path, title: str = "Task similarity: cosine of ΔW_t") -> Path:
    """Write a labelled heatmap of the T×T similarity `sim` to the PNG file `path`; return the path.

    The colour scale is fixed to [−1, 1] (diverging, 0 = unrelated) so figures compare across runs.
    """
    sim = _check_square(sim, task_names)
    T = sim.shape[0]
    # ~0.6 inch per task keeps the labels and the cell annotations legible; 4 inches at least.
    side = max(4.0, 1.5 + 0.6 * T)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(sim.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(T), labels=list(task_names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(T), labels=list(task_names))
    if T <= _MAX_ANNOTATED_TASKS:
        for i in range(T):
            for j in range(T):
                v = float(sim[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_title(title)
    return _save_png(fig, path)


def _rank_series(report_or_model) -> tuple[list[str], dict[str, list[int]]]:
    """Layer names and the rank series to draw: {"before", "after"} for a prune report, else {"rank"}."""
    if isinstance(report_or_model, nn.Module):
        report_or_model = compression_report(report_or_model)
    layers = report_or_model.get("layers") if isinstance(report_or_model, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError("expected a converted model, a prune report or a compression report "
                         "(a dict with a non-empty 'layers' entry)")
    names = list(layers)
    first = layers[names[0]]
    if "rank_before" in first:
        return names, {"before": [layers[n]["rank_before"] for n in names],
                       "after": [layers[n]["rank_after"] for n in names]}
    if "rank" in first:
        return names, {"rank": [layers[n]["rank"] for n in names]}
    raise ValueError(f"layer entries need 'rank' or 'rank_before'/'rank_after', got keys {sorted(first)}")


def plot_layer_ranks(report_or_model, path, title: str = "Rank per layer") -> Path:
    """Write a horizontal bar chart of each layer's rank to the PNG file `path`; return the path.

    Given the report of `cpkernels.sparsity.prune` (or `prune_factors`), it draws the rank
    before pruning (light) behind the rank after; given a model or a compression report, the
    current ranks.
    """
    names, series = _rank_series(report_or_model)
    n = len(names)
    # One bar row per layer, ~0.22 inch each, so 72 BERT layers still fit one page.
    fig = _new_figure(8.0, max(2.5, 1.0 + 0.22 * n))
    ax = fig.add_subplot()
    y = list(range(n))
    if "before" in series:
        ax.barh(y, series["before"], color="#c6dbef", label="before pruning")
        ax.barh(y, series["after"], height=0.5, color="#2171b5", label="after pruning")
        # Outside the axes, top right: never hides a bar, whatever the number of layers.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax.barh(y, series["rank"], color="#2171b5")
    ax.set_yticks(y, labels=names, fontsize=7)
    ax.margins(y=0.01)  # matplotlib's default 5% leaves inches of blank space with many layers
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlabel("rank (live rank-1 components)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    return _save_png(fig, path)

"""`LayerFactors`: the CP factors of one converted layer, the type that adapters, sparsity, analysis
and the analyze CLI pass around, plus the one parameter count.

    A (d_out, r), B (d_in, r), C (T, r), scale s, optional trained bias (d_out,)
    ΔW_t = s · A·diag(C[t])·Bᵀ

The shape check lives in `LayerFactors.__post_init__` and nowhere else; the parameter count lives in
`adapter_counts` (used by `parameter_report` for a model and by `sparsity.compression_report` for
saved adapters). Factors come from a model (`model_factors`, views of the layers' own Parameters),
from a saved-adapter directory (`as_factors(path)`), or from a plain ``{name: {"A", "B", "C"}}`` dict.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from .modules import FusedCPLinear
from .reader import SavedAdapters, read_adapter_folder

__all__ = ["LayerFactors", "as_factors", "model_factors", "read_adapters", "saved_factors", "converted_layers",
           "adapter_counts", "layer_info", "parameter_report", "print_parameter_report"]


@dataclass(eq=False)
class LayerFactors:
    """The factors of one layer. Read them as attributes (``f.A``) or, like the dicts this type
    replaces, by key (``f["A"]``; ``"bias" in f`` says whether a trained bias is present)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    scale: float = 1.0
    bias: torch.Tensor | None = None

    def __post_init__(self):
        where = f"layer {self.name!r}"
        for k in ("A", "B", "C"):
            t = getattr(self, k)
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: {k} must be a 2-D tensor, got {shape}")
        A, B, C = self.A, self.B, self.C
        if not (A.shape[1] == B.shape[1] == C.shape[1]):
            raise ValueError(f"{where}: ranks differ: A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)} "
                             f"(expected (d_out, r), (d_in, r), (T, r) with one r)")
        if self.bias is not None and (not isinstance(self.bias, torch.Tensor)
                                      or tuple(self.bias.shape) != (A.shape[0],)):
            shape = tuple(self.bias.shape) if isinstance(self.bias, torch.Tensor) else type(self.bias).__name__
            raise ValueError(f"{where}: bias must have shape (d_out,) = ({A.shape[0]},) like A's rows, got {shape}")
        scale = self.scale.item() if isinstance(self.scale, torch.Tensor) and self.scale.numel() == 1 else self.scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
            raise ValueError(f"{where}: scale must be a finite real number, got {self.scale!r}")
        self.scale = float(scale)

    # Shapes ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.B.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.C.shape[0]

    # The old dict interface (f["A"], "bias" in f), kept for code written against read_adapters' dicts.
    _KEYS = ("A", "B", "C", "scale", "bias")

    def __getitem__(self, key: str):
        if key not in self._KEYS or (key == "bias" and self.bias is None):
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self._KEYS and (key != "bias" or self.bias is not None)

    # Construction and math -----------------------------------------------------------------
    @classmethod
    def from_layer(cls, name: str, layer: FusedCPLinear) -> "LayerFactors":
        """The layer's own Parameters (not copies); its bias only when it trains (then it is part of
        the adapter, as in saved files)."""
        bias = layer.bias if layer.bias is not None and layer.bias.requires_grad else None
        return cls(name, layer.A, layer.B, layer.C, float(layer.scale), bias)

    def with_factors(self, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> "LayerFactors":
        """A copy with other factors (e.g. some components dropped); name, scale and bias kept."""
        return replace(self, A=A, B=B, C=C)

    def detach(self) -> "LayerFactors":
        bias = None if self.bias is None else self.bias.detach()
        return replace(self, A=self.A.detach(), B=self.B.detach(), C=self.C.detach(), bias=bias)

    def delta_weight(self, task: int, dtype=torch.float64) -> torch.Tensor:
        """ΔW_task = s·A·diag(C[task])·Bᵀ, (d_out, d_in), computed in float64."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise IndexError(f"layer {self.name!r}: task {task!r} is outside [0, num_tasks={self.num_tasks})")
        A, B, c = (t.detach().double() for t in (self.A, self.B, self.C[task]))
        return ((A * (self.scale * c)) @ B.T).to(dtype)

    def parameter_count(self) -> dict:
        """{"shared": A, B and a trained bias; "per_task": one row of C (= rank); "total": all of it}."""
        shared = self.rank * (self.in_features + self.out_features) + (0 if self.bias is None else self.bias.numel())
        return {"shared": shared, "per_task": self.rank, "total": shared + self.rank * self.num_tasks}


# --------------------------------------------------------------------------------------------
# Where factors come from
# --------------------------------------------------------------------------------------------
def converted_layers(model: nn.Module, refuse_merged: str | None = None) -> list[tuple[str, FusedCPLinear]]:
    """(qualified name, layer) for every FusedCPLinear of `model`, in model order; a ValueError when
    there is none. With ``refuse_merged="<action>"``, a merged layer raises too: its weight holds a
    copy of the update that the action would read or change."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FusedCPLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FusedCPLinear layers; call cpkernels.convert(model, ...) "
                         f"first")
    if refuse_merged is not None:
        for name, layer in layers:
            if layer.merged_task is not None:
                raise ValueError(f"layer {name!r} holds merged task {layer.merged_task}; call "
                                 f"cpkernels.unmerge(model) before {refuse_merged}")
    return layers


def model_factors(model: nn.Module, refuse_merged: str | None = None) -> dict[str, LayerFactors]:
    """``{name: LayerFactors}`` of a converted model, in model order, viewing its own Parameters."""
    return {name: LayerFactors.from_layer(name, m) for name, m in converted_layers(model, refuse_merged)}


def saved_factors(saved: SavedAdapters) -> dict[str, LayerFactors]:
    """``{name: LayerFactors}`` of an adapter folder read by `reader.read_adapter_folder`, each checked
    against the shapes its config records."""
    factors = {}
    for name, t in saved.layers.items():
        info = saved.config["layers"][name]
        try:
            f = LayerFactors(name, t["A"], t["B"], t["C"], info["scale"], t.get("bias"))
        except ValueError as exc:
            raise ValueError(f"{saved.file}: {exc}") from None
        want = (info["out_features"], info["in_features"], info["rank"], len(saved.config["tasks"]))
        got = (f.out_features, f.in_features, f.rank, f.num_tasks)
        if got != want:
            raise ValueError(f"{saved.file}: layer {name!r} has (out, in, rank, saved tasks) = {got} but its config "
                             f"says {want}")
        factors[name] = f
    return factors


def read_adapters(path) -> tuple[dict, dict[str, LayerFactors]]:
    """(config, {layer name: LayerFactors}) from an adapter directory (or its .safetensors file), on the
    CPU, without a model. C holds the rows of ``config["tasks"]``; each layer carries its saved scale.
    The config is the saved json object (the CPConfig fields plus tasks, base_parameters, layers, heads).
    Every tensor is checked against the sha256 digest recorded when it was saved."""
    saved = read_adapter_folder(path)
    return saved.config, saved_factors(saved)


def as_factors(source) -> dict[str, LayerFactors]:
    """``{name: LayerFactors}`` from a converted model, a saved-adapter directory (or its .safetensors
    file), a dict of LayerFactors, or a ``{name: {"A", "B", "C"[, "scale", "bias"]}}`` dict.
    Every layer must have the same number of tasks T; ranks may differ (after pruning)."""
    if isinstance(source, nn.Module):
        return model_factors(source)
    if isinstance(source, (str, os.PathLike)):
        return read_adapters(source)[1]
    if not isinstance(source, dict):
        raise TypeError("expected a converted nn.Module, an adapter directory, or a {layer: factors} dict "
                        f"(from cpkernels.adapters.read_adapters), got {type(source).__name__}")
    if not source:
        raise ValueError("the factor dict is empty: no CP layers to analyse")
    out, num_tasks = {}, None
    for name, f in source.items():
        if not isinstance(f, LayerFactors):
            missing = [k for k in ("A", "B", "C") if not isinstance(f, dict) or k not in f]
            if missing:
                raise ValueError(f"layer {name!r}: missing factor(s) {missing}; expected a dict with A, B and C")
            f = LayerFactors(name, f["A"], f["B"], f["C"], f.get("scale", 1.0), f.get("bias"))
        if num_tasks is not None and f.num_tasks != num_tasks:
            raise ValueError(f"layer {name!r}: C has {f.num_tasks} task rows, earlier layers have {num_tasks}")
        num_tasks = f.num_tasks
        out[name] = f
    return out


# --------------------------------------------------------------------------------------------
# The parameter count
# --------------------------------------------------------------------------------------------
def adapter_counts(factors: dict[str, LayerFactors], num_tasks: int | None = None,
                   base_parameters: int | None = None) -> dict:
    """Adapter parameters the paper's way, for `parameter_report` and `sparsity.compression_report`.

    ``layers`` ({name: {"rank", "params"}}), ``rank_total``, ``params`` (A, B, C and trained biases),
    ``shared_trainable`` (A, B, trained biases: every task uses them), ``per_task`` (one row of C per
    layer: the sum of the ranks), ``amortized_per_task`` (shared / num_tasks + per_task, how the paper
    arrives at "0.3% per task"), ``percent_per_task`` and ``percent_amortized_per_task`` (100·x /
    base_parameters, None when it is unknown), ``num_tasks`` (default: the rows of C), ``base_parameters``.
    """
    counts = {name: f.parameter_count() for name, f in factors.items()}
    if num_tasks is None:
        num_tasks = next(iter(factors.values())).num_tasks
    shared = sum(c["shared"] for c in counts.values())
    per_task = sum(c["per_task"] for c in counts.values())
    amortized = shared / num_tasks + per_task
    percent = (lambda n: 100.0 * n / base_parameters) if base_parameters else (lambda n: None)
    return {
        "layers": {name: {"rank": factors[name].rank, "params": c["total"]} for name, c in counts.items()},
        "rank_total": per_task,
        "params": sum(c["total"] for c in counts.values()),
        "shared_trainable": shared,
        "per_task": per_task,
        "amortized_per_task": amortized,
        "percent_per_task": percent(per_task),
        "percent_amortized_per_task": percent(amortized),
        "num_tasks": num_tasks,
        "base_parameters": base_parameters,
    }


def layer_info(layer: FusedCPLinear) -> dict:
    """The shape of one converted layer, as stored in reports and adapter configs."""
    return {"in_features": layer.in_features, "out_features": layer.out_features, "rank": layer.rank,
            "bias": layer.bias is not None, "scale": layer.scale}


def parameter_report(model: nn.Module) -> dict:
    """Count parameters the way the paper does.

    Keys: ``total`` (every parameter), ``frozen`` (requires_grad False), ``shared_trainable`` (A and B,
    plus converted layers' biases if they train), ``per_task`` (one row of C per layer: the sum of the
    ranks), ``other_trainable`` (any other parameter that trains: task heads, unfrozen norms),
    ``base_parameters`` (total minus the CP factors and other_trainable), ``percent_per_task``
    (100·per_task / base_parameters), ``amortized_per_task`` (shared_trainable / num_tasks + per_task)
    and ``percent_amortized_per_task``, ``trainable``, ``num_tasks``, and ``layers`` ({name: in/out
    features, rank, bias, scale}). The adapter counts come from `adapter_counts`.
    """
    layers = converted_layers(model)
    factors = {name: LayerFactors.from_layer(name, layer) for name, layer in layers}
    adapter = {id(p) for f in factors.values() for p in (f.A, f.B, f.C, f.bias) if p is not None}
    total = frozen = adapter_total = other = 0
    for p in model.parameters():  # unique Parameters: shared ones count once
        n = p.numel()
        total += n
        if id(p) in adapter:
            adapter_total += n
        elif not p.requires_grad:
            frozen += n
        else:
            other += n
    frozen += sum(p.numel() for f in factors.values() for p in (f.A, f.B, f.C) if not p.requires_grad)
    # A trained bias belongs to the base model (it exists without the adapter) and to the adapter.
    trained_bias = sum(f.bias.numel() for f in factors.values() if f.bias is not None)
    num_tasks = layers[0][1].num_tasks
    base = total - adapter_total + trained_bias - other
    counts = adapter_counts(factors, num_tasks, base)
    return {
        "total": total, "frozen": frozen, "trainable": total - frozen, "shared_trainable": counts["shared_trainable"],
        "per_task": counts["per_task"], "other_trainable": other, "base_parameters": base, "num_tasks": num_tasks,
        "percent_per_task": 100.0 * counts["per_task"] / max(base, 1),
        "amortized_per_task": counts["amortized_per_task"],
        "percent_amortized_per_task": 100.0 * counts["amortized_per_task"] / max(base, 1),
        "layers": {name: layer_info(layer) for name, layer in layers},
    }


def print_parameter_report(model: nn.Module) -> None:
    """Print the report in the style of PEFT's print_trainable_parameters."""
    r = parameter_report(model)
    print(f"trainable params: {r['trainable']:,} || all params: {r['total']:,} || "
          f"trainable%: {100.0 * r['trainable'] / max(r['total'], 1):.4f}")
    print(f"shared (A, B, trainable biases): {r['shared_trainable']:,} || per task (C rows): {r['per_task']:,} "
          f"x {r['num_tasks']} tasks || other trainable (heads): {r['other_trainable']:,} || "
          f"{len(r['layers'])} converted layers")
    print(f"per task: {r['per_task']:,} = {r['percent_per_task']:.4f}% of the {r['base_parameters']:,}-parameter "
          f"base model || amortized (shared / tasks + per task): {r['amortized_per_task']:,.0f} = "
          f"{r['percent_amortized_per_task']:.4f}%")

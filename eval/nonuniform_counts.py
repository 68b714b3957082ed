"""What per-layer expert counts would buy over the uniform count stock llama.cpp needs (issue 16, part 4).

    python eval/nonuniform_counts.py --stats STATS.gguf

On the reference model, in transformers (float32, no quantization): for each total number of kept
experts (uniform 20, 18, 16, 14 and 12 of 24 in each layer), the uniform pruning against the best
per-layer counts with the same total (the same bytes: every expert is the same size). Per-layer
counts are chosen from the calibration's local pruning errors (`ggufmoe calibrate`): greedily, the
layer whose next removal adds the least depth-weighted error gives up experts, at the keep counts the
calibration measured. A layer is pruned exactly by masking its removed experts' router logits to
-inf (softmax routing renormalised over the kept ones, as a pruned GGUF routes). Measured: KL
divergence to the unpruned model over chunks of eval_doc.txt. Writes eval/results/nonuniform_counts.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import ROOT, SHARED, eval_chunks  # noqa: E402

from ggufmoe.arch import architecture_for  # noqa: E402
from ggufmoe.prune.criteria import choose, expert_scores, keep_counts  # noqa: E402
from ggufmoe.sensitivity.local_costs import depth  # noqa: E402
from ggufmoe.source.hf import HFSource  # noqa: E402
from ggufmoe.stats.file import load_stats  # noqa: E402
from ggufmoe.stats.local_errors import local_errors  # noqa: E402

CRITERION = "reap"


def kl_of(model, chunks, base, kept: dict[int, list[int]]) -> float:
    """Mean KL to ``base`` with each layer routed to its kept experts only (removed ones' logits -inf)."""
    for il, keep in kept.items():
        gate = model.model.layers[il].mlp.gate
        mask = torch.full((gate.weight.shape[0],), float("-inf"))
        mask[keep] = 0.0

        def forward(hidden_states, gate=gate, mask=mask):
            return masked_router(gate, hidden_states, mask)

        gate.forward = forward
    try:
        kls = []
        with torch.no_grad():
            for c, b in zip(chunks, base):
                lp = torch.log_softmax(model(input_ids=torch.tensor([c])).logits[0].double(), -1)
                kls.append(float((b.exp() * (b - lp)).sum(-1).mean()))
        return float(np.mean(kls))
    finally:
        for il in kept:
            del model.model.layers[il].mlp.gate.forward


def masked_router(gate, hidden_states, mask):
    """Qwen3-MoE's router with some logits at -inf: softmax, top-k, renormalised (transformers' own steps)."""
    hidden_states = hidden_states.reshape(-1, gate.weight.shape[1])
    logits = torch.nn.functional.linear(hidden_states, gate.weight) + mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, gate.top_k, dim=-1)
    if getattr(gate, "norm_topk_prob", True):
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return logits, top_w.to(hidden_states.dtype), top_i


def per_layer_counts(errors: dict[int, dict[int, float]], layers: list[int], n_layers: int, total: int,
                     counts: list[int]) -> dict[int, int]:
    """Keep counts per layer summing to ``total``, from all experts down: each step removes from the layer whose
    next measured count adds the least depth-weighted error per expert removed."""
    keep = {il: counts[0] for il in layers}
    while sum(keep.values()) > total:
        best = None
        for il in layers:
            lower = [c for c in counts if c < keep[il]]
            if not lower:
                continue
            nxt = lower[0]
            now = errors[il].get(keep[il], 0.0)
            cost = depth(il, n_layers) * (errors[il][nxt] - now) / (keep[il] - nxt)
            if best is None or cost < best[0]:
                best = (cost, il, nxt)
        if best is None:
            break
        keep[best[1]] = best[2]
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "refmoe-qwen3")
    ap.add_argument("--stats", type=Path, required=True, help="statistics from the streamed `ggufmoe calibrate`")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    arch = architecture_for(HFSource(args.model))
    stats = load_stats(args.stats)
    local = local_errors(stats)
    n_layers, n = int(arch.cfg.num_hidden_layers), arch.n_expert
    layers = sorted(stats.layers)
    counts = sorted(keep_counts(arch), reverse=True)
    errors = {il: {n: 0.0, **{int(k): v for k, v in local.prune[str(il)][CRITERION].items() if "@" not in k}}
              for il in layers}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    chunks = eval_chunks(args.model, args.chunks, args.ctx)
    with torch.no_grad():
        base = [torch.log_softmax(model(input_ids=torch.tensor([c])).logits[0].double(), -1) for c in chunks]
    scores = {il: expert_scores(stats.layers[il], CRITERION, 0.5) for il in layers}
    rows = []
    for uniform in (20, 18, 16, 14, 12):
        total = uniform * len(layers)
        flat = {il: choose(scores[il], uniform) for il in layers}
        per = per_layer_counts(errors, layers, n_layers, total, counts)
        varied = {il: choose(scores[il], per[il]) for il in layers}
        row = dict(uniform=uniform, counts=[per[il] for il in layers], kl_uniform=kl_of(model, chunks, base, flat),
                   kl_per_layer=kl_of(model, chunks, base, varied))
        row["gain"] = 1 - row["kl_per_layer"] / row["kl_uniform"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = ROOT / "eval" / "results"
    (res / "nonuniform_counts.json").write_text(json.dumps(rows, indent=1))
    best = max(r["gain"] for r in rows)
    lines = ["# Per-layer expert counts vs the uniform count (reference model, transformers)", "",
             f"`{args.model.name}`, {len(layers)} MoE layers of {n} experts, REAP's choice of experts; KL divergence "
             f"to the unpruned model over {len(chunks)} chunks of {args.ctx} tokens of eval_doc.txt. Per-layer counts "
             "from the calibration's local pruning errors at the same total (same bytes). Reproduce: "
             "`python eval/nonuniform_counts.py --stats STATS.gguf`.", "",
             "| uniform | per-layer counts | KLD uniform | KLD per-layer | gain |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['uniform']}/{n} | {', '.join(map(str, r['counts']))} | {r['kl_uniform']:.4f} | "
              f"{r['kl_per_layer']:.4f} | {r['gain']:+.1%} |" for r in rows]
    lines += ["", f"Largest gain: {best:+.1%}."]
    (res / "nonuniform_counts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

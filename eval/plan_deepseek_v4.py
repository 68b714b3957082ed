"""DeepSeek-V4-Flash (284B) and V4-Pro (1.6T) planned from their configurations alone: Flash for 64, 96 and 128 GiB,
Pro for 256 and 512 GiB of total memory (file, KV cache and compressor states, compute buffers, the process) at
ctx 32768. Writes eval/results/deepseek_v4_plans.md and .json.

    python eval/plan_deepseek_v4.py

V4-Flash's shape is transformers' ``DeepseekV4Config()`` defaults (hidden 4096, 43 layers, 64 heads of 512, 256
experts of 2048, top-6); V4-Pro's the published one (hidden 7168, 61 layers, 128 heads of 512, q_lora 1536, 16 output
groups of rank 1024, 384 experts of 3072, top-6, routed scaling 2.5), the rest transformers' defaults (the indexer,
the window, the layer types: two heavily compressed layers, then the two kinds alternating; three hash layers).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ggufmoe.pipeline.planning import build_plan  # noqa: E402
from ggufmoe.plan.budget import Budget  # noqa: E402
from ggufmoe.plan.report import format_plan  # noqa: E402

GIB = 2**30
CTX = 32768
PRO = dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
           o_lora_rank=1024, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5)
MODELS = {"DeepSeek-V4-Flash": ({}, (64, 96, 128)), "DeepSeek-V4-Pro": (PRO, (256, 512))}

PAPER = """\
## How it compares with the paper's recipe and with llama.cpp's own conversion

Chen et al. (arXiv 2509.25689) put DeepSeek-V3 (671B) into 128 GB by keeping 75 % of the routed experts (score
0.5 x frequency + 0.5 x mean routing weight), lowering the experts used per token and choosing a mixed 1-2 bit
recipe by hand: a 103 GB file, about 1.6 bits per remaining weight. llama.cpp's own converter writes DeepSeek-V4 with
its experts as they ship (MXFP4, 4.25 bits a weight) and every other matrix Q8_0 (the `stock` row: sizes from the
configuration, those types). ggufmoe chooses experts kept and every tensor's type for the budget as a whole; it keeps
the model's experts per token (the first layers' token -> experts table fixes it: `top_k_fixed`).

| model | budget | experts kept | routed experts | bits / routed weight | file | memory at ctx {ctx} | predicted KL |
|---|---:|---:|---|---:|---:|---:|---:|
{rows}

- The predictions rest on default sensitivities from tensor shapes and an even spread of routing over experts (no
  weights, no statistics): with the checkpoint, `ggufmoe calibrate` (streamed, FP4/FP8 read as shipped) and
  `plan --stats` measure both, and the choice of how many experts to keep can move.
- DeepSeek-V4's KV cache is small (raw keys on every layer, compressed keys on the others: {kv} at ctx {ctx} for
  V4-Flash, the window's keys cached for the whole context as llama-cpp-python's `swa_full` does), so nearly the
  whole budget goes to weights. The second item is the compute buffer: {compute} at ctx {ctx} without flash attention
  (llama-cpp-python's default; the attention scores over the raw and compressed cells,
  `ggufmoe/plan/compressed_attention.py`).
"""


def stock_bytes(specs) -> int:
    """The tensor bytes llama.cpp's converter writes: experts MXFP4 as shipped, other matrices Q8_0, vectors and the
    small F32 matrices (mixes, position biases) F32, the token table I32 (no pruning)."""
    from gguf import GGMLQuantizationType as T

    from ggufmoe.model.qtypes import row_bytes

    def stock_type(s) -> T:
        if s.fixed_type is not None:
            return s.fixed_type
        return T.MXFP4 if s.is_expert else T.Q8_0 if len(s.shape) > 1 else T.F32

    return sum(row_bytes(stock_type(s), s.shape[-1]) * (s.n_elements // s.shape[-1]) for s in specs)


def main() -> None:
    from transformers import DeepseekV4Config

    from ggufmoe.arch import architecture_for
    from ggufmoe.source.config import ConfigSource

    results, text = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model, (shape, budgets) in MODELS.items():
            d = Path(tmp) / model
            DeepseekV4Config(architectures=["DeepseekV4ForCausalLM"], **shape).save_pretrained(d)
            specs = list(architecture_for(ConfigSource(d)).tensors())
            per_expert = {s.name: s.n_elements // s.n_parts for s in specs if s.is_expert}
            for gib in budgets:
                t1 = time.perf_counter()
                plan = build_plan(d / "config.json", Budget(gib * GIB, ctx=CTX), progress=False)
                seconds = time.perf_counter() - t1
                exps = {n: t for n, t in plan.types.items() if n in per_expert}
                routed = sum(plan.tensor_bytes[n] for n in exps)
                weights = sum(per_expert[n] * plan.keep for n in exps)
                results.append({"model": model, "budget_gib": gib, "ctx": CTX, "keep": plan.keep,
                                "n_expert": plan.n_expert, "top_k": plan.top_k, "file_bytes": plan.file_bytes,
                                "memory": plan.memory, "predicted_kld": plan.predicted_kld,
                                "routed_types": sorted(set(exps.values())),
                                "bits_per_routed_weight": 8 * routed / weights,
                                "stock_tensor_bytes": stock_bytes(specs), "seconds": seconds})
                text += [f"### {model} in {gib} GiB (ctx {CTX})", "", "```",
                         format_plan(plan).replace(str(d / "config.json"), model).replace(str(d), model), "```", ""]
    rows = []
    for r in results:
        rows.append(f"| {r['model']} | {r['budget_gib']} GiB | {r['keep']} / {r['n_expert']} | "
                    f"{' / '.join(r['routed_types'])} | {r['bits_per_routed_weight']:.2f} | "
                    f"{r['file_bytes'] / 1e9:.1f} GB | {r['memory']['total'] / GIB:.1f} GiB | "
                    f"{r['predicted_kld']['total']:.3f} |")
    for model in MODELS:
        stock = next(r["stock_tensor_bytes"] for r in results if r["model"] == model)
        rows.append(f"| {model}, stock (llama.cpp's converter) | - | all | MXFP4 | 4.25 | {stock / 1e9:.1f} GB | - | - |")
    flash = next(r for r in results if r["model"] == "DeepSeek-V4-Flash")
    head = ["# DeepSeek-V4 planned from its configurations alone", "",
            f"`ggufmoe plan config.json --budget B --ctx {CTX}` on V4-Flash's and V4-Pro's shapes "
            f"(`eval/plan_deepseek_v4.py`; {time.perf_counter() - t0:.0f} s for the five plans on this "
            f"{os.cpu_count()}-core machine), no weights: default sensitivities from tensor shapes, default pruning "
            "cost. Which experts are kept is decided at conversion from calibration statistics; the plan fixes how "
            "many.", ""]
    paper = PAPER.format(ctx=CTX, rows="\n".join(rows), kv=f"{flash['memory']['kv_cache'] / GIB:.2f} GiB",
                         compute=f"{flash['memory']['compute'] / GIB:.2f} GiB")
    out = ROOT / "eval" / "results" / "deepseek_v4_plans.md"
    out.write_text("\n".join(head) + "\n" + paper + "\n" + "\n".join(text))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()

"""Are pruning and quantizing the same model additive in KL? The planner prices a plan as the sum of its
pruning cost and its quantization cost; this measures how far the sum is from the truth.

    python eval/prune_quant_interaction.py [--work DIR]

On the reference model, at the file sizes of llama.cpp's IQ2_M and Q2_K mixes, the planner's plan with the
keep count fixed (``Budget.keep``) at 24, 21, 20, 18 and 15 of 24 experts. For each, three files: the plan
itself (pruned and quantized), its pruning alone (F16) and its types alone on all experts (the plan's type
rules name tensors, so they apply to the unpruned model too). KL divergence to the F32 conversion over
chunks of eval_doc.txt through llama.cpp; the ratio of the plan's KL to the sum of the other two. Writes
eval/results/prune_quant_interaction.{md,json}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from common import ROOT, SHARED, reference_parser, reference_work, score  # noqa: E402

from ggufmoe.pipeline.planning import build_plan, options_from_plan  # noqa: E402
from ggufmoe.prune.criteria import Criterion  # noqa: E402
from ggufmoe.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ggufmoe.plan.budget import Budget  # noqa: E402
from ggufmoe.prune.criteria import PruneRequest  # noqa: E402
from ggufmoe.quant.rules import TypeRules  # noqa: E402
from ggufmoe.runtime.llama_quantize import llama_quantize  # noqa: E402
from ggufmoe.stats.file import load_stats  # noqa: E402

MIXES = ("IQ2_M", "Q2_K")
KEEPS = (24, 21, 20, 18, 15)


def main() -> None:
    ap = reference_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    work, stats_path, f32, chunks, base = reference_work(args.model, args.work, args.chars, args.chunks, args.ctx)
    calib = (SHARED / "data" / "calib.txt").read_text()[: args.chars]
    imatrix = load_stats(stats_path).imatrix
    kl = {}

    def kld(path: Path) -> float:
        if path.name not in kl:
            kl[path.name] = score(path, chunks, base, args.ctx)["kld"]
        return kl[path.name]

    rows = []
    for m in MIXES:
        size = llama_quantize(f32, work / f"mix-{m}.gguf", m, imatrix=imatrix).stat().st_size
        for keep in KEEPS:
            plan = build_plan(args.model, Budget(size, weights_only=True, keep=keep, criterion=Criterion.REAP),
                              stats_path, calib, progress=False)
            tag = f"{m}-k{keep}"
            both = convert(args.model, options_from_plan(plan, ConvertOptions(
                out=work / f"both-{tag}.gguf", types=TypeRules.parse("Q8_0"), progress=False)))[0]
            quant = convert(args.model, ConvertOptions(out=work / f"quant-{tag}.gguf", types=plan.type_rules(),
                                                       stats=stats_path, progress=False))[0]
            row = dict(mix=m, keep=keep, both=kld(both), quant=kld(quant), predicted_quant=plan.predicted_kld["quant"],
                       predicted_prune=plan.predicted_kld["prune"], predicted=plan.predicted_kld["total"])
            if keep < 24:
                prune = work / f"prune-k{keep}.gguf"
                if not prune.exists():
                    convert(args.model, ConvertOptions(out=prune, types=TypeRules.parse("F16"), stats=stats_path,
                                                       prune=PruneRequest(keep=keep, criterion=plan.criterion),
                                                       progress=False))
                row["prune"] = kld(prune)
            else:
                row["prune"] = 0.0
            row["ratio"] = row["both"] / (row["prune"] + row["quant"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = ROOT / "eval" / "results"
    (res / "prune_quant_interaction.json").write_text(json.dumps(rows, indent=1))
    pruned = [r["ratio"] for r in rows if r["keep"] < 24]
    lines = [
        "# Pruning and quantizing together: additive?",
        "",
        f"`{args.model.name}`; statistics from the first {args.chars:,} characters of calib.txt (pieces held out), "
        f"probes on the held-out pieces. For each size and keep count, the planner's plan with that keep count "
        f"fixed; its pruning alone (F16) and its types alone (all 24 experts). KL divergence to the F32 conversion "
        f"over {len(chunks)} chunks of {args.ctx} tokens of eval_doc.txt. Reproduce: "
        "`python eval/prune_quant_interaction.py`.",
        "",
        "| size of | kept | KL pruned + quantized | KL pruning alone | KL types alone | together / sum | "
        "predicted pruning | predicted quantization |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['mix']} | {r['keep']}/24 | {r['both']:.4f} | {r['prune']:.4f} | {r['quant']:.4f} | "
              f"{r['ratio']:.2f} | {r['predicted_prune']:.4f} | {r['predicted_quant']:.4f} |" for r in rows]
    lines += ["", f"Pruned plans: together / sum from {min(pruned):.2f} to {max(pruned):.2f} (geometric mean "
              f"{np.exp(np.mean(np.log(pruned))):.2f})."]
    (res / "prune_quant_interaction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

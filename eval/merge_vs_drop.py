"""Merging vs dropping pruned experts on the reference model, at the same kept counts and types.

For 18 and 12 of 24 experts kept, by the paper's routing criterion and by REAP, each written at F16
(the pruning alone) and at Q4_K (with quantization): KL divergence to the F32 conversion, perplexity
and top-1 agreement over chunks of eval_doc.txt through llama.cpp, dropping (`convert --keep`) and
merging (`convert --keep --merge`) the same experts. Statistics: the streamed `ggufmoe calibrate`
(local errors and expert similarities) on calib.txt.
"""

from __future__ import annotations

import json
import os
import platform

from common import ROOT, reference_parser, reference_work, score  # noqa: E402

from ggufmoe.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ggufmoe.prune.criteria import PruneRequest  # noqa: E402
from ggufmoe.quant.rules import TypeRules  # noqa: E402


def main() -> None:
    ap = reference_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    work, stats, _, chunks, base = reference_work(args.model, args.work, args.chars, args.chunks, args.ctx)
    rows = []
    for keep in (18, 12):
        for criterion in ("routing", "reap"):
            for qtype in ("F16", "Q4_K"):
                row = dict(keep=keep, criterion=criterion, type=qtype)
                for merge in (False, True):
                    out = work / f"k{keep}-{criterion}-{qtype}-{'merge' if merge else 'drop'}.gguf"
                    convert(args.model, ConvertOptions(out=out, types=TypeRules.parse(qtype), stats=stats,
                                                       prune=PruneRequest(keep=keep, criterion=criterion, merge=merge),
                                                       progress=False))
                    row["merge" if merge else "drop"] = dict(score(out, chunks, base, args.ctx),
                                                             bytes=out.stat().st_size)
                rows.append(row)
                print(json.dumps(row), flush=True)
    res = ROOT / "eval" / "results"
    (res / "merge_vs_drop.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Merging vs dropping pruned experts (reference model)",
        "",
        f"`{args.model.name}`, 24 experts per layer, top-4. Statistics: streamed `ggufmoe calibrate` on the first "
        f"{args.chars:,} characters of calib.txt. KL divergence to the F32 conversion over {len(chunks)} chunks of "
        f"{args.ctx} tokens of eval_doc.txt through llama.cpp; the same experts kept either way, the same type for "
        f"every weight matrix. Machine: {platform.machine()}, {os.cpu_count()} cores. "
        "Reproduce: `python eval/merge_vs_drop.py`.",
        "",
        "| kept | criterion | type | size | KLD dropped | KLD merged | merged / dropped | PPL dropped | PPL merged | "
        "top-1 dropped | top-1 merged |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, m = r["drop"], r["merge"]
        lines.append(f"| {r['keep']}/24 | {r['criterion']} | {r['type']} | {d['bytes']:,} | {d['kld']:.4f} | "
                     f"{m['kld']:.4f} | {m['kld'] / d['kld']:.2f} | {d['ppl']:.3f} | {m['ppl']:.3f} | "
                     f"{d['top1']:.1%} | {m['top1']:.1%} |")
    (res / "merge_vs_drop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

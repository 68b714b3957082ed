"""What expert pruning costs on the reference model: KL divergence and perplexity per keep ratio,
criterion and top-k choice, with F16 weights so that only pruning is measured.

    python eval/prune_table.py

Statistics from ../shared/data/calib.txt (calibration), measured on ../shared/data/eval_doc.txt
through llama.cpp against the unpruned F16 conversion. Writes eval/results/prune.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from common import eval_chunks, score as score_gguf  # noqa: E402
from ggufmoe.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ggufmoe.runtime.logprobs import LlamaScorer  # noqa: E402
from ggufmoe.prune.criteria import Criterion, PruneRequest  # noqa: E402
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.file import load_stats, save_stats
from ggufmoe.quant.rules import TypeRules  # noqa: E402

RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "refmoe-qwen3")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stats", type=Path, help="reuse statistics of the whole calib.txt from `ggufmoe calibrate`")
    args = ap.parse_args()
    chunks = eval_chunks(args.model, args.chunks, args.ctx)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stats_path = args.stats or tmp / "stats.gguf"
        if args.stats:
            stats = load_stats(stats_path)
        else:
            stats = collect_stats(args.model, (SHARED / "data" / "calib.txt").read_text())
            save_stats(stats, stats_path)
        dead = {il: int((s.counts == 0).sum()) for il, s in sorted(stats.layers.items())}
        k, n = 4, len(next(iter(stats.layers.values())).counts)

        def run(name: str, req: PruneRequest) -> dict:
            out = tmp / f"{name}.gguf"
            convert(args.model, ConvertOptions(out=out, types=TypeRules.parse("F16"), stats=stats_path, prune=req,
                                               progress=False))
            r = dict(score_gguf(out, chunks, base, args.ctx), bytes=out.stat().st_size)
            out.unlink()
            return r

        base_path = convert(args.model, ConvertOptions(out=tmp / "base.gguf", types=TypeRules.parse("F16"),
                                                       progress=False))[0]
        with LlamaScorer(base_path, args.ctx) as score:
            base = [score(c) for c in chunks]
        if min(dead.values()) > 0:
            keep = n - min(dead.values())
            rows.append(dict(ratio=keep / n, keep=keep, criterion="frequency (never-activated only)", top_k=k,
                             **run("dead", PruneRequest(keep=keep, criterion="frequency"))))
            print(rows[-1], flush=True)
        for ratio in RATIOS:
            keep = round(ratio * n)
            for criterion in Criterion:
                for top_k in sorted({k, math.ceil(ratio * k - 1e-9)}, reverse=True):
                    if ratio == 1.0 and criterion != Criterion.FREQUENCY:
                        continue  # nothing pruned: the criterion does not matter
                    r = run(f"{keep}-{criterion}-{top_k}", PruneRequest(keep=keep, criterion=criterion, top_k=top_k))
                    rows.append(dict(ratio=ratio, keep=keep, criterion=criterion if ratio < 1 else "-", top_k=top_k,
                                     **r))
                    print(rows[-1], flush=True)
    out = ROOT / "eval" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune.json").write_text(json.dumps(dict(dead_experts_per_layer=dead, rows=rows), indent=1))
    lines = [
        "# Expert pruning on the reference model",
        "",
        f"`{args.model.name}` (24 experts, top-4, 6 MoE layers). Statistics from the whole calib.txt; "
        f"KL divergence to the unpruned F16 conversion over {len(chunks)} chunks of {args.ctx} tokens of "
        f"eval_doc.txt, through llama.cpp; F16 weights, so only pruning is measured. `routing` = "
        f"0.5·frequency + 0.5·mean routing weight; top-k *scaled* = ceil(ratio × 4). "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores. Reproduce: `python eval/prune_table.py`.",
        "",
        f"Experts never activated on the calibration text, per layer: {dead}.",
        "",
        "| keep ratio | experts kept | criterion | top-k | KLD | PPL | top-1 | file |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['ratio']:.3f} | {r['keep']} | {r['criterion']} | {r['top_k']} | {r['kld']:.5f} | "
              f"{r['ppl']:.3f} | {100 * r['top1']:.1f}% | {r['bytes'] / 2**20:.1f} MiB |" for r in rows]
    (out / "prune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

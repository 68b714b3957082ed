"""Every quant type on the reference model: size, bits/weight, KL divergence to F32, perplexity.

    python eval/quant_types.py [--model DIR] [--chunks 8] [--ctx 512]

Calibration (importance matrix) on ../shared/data/calib.txt, evaluation on
../shared/data/eval_doc.txt (disjoint files). KL divergence is measured through llama.cpp
against the F32 conversion, both with an F32 KV cache. Writes eval/results/quant_types.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from ggufmoe.stats.collect import collect_imatrix  # noqa: E402
from ggufmoe.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ggufmoe.stats.imatrix import save_imatrix  # noqa: E402
from ggufmoe.runtime.logprobs import LlamaScorer, compare  # noqa: E402
from ggufmoe.model.qtypes import USER_TYPES
from ggufmoe.quant.rules import TypeRules  # noqa: E402


def eval_chunks(model: Path, n: int, ctx: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tok.encode((SHARED / "data" / "eval_doc.txt").read_text(), add_special_tokens=False).ids
    stride = len(ids) // n  # spread the chunks over the whole document
    return [ids[i * stride:i * stride + ctx] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "refmoe-qwen3")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-chars", type=int, default=400_000)
    args = ap.parse_args()
    chunks = eval_chunks(args.model, args.chunks, args.ctx)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = (SHARED / "data" / "calib.txt").read_text()[:args.calib_chars]
        imatrix = tmp / "imatrix.gguf"
        save_imatrix(collect_imatrix(args.model, calib, ctx=512), imatrix)
        base_path = convert(args.model, ConvertOptions(out=tmp / "F32.gguf", types=TypeRules.parse("F32")))[0]
        with LlamaScorer(base_path, args.ctx) as score:
            base = [score(c) for c in chunks]
        n_params = None
        for name in USER_TYPES:
            t0 = time.perf_counter()
            path = convert(args.model, ConvertOptions(out=tmp / f"{name}.gguf", types=TypeRules.parse(name),
                                                      imatrix=imatrix, progress=False))[0]
            seconds = time.perf_counter() - t0
            with LlamaScorer(path, args.ctx) as score:
                cmp = [compare(score(c), b, c) for c, b in zip(chunks, base)]
            size = path.stat().st_size
            if name == "F32":
                n_params = size / 4
            results.append(dict(type=name, bytes=size, bpw=8 * size / n_params, convert_s=seconds,
                                kld=float(np.mean([c.kld_mean for c in cmp])),
                                ppl=float(np.exp(np.mean([np.log(c.ppl) for c in cmp]))),
                                top1=float(np.mean([c.top1 for c in cmp]))))
            print(results[-1], flush=True)
            path.unlink()
    out = ROOT / "eval" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_types.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Quant types on the reference model",
        "",
        f"Model `{args.model.name}`; importance matrix from the first {args.calib_chars:,} characters of "
        f"calib.txt; {args.chunks} chunks of {args.ctx} tokens of eval_doc.txt; KL divergence to the F32 "
        f"conversion through llama.cpp (F32 KV cache). Whole-model type (norms and routers stay F32; "
        f"file size includes metadata). Machine: {platform.machine()}, {os.cpu_count()} cores (convert times are wall times on a shared machine). "
        "Reproduce: `python eval/quant_types.py`.",
        "",
        "| type | file size | bits/weight | KLD to F32 | PPL | top-1 agreement | convert |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: -r["bytes"]):
        lines.append(f"| {r['type']} | {r['bytes'] / 2**20:.2f} MiB | {r['bpw']:.2f} | {r['kld']:.5f} | "
                     f"{r['ppl']:.3f} | {100 * r['top1']:.1f}% | {r['convert_s']:.1f} s |")
    (out / "quant_types.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

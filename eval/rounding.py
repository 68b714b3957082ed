"""Output-aware rounding against llama.cpp's rounding on the reference model, at equal types and bytes.

    python eval/rounding.py [--types Q4_K,Q3_K,...] [--chars 400000] [--chunks 8] [--work DIR]

Statistics (the importance matrix both roundings use) and the rounding's inputs from the first CHARS characters of
calib.txt; KL divergence to the F32 conversion through llama.cpp on two texts the calibration did not see:
eval_doc.txt and this project's README and sources (another kind of text). Rows are kept by type and calibration
size (a run at other ``--chars`` adds rows). Writes eval/results/rounding.{md,json}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SHARED, eval_chunks, reference_parser, reference_work, score, source_text  # noqa: E402

from ggufmoe.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ggufmoe.pipeline.rounding import RoundingOptions  # noqa: E402
from ggufmoe.quant.rules import TypeRules  # noqa: E402
from ggufmoe.runtime.logprobs import LlamaScorer  # noqa: E402

TYPES = "Q4_K,Q3_K,Q2_K,IQ3_XXS,IQ2_XXS,IQ1_M"
CHARS = 400_000  # the calibration size of the main rows (and of an older run's rows, which do not say)


def main() -> None:
    ap = reference_parser(__doc__.splitlines()[0])
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--redraw", action="store_true", help="only write the table and plot again from the JSON")
    args = ap.parse_args()
    saved = ROOT / "eval" / "results" / "rounding.json"
    if args.redraw:
        write(json.loads(saved.read_text()), args)
        return
    work, stats, f32, chunks, base = reference_work(args.model, args.work, args.chars, args.chunks, args.ctx)
    text = (SHARED / "data" / "calib.txt").read_text()[:args.chars]
    src_chunks = eval_chunks(args.model, args.chunks, args.ctx, source_text())
    with LlamaScorer(f32, args.ctx) as s:
        src_base = [s(c) for c in src_chunks]
    rows = []
    for t in args.types.split(","):
        row = {"type": t, "chars": args.chars}
        for mode in ("llama", "aware"):
            out = work / f"{t}-{mode}.gguf"
            t0 = time.perf_counter()
            if not out.exists():
                convert(args.model, ConvertOptions(out=out, types=TypeRules.parse(t), stats=stats, progress=False,
                                                   rounding=RoundingOptions(text) if mode == "aware" else None))
            row[f"{mode}_s"] = time.perf_counter() - t0
            row[f"{mode}_bytes"] = out.stat().st_size
            row[f"{mode}_eval_doc"] = score(out, chunks, base, args.ctx)["kld"]
            row[f"{mode}_sources"] = score(out, src_chunks, src_base, args.ctx)["kld"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if saved.exists():  # the rows of other types and calibration sizes stay
        done = {key(r) for r in rows}
        rows += [r for r in json.loads(saved.read_text()) if key(r) not in done]
    write(rows, args)


def key(row: dict) -> tuple[str, int]:
    return row["type"], row.get("chars", CHARS)


def write(rows: list[dict], args) -> None:
    res = ROOT / "eval" / "results"
    order = TYPES.split(",")
    rows.sort(key=lambda r: (order.index(r["type"]) if r["type"] in order else len(order), key(r)[1]))
    (res / "rounding.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Output-aware rounding vs llama.cpp's rounding (reference model)", "",
             "Same types, same importance matrix, same bytes. Calibration (statistics and rounding): the first `calib "
             "chars` characters of calib.txt; "
             f"KL to F32 through llama.cpp, {args.chunks} chunks of {args.ctx} tokens of each text (eval_doc.txt; the "
             "README and ggufmoe/*.py). The rounding fed the rounded model (each matmul fitted to bring the rounded "
             "model's outputs near the model's own, one input at a time in forward order). Conversion with the "
             "rounding pass: wall seconds on 2 cores, shared with the test suite and other benchmarks while they ran "
             "(upper bounds).", "",
             "| type | calib chars | bytes | KL eval_doc llama | aware | ratio | KL sources llama | aware | ratio "
             "| conversion s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['type']} | {key(r)[1]} | {r['aware_bytes']} | {r['llama_eval_doc']:.4f} | "
                     f"{r['aware_eval_doc']:.4f} | {r['aware_eval_doc'] / r['llama_eval_doc']:.3f} | "
                     f"{r['llama_sources']:.4f} | "
                     f"{r['aware_sources']:.4f} | {r['aware_sources'] / r['llama_sources']:.3f} | {r['aware_s']:.0f} |")
    lines += ["", "![KL by type, both roundings](rounding.png)"]
    (res / "rounding.md").write_text("\n".join(lines) + "\n")
    plot(rows, res / "rounding.png")


def plot(rows: list[dict], path: Path) -> None:
    """KL of both roundings per type, on both texts (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(rows))
    for i, (text, label) in enumerate((("eval_doc", "eval_doc.txt"), ("sources", "README + sources"))):
        for j, mode in enumerate(("llama", "aware")):
            ax.bar(x + (2 * i + j - 1.5) * 0.2, [r[f"{mode}_{text}"] for r in rows], 0.2,
                   label=f"{label}, {'llama.cpp rounding' if mode == 'llama' else 'output-aware'}",
                   color=f"C{2 * i + j}")
    ax.set_xticks(x, [r["type"] if key(r)[1] == CHARS else f"{r['type']}\n{key(r)[1]:,} ch." for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("KL divergence to F32 (nats/token)")
    ax.set_title("refmoe-qwen3: same types and bytes, two roundings")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""The cost of output-aware rounding at DeepSeek-V3 widths, and our block encoders against llama.cpp's quantizer.

    python eval/bench_rounding.py [--types Q4_K,IQ2_XXS] [--tokens 4096]

A routed expert's gate/up (7168 columns) and down (2048 columns) of DeepSeek-V3's shapes, Gaussian weights and inputs
of a few strong directions (the rounded model's: the model's own plus a small change): on one thread, the seconds of
the second moments and cross moments over ``--tokens`` tokens, of the column order, the inverse Hessian's Cholesky
factor and the shift toward the model's own outputs (:func:`~ggufmoe.quant.aware.shift_of`), and per row of llama.cpp's
two quantizations (of the weight and of the shifted weight) and the error feedback (our encoders' choose and pack
inside) on :data:`MEASURED_ROWS` rows, per type; then our encoders' throughput (unpack + pack) next to llama.cpp's quantizer on
the same rows. Every matmul of the 671B model is projected from those by its shape (:data:`MODEL`, the arithmetic in
the output); written to eval/results/bench_rounding.{md,json}."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: the projection scales per core
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from gguf import GGMLQuantizationType as T  # noqa: E402

from ggufmoe.quant.aware import ROWS_PER_THREAD, Feedback, gptq_codes, shift_of  # noqa: E402
from ggufmoe.quant.formats import FORMATS  # noqa: E402
from ggufmoe.quant.ggml import Quantizer  # noqa: E402

MEASURED_ROWS = 1024  # rows of a matrix the error feedback runs on (rows are independent: the time scales by rows)
# measured: name -> (columns, rows of the real matrix)
MEASURED = {"expert gate/up": (7168, 2048), "expert down": (2048, 7168)}
# every matmul of DeepSeek-V3 671B the rounding covers: name -> (columns, rows, how many); the routed and shared
# experts, the dense layers' FFN, MLA's projections (k_b/v_b: no hook, left out)
MODEL = {
    "expert gate + up (256 routed + 1 shared; one factor for both)": (7168, 2 * 2048, 58 * 257),
    "expert down": (2048, 7168, 58 * 257),
    "dense FFN gate/up": (7168, 18432, 3 * 2),
    "dense FFN down": (18432, 7168, 3),
    "attention q_a, kv_a": (7168, 2112, 61),
    "attention q_b": (1536, 24576, 61),
    "attention output": (16384, 7168, 61),
    "output": (7168, 129280, 1),
}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_K,IQ2_XXS")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--redraw", action="store_true", help="only write the results again from the JSON")
    args = ap.parse_args()
    if args.redraw:
        kept = json.loads((ROOT / "eval" / "results" / "bench_rounding.json").read_text())
        write(kept["matrices"], kept["encoders"], args)
        return
    rng = np.random.default_rng(0)
    q, cores = Quantizer(1), Quantizer(os.cpu_count())
    rows_out = []
    for name, (cols, real_rows) in MEASURED.items():
        basis = rng.standard_normal((64, cols)).astype(np.float32)
        own = (rng.standard_normal((args.tokens, 64)).astype(np.float32) @ basis
               + 0.1 * rng.standard_normal((args.tokens, cols)).astype(np.float32))
        x = own + 0.05 * rng.standard_normal((args.tokens, cols)).astype(np.float32)
        (h, cross), t_h = timed(lambda: ((x.T @ x).astype(np.float64), ((own - x).T @ x).astype(np.float64)))
        w = rng.standard_normal((MEASURED_ROWS, cols)).astype(np.float32)
        imp = (x * x).mean(0)
        for tname in args.types.split(","):
            t = T[tname]
            _, t_llama = timed(q.quantize, w, t, imp)
            feedback, t_factor = timed(Feedback.of, h, FORMATS[t].GROUP)
            shift, t_shift = timed(shift_of, h, cross)
            target = (w + w.astype(np.float64) @ shift).astype(np.float32)
            start, t_start = timed(q.quantize, target, t, imp)
            _, t_gptq = timed(gptq_codes, target, start, t, h, feedback)
            _, t_split = timed(gptq_codes, target, start, t, h, feedback, cores)
            t_chol, t_llama = t_factor + t_shift, t_llama + t_start
            row = dict(matrix=name, type=tname, cols=cols, rows=real_rows, tokens=args.tokens, moments_s=t_h,
                       cholesky_s=t_chol, feedback_s_per_row=t_gptq / MEASURED_ROWS, threads=cores.threads,
                       feedback_s_per_row_threads=t_split / MEASURED_ROWS,
                       llama_quantize_s_per_row=t_llama / MEASURED_ROWS)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    enc = []
    w = rng.standard_normal((512, 7168)).astype(np.float32)
    imp = np.ones(7168, np.float32)
    for tname in ("Q4_K", "Q2_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ1_M"):
        t = T[tname]
        raw, t_q = timed(q.quantize, w, t, imp)
        raw = raw.reshape(len(w), -1)
        fmt, t_un = timed(FORMATS[t].unpack, raw)
        _, t_pack = timed(fmt.pack)
        mb = w.nbytes / 2**20
        enc.append(dict(type=tname, llama_quantize_mb_s=mb / t_q, unpack_pack_mb_s=mb / (t_un + t_pack)))
        print(json.dumps(enc[-1]), flush=True)
    write(rows_out, enc, args)


def projection(rows: list[dict]) -> tuple[list[str], float, float]:
    """Core-seconds of every matmul of the 671B model, scaled from the measured matrices: the moments by n^2 per token,
    the factor and shift by n^3, the error feedback by rows x n^2 (its products; the per-column code choice is rows x
    n), llama.cpp's two quantizations by rows x n. Returns the table's lines, the total and the factors' and shifts'
    part of it."""
    gate = [r for r in rows if r["matrix"] == "expert gate/up"]
    n0 = gate[0]["cols"]
    moments = gate[0]["moments_s"]
    chol = float(np.mean([r["cholesky_s"] for r in gate]))
    per_row = float(np.mean([r["feedback_s_per_row"] for r in gate]))
    quantize = float(np.mean([r["llama_quantize_s_per_row"] for r in gate]))
    lines, total, factors = [], 0.0, 0.0
    for name, (cols, n_rows, count) in MODEL.items():
        factor = (cols / n0) ** 3 * chol
        factors += factor * count
        s = (cols / n0) ** 2 * moments + factor + n_rows * (cols / n0) ** 2 * per_row + n_rows * cols / n0 * quantize
        total += s * count
        lines.append(f"| {name} | {n_rows} x {cols} | {count} | {s:.0f} | {s * count / 3600:.0f} |")
    return lines, total, factors


def split_note(rows: list[dict]) -> str:
    """How near a perfect split among the cores the feedback came, and what that leaves unmeasured."""
    split = [r for r in rows if "feedback_s_per_row_threads" in r]
    if not split:
        return "not measured in this run."
    eff = np.mean([r["feedback_s_per_row"] / (r["feedback_s_per_row_threads"] * r["threads"]) for r in split])
    return (f"on this machine's {split[0]['threads']} cores it ran at {eff:.0%} of a perfect split (mean over the "
            f"matrices). It does not reach 64 cores: a thread takes at least {ROWS_PER_THREAD} rows (a 4096-row "
            f"matrix at most {4096 // ROWS_PER_THREAD} threads), each thread's column loop takes Python's lock "
            "between its numpy calls, and the wide matrices' updates are bound by memory bandwidth; a pool over a "
            "layer's experts (memory for each expert's moments in flight) is the other way to fill the cores.")


def write(rows: list[dict], enc: list[dict], args) -> None:
    res = ROOT / "eval" / "results"
    threads = next((r["threads"] for r in rows if "threads" in r), os.cpu_count())
    (res / "bench_rounding.json").write_text(json.dumps(dict(matrices=rows, encoders=enc), indent=1))
    lines = ["# Output-aware rounding at DeepSeek-V3 widths: cost and projection", "",
             f"One thread, `python eval/bench_rounding.py` on this machine ({platform.machine()}, {os.cpu_count()} "
             "cores, shared with other work while it ran: upper bounds). Second moments over "
             f"{args.tokens} tokens per matrix input; the error feedback on {MEASURED_ROWS} rows (rows are independent).",
             f"Last column: the same feedback with its rows split among {threads} threads (one per core), as the pass "
             "does (`ggufmoe.quant.aware.gptq_codes`), in core-seconds per row (wall time x threads): equal to "
             "the one-thread figure where the split scales perfectly.",
             "", "| matrix | type | columns | moments + cross s | order + factor + shift s | feedback s per row | "
             "llama.cpp's 2 quantizations s per row | feedback core-s per row, split |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        split = r.get("feedback_s_per_row_threads")
        split = "-" if split is None else f"{split * r['threads']:.4f}"
        lines.append(f"| {r['matrix']} | {r['type']} | {r['cols']} | {r['moments_s']:.1f} | {r['cholesky_s']:.1f} | "
                     f"{r['feedback_s_per_row']:.4f} | {r['llama_quantize_s_per_row']:.5f} | {split} |")
    table, total, factors = projection(rows)
    flop = sum(c * (cols ** 3) * 11 / 3 for cols, _, c in MODEL.values())
    lines += ["", "## 671B projection", "",
              "Each matmul's cost scaled from the expert gate/up measurement (mean over the types): moments x (n/7168)^2, "
              "factor and shift x (n/7168)^3, feedback per row x rows x (n/7168)^2, quantizations per row x rows x "
              "n/7168; the moments are per 4096 tokens (a routed expert sees about tokens x 8 / 256 of the "
              "calibration's tokens).", "",
              "| matmul | rows x columns | count | core-s each | core-hours |", "|---|---|---:|---:|---:|", *table, "",
              f"All: {total / 3600:.0f} core-hours: {total / 3600 / 64:.1f} h on a 64-core host if the matrices are "
              "rounded one per core (they are independent), beside the streamed pass that runs the model: a "
              "forward of each layer in the model and, in the rounded model, one before its plain tensors are rounded "
              "and one more after each input's tensors are (five inputs in an MLA layer with a shared expert: q_a "
              "and kv_a, q_b, the attention output, the shared expert's gate and up, its down). The pass rounds one "
              "matrix at a time, its products on BLAS's threads and the feedback's rows split among one thread per "
              "core: " + split_note(rows),
              "", "One H100/H200: not measured (no GPU lent to this task). `--device cuda` runs the model's forwards and "
              "each input's factor and shift (torch, float64) on the GPU; the moments are summed on the CPU, and the "
              "feedback's code choice is numpy on the host's cores. On the GPU the factors and shifts, "
              f"{factors / 3600:.0f} of the core-hours here, are {flop / 1e15:.0f} PFLOP (4/3 n^3 + 7/3 n^3 per "
              f"input): {flop / 40e12 / 60:.0f} minutes at 40 TFLOP/s of float64 (an H100's or H200's tensor cores "
              f"peak at 67). The rest, {(total - factors) / 3600:.0f} core-hours, stays on the host: "
              f"{(total - factors) / 3600 / 16:.0f} h on the 16 cores of the H100 machine lent here, if the row split "
              "holds there; a GPU port of the code choice (the formats' nearest-code search in torch) is what "
              "would move it.", "",
              "## Encoders (one core, 512 x 7168 rows)", "",
              "| type | llama.cpp quantize MB/s | our unpack + pack MB/s (the codes given) |", "|---|---:|---:|"]
    lines += [f"| {e['type']} | {e['llama_quantize_mb_s']:.0f} | {e['unpack_pack_mb_s']:.0f} |" for e in enc]
    (res / "bench_rounding.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

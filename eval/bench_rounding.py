"""The cost of output-aware rounding at DeepSeek-V3 widths, and our block encoders against llama.cpp's quantizer.

    python eval/bench_rounding.py [--types Q4_K,Q2_K,IQ2_XXS,IQ1_M] [--tokens 4096]

Per matrix of DeepSeek-V3's shapes (:data:`MATRICES`; the tall ones measured on 2048 of their rows and scaled: the
rows are independent), with Gaussian weights and inputs of a few strong directions: the seconds of the second moments over ``--tokens`` tokens, of the inverse
Hessian's Cholesky factor and of the error feedback (our encoders' choose/pack inside), per type, on one thread; then
our encoders' own throughput (unpack + pack) and llama.cpp's quantizer's on the same rows, per core. The 671B
projection (61 layers: 3 dense, 58 with 256 routed experts and a shared one; the dense layers' down matrices, 3 of
them, and MLA's k_b/v_b, which no hook sees, are left out) is written with its arithmetic to
eval/results/bench_rounding.{md,json}.
"""

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

from ggufmoe.quant.aware import gptq_codes, inverse_cholesky  # noqa: E402
from ggufmoe.quant.formats import FORMATS  # noqa: E402
from ggufmoe.quant.ggml import Quantizer  # noqa: E402

# name: (rows measured, columns, rows of the real matrix, matrices of this shape in the 671B model)
MATRICES = {
    "expert gate/up (routed and shared)": (2048, 7168, 2048, 58 * 257 * 2),
    "expert down (routed and shared)": (7168, 2048, 7168, 58 * 257),
    "dense FFN gate/up": (2048, 7168, 18432, 3 * 2),
    "attention q_a + kv_a": (2112, 7168, 2112, 61),
    "attention q_b": (2048, 1536, 24576, 61),
    "attention output": (2048, 16384, 7168, 61),
}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_K,Q2_K,IQ2_XXS,IQ1_M")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    q = Quantizer(1)
    rows_out = []
    for name, (rows, cols, real_rows, count) in MATRICES.items():
        basis = rng.standard_normal((64, cols)).astype(np.float32)
        x = (rng.standard_normal((args.tokens, 64)).astype(np.float32) @ basis
             + 0.1 * rng.standard_normal((args.tokens, cols)).astype(np.float32))
        h, t_h = timed(lambda: (x.T @ x).astype(np.float64))
        _, t_chol = timed(inverse_cholesky, h)
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        imp = (x * x).mean(0)
        for tname in args.types.split(","):
            t = T[tname]
            raw, t_llama = timed(q.quantize, w, t, imp)
            _, t_gptq = timed(gptq_codes, w, raw, t, h)
            scale = real_rows / rows
            row = dict(matrix=name, type=tname, rows=real_rows, cols=cols, count=count, tokens=args.tokens,
                       moments_s=t_h, cholesky_s=t_chol, feedback_s=t_gptq * scale, llama_quantize_s=t_llama * scale)
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


def write(rows: list[dict], enc: list[dict], args) -> None:
    res = ROOT / "eval" / "results"
    (res / "bench_rounding.json").write_text(json.dumps(dict(matrices=rows, encoders=enc), indent=1))
    lines = ["# Output-aware rounding at DeepSeek-V3 widths: cost and projection", "",
             f"One thread ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other "
             f"work), `python eval/bench_rounding.py`. Second moments over {args.tokens} tokens per matrix input.",
             "", "| matrix | type | rows x cols | moments s | Cholesky s | error feedback s | llama.cpp quantize s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['type']} | {r['rows']} x {r['cols']} | {r['moments_s']:.2f} | "
                     f"{r['cholesky_s']:.2f} | {r['feedback_s']:.1f} | {r['llama_quantize_s']:.2f} |")
    lines += ["", "## 671B projection (one type for all: the mean of the measured types)", ""]
    total = 0.0
    for name in MATRICES:
        mine = [r for r in rows if r["matrix"] == name]
        per = float(np.mean([r["feedback_s"] + r["cholesky_s"] for r in mine])) + mine[0]["moments_s"]
        n = mine[0]["count"]
        total += per * n
        lines.append(f"- {name}: {n} matrices x {per:.1f} s = {per * n / 3600:.1f} core-hours")
    lines += [f"- all: {total / 3600:.0f} core-hours; on a 64-core host (matrices are independent: one per core) "
              f"{total / 3600 / 64:.1f} h, plus the streamed pass that runs the model (the calibration's own time).",
              "- one H100/H200: not measured (the error feedback runs in numpy on the CPU; `--device cuda` runs the "
              "model's forward there, not the rounding). The work is the same matrix products; a GPU port would batch "
              "a layer's 256 experts in one column loop.", "",
              "## Encoders (one core, 512 x 7168 rows)", "",
              "| type | llama.cpp quantize MB/s | our unpack + pack MB/s |", "|---|---:|---:|"]
    lines += [f"| {e['type']} | {e['llama_quantize_mb_s']:.0f} | {e['unpack_pack_mb_s']:.0f} |" for e in enc]
    (res / "bench_rounding.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

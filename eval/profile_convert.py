"""Where `ggufmoe convert` spends its time: reading, FP8 dequantization, quantization (per type), the rest.

    python eval/profile_convert.py MODEL_DIR IMATRIX [--threads N] [--out JSON]

Runs ggufmoe's ``convert()`` in this process on the same mix as ``eval/bench_convert.py``, with
timers wrapped around checkpoint reads (``HFSource.get_rows``, which every read goes through, less its
dequantization), ``dequant_fp8_blocks`` and ``Quantizer.quantize`` (wall time of each call: quantization
runs on the thread pool, the caller waits). Reads and dequantization run in convert's read-ahead thread,
overlapped with quantization: they are listed but not subtracted. What is left of the total is the time the
writing thread spends on anything but quantizing: waiting for the read-ahead thread, writing, Python. The
output is written to a temporary directory and deleted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from bench_convert import GGUFMOE_DEFAULT, MIX  # noqa: E402

READ, DEQUANT = "read (safetensors) + float, read-ahead thread", "fp8 dequant, read-ahead thread"
OVERLAPPED = (READ, DEQUANT)  # run while the writing thread quantizes: not part of its time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("imatrix", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import numpy as np

    import ggufmoe.source.hf as hf
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.ggml import Quantizer
    from ggufmoe.quant.rules import TypeRules

    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    elements: dict[str, int] = defaultdict(int)

    orig_dequant, orig_get, orig_quantize = hf.dequant_fp8_blocks, hf.HFSource.get_rows, Quantizer.quantize

    def dequant(*a, **k):
        t0 = time.perf_counter()
        out = orig_dequant(*a, **k)
        times[DEQUANT] += time.perf_counter() - t0
        counts[DEQUANT] += 1
        elements[DEQUANT] += out.size
        return out

    def get_rows(self, name, r0, r1):
        t0 = time.perf_counter()
        before = times[DEQUANT]
        out = orig_get(self, name, r0, r1)
        if not name.endswith(hf.SCALE_SUFFIX):  # a scale read inside a weight's get is counted with it
            times[READ] += time.perf_counter() - t0 - (times[DEQUANT] - before)
            counts[READ] += 1
            elements[READ] += out.size
        return out

    def quantize(self, data, t, imatrix=None):
        t0 = time.perf_counter()
        out = orig_quantize(self, data, t, imatrix)
        key = f"quantize {t.name}" + ("" if imatrix is not None or t.name in ("F32",) else " (no imatrix)")
        times[key] += time.perf_counter() - t0
        counts[key] += 1
        elements[key] += int(np.prod(data.shape))
        return out

    hf.dequant_fp8_blocks, hf.HFSource.get_rows, Quantizer.quantize = dequant, get_rows, quantize
    with tempfile.TemporaryDirectory(dir=args.model.parent) as tmp:
        opts = ConvertOptions(out=Path(tmp) / "out.gguf",
                              types=TypeRules.parse(GGUFMOE_DEFAULT, [f"{p}={t}" for p, t in MIX]),
                              imatrix=args.imatrix, threads=args.threads, progress=False)
        t0 = time.perf_counter()
        convert(args.model, opts)
        total = time.perf_counter() - t0
    rest = total - sum(v for k, v in times.items() if k not in OVERLAPPED)
    rows = [{"what": k, "seconds": v, "share_pct": 100 * v / total, "calls": counts[k],
             "Melements_per_s": elements[k] / v / 1e6 if v else 0.0} for k, v in sorted(times.items(), key=lambda kv: -kv[1])]
    rows.append({"what": "rest of the writing thread (waiting for reads, writing, Python)", "seconds": rest,
                 "share_pct": 100 * rest / total})
    result = {"total_seconds": total, "rows": rows}
    print(f"total {total:.1f} s")
    for r in rows:
        extra = f"  {r['calls']} calls, {r['Melements_per_s']:.1f} M elements/s" if "calls" in r else ""
        print(f"  {r['what']:<32} {r['seconds']:8.1f} s  {r['share_pct']:5.1f}%{extra}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Streamed probes against the probes through llama.cpp on the same tokens (issue 26, acceptance 1).

    python eval/streamed_probes.py [--model DIR] [--chars N] [--chunks N] [--text FILE] [--work DIR]

Calibrates the reference model streamed on the first CHARS characters of calib.txt, carrying the streamed probes on
CHUNKS chunks of 512 tokens of TEXT (default eval_doc.txt, which the calibration did not see); then measures the same
probes through llama.cpp (a conversion each, F16 base, F32 KV cache) on the very same chunks, and writes the table
to eval/results/streamed_probes.md (and .json).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import SHARED, reference_parser  # noqa: E402

from ggufmoe.pipeline.calibrate import calibrate  # noqa: E402
from ggufmoe.pipeline.measure import measure_sensitivity  # noqa: E402
from ggufmoe.pipeline.planning import pruning_kl  # noqa: E402
from ggufmoe.sensitivity.cost import JOINT_TYPES, PROBE_TYPE  # noqa: E402
from ggufmoe.sensitivity.probe_set import prune_name  # noqa: E402
from ggufmoe.sensitivity.prune_cost import probe_prunings  # noqa: E402
from ggufmoe.stats.file import save_stats  # noqa: E402
from ggufmoe.stats.opened import OpenedModel  # noqa: E402


def main() -> None:
    ap = reference_parser(__doc__)
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "eval_doc.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "streamed_probes")
    args = ap.parse_args()
    work = args.work or Path("/tmp/streamed-probes")
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "stats.gguf"
    text = args.text.read_text()
    t0 = time.perf_counter()
    if not stats.exists():
        save_stats(calibrate(args.model, (SHARED / "data" / "calib.txt").read_text()[:args.chars], probes=True,
                             probe_texts={args.text.name: text}, probe_chunks=args.chunks, ctx=args.ctx), stats)
    t_cal = time.perf_counter() - t0
    model = OpenedModel.open(args.model, stats)
    streamed = model.probes
    t0 = time.perf_counter()
    sens = measure_sensitivity(model, text, chunks=args.chunks, ctx=args.ctx)
    reqs = probe_prunings(model.arch, True)
    pruned = pruning_kl(model, text, reqs, ctx=args.ctx, chunks=args.chunks)
    t_llama = time.perf_counter() - t0
    a = PROBE_TYPE.name
    llama = {f"class:{k}:{a}": v[a] for k, v in sens.probes.items()}
    llama.update({f"layers:{g}:{a}": v for g, v in sens.layer_probes.items()})
    llama.update({f"all:{t.name}": sens.info["uniform"][t.name]["measured"] for t in JOINT_TYPES
                  if t.name in sens.info["uniform"]})
    llama.update({prune_name(r, model.arch): v for r, v in zip(reqs, pruned)})
    rows = []
    for name, kl in llama.items():
        s = streamed.by_text(name)[args.text.name] if name in streamed.kl else None
        rows.append(dict(probe=name, llama_cpp=kl, streamed=s, ratio=s / kl if s is not None and kl > 0 else None))
    out = dict(model=str(args.model), chars=args.chars, chunks=args.chunks, ctx=args.ctx, text=args.text.name,
               calibrate_seconds=round(t_cal, 1), streamed_seconds=streamed.info.get("seconds"),
               llama_cpp_seconds=round(t_llama, 1), rows=rows)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    within = sum(1 for r in rows if r["ratio"] is not None and abs(r["ratio"] - 1) <= 0.10)
    lines = ["# Streamed probes against probes through llama.cpp (same tokens)", "",
             f"`{args.model.name}`, statistics streamed on the first {args.chars:,} characters of calib.txt; both "
             f"kinds of probe on the same {args.chunks} chunks of {args.ctx} tokens of {args.text.name} (not "
             "calibrated on). llama.cpp: one conversion per probe (the rest F16, F32 KV cache) scored against the F16 "
             "conversion. Streamed: the probe streams inside the calibration (the rest exact float32 weights) "
             "against the exact model. Reproduce: `python eval/streamed_probes.py`.", "",
             "| probe | llama.cpp KL | streamed KL | streamed / llama.cpp |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        lines.append(f"| {r['probe']} | {r['llama_cpp']:.5f} | {r['streamed'] or 0:.5f} | {ratio} |")
    lines += ["", f"Within 10%: {within} of {len(rows)}. Time: calibration with the streams {t_cal:.0f} s (the "
              f"streams {streamed.info.get('seconds')} s of it); the llama.cpp probes {t_llama:.0f} s."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

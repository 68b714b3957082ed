"""At DeepSeek-V3 width: a streamed calibration carrying the end-to-end probes, then `plan --sensitivity streamed`.

    python eval/rehearse_probes_ds3.py [--sizes 2x32,4x32] [--work DIR]

For each size (layers x routed experts) a synthetic FP8 checkpoint of DeepSeek-V3's shapes (`tools/make_synthetic.py`:
hidden 7168, MLA, a dense first layer, then MoE layers of 2048-wide experts) is calibrated on 1,024 tokens of
tests/data/calib.txt with `--probes --probe-chunks 1` (one chunk of 512 held-out tokens per stream) and
`--max-memory 8GiB`; then planned from the streamed probes alone. Wall time and peak RSS (the child's ``ru_maxrss``)
of each step, the streams' own seconds, and the stated bound of what the streams hold go to
eval/results/rehearse_probes_ds3.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT))

from rehearse_local_ds3 import GGUFMOE, TEXT, step, synthetic  # noqa: E402

from ggufmoe.stats.file import load_stats  # noqa: E402
from ggufmoe.stats.probe_results import KEY, StreamedProbes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2x32,4x32")
    ap.add_argument("--budget", default="2.7GiB")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ggufmoe-probes-ds3-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        src = synthetic(work, size)
        stats = work / f"{size}.stats.gguf"
        stats.unlink(missing_ok=True)
        row = dict(size=size)
        row["calibrate"] = step(GGUFMOE + ["calibrate", str(src), "--text", str(TEXT), "--max-tokens", "1024",
                                           "--max-memory", "8GiB", "--probes", "--probe-chunks", "1", "-o", str(stats),
                                           "-q"], work / f"{size}.cal.log")
        if stats.is_file():
            probes = StreamedProbes.from_json(load_stats(stats).extras[KEY])
            row["streams"] = dict(seconds=probes.info["seconds"], by_part=probes.info["seconds_by_part"],
                                  tokens=probes.info["tokens"], probes=len(probes.kl),
                                  left_exact=len(probes.info["left_exact"]),
                                  all_kl={p: round(probes.mean(p), 4) for p in probes.kl if p.startswith("all:")})
        plan = work / f"{size}.plan.json"
        row["plan"] = step(GGUFMOE + ["plan", str(src), "--budget", args.budget, "--ctx", "512", "--stats", str(stats),
                                      "--sensitivity", "streamed", "-o", str(plan), "-q"], work / f"{size}.plan.log")
        if plan.is_file():
            p = json.loads(plan.read_text())
            row["plan_result"] = dict(keep=p["keep"], predicted_kld=p["predicted_kld"]["total"], notes=p.get("notes"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(src)
    out = ROOT / "eval" / "results"
    (out / "rehearse_probes_ds3.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Streamed probes at DeepSeek-V3 width", "",
             f"`python eval/rehearse_probes_ds3.py --sizes {args.sizes}`: synthetic FP8 checkpoints of DeepSeek-V3's "
             "shapes, 1,024 calibration tokens, the probes on one held-out chunk of 512 tokens (one stream per tensor "
             "class and per run of layers at Q3_K, the whole model at three types, two prunings), `--max-memory 8GiB`. Peak RSS is the child's "
             f"`ru_maxrss`; load is the 1-minute load average at the end. Machine: {platform.machine()}, "
             f"{os.cpu_count()} cores.", "",
             "| size | step | wall | peak RSS | load | result |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        for key, label in (("calibrate", "calibrate --probes"), ("plan", "plan --sensitivity streamed")):
            m = r[key]
            res = "ok" if m["rc"] == 0 else f"rc {m['rc']}"
            if key == "calibrate" and "streams" in r:
                s = r["streams"]
                res += (f": the streams {s['seconds']:.0f} s of it ({', '.join(f'{k} {v:.0f} s' for k, v in s['by_part'].items())}"
                        f"), {s['probes']} probes, KL {s['all_kl']}")
            if key == "plan" and "plan_result" in r:
                pr = r["plan_result"]
                res += f": keep {pr['keep']}, predicted KL {pr['predicted_kld']:.3f}"
            lines.append(f"| {r['size']} | {label} | {m['wall_s']:.0f} s | {m['peak_rss_gib']:.2f} GiB | "
                         f"{m['load']:.1f} | {res} |")
    (out / "rehearse_probes_ds3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

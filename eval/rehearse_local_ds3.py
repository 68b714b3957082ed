"""At DeepSeek-V3 width: streamed calibration with and without the local errors, then `plan --stats` from them.

    python eval/rehearse_local_ds3.py [--sizes 2x32,2x64] [--work DIR]

For each size (layers x routed experts) a synthetic FP8 checkpoint of DeepSeek-V3's shapes
(`tools/make_synthetic.py`) is calibrated twice on the same 2,048 tokens (`--max-memory 4GiB`):
once as `ggufmoe calibrate` runs (local errors and pruning errors measured in the pass) and once with
them switched off (the Python API's ``measure_local=False``); then `ggufmoe plan --stats` plans it
for a low-bit budget from those statistics alone (a model this size is not probed: local errors).
Wall time and peak RSS (``ru_maxrss`` of the child) of every step go to
eval/results/rehearse_local_ds3.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUFMOE = [str(Path(sys.executable).with_name("ggufmoe"))]
TEXT = ROOT / "tests" / "data" / "calib.txt"
NO_LOCAL = ("from ggufmoe.stats.stream import stream_stats; from ggufmoe.stats.file import save_stats; import sys; "
            "save_stats(stream_stats(sys.argv[1], open(sys.argv[2]).read(), max_tokens=2048, progress=False, "
            "max_memory=4 * 1024**3, measure_local=False), sys.argv[3])")


def step(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall time, peak RSS (GiB) and exit code."""
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    return dict(cmd=" ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
                wall_s=round(time.perf_counter() - t, 1), peak_rss_gib=round(usage.ru_maxrss / 2**20, 2),
                rc=os.waitstatus_to_exitcode(status), load=os.getloadavg()[0])


def synthetic(work: Path, size: str) -> Path:
    """The synthetic DeepSeek-V3-shaped checkpoint of ``size`` (LAYERSxEXPERTS) in ``work``, made unless there."""
    layers, experts = size.split("x")
    src = work / size
    if not src.exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(src), "--layers", layers,
                        "--experts", experts, "-q"], check=True)
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2x32,2x64")
    ap.add_argument("--budget", default="2.7GiB")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ggufmoe-local-ds3-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        src = synthetic(work, size)
        stats, bare = work / f"{size}.stats.gguf", work / f"{size}.bare.stats.gguf"
        for p in (stats, bare):
            p.unlink(missing_ok=True)
        row = dict(size=size)
        row["calibrate"] = step(GGUFMOE + ["calibrate", str(src), "--text", str(TEXT), "--max-tokens", "2048",
                                           "--max-memory", "4GiB", "-o", str(stats), "-q"], work / f"{size}.cal.log")
        row["calibrate_without_local"] = step([sys.executable, "-c", NO_LOCAL, str(src), str(TEXT), str(bare)],
                                              work / f"{size}.bare.log")
        plan = work / f"{size}.plan.json"
        row["plan"] = step(GGUFMOE + ["plan", str(src), "--budget", args.budget, "--ctx", "512", "--stats", str(stats),
                                      "--sensitivity", "local", "-o", str(plan), "-q"], work / f"{size}.plan.log")
        if plan.is_file():
            p = json.loads(plan.read_text())
            row["plan_result"] = dict(keep=p["keep"], criterion=p["criterion"], predicted_kld=p["predicted_kld"],
                                      notes=p.get("notes", []), file_bytes=p["file_bytes"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(src)
    out = ROOT / "eval" / "results"
    (out / "rehearse_local_ds3.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Local errors at DeepSeek-V3 width: calibrate with and without them, then plan from them", "",
             f"`python eval/rehearse_local_ds3.py --sizes {args.sizes}`: synthetic FP8 checkpoints of DeepSeek-V3's "
             "shapes (hidden 7168, MLA, a dense first layer, then MoE layers of 2048-wide experts, 8 groups), "
             "2,048 calibration tokens of tests/data/calib.txt, `--max-memory 4GiB`. Peak RSS is the child's "
             "`ru_maxrss`. The load average (1 min) is at the end of each step: this 2-core machine was running "
             f"other work too, so wall times are inflated. Machine: {platform.machine()}, {os.cpu_count()} cores.",
             "", "| size | step | wall | peak RSS | load | result |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        for key, label in (("calibrate", "calibrate (local and pruning errors measured)"),
                           ("calibrate_without_local", "calibrate without them"),
                           ("plan", f"plan --budget {args.budget} --stats (no probes)")):
            m = r[key]
            res = "ok" if m["rc"] == 0 else f"rc {m['rc']}"
            if key == "plan" and "plan_result" in r:
                pr = r["plan_result"]
                res += (f": keep {pr['keep']} ({pr['criterion']}), predicted KL {pr['predicted_kld']['total']:.3f}, "
                        f"{pr['file_bytes'] / 2**30:.2f} GiB file; " + "; ".join(pr["notes"]))
            lines.append(f"| {r['size']} | {label} | {m['wall_s']:.0f} s | {m['peak_rss_gib']:.2f} GiB | "
                         f"{m['load']:.1f} | {res} |")
    (out / "rehearse_local_ds3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

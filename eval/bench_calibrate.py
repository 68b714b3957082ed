"""Speed and peak RSS of `ggufmoe calibrate` over a whole calibration text.

    python eval/bench_calibrate.py [MODEL_DIR] [--text FILE] [--ctx 512] [--runs 1]

Each run is a fresh `ggufmoe calibrate` child process, timed from start to exit (model
loading, tokenization and writing the file included); its peak RSS comes from the kernel
(getrusage of the waited-for child). Tokens are read back from the stats file written.
Writes eval/results/calibrate.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from common import peak_rss_of  # noqa: E402
from ggufmoe.stats.file import load_stats  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(SHARED / "models" / "refmoe-qwen3"))
    ap.add_argument("--text", default=str(SHARED / "data" / "calib.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "calibrate.md"))
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("ggufmoe"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stats.gguf"
        for i in range(args.runs):
            rss, wall = peak_rss_of([exe, "calibrate", args.model, "--text", args.text, "--chunk", str(args.ctx),
                                     "-o", str(out), "-q"], quiet=True)
            stats = load_stats(out)
            tokens = next(iter(stats.layers.values())).n_tokens
            rows.append((tokens, wall, rss))
            print(f"run {i + 1}: {tokens} tokens in {wall:.1f} s, {tokens / wall:.0f} tokens/s, "
                  f"peak RSS {rss / 2**20:.0f} MiB", flush=True)
            out.unlink()
    text_size = Path(args.text).stat().st_size
    walls = [r[1] for r in rows]
    lines = [
        "# Speed of `ggufmoe calibrate`",
        "",
        f"Model `{Path(args.model).name}`, whole `{Path(args.text).name}` ({text_size / 1e6:.2f} MB of text), "
        f"`--ctx {args.ctx}`. Wall time of the whole command (model loading, tokenization, writing the "
        f"stats file included); peak RSS from the kernel. Measured by `eval/bench_calibrate.py`.",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}. "
        "A shared virtual machine: timings vary from run to run with its neighbours' load.",
        "",
        "| run | tokens | seconds | tokens/s | peak RSS |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {i + 1} | {tokens} | {wall:.1f} | {tokens / wall:.0f} | {rss / 2**20:.0f} MiB |"
              for i, (tokens, wall, rss) in enumerate(rows)]
    if len(rows) > 1:
        lines += ["", f"Median: {statistics.median(walls):.1f} s, "
                      f"{rows[0][0] / statistics.median(walls):.0f} tokens/s."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Peak RSS of `ggufmoe convert` on a model, against the bound 1 GiB + largest tensor in F32.

    python eval/bench_convert_rss.py [MODEL_DIR] [--type Q4_K ...]

Each conversion runs in a fresh child process; its peak RSS comes from the kernel
(getrusage of the waited-for child). Writes eval/results/convert_rss.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import peak_rss_of  # noqa: E402
from ggufmoe.arch import architecture_for  # noqa: E402
from ggufmoe.source.hf import HFSource  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "refmoe-qwen3"))
    ap.add_argument("--type", dest="types", action="append", default=None)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "convert_rss.md"))
    args = ap.parse_args()
    types = args.types or ["F32", "Q8_0", "Q4_K"]
    specs = list(architecture_for(HFSource(args.model)).tensors())
    largest = max(s.n_elements for s in specs) * 4
    bound = 2**30 + largest
    exe = str(Path(sys.executable).with_name("ggufmoe"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            out = Path(tmp) / f"m-{t}.gguf"
            rss, wall = peak_rss_of([exe, "convert", args.model, "-o", str(out), "--type", t, "-q"])
            rows.append((t, out.stat().st_size, rss, wall))
            out.unlink()
    lines = [
        "# Peak RSS of `ggufmoe convert`",
        "",
        f"Model: `{Path(args.model).name}`; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Measured by `eval/bench_convert_rss.py`.",
        f"Largest single tensor in F32: {largest / 2**20:.1f} MiB; "
        f"bound = 1 GiB + that = {bound / 2**20:.0f} MiB.",
        "",
        "| type | output | peak RSS | wall | within bound |",
        "|---|---:|---:|---:|:---:|",
    ]
    lines += [f"| {t} | {size / 2**20:.1f} MiB | {rss / 2**20:.0f} MiB | {wall:.1f} s | {'yes' if rss < bound else 'NO'} |"
              for t, size, rss, wall in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

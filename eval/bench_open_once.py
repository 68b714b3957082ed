"""How often one command opens its inputs: sources, statistics files, GGUF headers, llama.cpp's system info.

    python eval/bench_open_once.py [WORKDIR] [--synthetic-layers 2] [--synthetic-experts 32] [--shard-size 64MB]
                                   [--package CHECKOUT]   # the ggufmoe of another checkout (before/after)

Runs, each in a child process with an empty cache folder (``XDG_CACHE_HOME``, so cold):

- ``convert models/refmoe-qwen3 --budget 112MiB --ctx 1024 --calib data/calib-sample.txt``;
- ``plan SYNTH --budget ... --stats STATS`` of a DeepSeek-V3-width synthetic checkpoint
  (``tools/make_synthetic.py``, few layers and experts, many small shards), its statistics from a streamed
  calibration on ``--synthetic-tokens`` tokens (made once, outside the counted command, by this checkout).

The child wraps, before running the command in-process, the functions that open things and counts
their calls: ``HFSource`` constructions and safetensors shard headers read, statistics files read and
written (``read_imatrix_gguf`` / ``write_imatrix_gguf``), GGUF headers built (``GGUFWriter``
constructions) and ``tokenizer.json`` parses, llama.cpp system-info calls (``llama_print_system_info``), wall
and CPU time (its own and its children's: the CPU time means more than the wall time on a loaded machine).
Child processes the command starts (llama.cpp measurements) are not counted. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "models" / "refmoe-qwen3"
CALIB = ROOT / "data" / "calib-sample.txt"


def _count(counts: dict[str, int], key: str, owner, name: str) -> None:
    """Wrap ``owner.name`` so that each call adds one to ``counts[key]``."""
    orig = getattr(owner, name)

    def wrapped(*a, **kw):
        counts[key] = counts.get(key, 0) + 1
        return orig(*a, **kw)

    setattr(owner, name, wrapped)


def child(out: Path, argv: list[str]) -> None:
    """Run ``ggufmoe ARGV`` in this process with the counters installed; write counts and wall time to ``out``."""
    import gguf
    import llama_cpp

    from ggufmoe import cli
    from ggufmoe.source import hf, tokenizer
    from ggufmoe.stats import file, imatrix

    counts: dict[str, int] = {}
    _count(counts, "hf_sources", hf.HFSource, "__init__")
    _count(counts, "shard_headers", hf, "read_header")
    _count(counts, "stats_reads", imatrix, "read_imatrix_gguf")
    file.read_imatrix_gguf = imatrix.read_imatrix_gguf
    _count(counts, "stats_writes", imatrix, "write_imatrix_gguf")
    file.write_imatrix_gguf = imatrix.write_imatrix_gguf
    _count(counts, "gguf_headers", gguf.GGUFWriter, "__init__")
    _count(counts, "tokenizer_parses", tokenizer, "_read_tokenizer")
    _count(counts, "system_info", llama_cpp, "llama_print_system_info")
    sys.argv = ["ggufmoe", *argv]
    t0 = time.perf_counter()
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    counts["wall_s"] = round(time.perf_counter() - t0, 1)
    use = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    counts["cpu_s"] = round(sum(u.ru_utime + u.ru_stime for u in use), 1)  # this process and llama.cpp's children
    counts["exit"] = code
    out.write_text(json.dumps(counts))


def run(work: Path, name: str, argv: list[str], package: Path) -> dict:
    """One cold command in a child process running the ggufmoe of ``package``; its counts."""
    cache = work / f"cache-{name}"
    cache.mkdir(exist_ok=True)
    res = work / f"{name}.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(package)}
    subprocess.run([sys.executable, __file__, "--child", str(res), *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return json.loads(res.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", nargs="?", type=Path)
    ap.add_argument("--synthetic-layers", default="2")
    ap.add_argument("--synthetic-experts", default="32")
    ap.add_argument("--shard-size", default="64MB")
    ap.add_argument("--plan-budget", default="3GiB")
    ap.add_argument("--synthetic-tokens", default="256", help="calibration tokens of the synthetic model")
    ap.add_argument("--package", type=Path, default=ROOT, help="checkout whose ggufmoe runs [default: this one]")
    if sys.argv[1:2] == ["--child"]:  # the counted command: --child RESULT ARGV...
        child(Path(sys.argv[2]), sys.argv[3:])
        return
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-open-once-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"convert_ref": run(work, "convert_ref", [
        "convert", str(REF), "-o", str(work / "ref.gguf"), "--budget", "112MiB", "--ctx", "1024",
        "--calib", str(CALIB), "-q"], args.package)}
    synth = work / "synth"
    if not (synth / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(synth), "--layers",
                        args.synthetic_layers, "--experts", args.synthetic_experts, "--shard-size", args.shard_size,
                        "-q"], check=True)
    results["synth_shards"] = len(list(synth.glob("*.safetensors")))
    stats = work / "synth.stats.gguf"
    if not stats.is_file():
        subprocess.run([sys.executable, "-c", "from ggufmoe.cli import main; main()", "calibrate", str(synth),
                        "--text", str(CALIB), "--max-tokens", args.synthetic_tokens, "-o", str(stats), "-q"],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    results["plan_synth"] = run(work, "plan_synth", [
        "plan", str(synth), "--budget", args.plan_budget, "--ctx", "1024", "--stats", str(stats), "-o",
        str(work / "synth-plan.json")], args.package)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

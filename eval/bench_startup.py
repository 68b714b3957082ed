"""The fixed cost of a conversion: ggufmoe convert of the reference model against llama.cpp's quantizer.

    python eval/bench_startup.py [--repeat 7] [--before DIR] [--work DIR]

A benchmark, not a test. Whole-process wall times (``subprocess.run``, from start to exit) of:

* ``ggufmoe convert models/refmoe-qwen3 -o X --type Q2_K`` (the Hugging Face checkpoint), with the
  configuration cache (``ggufmoe.source.hf_config``) warm, as every conversion after a model's first;
* the same with an empty cache (a fresh ``XDG_CACHE_HOME`` each run): a model's first conversion;
* ``ggufmoe convert F16.gguf -o X --type Q2_K`` (the same model as an F16 GGUF);
* llama.cpp: a Python process that imports only ``llama_cpp`` and calls ``llama_model_quantize`` from the
  same F16 GGUF to its Q2_K mix (what ``llama-quantize F16.gguf X Q2_K`` does, without building it);
* ``python -c "import torch"``, for scale;
* with ``--before DIR`` (a checkout of an earlier ggufmoe), its HF-source conversion too.

The commands take turns, ``--repeat`` rounds, so that the load of a shared machine falls on all of them
alike; medians are reported, with the load average before and after. Writes eval/results/startup.md and
startup.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "models" / "refmoe-qwen3"
GGUFMOE = str(Path(sys.executable).with_name("ggufmoe"))
RESULTS = ROOT / "eval" / "results"
LLAMA = "llama.cpp llama_model_quantize (F16 GGUF)"
HF, COLD = "ggufmoe HF (models/refmoe-qwen3)", "ggufmoe HF, empty config cache"
TORCH, BEFORE = "python -c 'import torch'", "ggufmoe HF, the --before checkout"

# llama.cpp's quantizer and nothing else: llama-quantize SRC DST Q2_K, defaults otherwise (all cores)
LLAMA_QUANTIZE = """
import ctypes, sys
import llama_cpp.llama_cpp as lc
lc.llama_backend_init()
p = lc.llama_model_quantize_default_params()
p.ftype = lc.LLAMA_FTYPE_MOSTLY_Q2_K
sys.exit(lc.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--before", type=Path, help="a checkout of an earlier ggufmoe to measure as well")
    ap.add_argument("--work", type=Path, help="folder for the files (default: a temporary one)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(work / "cache")}
    f16 = work / "ref-f16.gguf"
    if not f16.is_file():
        timed([GGUFMOE, "convert", str(REF), "-o", str(f16), "--type", "F16", "-q"], env)
    timed([GGUFMOE, "convert", str(REF), "-o", str(work / "warm.gguf"), "--type", "Q2_K", "-q"], env)  # fills it

    def convert(src: Path, out: str, cmd_env: dict = env) -> tuple[list[str], dict]:
        return [GGUFMOE, "convert", str(src), "-o", str(work / out), "--type", "Q2_K", "-q"], cmd_env

    cmds: dict[str, Callable[[], tuple[list[str], dict]]] = {
        LLAMA: lambda: ([sys.executable, "-c", LLAMA_QUANTIZE, str(f16), str(work / "llama.gguf")], env),
        HF: lambda: convert(REF, "hf.gguf"),
        "ggufmoe F16 GGUF": lambda: convert(f16, "gguf.gguf"),
        COLD: lambda: convert(
            REF, "cold.gguf", {**env, "XDG_CACHE_HOME": tempfile.mkdtemp(dir=work, prefix="cold-")}),
        TORCH: lambda: ([sys.executable, "-c", "import torch"], env),
    }
    if args.before:
        before_env = {**env, "PYTHONPATH": str(args.before.resolve())}
        cmds[BEFORE] = lambda: convert(REF, "before.gguf", before_env)

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for r in range(args.repeat):
        names = list(cmds)
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts with another command
            times[name].append(timed(*cmds[name]()))
        print(f"round {r + 1}/{args.repeat}: " + ", ".join(f"{v[-1]:.2f}" for v in times.values()), file=sys.stderr)
    load_after = os.getloadavg()

    medians = {name: statistics.median(v) for name, v in times.items()}
    base = medians[LLAMA]
    sizes = {p.name: p.stat().st_size for p in (work / "llama.gguf", work / "hf.gguf", work / "gguf.gguf")}
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpus=os.cpu_count(),
                  repeat=args.repeat, load_before=load_before, load_after=load_after,
                  times=times, medians=medians, output_bytes=sizes,
                  ratio_to_llama_cpp={k: v / base for k, v in medians.items()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(result, indent=1) + "\n")
    hf, torch = medians[HF], medians[TORCH]
    reading = [f"ggufmoe from the checkpoint: {hf / base:.2f}x llama.cpp's whole process "
               f"({'within' if hf <= 2 * base else 'over'} the 2x target)"]
    if args.before:
        reading.append(f"before ({args.before.name}): {medians[BEFORE] / base:.2f}x")
    reading += [f"a model's first conversion (empty configuration cache: transformers imported, its model built "
                f"on the meta device): {medians[COLD] / base:.2f}x",
                f"`import torch` alone: {torch:.2f} s, {torch / base:.2f}x llama.cpp's whole process, for scale: "
                f"a conversion reads, transforms and quantizes numpy arrays and never imports torch "
                f"(tests/test_no_torch.py)"]
    rows = "\n".join(f"| {name} | {medians[name]:.2f} | {min(v):.2f} | {max(v):.2f} | {medians[name] / base:.2f}x |"
                     for name, v in times.items())
    (RESULTS / "startup.md").write_text(f"""# Start-up: converting the reference model, whole process

`python eval/bench_startup.py --repeat {args.repeat}{' --before ' + args.before.name if args.before else ''}`,
{result['date']}, {os.cpu_count()} CPUs. Each command a fresh process, start to exit; the commands take turns,
{args.repeat} rounds; times in seconds. The reference model (`models/refmoe-qwen3`, 33M parameters) to Q2_K: ggufmoe
makes every weight matrix Q2_K; llama.cpp's Q2_K mix keeps some at higher types (its file
{sizes['llama.gguf'] / 2**20:.2f} MiB, ggufmoe's {sizes['hf.gguf'] / 2**20:.2f} MiB).

Load average {load_before[0]:.2f} before, {load_after[0]:.2f}
after (1 minute). Absolute times move with the load; the ratios, from commands that took turns under the same
load, are the result.

| command | median | min | max | / llama.cpp |
|---|---|---|---|---|
{rows}

Target (issue 17): converting the reference model costs at most 2x llama.cpp's whole-process time.

{chr(10).join("- " + line for line in reading)}
""")
    print((RESULTS / "startup.md").read_text())


if __name__ == "__main__":
    main()

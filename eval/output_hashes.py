"""SHA-256 of the tensor data of a few reference outputs, to show a refactoring changes no output byte.

    python eval/output_hashes.py [WORKDIR] > hashes.json
    GGUFMOE_CALIBRATE_ARGS=--whole python eval/output_hashes.py ...   # extra calibrate options

Makes, from the embedded reference model and data/calib-sample.txt: the statistics file, a Q4_K
conversion, a REAP-pruned Q4_K conversion with those statistics, a pruning of the Q4_K GGUF (a GGUF
source: bytes copied), a budget plan with measured sensitivities and its conversion. Prints one JSON object: file name ->
SHA-256 of its tensor data and of the whole file
(the statistics as calibrate wrote them, before plan caches sensitivities in them; the plan with
its statistics path reduced to the file name).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gguf import GGUFReader

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "models" / "refmoe-qwen3"
CALIB = ROOT / "data" / "calib-sample.txt"
GGUFMOE = str(Path(sys.executable).with_name("ggufmoe"))


def ggufmoe(*args) -> None:
    subprocess.run([GGUFMOE, *map(str, args), "-q"], check=True, stdout=subprocess.DEVNULL)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_data_sha(path: Path) -> str:
    h = hashlib.sha256()
    for t in GGUFReader(path).tensors:
        h.update(t.name.encode())
        h.update(t.data.tobytes())
    return h.hexdigest()


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "ref.stats.gguf"
    ggufmoe("calibrate", REF, "--text", CALIB, "--max-tokens", "2048", "-o", stats,
            *os.environ.get("GGUFMOE_CALIBRATE_ARGS", "").split())
    out = {"ref.stats.gguf": {"tensor_data": tensor_data_sha(stats), "file": sha256(stats.read_bytes())}}
    ggufmoe("convert", REF, "-o", work / "q4k.gguf", "--type", "Q4_K")
    ggufmoe("convert", REF, "-o", work / "pruned.gguf", "--type", "Q4_K", "--stats", stats, "--keep", "16",
            "--criterion", "reap")
    ggufmoe("convert", work / "q4k.gguf", "-o", work / "gguf-pruned.gguf", "--stats", stats, "--keep", "18")
    ggufmoe("plan", REF, "--budget", "12M", "--weights-only", "--stats", stats, "--calib", CALIB,
            "-o", work / "plan.json")
    ggufmoe("convert", REF, "-o", work / "planned.gguf", "--plan", work / "plan.json")
    for name in ["q4k.gguf", "pruned.gguf", "gguf-pruned.gguf", "planned.gguf"]:
        f = work / name
        out[name] = {"tensor_data": tensor_data_sha(f), "file": sha256(f.read_bytes())}
    plan = json.loads((work / "plan.json").read_text())
    plan["stats"] = Path(plan["stats"]).name  # the work folder differs from run to run
    out["plan.json"] = {"file": sha256(json.dumps(plan, sort_keys=True).encode())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

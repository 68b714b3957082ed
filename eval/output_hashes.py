"""SHA-256 of the tensor data of reference outputs, to show a refactoring changes no output byte.

    python eval/output_hashes.py [WORKDIR] [--families ref,qwen3moe,...] > hashes.json
    PYTHONPATH=/old/checkout python eval/output_hashes.py WORKDIR > before.json   # the old code's outputs
    GGUFMOE_CALIBRATE_ARGS=--whole python eval/output_hashes.py ...   # extra calibrate options

The CLI runs as ``python -c 'from ggufmoe.cli import main; main()'`` with this interpreter and the
environment's PYTHONPATH, so PYTHONPATH picks the checkout whose outputs are hashed; the models, data
and this script come from this script's own checkout. The models' paths
are given relative to WORKDIR (statistics record them), so runs in different work folders compare.

``ref``: from the embedded reference model and data/calib-sample.txt: the statistics file, a Q4_K
conversion, a REAP-pruned Q4_K conversion with those statistics, a pruning of the Q4_K GGUF (a GGUF
source: bytes copied), a budget plan with measured sensitivities and its conversion.

Every family of tests/tiny_models.py (FAMILIES): its seeded tiny checkpoint (seed 0, built once into
WORKDIR/tiny/FAMILY and reused; on the first build a second build checks its bytes are deterministic),
a Q4_K conversion, and for the families calibrate runs on (CALIBRATED): the statistics of 512 tokens
of tests/data/calib.txt, a REAP-pruned Q4_K conversion and a frequency-pruned F16 conversion keeping
half the experts (pruning needs statistics, so the others have no pruned outputs).

Prints one JSON object: output name -> SHA-256 of its tensor data and of the whole file
(the statistics as calibrate wrote them, before plan caches sensitivities in them; the plan with
its statistics path reduced to the file name; a checkpoint: the SHA-256 of each of its files).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "models" / "refmoe-qwen3"
CALIB = ROOT / "data" / "calib-sample.txt"
TINY_CALIB = ROOT / "tests" / "data" / "calib.txt"
CLI = [sys.executable, "-c", "from ggufmoe.cli import main; main()"]  # the ggufmoe on PYTHONPATH
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def tiny_models():
    """tests/tiny_models.py of this script's checkout (not of the one on PYTHONPATH)."""
    spec = importlib.util.spec_from_file_location("tiny_models", ROOT / "tests" / "tiny_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ggufmoe(work: Path, *args) -> None:
    # cwd: the work folder, so that no ggufmoe in the current folder shadows the one on PYTHONPATH
    subprocess.run([*CLI, *map(str, args), "-q"], check=True, stdout=subprocess.DEVNULL, cwd=work)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_data_sha(path: Path) -> str:
    h = hashlib.sha256()
    for t in GGUFReader(path).tensors:
        h.update(t.name.encode())
        h.update(t.data.tobytes())
    return h.hexdigest()


def gguf_hashes(path: Path) -> dict:
    return {"tensor_data": tensor_data_sha(path), "file": sha256(path.read_bytes())}


def dir_hashes(path: Path) -> dict:
    return {f.name: sha256(f.read_bytes()) for f in sorted(path.iterdir()) if f.is_file()}


def calibrate_args() -> list[str]:
    return os.environ.get("GGUFMOE_CALIBRATE_ARGS", "").split()


def ref_outputs(work: Path) -> dict:
    stats = work / "ref.stats.gguf"
    ggufmoe(work, "calibrate", REF, "--text", CALIB, "--max-tokens", "2048", "-o", stats, *calibrate_args())
    out = {"ref.stats.gguf": gguf_hashes(stats)}
    ggufmoe(work, "convert", REF, "-o", work / "q4k.gguf", "--type", "Q4_K")
    ggufmoe(work, "convert", REF, "-o", work / "pruned.gguf", "--type", "Q4_K", "--stats", stats, "--keep", "16",
            "--criterion", "reap")
    ggufmoe(work, "convert", work / "q4k.gguf", "-o", work / "gguf-pruned.gguf", "--stats", stats, "--keep", "18")
    # the options explicit, with the values they defaulted to before issue 24 made one default for each
    ggufmoe(work, "plan", REF, "--budget", "12M", "--weights-only", "--stats", stats, "--calib", CALIB,
            "--ctx", "8192", "--criterion", "reap", "-o", work / "plan.json")
    ggufmoe(work, "convert", REF, "-o", work / "planned.gguf", "--plan", work / "plan.json")
    for name in ["q4k.gguf", "pruned.gguf", "gguf-pruned.gguf", "planned.gguf"]:
        out[name] = gguf_hashes(work / name)
    plan = json.loads((work / "plan.json").read_text())
    plan["stats"] = Path(plan["stats"]).name  # the work folder differs from run to run
    out["plan.json"] = {"file": sha256(json.dumps(plan, sort_keys=True).encode())}
    return out


def tiny_checkpoint(tm, family: str, work: Path) -> Path:
    """The seed-0 tiny checkpoint of ``family`` in WORKDIR/tiny, built once; a first build is built twice
    and must come out byte for byte the same."""
    model = work / "tiny" / family
    if (model / "config.json").is_file():
        return model
    tmp = Path(tempfile.mkdtemp(dir=work))
    try:
        tm.build(family, tmp / "a", seed=0)
        tm.build(family, tmp / "b", seed=0)
        a, b = dir_hashes(tmp / "a"), dir_hashes(tmp / "b")
        if a != b:
            raise SystemExit(f"{family}: the tiny checkpoint is not deterministic: "
                             f"{sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))} differ")
        model.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "a").rename(model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def n_experts(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return next(cfg[k] for k in EXPERT_KEYS if cfg.get(k))


def family_outputs(tm, family: str, work: Path) -> dict:
    model = tiny_checkpoint(tm, family, work)
    out = {f"{family}/checkpoint": dir_hashes(model)}
    (work / "out" / family).mkdir(parents=True, exist_ok=True)
    # paths relative to the work folder (the CLI's current folder): the statistics record the model's path
    # as given, and the work folders of the runs compared differ
    model, d = model.relative_to(work), Path("out", family)
    ggufmoe(work, "convert", model, "-o", d / "q4k.gguf", "--type", "Q4_K")
    names = ["q4k.gguf"]
    if family in tm.CALIBRATED:
        stats = d / "stats.gguf"
        ggufmoe(work, "calibrate", model, "--text", TINY_CALIB, "--max-tokens", "512", "-o", stats,
                *calibrate_args())
        keep = str(n_experts(work / model) // 2)
        ggufmoe(work, "convert", model, "-o", d / "pruned-reap-q4k.gguf", "--type", "Q4_K", "--stats", stats,
                "--keep", keep, "--criterion", "reap")
        ggufmoe(work, "convert", model, "-o", d / "pruned-freq-f16.gguf", "--type", "F16", "--stats", stats,
                "--keep", keep, "--criterion", "frequency")
        names = ["stats.gguf", *names, "pruned-reap-q4k.gguf", "pruned-freq-f16.gguf"]
    for name in names:
        out[f"{family}/{name}"] = gguf_hashes(work / d / name)
    return out


def main() -> None:
    tm = tiny_models()
    choices = ("ref", *tm.FAMILIES)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", nargs="?", type=Path, help="where the outputs go [default: a new temporary folder]")
    p.add_argument("--families", default=",".join(choices),
                   help=f"comma-separated subset of {','.join(choices)} [default: all]")
    a = p.parse_args()
    families = [f for f in a.families.split(",") if f]
    if unknown := [f for f in families if f not in choices]:
        p.error(f"unknown families {unknown}; choose from {','.join(choices)}")
    work = (a.workdir or Path(tempfile.mkdtemp())).resolve()
    work.mkdir(parents=True, exist_ok=True)
    which = subprocess.run([*CLI[:2], "import ggufmoe; print(ggufmoe.__file__)"], capture_output=True, text=True,
                           cwd=work, check=True).stdout.strip()
    print(f"hashing the outputs of {which} in {work}", file=sys.stderr)
    out, start = {}, time.monotonic()
    for family in families:
        t = time.monotonic()
        out.update(ref_outputs(work) if family == "ref" else family_outputs(tm, family, work))
        print(f"{family}: {time.monotonic() - t:.1f} s", file=sys.stderr)
    print(f"{len(out)} outputs in {time.monotonic() - start:.1f} s", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

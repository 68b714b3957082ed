"""The reference model's budget sweep, committed as eval/results/sweep/{results.md,results.json,pareto.png,README.md}.

    python eval/sweep_reference.py [--work DIR]

One `ggufmoe sweep` command: budgets from just under the size of llama.cpp's IQ1_M mix to just over its
Q4_K_M, its mixes IQ1_M ... Q4_K_M as baselines, calibration on calib.txt, evaluation on
eval_doc.txt. The work folder keeps the GGUFs; a second run resumes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BUDGETS = "8.4M,8.5M,10M,11.7M,13M,16.3M,19M,20M"
BASELINES = "IQ1_M,IQ2_XXS,IQ2_M,Q2_K,Q3_K_M,Q4_K_M"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for the sweep's files [default: a temporary one]")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ggufmoe-sweep-"))
    cmd = [str(Path(sys.executable).with_name("ggufmoe")), "sweep", str(SHARED / "models" / "refmoe-qwen3"),
           "--budgets", BUDGETS, "--baselines", BASELINES, "--calib", str(SHARED / "data" / "calib.txt"),
           "--text", str(SHARED / "data" / "eval_doc.txt"), "-o", str(work)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    dest = ROOT / "eval" / "results" / "sweep"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "results.json", "pareto.png", "README.md"):
        shutil.copy(work / name, dest / name)
    print(f"copied to {dest}")


if __name__ == "__main__":
    main()

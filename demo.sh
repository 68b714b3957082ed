#!/usr/bin/env bash
# Set up ggufmoe in .venv and run its main job on the embedded reference model (a trained Qwen3-MoE, 24
# experts): fit it into a memory budget in one command (calibrate, plan which experts to keep and a type per
# tensor, convert), run the result in llama.cpp under a kernel-enforced limit of that budget, and measure its
# quality against the F16 conversion on text it was not calibrated on.
#   BUDGET=108MiB CTX=1024 ./demo.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-108MiB}
CTX=${CTX:-1024}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
G=.venv/bin/ggufmoe
M=models/refmoe-qwen3
mkdir -p out
rm -f out/refmoe-fit.gguf out/refmoe-fit.plan.json out/refmoe-fit.stats.gguf
step() { printf '\n== %s\n' "$*"; }

step "the model"
$G inspect $M
step "fit it into $BUDGET of memory at a context of $CTX: calibrate, plan, convert"
$G convert $M -o out/refmoe-fit.gguf --budget "$BUDGET" --ctx "$CTX" --calib data/calib-sample.txt
step "run it in llama.cpp under a $BUDGET memory limit"
$G validate out/refmoe-fit.gguf --plan out/refmoe-fit.plan.json
step "its quality against the F16 conversion, on text it was not calibrated on"
[ -f out/refmoe-F16.gguf ] || $G convert $M -o out/refmoe-F16.gguf --type F16 -q
$G eval out/refmoe-fit.gguf --base out/refmoe-F16.gguf --text tests/data/eval_doc.txt --max-tokens 4096

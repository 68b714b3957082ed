#!/usr/bin/env bash
# Set up ggufmoe in .venv and run the main job on the embedded reference model: inspect it,
# calibrate it, prune it to 20 of 24 experts and quantize it to Q4_K in one pass, run it in llama.cpp.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
mkdir -p out
.venv/bin/ggufmoe inspect models/refmoe-qwen3
.venv/bin/ggufmoe calibrate models/refmoe-qwen3 --text data/calib-sample.txt -o out/refmoe.stats.gguf
.venv/bin/ggufmoe convert models/refmoe-qwen3 -o out/refmoe-Q4_K.gguf --type Q4_K --stats out/refmoe.stats.gguf \
    --keep 20 --criterion reap
.venv/bin/python - <<'PY'
from llama_cpp import Llama
llm = Llama("out/refmoe-Q4_K.gguf", n_ctx=256, verbose=False)
out = llm("def main():\n    ", max_tokens=48, temperature=0)
print("llama.cpp says:\n" + out["choices"][0]["text"])
PY

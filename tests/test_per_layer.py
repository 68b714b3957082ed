"""Per-layer expert counts (``convert --keep N --keep-per-layer``): the file llama.cpp patched by
patches/per-layer-expert-count.patch runs equals the same pruning in transformers; stock llama.cpp
refuses it."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType
from transformers import AutoModelForCausalLM

import tiny_models
from ggufmoe.arch import architecture_for
from ggufmoe.pipeline.calibrate import calibrate
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.prune.criteria import PruneRequest, choose_experts
from ggufmoe.plan.per_layer import spread_experts
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.logprobs import compare, hf_logprobs
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.file import load_stats, save_stats
from prune_hf import prune_hf_model

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, numpy as np
from ggufmoe.runtime.logprobs import llama_logprobs
tokens = [int(t) for t in open(sys.argv[2]).read().split()]
np.save(sys.argv[3], llama_logprobs(sys.argv[1], tokens))
"""


@pytest.fixture(scope="module")
def patched_llama() -> Path:
    """The patched libllama.so (tools/build_patched_llama.py: minutes the first time, then cached)."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "build_patched_llama.py")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return Path(out.stdout.strip().splitlines()[-1])


def llama_logprobs_with(lib: Path, gguf_path: Path, tokens: list[int], tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "tokens.txt").write_text(" ".join(map(str, tokens)))
    import llama_cpp

    env = dict(os.environ)
    if lib:  # the patched llama.cpp, on this environment's ggml (tools/build_patched_llama.py)
        env.update(LLAMA_CPP_LIB_PATH=str(lib), LD_LIBRARY_PATH=str(Path(llama_cpp.__file__).parent / "lib"))
    return subprocess.run([sys.executable, "-c", CHILD, str(gguf_path), str(tmp / "tokens.txt"), str(tmp / "lp.npy")],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("family, keep", [("qwen3moe", 6), ("deepseek3", 12)])
def test_per_layer_counts_parity(patched_llama, family, keep, tmp_path, eval_tokens):
    tiny_models.build(family, tmp_path / "hf")
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:30000]
    save_stats(calibrate(tmp_path / "hf", text, ctx=256, progress=False), tmp_path / "stats.gguf")
    req = PruneRequest(keep=keep, criterion="reap", per_layer=True)
    out = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "p.gguf", types=TypeRules.parse("F32"),
                                                  stats=tmp_path / "stats.gguf", prune=req, progress=False))[0]
    arch, stats = architecture_for(HFSource(tmp_path / "hf")), load_stats(tmp_path / "stats.gguf")
    plan = spread_experts(arch, stats, choose_experts(arch, stats, req))
    counts = {il: len(k) for il, k in plan.kept.items()}
    assert len(set(counts.values())) > 1 and sum(counts.values()) <= keep * len(counts), counts
    field = GGUFReader(out).fields[f"{arch.gguf_arch}.expert_count"]
    assert field.types == [GGUFValueType.ARRAY, GGUFValueType.INT32]  # as llama.cpp's per-layer keys are
    written = [int(v) for v in field.contents()]
    assert [written[il] for il in sorted(counts)] == [counts[il] for il in sorted(counts)]

    stock = llama_logprobs_with(None, out, eval_tokens, tmp_path)
    assert stock.returncode != 0 and "Traceback" in stock.stderr  # refused at load, not misread
    ran = llama_logprobs_with(patched_llama, out, eval_tokens, tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    model = prune_hf_model(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval(), plan)
    result = compare(np.load(tmp_path / "lp.npy"), hf_logprobs(model, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < 1e-3, result

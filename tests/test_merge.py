"""Expert merging: the merged GGUF in llama.cpp equals the same merge applied in transformers."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

import tiny_models
from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.prune.criteria import PruneRequest, choose_experts
from ggufmoe.prune.merge import fold, merge_experts
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.logprobs import compare, hf_logprobs, llama_logprobs
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.file import load_stats, save_stats
from ggufmoe.pipeline.calibrate import calibrate
from prune_hf import prune_hf_model


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A tiny DeepSeek-V3 (4 groups of 4 experts, routing bias) and its streamed statistics."""
    d = tmp_path_factory.mktemp("merge")
    tiny_models.build("deepseek3", d / "hf")
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:30000]
    save_stats(calibrate(d / "hf", text, ctx=256, progress=False), d / "stats.gguf")
    return d


@pytest.mark.parametrize("criterion", ["frequency", "reap"])
def test_merged_parity(deepseek, criterion, eval_tokens):
    d = deepseek
    out = d / f"merged-{criterion}.gguf"
    req = PruneRequest(keep=8, criterion=criterion, merge=True)
    convert(d / "hf", ConvertOptions(out=out, types=TypeRules.parse("F32"), stats=d / "stats.gguf", prune=req,
                                     progress=False))
    arch, stats = architecture_for(HFSource(d / "hf")), load_stats(d / "stats.gguf")
    plan = merge_experts(arch, stats, choose_experts(arch, stats, req))
    assert plan.folds and all(len(f) == 8 for f in plan.folds.values())
    # groups stay intact: every expert folds into a kept expert of its own group
    for il, folds in plan.folds.items():
        assert sorted(j for f in folds for j, _ in f) == sorted(set(j for f in folds for j, _ in f))
        for k, f in zip(plan.kept[il], folds):
            assert all(j // 4 == k // 4 for j, _ in f) and abs(sum(w for _, w in f) - 1) < 1e-9
    assert any(len(f) > 1 for folds in plan.folds.values() for f in folds)  # something was merged
    model = prune_hf_model(AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval(), plan)
    result = compare(llama_logprobs(out, eval_tokens), hf_logprobs(model, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < 1e-3, result
    assert GGUFReader(out).fields["ggufmoe.prune.merged"].contents() is True
    dropped = prune_hf_model(AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval(),
                             choose_experts(arch, stats, req))
    assert compare(hf_logprobs(model, eval_tokens[:256]), hf_logprobs(dropped, eval_tokens[:256]),
                   eval_tokens[:256]).mean_abs_dnll > 1e-3  # merging is not dropping


def test_fold_by_similarity_and_saliency():
    sim = np.array([[1, .9, .1, .2], [.9, 1, .3, .1], [.1, .3, 1, .8], [.2, .1, .8, 1]])
    assert fold([0, 2], sim, np.array([3.0, 1.0, 2.0, 2.0])) == [[(0, 0.75), (1, 0.25)], [(2, 0.5), (3, 0.5)]]
    assert fold([0, 2], sim, np.zeros(4)) == [[(0, 1.0)], [(2, 1.0)]]  # nothing scored: kept as they are
    assert fold([0, 3], sim, np.ones(4), groups=2) == [[(0, 0.5), (1, 0.5)], [(3, 0.5), (2, 0.5)]]


def test_merging_needs_similarities(tmp_path):
    tiny_models.build("qwen3moe", tmp_path / "hf")
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:10000]
    save_stats(collect_stats(tmp_path / "hf", text, ctx=256, progress=False), tmp_path / "whole.gguf")
    with pytest.raises(GgufmoeError, match="merging needs expert similarities"):
        convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "m.gguf", types=TypeRules.parse("F32"),
                                                stats=tmp_path / "whole.gguf",
                                                prune=PruneRequest(keep=4, merge=True), progress=False))
    assert not (tmp_path / "m.gguf").exists()

"""Pruning: the pruned GGUF in llama.cpp matches the same pruning applied in transformers."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

import tiny_models
from ggufmoe.arch import architecture_for
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.errors import GgufmoeError
from ggufmoe.runtime.logprobs import compare, hf_logprobs, llama_logprobs
from ggufmoe.prune.criteria import Criterion, PruneRequest, choose, choose_experts
from prune_hf import prune_hf_model
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.file import save_stats
from ggufmoe.quant.rules import TypeRules

# arch -> (keep, adjusted top-k request)
CASES = {"qwen3moe": (6, dict(top_k_scale=1.5)), "deepseek3": (8, dict(top_k=4)), "glm4moe": (8, dict(top_k=4)),
         "gpt-oss": (5, dict(top_k=3)), "minimax-m2": (4, dict(top_k=3)),
         "ernie4_5-moe": (4, dict(top_k=3)), "dots1": (8, dict(top_k=4)), "qwen3next": (5, dict(top_k=3)),
         "qwen35moe": (5, dict(top_k=3)), "glm-dsa": (8, dict(top_k=4))}


@pytest.fixture(scope="module", params=list(CASES))
def calibrated(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    tiny_models.build(request.param, d / "hf")
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:30000]
    save_stats(collect_stats(d / "hf", text, ctx=256, progress=False), d / "stats.gguf")
    return request.param, d


def pruned_pair(d, req):
    """(pruned GGUF, the transformers model pruned the same way)."""
    from ggufmoe.stats.file import load_stats

    out = d / f"pruned-{req.criterion}-{req.top_k}-{req.top_k_scale}.gguf"
    convert(d / "hf", ConvertOptions(out=out, types=TypeRules.parse("F32"), stats=d / "stats.gguf", prune=req,
                                     progress=False))
    plan = choose_experts(architecture_for(HFSource(d / "hf")), load_stats(d / "stats.gguf"), req)
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    return out, prune_hf_model(model, plan), plan


# every criterion, and per family both the source's top-k and the adjusted one
@pytest.mark.parametrize("criterion, adjust_top_k", [(Criterion.FREQUENCY, True), (Criterion.ROUTING, False),
                                                     (Criterion.REAP, True)])
def test_pruned_parity(calibrated, criterion, adjust_top_k, eval_tokens):
    arch, d = calibrated
    keep, top_k = CASES[arch]
    req = PruneRequest(keep=keep, criterion=criterion, **(top_k if adjust_top_k else {}))
    gguf_path, model, plan = pruned_pair(d, req)
    result = compare(llama_logprobs(gguf_path, eval_tokens), hf_logprobs(model, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < 1e-3, result
    fields = GGUFReader(gguf_path).fields
    prefix = architecture_for(HFSource(d / "hf")).gguf_arch
    assert fields[f"{prefix}.expert_count"].contents() == keep
    assert fields[f"{prefix}.expert_used_count"].contents() == plan.top_k
    assert fields["ggufmoe.prune.criterion"].contents() == criterion
    for il, kept in plan.kept.items():
        assert list(fields[f"ggufmoe.prune.kept.{il}"].contents()) == kept


def test_pruning_changes_the_model(calibrated, eval_tokens):
    """Sanity: pruning moves the log-probs by more than the parity tolerance (the parity is not vacuous)."""
    arch, d = calibrated
    _, model, _ = pruned_pair(d, PruneRequest(keep=CASES[arch][0], criterion="frequency"))
    full = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    tokens = eval_tokens[:256]
    assert compare(hf_logprobs(model, tokens), hf_logprobs(full, tokens), tokens).mean_abs_dnll > 1e-3


def test_groups_stay_equal_and_contiguous(calibrated):
    _, d = calibrated
    a = architecture_for(HFSource(d / "hf"))
    if a.expert_groups is None:
        pytest.skip("no expert groups")
    from ggufmoe.stats.file import load_stats

    plan = choose_experts(a, load_stats(d / "stats.gguf"), PruneRequest(keep=8, criterion="reap"))
    for kept in plan.kept.values():
        assert kept == sorted(kept)
        assert [sum(1 for e in kept if e // 4 == g) for g in range(4)] == [2, 2, 2, 2]


def test_impossible_requests(calibrated):
    _, d = calibrated
    from ggufmoe.stats.file import load_stats

    a, stats = architecture_for(HFSource(d / "hf")), load_stats(d / "stats.gguf")
    with pytest.raises(GgufmoeError, match="cannot keep"):
        choose_experts(a, stats, PruneRequest(keep=0))
    with pytest.raises(GgufmoeError, match="top-k"):
        choose_experts(a, stats, PruneRequest(keep=a.expert_groups[0] if a.expert_groups else 2, top_k=5))
    if a.expert_groups:
        with pytest.raises(GgufmoeError, match="multiple of 4"):
            choose_experts(a, stats, PruneRequest(keep=10))


def test_choose_keeps_best_in_original_order():
    scores = np.array([0.1, 0.9, 0.0, 0.5, 0.7, 0.2])
    assert choose(scores, 3) == [1, 3, 4]
    assert choose(scores, 2, groups=2) == [1, 4]
    assert choose(np.zeros(4), 2) == [0, 1]  # ties: lower index first


def test_cli_prunes_and_explains_errors(calibrated, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    arch, d = calibrated
    if arch not in ("qwen3moe", "deepseek3"):
        pytest.skip("the command line is the same for every family (one with groups, one without)")
    exe = str(Path(sys.executable).with_name("ggufmoe"))
    out = tmp_path / "p.gguf"
    ok = subprocess.run([exe, "convert", d / "hf", "-o", out, "--type", "F16", "--stats", d / "stats.gguf",
                         "--keep-ratio", "0.5", "--criterion", "reap", "-q"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    prefix = architecture_for(HFSource(d / "hf")).gguf_arch
    n = architecture_for(HFSource(d / "hf")).n_expert
    assert GGUFReader(out).fields[f"{prefix}.expert_count"].contents() == n // 2
    bad = subprocess.run([exe, "convert", d / "hf", "-o", tmp_path / "x.gguf", "--keep", str(CASES[arch][0])],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: pruning needs calibration statistics: pass --stats (from `ggufmoe calibrate`)"]
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family", tiny_models.UNCALIBRATED)
def test_pruned_parity_without_calibration(family, tmp_path, eval_tokens):
    """A family that cannot be calibrated still prunes exactly to a given plan (and calibrating it is refused)."""
    from ggufmoe.prune.criteria import Pruning
    from ggufmoe.stats.stream import stream_stats

    tiny_models.build(family, tmp_path / "hf")
    arch = architecture_for(HFSource(tmp_path / "hf"))
    moe = sorted({s.layer for s in arch.tensors() if s.is_expert})
    kept = {il: sorted(np.random.default_rng(il).choice(arch.n_expert, 5, replace=False).tolist()) for il in moe}
    plan = Pruning(n_expert=arch.n_expert, top_k_source=arch.top_k, keep=5, top_k=arch.top_k, criterion="frequency",
                   alpha=0.5, kept=kept)
    out = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "p.gguf", types=TypeRules.parse("F32"), pruning=plan,
                                                  progress=False))[0]
    model = prune_hf_model(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval(), plan)
    result = compare(llama_logprobs(out, eval_tokens), hf_logprobs(model, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < 1e-3, result
    assert GGUFReader(out).fields[f"{arch.gguf_arch}.expert_count"].contents() == 5
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:5000]
    for calibrate in (collect_stats, stream_stats):
        with pytest.raises(GgufmoeError, match="cannot be calibrated"):
            calibrate(tmp_path / "hf", text, ctx=128, progress=False)


def test_gemma4_prunes_from_streamed_statistics(tmp_path, eval_tokens):
    """Gemma 4 calibrated streamed (its layers run again on their routed output, the pruning probe routing the
    residual), then pruned by REAP to 5 experts with one more per token: the file matches transformers pruned the
    same way (the router's rows and per-expert scales kept). The reference computes tanh GELU as llama.cpp's CPU
    backend does (from an f16 table): Gemma 4's pruned routes are near-tied often enough that the table's rounding
    alone moves the mean |dNLL| to ~2e-3."""
    from ggufmoe.stats.stream import stream_stats

    tiny_models.build("gemma4", tmp_path / "hf")
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:30000]
    save_stats(stream_stats(tmp_path / "hf", text, ctx=256, progress=False), tmp_path / "stats.gguf")
    gguf_path, model, plan = pruned_pair(tmp_path, PruneRequest(keep=5, criterion="reap", top_k=3))
    result = compare(llama_logprobs(gguf_path, eval_tokens), hf_logprobs(tiny_models.with_ggml_gelu(model), eval_tokens),
                     eval_tokens)
    assert result.mean_abs_dnll < 1e-3, result
    fields = GGUFReader(gguf_path).fields
    assert (fields["gemma4.expert_count"].contents(), fields["gemma4.expert_used_count"].contents()) == (5, 3)


def test_gemma4_gguf_source_prunes_as_the_checkpoint(tmp_path):
    """Pruning a Gemma 4 GGUF writes what pruning its checkpoint writes: the per-expert output scales
    (``ffn_down_exps.scale``) follow the kept experts, the router's input scale (``ffn_gate_inp.scale``) stays."""
    from ggufmoe.prune.criteria import Pruning

    tiny_models.build("gemma4", tmp_path / "hf")
    arch = architecture_for(HFSource(tmp_path / "hf"))
    kept = {il: [0, 2, 3, 5, 7] for il in range(arch.n_layer)}
    plan = Pruning(n_expert=arch.n_expert, top_k_source=arch.top_k, keep=5, top_k=arch.top_k, criterion="frequency",
                   alpha=0.5, kept=kept)

    def f32(src, name, pruning=None):
        return convert(src, ConvertOptions(out=tmp_path / name, types=TypeRules.parse("F32"), pruning=pruning,
                                           progress=False))[0]

    source = {t.name: np.array(t.data) for t in GGUFReader(f32(tmp_path / "hf", "full.gguf")).tensors}
    files = [f32(tmp_path / "hf", "a.gguf", plan), f32(tmp_path / "full.gguf", "b.gguf", plan)]
    a, b = ({t.name: np.array(t.data) for t in GGUFReader(f).tensors} for f in files)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    np.testing.assert_array_equal(a["blk.1.ffn_down_exps.scale"], source["blk.1.ffn_down_exps.scale"][kept[1]])
    np.testing.assert_array_equal(a["blk.1.ffn_gate_inp.scale"], source["blk.1.ffn_gate_inp.scale"])
    np.testing.assert_array_equal(a["blk.1.ffn_gate_inp.weight"], source["blk.1.ffn_gate_inp.weight"][kept[1]])

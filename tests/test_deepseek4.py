"""DeepSeek-V4: DeepSeek's own checkpoint layout and formats (FP8 with UE8M0 block scales, FP4 experts), the token
table written as llama.cpp reads it, and what llama.cpp cannot run refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tiny_models
from cli_run import assert_one_line_error, run
from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.prune.criteria import PruneRequest
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.logprobs import compare, hf_logprobs, llama_logprobs
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.stream import stream_stats

TOL = 1e-3


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """A tiny DeepSeek-V4 as transformers saves it (``hf``, the exact reference) and as DeepSeek ships it (``ds``)."""
    d = tmp_path_factory.mktemp("v4")
    tiny_models.build("deepseek4", d / "hf")
    tiny_models.save_v4_quantized(d / "hf", d / "ds")
    return d


def test_deepseek_layout_and_formats_convert_to_the_model_they_define(v4, tmp_path, eval_tokens):
    """FP8 matrices (UE8M0 128x128 scales) and FP4 experts read as torch dequantizes them: the F32 file is the model
    the dequantized weights define, under DeepSeek's own tensor names."""
    reference = AutoModelForCausalLM.from_pretrained(v4 / "hf", dtype=torch.float32).eval()
    out = convert(v4 / "ds", ConvertOptions(out=tmp_path / "m.gguf", types=TypeRules.parse("F32"), progress=False))[0]
    result = compare(llama_logprobs(out, eval_tokens), hf_logprobs(reference, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < TOL, result


def test_fp4_experts_are_copied_and_the_token_table_is_written_as_int32(v4, tmp_path, eval_tokens):
    """Written at the types the checkpoint stores (no --type), the experts are its own FP4 codes and scales as
    MXFP4 blocks, byte for byte, and llama.cpp runs the file; the hash layer's token -> experts table is I32."""
    out = convert(v4 / "ds", ConvertOptions(out=tmp_path / "kept.gguf", types=TypeRules.parse(None), progress=False))[0]
    source = {k: v.view(torch.uint8).numpy() if v.dtype.itemsize == 1 else v.numpy()
              for k, v in load_file(v4 / "ds" / "model.safetensors").items()}
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    experts = [n for n in tensors if n.endswith("_exps.weight")]
    assert len(experts) == 3 * 4
    proj = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
    for name in experts:
        t = tensors[name]
        assert t.tensor_type == T.MXFP4, name
        il, kind = int(name.split(".")[1]), name.split(".")[2]
        codes = [source[f"layers.{il}.ffn.experts.{e}.{proj[kind]}.weight"] for e in range(16)]
        scales = [source[f"layers.{il}.ffn.experts.{e}.{proj[kind]}.scale"] for e in range(16)]
        want = [tiny_models.repack_mxfp4(c.reshape(len(c), -1, 16), s) for c, s in zip(codes, scales)]
        assert np.array_equal(np.asarray(t.data).reshape(-1), np.concatenate(want)), name
    table = tensors["blk.0.ffn_gate_tid2eid.weight"]
    assert table.tensor_type == T.I32
    assert np.array_equal(np.asarray(table.data).reshape(-1), source["layers.0.ffn.gate.tid2eid"].reshape(-1))
    assert "blk.0.exp_probs_b.bias" not in tensors and "blk.1.exp_probs_b.bias" in tensors  # unused on a hash layer
    assert not any(n.startswith("mtp") for n in tensors)
    reference = AutoModelForCausalLM.from_pretrained(v4 / "hf", dtype=torch.float32).eval()
    # llama.cpp quantizes the activations of MXFP4 and Q8_0 matmuls on the CPU: close, not exact
    assert compare(llama_logprobs(out, eval_tokens), hf_logprobs(reference, eval_tokens), eval_tokens).kld_mean < 0.01


def test_fp4_and_ue8m0_values_are_torch_s(v4):
    """The reader's FP4 experts and UE8M0-scaled FP8 matrices equal torch's dequantization bit for bit."""
    raw = load_file(v4 / "ds" / "model.safetensors")
    src = HFSource(v4 / "ds")
    for name in ("layers.1.ffn.experts.3.w2.weight", "layers.1.attn.wq_b.weight"):
        scale = raw[name.removesuffix(".weight") + ".scale"]
        want = (tiny_models.from_v4_fp4(raw[name], scale) if raw[name].dtype == torch.int8
                else tiny_models.from_fp8_blocks(raw[name], scale.float()))
        assert src.shape(name) == tuple(want.shape)
        assert np.array_equal(src.get(name).view(np.uint32), want.numpy().view(np.uint32)), name
        assert np.array_equal(src.get_rows(name, 3, 9), want[3:9].numpy()), name


def test_streamed_statistics_of_deepseek_s_checkpoint_are_the_whole_model_s(v4):
    """Calibration one layer at a time, on DeepSeek's layout and formats (four streams between the layers, the hash
    layer routed by the batch's token ids, the routed output added after the layer through each stream's weights):
    the statistics of transformers' whole model on the dequantized weights."""
    from test_stream import calib_text, worst_difference

    args = {"ctx": 128, "max_tokens": 1024, "progress": False}
    streamed = stream_stats(v4 / "ds", calib_text(), **args)
    whole = collect_stats(v4 / "hf", calib_text(), **args)
    whole.source = streamed.source
    what, diff = worst_difference(streamed, whole)
    assert diff < 1e-3, (what, diff)
    assert sorted(streamed.layers) == [0, 1, 2, 3] and all(s.counts.sum() > 0 for s in streamed.layers.values())


@pytest.mark.parametrize("change, reason", [
    (dict(layer_types=["sliding_attention", "compressed_sparse_attention"] * 2),
     "llama.cpp runs only models with both 4 and 128 layers"),
    (dict(mlp_layer_types=["moe", "hash_moe", "moe", "moe"]), "llama.cpp routes by the token table only in leading"),
    (dict(hc_mult=2), "hc_mult 2 (llama.cpp's graph has 4 streams)"),
    (dict(scoring_func="sigmoid"), "scoring_func 'sigmoid' (llama.cpp: sqrtsoftplus only)"),
])
def test_what_llama_cpp_cannot_run_is_refused(tmp_path, change, reason):
    tiny_models.build("deepseek4", tmp_path / "hf", config=tiny_models.deepseek4_config(**change))
    proc = run("convert", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--type", "F32")
    assert_one_line_error(proc, reason)
    assert not (tmp_path / "m.gguf").exists()



@pytest.fixture(scope="module")
def v4_stats(v4):
    """Streamed statistics of the tiny DeepSeek-V4 (with the expert similarities its pruning probes measure)."""
    from ggufmoe.prune.criteria import kept_sets
    from ggufmoe.stats.file import save_stats
    from test_stream import calib_text

    arch = architecture_for(HFSource(v4 / "hf"))
    save_stats(stream_stats(v4 / "hf", calib_text(), ctx=128, max_tokens=2048, progress=False,
                            kept_sets=kept_sets(arch)), v4 / "stats.gguf")
    return v4 / "stats.gguf"


def test_pruned_hash_layer_redirects_its_tokens(v4, v4_stats, tmp_path, eval_tokens):
    """Pruned to 10 of 16 experts: the hash layer's table sends each entry of a removed expert to the most similar
    kept expert (by the similarities the calibration measured) that the token does not use yet, renumbered; the
    GGUF equals the same pruning applied in transformers."""
    from ggufmoe.prune.criteria import choose_experts
    from ggufmoe.prune.redirect import with_table_orders
    from ggufmoe.stats.file import load_stats
    from ggufmoe.stats.local_errors import local_errors
    from prune_hf import prune_hf_model

    arch, stats = architecture_for(HFSource(v4 / "hf")), load_stats(v4_stats)
    plan = with_table_orders(list(arch.tensors()), stats, choose_experts(arch, stats, PruneRequest(keep=10)))
    similarity = np.asarray(local_errors(stats).similarity["0"])
    assert np.array_equal(plan.orders[0][:, 0], np.argmax(similarity, axis=1))  # an expert is most like itself
    out = convert(v4 / "hf", ConvertOptions(out=tmp_path / "p.gguf", types=TypeRules.parse("F32"), stats=v4_stats,
                                            prune=PruneRequest(keep=10), progress=False))[0]
    table = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.ffn_gate_tid2eid.weight")
    got = np.asarray(table.data).reshape(-1, 3)
    source = load_file(v4 / "hf" / "model.safetensors")["model.layers.0.ffn.gate.tid2eid"].numpy()
    kept = plan.kept[0]
    assert got.min() >= 0 and got.max() < 10 and all(len(set(row)) == 3 for row in got.tolist())
    still = np.isin(source, kept)
    assert np.array_equal(np.asarray(kept)[got][still], source[still])  # kept entries only renumbered
    model = prune_hf_model(AutoModelForCausalLM.from_pretrained(v4 / "hf", dtype=torch.float32).eval(), plan)
    result = compare(llama_logprobs(out, eval_tokens), hf_logprobs(model, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < TOL, result


def test_pruning_errors_of_the_hash_layer_are_measured_and_top_k_stays(v4, v4_stats):
    """The calibration measures what pruning costs in the hash layer too (its tokens rerouted through the redirected
    table); a top-k change is refused with the reason."""
    from ggufmoe.prune.criteria import choose_experts
    from ggufmoe.stats.file import load_stats
    from ggufmoe.stats.local_errors import local_errors

    arch, stats = architecture_for(HFSource(v4 / "hf")), load_stats(v4_stats)
    prune = local_errors(stats).prune
    assert sorted(prune) == ["0", "1", "2", "3"]
    costs = prune["0"]["routing"]
    assert all(v > 0 for v in costs.values()) and not any("@" in k for k in costs)  # no top-k variants
    with pytest.raises(GgufmoeError, match="cannot change: the first 1 layer"):
        choose_experts(arch, stats, PruneRequest(keep=10, top_k=2))


def test_a_gguf_source_prunes_as_the_checkpoint(v4, tmp_path):
    """Pruning DeepSeek-V4 from a GGUF (an F32 one we wrote) writes what pruning its checkpoint writes: the token table
    redirected the same way (by the experts' weights, without statistics), kept as I32 at any --type."""
    from ggufmoe.prune.criteria import Pruning

    arch = architecture_for(HFSource(v4 / "hf"))
    kept = {il: [0, 2, 3, 5, 7, 8, 9, 11, 12, 15] for il in range(arch.n_layer)}
    plan = Pruning(n_expert=16, top_k_source=3, keep=10, top_k=3, criterion="frequency", alpha=0.5, kept=kept)

    def f32(src, name, pruning=None, types="F32"):
        return convert(src, ConvertOptions(out=tmp_path / name, types=TypeRules.parse(types), pruning=pruning,
                                           progress=False))[0]

    files = [f32(v4 / "hf", "a.gguf", plan), f32(f32(v4 / "hf", "full.gguf"), "b.gguf", plan)]
    a, b = ({t.name: np.array(t.data) for t in GGUFReader(f).tensors} for f in files)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    q = {t.name: t for t in GGUFReader(f32(tmp_path / "full.gguf", "q.gguf", types="Q8_0")).tensors}
    assert q["blk.0.ffn_gate_tid2eid.weight"].tensor_type == T.I32
    assert q["blk.0.attn_q_b.weight"].tensor_type == T.Q8_0

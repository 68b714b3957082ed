"""F32 GGUF in llama.cpp reproduces transformers' per-token log-probs, for every architecture."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_models
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.runtime.logprobs import compare, hf_logprobs, llama_logprobs
from ggufmoe.quant.rules import TypeRules

TOL = 1e-3


def f32(src, out):
    return convert(src, ConvertOptions(out=out, types=TypeRules.parse("F32"), progress=False))[0]


@pytest.mark.parametrize("arch", tiny_models.FAMILIES)
def test_tiny_model_parity(arch, tmp_path, eval_tokens):
    model = tiny_models.build(arch, tmp_path / "hf")
    result = compare(llama_logprobs(f32(tmp_path / "hf", tmp_path / "m.gguf"), eval_tokens),
                     hf_logprobs(model, eval_tokens), eval_tokens)
    assert len(eval_tokens) >= 1024
    assert result.mean_abs_dnll < TOL, result


def test_gemma4_text_only_checkpoint(tmp_path, eval_tokens):
    """Gemma 4 saved by transformers' Gemma4ForCausalLM (``model.`` prefix, a flat config), with tied embeddings,
    its own value projections in the full layers (their KV heads then the sliding layers') and no shared KV. The
    reference computes tanh GELU from llama.cpp's f16 table: on these weights the table's rounding alone flips
    enough near-tied routes to move the mean |dNLL| against plain transformers to ~4e-3 (the family's parity test,
    on other weights, stays under 1e-3 without it)."""
    cfg = tiny_models.gemma4_config(attention_k_eq_v=False, num_kv_shared_layers=0).get_text_config()
    cfg.architectures, cfg.tie_word_embeddings = ["Gemma4ForCausalLM"], True
    model = tiny_models.build("gemma4", tmp_path / "hf", config=cfg)
    assert type(model).__name__ == "Gemma4ForCausalLM"
    result = compare(llama_logprobs(f32(tmp_path / "hf", tmp_path / "m.gguf"), eval_tokens),
                     hf_logprobs(tiny_models.with_ggml_gelu(model), eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < TOL, result


def test_deepseek_routing_is_exercised(tmp_path):
    """The tiny DeepSeek-V3 has real group routing and a non-zero routing bias."""
    from gguf import GGUFReader

    tiny_models.build("deepseek3", tmp_path / "hf")
    r = GGUFReader(f32(tmp_path / "hf", tmp_path / "m.gguf"))
    assert r.fields["deepseek2.expert_group_count"].contents() == 4
    assert r.fields["deepseek2.expert_group_used_count"].contents() == 2
    bias = next(t for t in r.tensors if t.name == "blk.1.exp_probs_b.bias")
    assert abs(bias.data).max() > 0.1


def test_deepseek_fp8_parity(tmp_path, eval_tokens):
    """An FP8 checkpoint with 128x128 block scales converts to the model its dequantized weights define."""
    cfg = tiny_models.deepseek3_config(hidden_size=256, moe_intermediate_size=160)
    tiny_models.build("deepseek3", tmp_path / "hf", config=cfg)
    tiny_models.save_fp8(tmp_path / "hf", tmp_path / "fp8")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    result = compare(llama_logprobs(f32(tmp_path / "fp8", tmp_path / "m.gguf"), eval_tokens),
                     hf_logprobs(reference, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < TOL, result


def test_reference_model_parity(ref_f32_gguf, ref_model, eval_tokens):
    result = compare(llama_logprobs(ref_f32_gguf, eval_tokens), hf_logprobs(ref_model, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < TOL, result
    assert result.ppl < 20  # a trained model, not noise


def test_deepseek_yarn_parity(tmp_path, eval_tokens):
    """DeepSeek-V3's own YaRN rope scaling (factor 40, mscale_all_dim 1, beta 32/1) matches transformers."""
    from gguf import GGUFReader

    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=64,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    cfg = tiny_models.deepseek3_config(rope_parameters=rope, max_position_embeddings=2560)
    model = tiny_models.build("deepseek3", tmp_path / "hf", config=cfg)
    gguf_path = f32(tmp_path / "hf", tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in GGUFReader(gguf_path).fields.items()}
    assert fields["deepseek2.rope.scaling.yarn_beta_fast"] == 32.0
    assert fields["deepseek2.rope.scaling.yarn_beta_slow"] == 1.0
    result = compare(llama_logprobs(gguf_path, eval_tokens), hf_logprobs(model, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < TOL, result


def mtp_cases():
    """(family, config with one more layer: the MTP block, keys the shipped config derives, MoE layers of the trunk)."""
    glm = tiny_models.configs()["glm4moe"]
    glm.num_hidden_layers += 1
    dsa = tiny_models.glm_dsa_config(num_hidden_layers=5, indexer_types=["full", "shared", "full", "shared", "full"])
    return [("glm4moe", glm, (), [1, 2]), ("glm-dsa", dsa, ("layer_types", "mlp_layer_types"), [1, 2, 3])]


@pytest.mark.parametrize("family, cfg, derived, moe_layers", mtp_cases(), ids=["glm4moe", "glm-dsa"])
def test_multi_token_prediction_layer_is_left_out(tmp_path, eval_tokens, family, cfg, derived, moe_layers):
    """GLM-4.5 and GLM-5 store an MTP block as layer num_hidden_layers (GLM-5's with an indexer of its own): convert
    and calibrate skip it."""
    import json

    from safetensors.torch import load_file, save_file

    from ggufmoe.stats.stream import stream_stats

    tiny_models.build(family, tmp_path / "hf", config=cfg)
    shard = next((tmp_path / "hf").glob("*.safetensors"))
    tensors = load_file(shard)
    n = cfg.num_hidden_layers - 1  # the last layer becomes the MTP block, with its own extra tensors
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(cfg.hidden_size, 2 * cfg.hidden_size)
    tensors[f"model.layers.{n}.enorm.weight"] = torch.ones(cfg.hidden_size)
    save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    for key in derived:  # derived from the others, as the family ships its configuration
        del config[key]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    result = compare(llama_logprobs(f32(tmp_path / "hf", tmp_path / "m.gguf"), eval_tokens),
                     hf_logprobs(reference, eval_tokens), eval_tokens)
    assert result.mean_abs_dnll < TOL, result
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:20_000]
    stats = stream_stats(tmp_path / "hf", text, ctx=128, max_tokens=512, progress=False)
    assert sorted(stats.layers) == moe_layers


def test_gpt_oss_mxfp4_checkpoint(tmp_path, eval_tokens):
    """OpenAI's MXFP4 experts: converted to F32 they are the model transformers dequantizes; written as MXFP4
    (the default for them) they are the checkpoint's own codes and scales, and llama.cpp runs the file."""
    from gguf import GGMLQuantizationType as T, GGUFReader
    from safetensors.numpy import load_file

    tiny_models.build("gpt-oss", tmp_path / "hf")
    tiny_models.save_mxfp4(tmp_path / "hf", tmp_path / "mx")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    want = hf_logprobs(reference, eval_tokens)
    assert compare(llama_logprobs(f32(tmp_path / "mx", tmp_path / "f32.gguf"), eval_tokens), want,
                   eval_tokens).mean_abs_dnll < TOL

    kept = convert(tmp_path / "mx", ConvertOptions(out=tmp_path / "kept.gguf", types=TypeRules.parse(None),
                                                   progress=False))[0]
    source = {k: v for f in (tmp_path / "mx").glob("*.safetensors") for k, v in load_file(f).items()}
    experts = [t for t in GGUFReader(kept).tensors if t.name.endswith("_exps.weight")]
    assert len(experts) == 3 * reference.config.num_hidden_layers
    for t in experts:
        assert t.tensor_type == T.MXFP4, t.name
        il, kind = int(t.name.split(".")[1]), t.name.split(".")[2]
        name = f"model.layers.{il}.mlp.experts.{'down_proj' if kind == 'ffn_down_exps' else 'gate_up_proj'}"
        rows = {"ffn_gate_exps": slice(0, None, 2), "ffn_up_exps": slice(1, None, 2)}.get(kind, slice(None))
        blocks, scales = source[name + "_blocks"][:, rows], source[name + "_scales"][:, rows]
        assert np.array_equal(np.asarray(t.data).reshape(-1), tiny_models.repack_mxfp4(blocks, scales)), t.name
    # llama.cpp quantizes activations for MXFP4 (and Q8_0) matmuls on the CPU, so the file is not bit-exact:
    # it stays closer to transformers than the same experts requantized to Q8_0
    q8 = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "q8.gguf", types=TypeRules.parse(None, ["_exps=Q8_0"]),
                                                 progress=False))[0]
    got = compare(llama_logprobs(kept, eval_tokens), want, eval_tokens).mean_abs_dnll
    assert got < compare(llama_logprobs(q8, eval_tokens), want, eval_tokens).mean_abs_dnll


def test_gpt_oss_untruncated_yarn_is_noted(tmp_path):
    """gpt-oss ships YaRN with truncate=false, which llama.cpp rounds: the conversion says so."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = tiny_models.configs()["gpt-oss"]
    cfg.rope_parameters = dict(tiny_models.GPT_OSS_YARN, truncate=False)
    tiny_models.build("gpt-oss", tmp_path / "hf", config=cfg)
    exe = str(Path(sys.executable).with_name("ggufmoe"))
    proc = subprocess.run([exe, "convert", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--type", "F16", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "note: YaRN with truncate=false" in proc.stderr


def test_llama4_long_context_parity(tmp_path):
    """Llama-4 past llama.cpp's built-in chunk of 8192 tokens, where the chunked layers stop seeing the first
    chunk and the rope-less layers' temperature starts to grow; with Llama-3 rope scaling (rope_freqs)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_models.REF_MODEL / "tokenizer.json"))
    text = (tiny_models.TEST_DATA / "eval_doc.txt").read_text()
    tokens = tok.encode(text, add_special_tokens=False).ids[:8400]
    assert len(tokens) == 8400
    cfg = tiny_models.configs()["llama4"]
    cfg.rope_parameters = dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, high_freq_factor=1.0,
                               low_freq_factor=1.0, original_max_position_embeddings=8192)
    model = tiny_models.build("llama4", tmp_path / "hf", config=cfg)
    result = compare(llama_logprobs(f32(tmp_path / "hf", tmp_path / "m.gguf"), tokens), hf_logprobs(model, tokens),
                     tokens)
    assert result.mean_abs_dnll < TOL, result


def test_glm_dsa_sparse_attention_selects(tmp_path, eval_tokens):
    """The tiny GLM-5's indexer really selects (its top-k changes transformers' output), the GGUF says which
    layers run their own indexer, and only those carry its tensors; its per-head weights stay F32 in a Q8_0 file."""
    from gguf import GGMLQuantizationType, GGUFReader

    model = tiny_models.build("glm-dsa", tmp_path / "hf")
    r = GGUFReader(f32(tmp_path / "hf", tmp_path / "m.gguf"))
    assert list(r.fields["glm-dsa.attention.indexer.types"].contents()) == [True, False, True, False]
    assert r.fields["glm-dsa.attention.indexer.top_k"].contents() == 64 < len(eval_tokens)
    indexers = sorted(t.name for t in r.tensors if ".indexer." in t.name)
    assert {int(n.split(".")[1]) for n in indexers} == {0, 2} and len(indexers) == 10
    q8 = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "q8.gguf", types=TypeRules.parse("Q8_0"),
                                                 progress=False))[0]
    types = {t.name: t.tensor_type for t in GGUFReader(q8).tensors}
    assert types["blk.0.indexer.proj.weight"] == GGMLQuantizationType.F32
    assert types["blk.0.indexer.attn_k.weight"] == GGMLQuantizationType.Q8_0
    sparse = hf_logprobs(model, eval_tokens)
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.index_topk = len(eval_tokens)
    assert compare(sparse, hf_logprobs(model, eval_tokens), eval_tokens).mean_abs_dnll > 10 * TOL


@pytest.mark.parametrize("change, reason", [
    (dict(indexer_types=["shared", "full", "full", "shared"]), "first layer's indexer is 'shared'"),
    (dict(mlp_layer_types=["dense", "sparse", "dense", "sparse"]), "dense blocks only before the first MoE block"),
    (dict(index_head_dim=96), "index_head_dim 96"),
])
def test_glm_dsa_refuses_what_llama_cpp_cannot_run(tmp_path, change, reason):
    from ggufmoe.errors import GgufmoeError

    tiny_models.build("glm-dsa", tmp_path / "hf", config=tiny_models.glm_dsa_config(**change))
    with pytest.raises(GgufmoeError, match=reason):
        f32(tmp_path / "hf", tmp_path / "m.gguf")

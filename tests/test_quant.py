"""The quantization engine is llama.cpp's: every type converts, loads and runs; errors are clear."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize, quantize as gguf_quantize

import tiny_models
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.errors import GgufmoeError
from ggufmoe.runtime.logprobs import compare, llama_logprobs
from ggufmoe.model.qtypes import USER_TYPES, effective_type
from ggufmoe.quant.ggml import Quantizer, requires_imatrix
from ggufmoe.quant.rules import TypeRules


@pytest.fixture(scope="module")
def ref_imatrix(tmp_path_factory):
    from ggufmoe.stats.collect import collect_imatrix
    from ggufmoe.stats.imatrix import save_imatrix

    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:60000]
    path = tmp_path_factory.mktemp("imatrix") / "ref.imatrix.gguf"
    save_imatrix(collect_imatrix(tiny_models.REF_MODEL, text, ctx=512, progress=False), path)
    return path


def test_q8_0_matches_gguf_py_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    with Quantizer(2) as q:
        ours = q.quantize(x, T.Q8_0)
    assert ours.tobytes() == gguf_quantize(x, T.Q8_0).tobytes()


@pytest.mark.parametrize("t", [T.Q6_K, T.Q4_K, T.Q2_K, T.IQ4_XS])
def test_round_trip_error_grows_as_bits_fall(t):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    with Quantizer(2) as q:
        y = dequantize(q.quantize(x, t), t).reshape(x.shape)
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < {T.Q6_K: 0.02, T.Q4_K: 0.1, T.IQ4_XS: 0.1, T.Q2_K: 0.4}[t]


def test_threads_do_not_change_bytes():
    x = np.random.default_rng(2).standard_normal((1000, 256)).astype(np.float32)
    with Quantizer(1) as one, Quantizer(4) as four:
        assert one.quantize(x, T.Q4_K).tobytes() == four.quantize(x, T.Q4_K).tobytes()


def test_fallback_types():
    assert effective_type(T.Q4_K, 256) == T.Q4_K
    assert effective_type(T.Q4_K, 64) == T.Q5_0
    assert effective_type(T.IQ2_XXS, 96) == T.IQ4_NL
    assert effective_type(T.Q6_K, 48) == T.F16


def test_imatrix_types_need_an_imatrix(tmp_path):
    with pytest.raises(GgufmoeError, match="needs an importance matrix"):
        convert(tiny_models.REF_MODEL, ConvertOptions(out=tmp_path / "x.gguf", types=TypeRules.parse("IQ2_XXS"),
                                                      progress=False))
    assert not list(tmp_path.iterdir())


def test_tensor_type_rules_first_match_wins(tmp_path):
    types = TypeRules.parse("Q8_0", ["ffn_down_exps=Q6_K", "ffn_.*_exps=Q4_K", "attn_.*=Q5_K"])
    out = convert(tiny_models.REF_MODEL, ConvertOptions(out=tmp_path / "m.gguf", types=types, progress=False))[0]
    got = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert got["blk.0.ffn_down_exps.weight"] == T.Q6_K
    assert got["blk.0.ffn_up_exps.weight"] == T.Q4_K
    assert got["blk.0.attn_q.weight"] == T.Q5_K
    assert got["blk.0.attn_q_norm.weight"] == T.F32
    assert got["blk.0.ffn_gate_inp.weight"] == T.F32
    assert got["token_embd.weight"] == T.Q8_0


@pytest.mark.parametrize("name", [n for n in USER_TYPES if n != "F32"])
def test_every_type_converts_loads_and_runs(name, tmp_path, ref_imatrix, ref_f32_gguf, eval_tokens):
    out = convert(tiny_models.REF_MODEL, ConvertOptions(out=tmp_path / f"{name}.gguf", types=TypeRules.parse(name),
                                                        imatrix=ref_imatrix, progress=False))[0]
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == USER_TYPES[name]
    assert types["token_embd.weight"] == (T.Q2_K if requires_imatrix(USER_TYPES[name]) else USER_TYPES[name])
    tokens = eval_tokens[:256]
    result = compare(llama_logprobs(out, tokens), llama_logprobs(ref_f32_gguf, tokens), tokens)
    assert np.isfinite(result.kld_mean) and result.kld_mean < 2.0, result

"""llama.cpp's own quantizer (llama_model_quantize) run from Python on our F32 GGUF with our imatrix."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader

import tiny_models
from ggufmoe.errors import GgufmoeError
from ggufmoe.stats.imatrix import ImatrixEntry, Imatrix, load_imatrix, save_imatrix
from ggufmoe.model.qtypes import MIXES
from ggufmoe.runtime.llama_quantize import failure_reason, llama_quantize
from ggufmoe.runtime.logprobs import compare, llama_logprobs
from ggufmoe.quant.ggml import Quantizer

TOKENS = 512  # evaluation tokens for KL


@pytest.fixture(scope="module")
def imatrix():
    from ggufmoe.stats.collect import collect_imatrix

    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:40000]
    return collect_imatrix(tiny_models.REF_MODEL, text, ctx=512, progress=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("llama_quantize")


@pytest.fixture(scope="module")
def tokens(eval_tokens):
    return eval_tokens[:TOKENS]


@pytest.fixture(scope="module")
def base_logp(ref_f32_gguf, tokens):
    return llama_logprobs(ref_f32_gguf, tokens)


@pytest.fixture(scope="module")
def q2k(ref_f32_gguf, work, imatrix):
    """Q2_K made by llama.cpp with and without our imatrix."""
    return {"imatrix": llama_quantize(ref_f32_gguf, work / "q2k-imat.gguf", "Q2_K", imatrix=imatrix),
            "plain": llama_quantize(ref_f32_gguf, work / "q2k-plain.gguf", "Q2_K")}


@pytest.fixture(scope="module")
def kld(tokens, base_logp):
    """KL divergence to the F32 file, once per file."""
    cache = {}

    def kld(path) -> float:
        if path not in cache:
            cache[path] = compare(llama_logprobs(path, tokens), base_logp, tokens).kld_mean
        return cache[path]
    return kld


def tensor_types(path) -> dict[str, T]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


def field(path, key):
    f = GGUFReader(path).get_field(key)
    return None if f is None else f.contents()


def test_ftypes_are_llama_cpp_enum_values():
    import llama_cpp

    for name, value in MIXES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == value, name
    for mix in ("Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_L Q3_K_M Q3_K_S Q2_K Q2_K_S IQ4_XS IQ4_NL IQ3_M "
                "IQ3_S IQ3_XS IQ3_XXS IQ2_M IQ2_S IQ2_XS IQ2_XXS IQ1_M IQ1_S F16 BF16").split():
        assert mix in MIXES


def test_q4_k_m_without_imatrix(ref_f32_gguf, tmp_path, kld):
    out = llama_quantize(ref_f32_gguf, tmp_path / "q4km.gguf", "q4_k_m", threads=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4km.gguf"]
    types = tensor_types(out)
    assert types["blk.0.ffn_up_exps.weight"] == T.Q4_K
    assert types["blk.0.attn_q.weight"] == T.Q4_K
    assert types["blk.0.ffn_gate_inp.weight"] == T.F32  # routers stay F32
    assert types["output.weight"] == T.Q6_K
    assert field(out, "general.file_type") == MIXES["Q4_K_M"]
    assert field(out, "quantize.imatrix.entries_count") is None
    assert 0 < kld(out) < 0.1


def test_iq2_xxs_without_imatrix_fails_in_one_line(ref_f32_gguf, tmp_path):
    with pytest.raises(GgufmoeError) as e:
        llama_quantize(ref_f32_gguf, tmp_path / "iq2xxs.gguf", "IQ2_XXS")
    msg = str(e.value)
    assert "\n" not in msg
    assert "requires an imatrix" in msg and "IQ2_XXS" in msg, msg
    assert not list(tmp_path.iterdir())  # neither output nor temporary files


def test_iq2_xxs_with_our_imatrix(ref_f32_gguf, tmp_path, imatrix, kld, q2k):
    """IQ2_XXS refuses to run without an imatrix: that it runs proves llama.cpp took ours."""
    out = llama_quantize(ref_f32_gguf, tmp_path / "iq2xxs.gguf", "IQ2_XXS", imatrix=imatrix)
    types = tensor_types(out)
    for layer in range(6):
        for kind in ("gate", "up", "down"):
            assert types[f"blk.{layer}.ffn_{kind}_exps.weight"] == T.IQ2_XXS
    assert types["blk.0.ffn_gate_inp.weight"] == T.F32
    assert field(out, "general.file_type") == MIXES["IQ2_XXS"]
    assert field(out, "quantize.imatrix.entries_count") == len(imatrix.entries)
    assert field(out, "quantize.imatrix.chunks_count") == imatrix.chunk_count
    assert field(out, "quantize.imatrix.dataset") == imatrix.datasets[0]
    assert quantized_as_ours(ref_f32_gguf, out, "blk.2.ffn_up_exps.weight", imatrix)
    k = kld(out)
    assert np.isfinite(k) and 0 < k < 2.0
    assert k > kld(q2k["imatrix"])  # 2.06 bits per weight is worse than Q2_K's 2.6


def quantized_as_ours(f32_gguf, out, name: str, imatrix: Imatrix | None) -> bool:
    """Whether llama.cpp's bytes for ``name`` in ``out`` equal ggml's quantizer called per expert
    on the F32 data with that expert's row of ``imatrix`` (or none)."""
    src = {t.name: t for t in GGUFReader(f32_gguf).tensors}[name]
    made = {t.name: t for t in GGUFReader(out).tensors}[name]
    data = np.asarray(src.data, dtype=np.float32)  # (n_expert, rows, ne0)
    with Quantizer(2) as q:
        ours = [q.quantize(data[e], made.tensor_type, imatrix.row(name, e) if imatrix else None)
                for e in range(data.shape[0])]
    return np.asarray(made.data).tobytes() == np.concatenate(ours).tobytes()


def test_q2_k_uses_each_experts_importance_row(ref_f32_gguf, imatrix, q2k):
    name = "blk.1.ffn_gate_exps.weight"
    assert tensor_types(q2k["imatrix"])[name] == tensor_types(q2k["plain"])[name] == T.Q2_K
    assert quantized_as_ours(ref_f32_gguf, q2k["imatrix"], name, imatrix)
    assert quantized_as_ours(ref_f32_gguf, q2k["plain"], name, None)
    assert not quantized_as_ours(ref_f32_gguf, q2k["plain"], name, imatrix)


def test_q2_k_is_better_with_our_imatrix(q2k, kld):
    with_imatrix, without = kld(q2k["imatrix"]), kld(q2k["plain"])
    assert np.isfinite(with_imatrix) and np.isfinite(without)
    assert with_imatrix < without, (with_imatrix, without)


def test_imatrix_file_round_trip_gives_the_same_file(ref_f32_gguf, tmp_path, imatrix, q2k):
    save_imatrix(imatrix, tmp_path / "ref.imatrix.gguf")
    out = llama_quantize(ref_f32_gguf, tmp_path / "q2k.gguf", "Q2_K", imatrix=load_imatrix(tmp_path / "ref.imatrix.gguf"))
    assert out.read_bytes() == q2k["imatrix"].read_bytes()


def test_tensor_type_overrides_first_match_wins(ref_f32_gguf, tmp_path, imatrix):
    rules = [("ffn_down_exps", "Q8_0"), (r"ffn_(gate|up|down)_exps", "Q4_K"), (r"blk\.[0-2]\.attn_", "IQ2_XXS"),
             ("ffn_gate_inp", "Q8_0")]
    out = llama_quantize(ref_f32_gguf, tmp_path / "mix.gguf", "Q3_K_M", imatrix=imatrix, tensor_types=rules)
    types = tensor_types(out)
    assert types["blk.0.ffn_down_exps.weight"] == T.Q8_0
    assert types["blk.5.ffn_gate_exps.weight"] == types["blk.5.ffn_up_exps.weight"] == T.Q4_K
    assert types["blk.2.attn_q.weight"] == types["blk.0.attn_v.weight"] == T.IQ2_XXS
    assert types["blk.3.attn_q.weight"] == T.Q3_K  # the mix's own choice
    assert types["blk.0.ffn_gate_inp.weight"] == T.F32  # llama.cpp never quantizes routers


def test_override_to_an_imatrix_type_needs_the_imatrix(ref_f32_gguf, tmp_path):
    with pytest.raises(GgufmoeError, match=r"requires an imatrix.*offending tensor: blk\.0\.ffn_down_exps"):
        llama_quantize(ref_f32_gguf, tmp_path / "x.gguf", "Q4_K_M", tensor_types=[("ffn_down_exps", "IQ1_S")])
    assert not list(tmp_path.iterdir())


def test_llama_cpp_refuses_an_imatrix_of_the_wrong_shape(ref_f32_gguf, tmp_path, imatrix):
    name = "blk.0.ffn_up_exps.weight"
    bad = Imatrix(dict(imatrix.entries), imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)
    bad.entries[name] = ImatrixEntry(np.ones((3, 256), np.float32), np.ones(3, np.float32))
    with pytest.raises(GgufmoeError, match=f"imatrix size 768 is different from tensor size 6144 for {name}"):
        llama_quantize(ref_f32_gguf, tmp_path / "x.gguf", "Q2_K", imatrix=bad)
    assert not list(tmp_path.iterdir())


def test_bad_arguments_fail_before_llama_cpp(ref_f32_gguf, tmp_path):
    with pytest.raises(GgufmoeError, match="unknown llama.cpp mix 'Q4_K_X'"):
        llama_quantize(ref_f32_gguf, tmp_path / "x.gguf", "Q4_K_X")
    with pytest.raises(GgufmoeError, match="unknown type 'Q9_K'"):
        llama_quantize(ref_f32_gguf, tmp_path / "x.gguf", "Q4_K_M", tensor_types=[("attn", "Q9_K")])
    with pytest.raises(GgufmoeError, match="bad regular expression"):
        llama_quantize(ref_f32_gguf, tmp_path / "x.gguf", "Q4_K_M", tensor_types=[("attn_(", "Q8_0")])
    with pytest.raises(GgufmoeError, match="only to quantized mixes"):
        llama_quantize(ref_f32_gguf, tmp_path / "x.gguf", "F16", tensor_types=[("attn", "Q8_0")])
    with pytest.raises(GgufmoeError, match="no such GGUF file"):
        llama_quantize(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q4_K_M")
    assert not list(tmp_path.iterdir())


def test_a_file_llama_cpp_cannot_read_is_one_line(tmp_path):
    src = tmp_path / "broken.gguf"
    src.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(GgufmoeError) as e:
        llama_quantize(src, tmp_path / "x.gguf", "Q4_K_M")
    assert "\n" not in str(e.value) and str(e.value).startswith("llama.cpp could not quantize broken.gguf to Q4_K_M: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_failure_reason_picks_llama_cpps_line():
    log = ("llama_model_quantize_impl: loading model\n"
           "/src/vendor/llama.cpp/ggml/src/ggml.c:1234: GGML_ASSERT(n_dims <= 4) failed\n"
           "#0 0x7f... in ggml_abort\n")
    assert failure_reason(log, -6) == "ggml.c:1234: GGML_ASSERT(n_dims <= 4) failed (process killed by SIGABRT)"
    assert failure_reason("a\nllama_model_quantize: failed to quantize: boom\n=====\n") == "boom"
    assert failure_reason("converting to iq2_xxs ..\n", -9) == "process killed by SIGKILL; its last output: converting to iq2_xxs .."
    assert failure_reason("", 1) == "exit status 1, no message"


def test_stats_file_is_an_imatrix_for_llama_quantize(ref_f32_gguf, tmp_path, q2k):
    """A `ggufmoe calibrate` stats file feeds llama.cpp's quantizer exactly like a plain imatrix."""
    from ggufmoe.stats.collect import collect_stats
    from ggufmoe.stats.file import load_stats, save_stats

    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:40000]
    save_stats(collect_stats(tiny_models.REF_MODEL, text, ctx=512, progress=False), tmp_path / "stats.gguf")
    out = llama_quantize(ref_f32_gguf, tmp_path / "q2k.gguf", "Q2_K", imatrix=load_stats(tmp_path / "stats.gguf").imatrix)
    assert out.read_bytes() == q2k["imatrix"].read_bytes()


def test_convert_writes_llama_quantizes_imatrix_keys(tmp_path, imatrix, q2k):
    """ggufmoe's file says which imatrix shaped it with llama-quantize's keys, types and values,
    plus the file's name; a file with no quantized tensor gets none."""
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.rules import TypeRules

    save_imatrix(imatrix, tmp_path / "ref.imatrix.gguf")
    made = {}
    for t in ("Q2_K", "F16"):
        made[t] = convert(tiny_models.REF_MODEL, ConvertOptions(out=tmp_path / f"{t}.gguf", types=TypeRules.parse(t),
                                                               imatrix=tmp_path / "ref.imatrix.gguf", progress=False))[0]
    ours, theirs = GGUFReader(made["Q2_K"]), GGUFReader(q2k["imatrix"])
    keys = [k for k in theirs.fields if k.startswith("quantize.imatrix.")]
    assert sorted(keys) == ["quantize.imatrix.chunks_count", "quantize.imatrix.dataset", "quantize.imatrix.entries_count"]
    for k in keys:
        assert ours.get_field(k).types == theirs.get_field(k).types, k
        assert ours.get_field(k).contents() == theirs.get_field(k).contents(), k
    assert ours.get_field("quantize.imatrix.file").contents() == "ref.imatrix.gguf"
    assert not [k for k in GGUFReader(made["F16"]).fields if k.startswith("quantize.")]


def test_convert_to_a_llama_cpp_mix(tmp_path, imatrix):
    """`convert --type Q4_K_M` is llama.cpp's own mix: the very file llama.cpp's quantizer makes from the BF16
    conversion with the same importance matrix, every tensor at the type llama-quantize gives it; mixes llama.cpp
    refuses without an importance matrix, and options a mix cannot take, are one line before any work."""
    from cli_run import assert_one_line_error, run
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.rules import TypeRules

    save_imatrix(imatrix, tmp_path / "im.gguf")
    proc = run("convert", tiny_models.REF_MODEL, "--type", "q4_k_m", "--imatrix", tmp_path / "im.gguf", "-o",
               tmp_path / "ours.gguf", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "memory to run" in proc.stdout
    bf16 = convert(tiny_models.REF_MODEL, ConvertOptions(out=tmp_path / "bf16.gguf", types=TypeRules.parse("BF16"),
                                                         imatrix=tmp_path / "im.gguf", progress=False))[0]
    theirs = llama_quantize(bf16, tmp_path / "theirs.gguf", "Q4_K_M", imatrix=imatrix)
    ours_t, theirs_t = tensor_types(tmp_path / "ours.gguf"), tensor_types(theirs)
    assert ours_t == theirs_t and {T.Q4_K, T.Q6_K} <= set(ours_t.values())
    for a, b in zip(GGUFReader(tmp_path / "ours.gguf").tensors, GGUFReader(theirs).tensors):
        assert a.name == b.name and np.array_equal(a.data, b.data), a.name
    for args, words in [(["--type", "IQ2_M"], ("IQ2_M", "importance matrix")),
                        (["--type", "Q4_K_M", "--keep", "12"], ("Q4_K_M", "pruning")),
                        (["--type", "Q4_K_M", "--split-max-size", "5M"], ("--split-max-size",))]:
        assert_one_line_error(run("convert", tiny_models.REF_MODEL, *args, "-o", tmp_path / "x.gguf", "-q"), *words)
        assert not list(tmp_path.glob("*x.gguf*"))

"""The memory model: exact file sizes before writing, KV/compute against llama.cpp, RSS within 5 %."""

import importlib.util
from pathlib import Path

import gguf
import pytest

import tiny_models
from ggufmoe.arch import architecture_for
from ggufmoe.arch.registry import gguf_shape
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.plan.layout import assign_types, prepare_output
from ggufmoe.arch.shape import ModelShape
from ggufmoe.plan.memory import (compute_buffer_bytes, kv_cache_bytes, recurrent_state_bytes, runtime_memory,
                                 weight_memory)
from ggufmoe.plan.target import CPU
from ggufmoe.gguf.header import file_bytes
from ggufmoe.gguf.header import shard_bytes
from ggufmoe.prune.criteria import PruneRequest, choose_experts
from ggufmoe.prune.apply import prune_model
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.file import load_stats, save_stats
from ggufmoe.quant.rules import TypeRules

MiB = 1 << 20
BENCH = Path(__file__).resolve().parents[1] / "eval" / "bench_memory.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measured_process() -> int:
    """The benchmark child's own process before it loads a model, as a plan counts it (its measurement and
    llama.cpp's code pages): these tests check the formulas of the model's memory, not the page cache's spread."""
    from ggufmoe.plan.process import LLAMA_CODE_BYTES

    return bench().run_child("none", 0)[0] + LLAMA_CODE_BYTES


def prepared_writer(src_dir, types: TypeRules, out: Path, split: int = 0, stats: Path | None = None,
                    prune: PruneRequest | None = None) -> gguf.GGUFWriter:
    """The writer state `convert` builds before writing anything (same functions, same order)."""
    src = HFSource(src_dir)
    arch = architecture_for(src)
    st = load_stats(stats, top_k=arch.top_k) if stats else None
    plan = choose_experts(arch, st, prune or PruneRequest())
    arch, specs = prune_model(arch, plan)
    typed = assign_types(specs, types, st.imatrix if st else None)
    return prepare_output(src, arch, typed, plan, types, out, split, st.imatrix if st else None, stats).writer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny qwen3moe and deepseek3 checkpoints, and calibration statistics for the deepseek3 one."""
    d = tmp_path_factory.mktemp("mem")
    for name in ("qwen3moe", "deepseek3"):
        tiny_models.build(name, d / name)
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:8000]
    save_stats(collect_stats(d / "deepseek3", text, ctx=256, progress=False), d / "stats.gguf")
    return d


CASES = {
    "f32": dict(model="qwen3moe", types=("F32", ())),
    "q4_k": dict(model="qwen3moe", types=("Q4_K", ())),
    "mixed": dict(model="deepseek3",
                  types=("Q8_0", ("ffn_.*_exps=Q4_K", "attn_.*=Q6_K", "output=F16", "blk\\.0\\..*=Q2_K"))),
    "split": dict(model="qwen3moe", types=("Q8_0", ()), split=400_000),
    "pruned": dict(model="deepseek3", types=("Q4_K", ()), prune=PruneRequest(keep=8, criterion="reap", top_k=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_file_bytes_are_exact(tiny, tmp_path, case):
    c = CASES[case]
    types = TypeRules.parse(*c["types"])
    stats = tiny / "stats.gguf" if c.get("prune") else None
    out = tmp_path / f"{case}.gguf"
    w = prepared_writer(tiny / c["model"], types, out, c.get("split", 0), stats, c.get("prune"))
    predicted, per_shard, weights = file_bytes(w), shard_bytes(w), weight_memory(w, CPU)
    written = convert(tiny / c["model"], ConvertOptions(out=out, types=types, split_max_size=c.get("split", 0),
                                                        stats=stats, prune=c.get("prune"), progress=False))
    assert [p.stat().st_size for p in written] == per_shard
    assert sum(p.stat().st_size for p in written) == predicted
    if case == "split":
        assert len(written) > 2
    # the writer-side and file-side views of the weights agree
    assert weight_memory(written, CPU) == weights
    assert weight_memory(w) == weight_memory(written)


def test_file_bytes_reference_model(ref_f32_gguf, tmp_path):
    w = prepared_writer(tiny_models.REF_MODEL, TypeRules.parse("F32"), tmp_path / "x.gguf")
    assert file_bytes(w) == ref_f32_gguf.stat().st_size


@pytest.mark.parametrize("name", tiny_models.FAMILIES)
def test_kv_and_compute_match_llama_cpp(tmp_path, name):
    """KV size exact and compute buffer within 1 MiB of what llama.cpp plans (metadata-only load)."""
    tiny_models.build(name, tmp_path / "hf")
    path = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "m.gguf", types=TypeRules.parse("F16"),
                                                   progress=False))[0]
    arch = architecture_for(HFSource(tmp_path / "hf"))
    shape = gguf_shape(path)
    assert arch.model_shape() == shape
    assert arch.kv_elements_per_token() == shape.kv_elements_per_token
    if name in ("qwen3next", "qwen35moe"):  # a KV cache for the full-attention layer only, a state for the two recurrent
        # ones
        assert shape.n_layer_recr == 2 and shape.kv_elements_per_token == 1 * 2 * (32 + 32)
    if name == "deepseek3":  # MLA: one latent row (kv_lora_rank + rope) per layer, no V
        c = arch.cfg
        assert arch.kv_elements_per_token() == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    if name == "glm-dsa":  # MLA's latent row on every layer, the indexer's key on the full layers 0 and 2
        c = arch.cfg
        assert shape.kv_elements_per_token == 4 * (c.kv_lora_rank + c.qk_rope_head_dim) + 2 * c.index_head_dim
    if name == "deepseek4":  # raw keys over the window on every layer, compressed keys on layers 1 and 3 (and their
        # indexer's keys: a cell per 4 tokens) and 2 (a cell per 128), each padded to 256 cells; three compressor states
        assert shape.n_layer_swa == 4 and (shape.n_layer_csa, shape.n_layer_hca) == (2, 1) and shape.k_only
    b = bench()
    # llama.cpp logs each cache's and each compressor state's size with 2 decimals
    caches = 5 if shape.n_layer_csa else 2 if shape.n_layer_swa or shape.n_layer_indexer else 1
    states = 3 if shape.n_layer_csa else 1
    for ctx, fa, swa_full in ((512, False, True), (2048, False, True), (2048, True, True), (2048, False, False)):
        if not swa_full and not shape.n_layer_swa:
            continue
        got = b.llama_reserved(path, ctx, 512, fa, swa_full)
        assert abs(got["kv"] - kv_cache_bytes(shape, ctx, swa_full=swa_full, flash_attn=fa)) < 0.006 * MiB * caches, \
            (ctx, fa, swa_full)
        # recurrent layers: their F32 state (none without), logged with 2 decimals
        rs = recurrent_state_bytes(shape)
        assert abs(got["rs"] - rs) < 0.006 * MiB * states and (got["rs"] > 0) == (rs > 0)
        assert abs(got["compute"] - compute_buffer_bytes(shape, ctx, 512, fa, swa_full=swa_full)) < 1 * MiB, \
            (ctx, fa, swa_full)


def test_glm5_kv_cache_from_config(tmp_path):
    """GLM-5 (78 layers, every indexer full): a 576-value latent row and a 128-value indexer key per layer and
    token, 107 KiB a token in F16; llama.cpp's own layers past the trunk (multi-token prediction) are not written."""
    from transformers import GlmMoeDsaConfig

    from ggufmoe.source.config import ConfigSource

    GlmMoeDsaConfig(architectures=["GlmMoeDsaForCausalLM"]).save_pretrained(tmp_path)
    arch = architecture_for(ConfigSource(tmp_path))
    assert arch.kv_elements_per_token() == 78 * (576 + 128)
    assert kv_cache_bytes(arch.model_shape(), 4096) == 4096 * 78 * (576 + 128) * 2


def test_kv_types():
    shape = ModelShape(n_vocab=6144, n_embd=256, n_layer=6, n_head=4, n_head_kv=2, head_k=64, head_v=64,
                       n_expert=24, n_expert_used=4, n_ff_exp=256)
    cells = 2048 * 6 * 2 * 128  # layers x (K + V) x n_head_kv * head
    assert kv_cache_bytes(shape, 2048, "f16") == cells * 2
    assert kv_cache_bytes(shape, 2048, "f32") == cells * 4
    assert kv_cache_bytes(shape, 2048, "q8_0") == cells // 32 * 34
    assert kv_cache_bytes(shape, 2048, "q4_0") == cells // 32 * 18
    assert kv_cache_bytes(shape, 2000, "f16") == kv_cache_bytes(shape, 2048, "f16")  # cells padded to 256
    with pytest.raises(ValueError, match="flash attention"):
        runtime_memory(None, 0, 2048, "q8_0", flash_attn=False, shape=shape)
    assert runtime_memory(None, 0, 2048, "q8_0", shape=shape).kv_cache == cells // 32 * 34


def test_runtime_memory_within_5_percent(ref_f32_gguf):
    """Planned total vs peak RSS of llama.cpp evaluating a full 2048-token context (all logits)."""
    arch = architecture_for(HFSource(tiny_models.REF_MODEL))
    assert arch.model_shape() == gguf_shape(ref_f32_gguf)
    wm = weight_memory(ref_f32_gguf)
    planned = runtime_memory(arch, wm.mapped, 2048, repacked_bytes=wm.repacked, process=measured_process())
    peak, logged = bench().run_child(ref_f32_gguf, 2048, "all")
    assert abs(logged["mapped"] - wm.mapped) < 0.006 * MiB and abs(logged["kv"] - planned.kv_cache) < 0.006 * MiB
    assert abs(planned.total - peak) / peak < 0.05, (planned, peak)


def built_q8(family: str, cfg, tmp_path: Path):
    """(architecture, Q8_0 GGUF) of a tiny ``family`` model built from ``cfg``."""
    tiny_models.build(family, tmp_path / "hf", config=cfg)
    path = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "m.gguf", types=TypeRules.parse("Q8_0"),
                                                   progress=False))[0]
    return architecture_for(HFSource(tmp_path / "hf")), path


def planned_and_measured(arch, path: Path, ctx: int, swa_full: bool = True):
    """(planned memory, llama.cpp's peak RSS, the buffers it logged) of ``path`` over a ``ctx``-token context."""
    wm = weight_memory(path)
    planned = runtime_memory(arch, wm.mapped, ctx, repacked_bytes=wm.repacked, swa_full=swa_full,
                             process=measured_process())
    peak, logged = bench().run_child(path, ctx, "all", swa_full=swa_full)
    return planned, peak, logged


@pytest.mark.parametrize("swa_full", [True, False])
def test_sliding_window_memory_within_5_percent(tmp_path, swa_full):
    """gpt-oss (sliding-window and full layers): planned total vs llama.cpp's peak RSS over a 4096-token
    context, with the sliding layers caching the whole context (llama-cpp-python's default) or the window."""
    cfg = tiny_models.configs()["gpt-oss"]
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 256, 8, 4, 32
    cfg.intermediate_size, cfg.sliding_window = 128, 128
    arch, path = built_q8("gpt-oss", cfg, tmp_path)
    assert arch.model_shape() == gguf_shape(path) and arch.model_shape().n_layer_swa == 2
    planned, peak, logged = planned_and_measured(arch, path, 4096, swa_full)
    assert abs(logged["kv"] - planned.kv_cache) < 2 * 0.006 * MiB  # two caches, each logged with 2 decimals
    assert abs(planned.total - peak) / peak < 0.05, (planned, peak)


@pytest.mark.parametrize("swa_full", [True, False])
def test_gemma4_memory_within_5_percent(tmp_path, swa_full):
    """Gemma 4 (sliding layers with their own heads, full layers with wider ones and keys as values, two layers
    reusing earlier caches, V rows padded to the widest without flash attention): planned total vs llama.cpp's peak
    RSS over a 4096-token context, the sliding layers caching the whole context or the window."""
    cfg = tiny_models.gemma4_config(hidden_size=256, num_attention_heads=8, head_dim=32, global_head_dim=64,
                                    num_global_key_value_heads=2, intermediate_size=128, moe_intermediate_size=128,
                                    sliding_window=128)
    arch, path = built_q8("gemma4", cfg, tmp_path)
    assert arch.model_shape() == gguf_shape(path) and arch.model_shape().kv_layers == (2, 2)
    planned, peak, logged = planned_and_measured(arch, path, 4096, swa_full)
    assert abs(logged["kv"] - planned.kv_cache) < 2 * 0.006 * MiB  # two caches, each logged with 2 decimals
    assert abs(planned.total - peak) / peak < 0.05, (planned, peak)


@pytest.mark.parametrize("ctx", [1024, 4096])
@pytest.mark.parametrize("family", ["qwen3next", "qwen35moe"])
def test_recurrent_memory_within_5_percent(tmp_path, family, ctx):
    """Qwen3-Next / Qwen3.5-MoE (recurrent linear-attention layers and a full-attention one): planned total vs
    llama.cpp's peak RSS over a context of two sizes; the KV cache of the full layer and the recurrent state as
    llama.cpp logs them."""
    cfg = tiny_models.configs()[family]
    text = cfg.get_text_config()
    text.hidden_size, text.head_dim, text.linear_key_head_dim, text.linear_value_head_dim = 256, 64, 64, 64
    text.linear_num_key_heads, text.linear_num_value_heads, text.moe_intermediate_size = 4, 8, 128
    if text is not cfg:  # the vision tower's output is the text model's input
        cfg.vision_config.out_hidden_size = 256
    arch, path = built_q8(family, cfg, tmp_path)
    shape = arch.model_shape()
    assert shape == gguf_shape(path) and shape.n_layer_recr == 2
    planned, peak, logged = planned_and_measured(arch, path, ctx)
    rs = recurrent_state_bytes(shape)
    assert rs == 2 * 4 * (3 * (512 + 2 * 4 * 64) + 64 * 512)  # layers x F32 x (conv + delta-rule state)
    assert planned.kv_cache == kv_cache_bytes(shape, ctx) + rs
    assert abs(logged["kv"] - kv_cache_bytes(shape, ctx)) < 0.006 * MiB and abs(logged["rs"] - rs) < 0.006 * MiB
    assert abs(planned.total - peak) / peak < 0.05, (planned, peak)


@pytest.mark.parametrize("ctx", [1024, 4096])
def test_deepseek4_memory_within_5_percent(tmp_path, ctx):
    """DeepSeek-V4 (raw keys over the window on every layer, compressed and indexer caches, compressor states, four
    streams): planned total vs llama.cpp's peak RSS over a context of two sizes; the caches and states as logged."""
    cfg = tiny_models.deepseek4_config(hidden_size=256, num_attention_heads=8, head_dim=128, q_lora_rank=64,
                                       index_head_dim=64, moe_intermediate_size=128, o_lora_rank=32)
    arch, path = built_q8("deepseek4", cfg, tmp_path)
    shape = arch.model_shape()
    assert shape == gguf_shape(path) and (shape.n_layer_csa, shape.n_layer_hca) == (2, 1)
    planned, peak, logged = planned_and_measured(arch, path, ctx)
    rs = recurrent_state_bytes(shape)
    assert planned.kv_cache == kv_cache_bytes(shape, ctx) + rs
    assert abs(logged["kv"] - kv_cache_bytes(shape, ctx)) < 5 * 0.006 * MiB and abs(logged["rs"] - rs) < 3 * 0.006 * MiB
    assert abs(planned.total - peak) / peak < 0.05, (planned, peak)

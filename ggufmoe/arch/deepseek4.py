"""DeepSeek-V4 (DeepseekV4ForCausalLM) -> llama.cpp ``deepseek4``.

What sets the family apart, and how it is written:

- **Hyper-connections**: four streams carry the hidden state; before attention and before the MoE each
  layer mixes them (``hc_attn_*`` / ``hc_ffn_*``: a projection of the flattened streams, a base and three
  scales, Sinkhorn-normalised), and the output head folds them into one (``output_hc_*``). Copied F32.
- **Attention**: a low-rank query, one key-value head (K = V), attention sinks and a grouped low-rank output
  (``attn_output_a`` per group, then ``attn_output_b``), over a sliding window on every layer plus, by
  ``layer_types``, a compressed cache (ratio 4 with a lightning indexer, or 128; ``attn_compressor_*``,
  ``indexer_*``). Rope on the last ``qk_rope_head_dim`` dimensions; the compressed layers rotate at their own
  base (``compress_rope_freq_base``) with the YaRN scaling, the sliding-only layers without it.
- **Routing**: sqrt-softplus scores (llama.cpp's gating function 4) with a selection bias; the leading
  ``hash_moe`` layers route by a fixed token -> experts table instead (``ffn_gate_tid2eid``, written as I32,
  their unused bias left out). One shared expert; gate and up clamped at ``swiglu_limit``.
- **Checkpoints**: DeepSeek ships the names of its own code (``layers.N.attn.wq_a.weight``, experts one by one
  as ``ffn.experts.E.w1``), FP8 matrices with UE8M0 128x128 ``.scale`` tensors and FP4 experts (int8 codes two to
  a byte, a UE8M0 ``.scale`` per 32 values: OCP MXFP4), both read by :class:`~ggufmoe.source.hf.HFSource`;
  transformers saves the same names under ``model.`` (the embedding as ``embed_tokens``, the head mix as
  ``hc_head.hc_*``, the key-value norm as ``attn.norm``). FP4 experts carry their MXFP4 bytes: written as
  MXFP4 they are the checkpoint's own codes and scales. The multi-token-prediction block (``mtp.*``) is not
  written.
"""

from __future__ import annotations

from functools import cached_property
from typing import Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import MODEL_TENSOR

from ggufmoe.arch.base import Architecture
from ggufmoe.arch.registry import register
from ggufmoe.arch.shape import COMPRESS_HEAVY, COMPRESS_SPARSE, ModelShape
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.names import TensorName
from ggufmoe.model.tensor import RowLoader, TensorSpec
from ggufmoe.source import mxfp4

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
HASH_MOE, MOE = "hash_moe", "moe"
TABLE = "ffn_gate_tid2eid"  # the token -> experts table of a hash layer (I32, vocabulary x experts per token)
CSA_RATIO, HCA_RATIO = COMPRESS_SPARSE, COMPRESS_HEAVY  # the only compressions llama.cpp's cache implements
HC_STREAMS = 4  # llama.cpp's graph asserts four hyper-connection streams
SQRT_SOFTPLUS = 4  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS (gguf-py 0.19 has no name for it)


class Keys:
    """The deepseek4 keys gguf-py 0.19 has no writer for (llama.cpp's ``src/llama-arch.cpp``)."""

    OUTPUT_GROUP_COUNT = "{arch}.attention.output_group_count"
    OUTPUT_LORA_RANK = "{arch}.attention.output_lora_rank"
    COMPRESS_RATIOS = "{arch}.attention.compress_ratios"
    COMPRESS_ROPE_FREQ_BASE = "{arch}.attention.compress_rope_freq_base"
    HC_COUNT = "{arch}.hyper_connection.count"
    HC_SINKHORN_ITERATIONS = "{arch}.hyper_connection.sinkhorn_iterations"
    HC_EPSILON = "{arch}.hyper_connection.epsilon"
    HASH_LAYER_COUNT = "{arch}.hash_layer_count"


# checkpoint name (DeepSeek's, under ``layers.N.``) -> GGUF name (under ``blk.N.``)
ATTENTION = {"attn_norm.weight": "attn_norm.weight", "attn.attn_sink": "attn_sinks.weight",
             "attn.wq_a.weight": "attn_q_a.weight", "attn.q_norm.weight": "attn_q_a_norm.weight",
             "attn.wq_b.weight": "attn_q_b.weight", "attn.wkv.weight": "attn_kv.weight",
             "attn.kv_norm.weight": "attn_kv_a_norm.weight", "attn.wo_a.weight": "attn_output_a.weight",
             "attn.wo_b.weight": "attn_output_b.weight"}
MIXES = {f"hc_{at}_{part}": f"hc_{at}_{part}.weight" for at in ("attn", "ffn") for part in ("fn", "base", "scale")}
COMPRESSOR = {"wkv.weight": "compressor_kv.weight", "wgate.weight": "compressor_gate.weight",
              "ape": "compressor_ape.weight", "norm.weight": "compressor_norm.weight"}
INDEXER = {"attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
           "attn.indexer.weights_proj.weight": "indexer.proj.weight"}
EXPERTS = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
ROOT = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "head.weight": "output.weight",
        "hc_head_fn": "output_hc_fn.weight", "hc_head_base": "output_hc_base.weight",
        "hc_head_scale": "output_hc_scale.weight"}
# transformers' spelling of a name -> DeepSeek's (after the ``model.`` prefix is dropped)
SAVED_AS = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
            "hc_head.hc_scale": "hc_head_scale"}
# GGUF tensors llama.cpp adds or mixes in F32 (the stream mixes and the compressors' position biases)
F32_KINDS = ("hc_", "output_hc_", "attn_compressor_ape", "indexer_compressor_ape")


@register
class DeepseekV4(Architecture):
    hf_architectures = ("DeepseekV4ForCausalLM",)
    gguf_arch = "deepseek4"
    experts_key = "n_routed_experts"
    per_expert_rows = Architecture.per_expert_rows | {MODEL_TENSOR.FFN_EXP_PROBS_B}  # the selection bias
    router_tensors = ("weight", "e_score_correction_bias")
    writes_head_dim = True
    rope_kinds = ("default", "yarn")
    layers_read_tokens = True  # the hash layers route by the token ids
    graph_nodes_per_token = 40  # llama.cpp's graph budget for deepseek4: 40 nodes per ubatch token
    router_table = "tid2eid"
    expert_id_tables = frozenset({TABLE})
    sensitivity_aliases = {"attn_q_a": "attn_q", "attn_q_b": "attn_q", "attn_kv": "attn_k", "attn_output_a": "attn_output",
                           "attn_output_b": "attn_output", "attn_compressor_kv": "attn_k", "attn_compressor_gate": "attn_k",
                           "indexer.attn_q_b": "attn_q", "indexer_compressor_kv": "attn_k",
                           "indexer_compressor_gate": "attn_k"}

    # --- the checkpoint's names -------------------------------------------------------------
    @cached_property
    def names(self) -> dict[str, str]:
        """DeepSeek's name of every checkpoint tensor -> the name it is stored under."""
        out = {}
        for name in self.src.tensor_names():
            short = name.removeprefix("model.")
            short = SAVED_AS.get(short, short)
            if short.endswith(".attn.norm.weight"):  # transformers' reverse of its kv_norm -> norm renaming
                short = short.replace(".attn.norm.weight", ".attn.kv_norm.weight")
            out.setdefault(short, name)
        return out

    def stored(self, name: str) -> str:
        stored = self.names.get(name)
        if stored is None:
            raise GgufmoeError(f"{self.src.path}: tensor {name} missing from the checkpoint")
        return stored

    def copy(self, gguf_name: str, name: str, fixed: T | None = None) -> TensorSpec:
        """A tensor read as it is from DeepSeek's ``name``; ``fixed``: written at that type whatever the mix."""
        stored = self.stored(name)
        return TensorSpec(gguf_name, self.src.shape(stored), RowLoader(self.src, stored), hf_name=stored, fixed_type=fixed)

    # --- the layout --------------------------------------------------------------------------
    @property
    def compress_ratios(self) -> list[int]:
        """Per block: 0 (sliding window only), 4 (compressed, with an indexer) or 128."""
        rates = dict(self.cfg.compress_rates)
        return [0 if t == SLIDING else int(rates[t]) for t in self.cfg.layer_types[:self.n_layer]]

    @property
    def n_hash(self) -> int:
        """Leading blocks that route by the token -> experts table."""
        types = list(self.cfg.mlp_layer_types)
        return next((i for i, t in enumerate(types) if t != HASH_MOE), len(types))

    def check(self) -> None:
        c = self.cfg
        mlp = list(c.mlp_layer_types[:self.n_layer])
        self.require(HASH_MOE not in mlp[self.n_hash:], f"mlp_layer_types {mlp}: llama.cpp routes by the token table "
                                                        "only in leading layers")
        ratios = self.compress_ratios
        self.require(set(ratios) <= {0, CSA_RATIO, HCA_RATIO}, f"compression ratios {sorted(set(ratios))} (llama.cpp "
                                                               f"implements 0, {CSA_RATIO} and {HCA_RATIO})")
        # llama.cpp's cache divides by each compressed kind's state size: a model without one crashes it (SIGFPE)
        self.require({CSA_RATIO, HCA_RATIO} <= set(ratios), f"compression ratios {sorted(set(ratios))}: llama.cpp runs "
                                                            f"only models with both {CSA_RATIO} and {HCA_RATIO} layers")
        self.require(int(c.hc_mult) == HC_STREAMS, f"hc_mult {c.hc_mult} (llama.cpp's graph has {HC_STREAMS} streams)")
        self.require(c.scoring_func == "sqrtsoftplus", f"scoring_func {c.scoring_func!r} (llama.cpp: sqrtsoftplus only)")
        self.require(int(c.num_key_value_heads) == 1, f"{c.num_key_value_heads} key-value heads (llama.cpp: one)")
        self.require(int(c.num_attention_heads) % int(c.o_groups) == 0,
                     f"{c.num_attention_heads} heads in {c.o_groups} output groups")
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")
        self.require(not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False), "biases")
        self.require(rope_kind(c, "main") == "default", f"rope {rope_kind(c, 'main')!r} on the sliding layers")

    # --- metadata ----------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c, arch = self.cfg, self.gguf_arch
        self.write_common_metadata(w, n_ff=self.n_ff_exp, n_head_kv=1)
        w.add_rope_dimension_count(int(c.qk_rope_head_dim))
        w.add_q_lora_rank(int(c.q_lora_rank))
        w.add_sliding_window(int(c.sliding_window))
        w.add_expert_feed_forward_length(self.n_ff_exp)
        self.write_expert_counts(w)
        w.add_expert_shared_count(int(c.n_shared_experts))
        w.add_expert_weights_scale(float(c.routed_scaling_factor))
        w.add_expert_weights_norm(bool(c.norm_topk_prob))
        w.add_uint32(gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=arch), SQRT_SOFTPLUS)
        w.add_swiglu_clamp_exp([float(c.swiglu_limit)] * self.n_layer)
        w.add_swiglu_clamp_shexp([float(c.swiglu_limit)] * self.n_layer)
        w.add_indexer_head_count(int(c.index_n_heads))
        w.add_indexer_key_length(int(c.index_head_dim))
        w.add_indexer_top_k(int(c.index_topk))
        w.add_uint32(Keys.OUTPUT_GROUP_COUNT.format(arch=arch), int(c.o_groups))
        w.add_uint32(Keys.OUTPUT_LORA_RANK.format(arch=arch), int(c.o_lora_rank))
        w.add_array(Keys.COMPRESS_RATIOS.format(arch=arch), self.compress_ratios)
        w.add_float32(Keys.COMPRESS_ROPE_FREQ_BASE.format(arch=arch), float(self.rope("compress")["rope_theta"]))
        w.add_uint32(Keys.HC_COUNT.format(arch=arch), int(c.hc_mult))
        w.add_uint32(Keys.HC_SINKHORN_ITERATIONS.format(arch=arch), int(c.hc_sinkhorn_iters))
        w.add_float32(Keys.HC_EPSILON.format(arch=arch), float(c.hc_eps))
        w.add_uint32(Keys.HASH_LAYER_COUNT.format(arch=arch), self.n_hash)
        w.add_embedding_length_out(int(c.hc_mult) * int(c.hidden_size))

    def rope(self, which: str) -> dict:
        return dict(self.cfg.rope_parameters[which])

    @property
    def rope_kind(self) -> str:
        """The compressed layers' rope (the sliding layers' is checked to be plain)."""
        return rope_kind(self.cfg, "compress")

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        """The sliding layers' base; the compressed layers' scaling (their base is a key of its own)."""
        main, compress = self.rope("main"), self.rope("compress")
        w.add_rope_freq_base(float(main["rope_theta"]))
        kind = self.rope_kind
        self.require(kind in self.rope_kinds, f"rope scaling {kind!r} on the compressed layers")
        if kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(compress["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(compress["original_max_position_embeddings"]))
            w.add_rope_scaling_yarn_beta_fast(float(compress.get("beta_fast", 32.0)))
            w.add_rope_scaling_yarn_beta_slow(float(compress.get("beta_slow", 1.0)))

    # --- tensors -----------------------------------------------------------------------------
    def tensors(self) -> Iterator[TensorSpec]:
        self.check()
        for name, gguf_name in ROOT.items():
            yield self.copy(gguf_name, name, T.F32 if gguf_name.startswith(F32_KINDS) else None)
        for il in range(self.n_layer):  # the multi-token-prediction block (mtp.*) is not written
            yield from self.attention(il)
            yield from self.feed_forward(il)

    def attention(self, il: int) -> Iterator[TensorSpec]:
        p, b = f"layers.{il}", f"blk.{il}"
        for name, gguf_name in {**ATTENTION, **MIXES}.items():
            yield self.copy(f"{b}.{gguf_name}", f"{p}.{name}", T.F32 if gguf_name.startswith(F32_KINDS) else None)
        ratio = self.compress_ratios[il]
        if ratio:
            yield from self.compressor(f"{p}.attn.compressor", f"{b}.attn_")
        if ratio == CSA_RATIO:
            for name, gguf_name in INDEXER.items():
                yield self.copy(f"{b}.{gguf_name}", f"{p}.{name}")
            yield from self.compressor(f"{p}.attn.indexer.compressor", f"{b}.indexer_")

    def compressor(self, prefix: str, gguf_prefix: str) -> Iterator[TensorSpec]:
        for name, gguf_name in COMPRESSOR.items():
            ape = name == "ape"
            yield self.copy(f"{gguf_prefix}{gguf_name}", f"{prefix}.{name}", T.F32 if ape else None)

    def feed_forward(self, il: int) -> Iterator[TensorSpec]:
        p, b = f"layers.{il}.ffn", f"blk.{il}"
        yield self.copy(f"{b}.ffn_norm.weight", f"layers.{il}.ffn_norm.weight")
        yield self.copy(f"{b}.ffn_gate_inp.weight", f"{p}.gate.weight")
        if il < self.n_hash:
            yield self.table(f"{b}.{TABLE}.weight", f"{p}.gate.tid2eid")
        else:
            yield self.copy(f"{b}.exp_probs_b.bias", f"{p}.gate.bias")
        for w, gguf_name in EXPERTS.items():
            yield self.experts(f"{b}.{gguf_name}_exps.weight", f"{p}.experts.{{e}}.{w}.weight")
        for w, gguf_name in EXPERTS.items():
            yield self.copy(f"{b}.{gguf_name}_shexp.weight", f"{p}.shared_experts.{w}.weight")

    def table(self, gguf_name: str, name: str) -> TensorSpec:
        """The token -> experts table (vocabulary x experts used), as llama.cpp reads it: I32."""
        src, stored = self.src, self.stored(name)
        shape = src.shape(stored)
        self.require(shape == (self.n_vocab, self.top_k), f"{name} {shape}: expected (vocabulary, experts per token)")

        def raw(_: int) -> np.ndarray:
            ids = src.raw_rows(stored, 0, shape[0])
            self.require(bool(((ids >= 0) & (ids < self.n_expert)).all()), f"{name} names experts that do not exist")
            return ids.astype("<i4").view(np.uint8).reshape(-1)

        def load(_: int) -> np.ndarray:
            return raw(0).view("<i4").reshape(shape).astype(np.float32)

        return TensorSpec(gguf_name, shape, load, hf_name=stored, source_type=T.I32, raw=raw,
                          holds_expert_ids=TensorName.parse(gguf_name).base in self.expert_id_tables)

    def experts(self, gguf_name: str, template: str) -> TensorSpec:
        """A 3-D expert tensor from the per-expert matrices (DeepSeek's ``template``, spelled as the checkpoint spells
        it); FP4 experts also as their MXFP4 bytes."""
        src = self.src
        spec = self.stacked_experts(gguf_name, template_of(self.stored(template.format(e=0)), template), self.n_expert)
        if not src.is_fp4(spec.hf_name.format(e=0)):
            return spec

        def raw(e: int) -> np.ndarray:
            return mxfp4.to_ggml(*src.fp4_rows(spec.hf_name.format(e=e), 0, spec.shape[1])).reshape(-1)

        spec.source_type, spec.raw = T.MXFP4, raw
        return spec

    @property
    def top_k_fixed(self) -> str | None:
        if not self.n_hash:
            return None
        return (f"the first {self.n_hash} layer(s) route each token to the {self.top_k} experts of a fixed table "
                f"(llama.cpp reads it {self.top_k} wide)")

    @property
    def hidden_streams(self) -> int:
        return int(self.cfg.hc_mult)

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def n_ff_exp(self) -> int:
        return int(self.cfg.moe_intermediate_size)

    def model_shape(self) -> ModelShape:
        """Every layer's raw keys over the sliding window (one head, K only), the compressed caches by layer type,
        the indexer's keys on the sparse ones; one shared expert; four streams."""
        c, ratios = self.cfg, self.compress_ratios
        s = super().model_shape()
        s.n_head_kv, s.k_only, s.n_ff_shexp = 1, True, int(c.n_shared_experts) * self.n_ff_exp
        s.n_swa, s.n_layer_swa = int(c.sliding_window), self.n_layer
        s.n_layer_csa, s.n_layer_hca = ratios.count(CSA_RATIO), ratios.count(HCA_RATIO)
        s.head_indexer, s.n_head_indexer = int(c.index_head_dim), int(c.index_n_heads)
        s.hc_streams = int(c.hc_mult)
        return s


def rope_kind(cfg, which: str) -> str:
    params = cfg.rope_parameters[which]
    return params.get("rope_type", params.get("type", "default"))


def template_of(first: str, template: str) -> str:
    """The stored name of expert ``{e}`` given the stored name of expert 0 (DeepSeek's ``template`` spelled as the
    checkpoint spells it)."""
    prefix = first[: len(first) - len(template.format(e=0))]
    return prefix + template

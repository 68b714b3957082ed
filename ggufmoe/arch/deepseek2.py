"""DeepSeek-V3/R1 and V2 (DeepseekV3ForCausalLM, DeepseekV2ForCausalLM) -> llama.cpp ``deepseek2``.

Multi-head latent attention: ``kv_b_proj`` is split into ``attn_k_b`` (transposed) and
``attn_v_b`` so llama.cpp can absorb them. Leading dense blocks, a shared expert, sigmoid
or softmax gating, the V3 routing bias ``exp_probs_b`` and expert groups.
"""

from __future__ import annotations

from typing import Iterator

import gguf
import numpy as np

from ggufmoe.arch.biased_routing import BiasedRoutingMoe
from ggufmoe.arch.registry import register
from ggufmoe.arch.base import rope_params
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.source.hf import HFSource


@register
class Deepseek2(BiasedRoutingMoe):
    hf_architectures = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
    gguf_arch = "deepseek2"
    per_layer_expert_counts = True
    rope_kinds = ("default", "yarn")
    sensitivity_aliases = {"attn_q_a": "attn_q", "attn_q_b": "attn_q", "attn_kv_a_mqa": "attn_k", "attn_k_b": "attn_k",
                           "attn_v_b": "attn_v"}  # MLA's projections default to the GQA ones

    @property
    def is_v3(self) -> bool:
        return self.src.architecture == "DeepseekV3ForCausalLM"

    @property
    def scoring(self) -> str:
        return getattr(self.cfg, "scoring_func", "sigmoid" if self.is_v3 else "softmax")

    def check(self) -> None:
        c = self.cfg
        self.require(getattr(c, "rope_interleave", True), "rope_interleave=false")
        if not self.is_v3:
            self.require(self.expert_groups is None or getattr(c, "topk_method", "greedy") == "greedy",
                         f"topk_method {getattr(c, 'topk_method', None)!r} with expert groups")
        self.require(getattr(c, "moe_layer_freq", 1) == 1, "moe_layer_freq != 1")

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c = self.cfg
        w.add_context_length(int(c.max_position_embeddings))
        w.add_embedding_length(int(c.hidden_size))
        w.add_block_count(int(c.num_hidden_layers))
        w.add_feed_forward_length(int(c.intermediate_size))
        w.add_head_count(int(c.num_attention_heads))
        w.add_head_count_kv(1)  # MLA runs as multi-query attention over the latent
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_vocab_size(int(c.vocab_size))
        if getattr(c, "q_lora_rank", None):
            w.add_q_lora_rank(int(c.q_lora_rank))
        w.add_kv_lora_rank(int(c.kv_lora_rank))
        w.add_key_length(int(c.kv_lora_rank + c.qk_rope_head_dim))
        w.add_value_length(int(c.kv_lora_rank))
        w.add_key_length_mla(int(c.qk_nope_head_dim + c.qk_rope_head_dim))
        w.add_value_length_mla(int(c.v_head_dim))
        w.add_rope_dimension_count(int(c.qk_rope_head_dim))
        self.write_routing(w)
        self.write_rope(w)

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        super().write_rope(w)
        mscale_all_dim = rope_params(self.cfg).get("mscale_all_dim")
        if self.rope_kind == "yarn" and mscale_all_dim:
            # llama.cpp divides this key by 0.1 when loading deepseek2 files
            w.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all_dim))

    def kv_head_dims(self) -> tuple[int, int]:
        """MLA as written: K head = kv_lora_rank + rope dims, V head = kv_lora_rank, one KV head."""
        c = self.cfg
        return int(c.kv_lora_rank + c.qk_rope_head_dim), int(c.kv_lora_rank)

    def kv_elements_per_token(self) -> int:
        """MLA caches one latent row per layer and token: ``kv_lora_rank + qk_rope_head_dim`` elements.

        llama.cpp (this version) stores K only for MLA (``has_v = !is_mla`` in llama-kv-cache.cpp):
        the compressed latent ``kv_cmpr`` and the roped ``k_pe`` concatenated, one head
        (``head_count_kv = 1``); V is a view of the first ``kv_lora_rank`` values of K.
        """
        return self.n_layer * self.kv_head_dims()[0]

    def model_shape(self) -> ModelShape:
        """MLA (one latent KV head, decompressed K heads of qk_nope + qk_rope), shared experts, dense blocks."""
        c = self.cfg
        s = super().model_shape()
        s.n_head_kv, s.mla = 1, True
        s.head_k_mla = int(c.qk_nope_head_dim + c.qk_rope_head_dim)
        return s

    def split_kv_b(self, il: int, kv_b: ReadForTwo) -> Iterator[TensorSpec]:
        """``attn_k_b`` and ``attn_v_b`` from layer ``il``'s ``kv_b_proj``, read once for both."""
        c = self.cfg
        name = f"model.layers.{il}.self_attn.kv_b_proj.weight"
        n_head, nope, v, rank = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank

        def heads() -> np.ndarray:
            return kv_b.get(name).reshape(n_head, nope + v, rank)

        yield TensorSpec(f"blk.{il}.attn_k_b.weight", (n_head, rank, nope),
                         lambda _: np.ascontiguousarray(heads()[:, :nope, :].transpose(0, 2, 1)), hf_name=name)
        yield TensorSpec(f"blk.{il}.attn_v_b.weight", (n_head, v, rank), lambda _: np.ascontiguousarray(heads()[:, nope:, :]),
                         hf_name=name)

    def attention(self, il: int, kv_b: ReadForTwo) -> Iterator[TensorSpec]:
        """Layer ``il``'s latent attention: the query (low-rank or not), the compressed KV and the output."""
        b, a = f"blk.{il}", f"model.layers.{il}.self_attn"
        if getattr(self.cfg, "q_lora_rank", None):
            yield self.plain(f"{b}.attn_q_a.weight", f"{a}.q_a_proj.weight")
            yield self.plain(f"{b}.attn_q_a_norm.weight", f"{a}.q_a_layernorm.weight")
            yield self.plain(f"{b}.attn_q_b.weight", f"{a}.q_b_proj.weight")
        else:
            yield self.plain(f"{b}.attn_q.weight", f"{a}.q_proj.weight")
        yield self.plain(f"{b}.attn_kv_a_mqa.weight", f"{a}.kv_a_proj_with_mqa.weight")
        yield self.plain(f"{b}.attn_kv_a_norm.weight", f"{a}.kv_a_layernorm.weight")
        yield from self.split_kv_b(il, kv_b)
        yield self.plain(f"{b}.attn_output.weight", f"{a}.o_proj.weight")

    def tensors(self) -> Iterator[TensorSpec]:
        kv_b = ReadForTwo(self.src)
        yield from self.embeddings_and_output()
        for il in range(self.cfg.num_hidden_layers):  # multi-token-prediction layers beyond are skipped
            p, b = f"model.layers.{il}", f"blk.{il}"
            yield self.plain(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight")
            yield from self.attention(il, kv_b)
            yield self.plain(f"{b}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight")
            yield from self.feed_forward(il)


class ReadForTwo:
    """One slot for a tensor two specs are cut from: the first ``get`` reads and keeps it, the next
    ``get`` of the same name hands it over and forgets it (so at most one tensor is held)."""

    def __init__(self, src: HFSource):
        self.src = src
        self.name: str | None = None
        self.value: np.ndarray | None = None

    def get(self, name: str) -> np.ndarray:
        if self.name == name and self.value is not None:
            value, self.name, self.value = self.value, None, None
            return value
        self.name, self.value = name, self.src.get(name)
        return self.value

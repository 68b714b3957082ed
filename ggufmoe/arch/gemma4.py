"""Gemma 4 MoE (Gemma4ForConditionalGeneration, Gemma4ForCausalLM) -> llama.cpp ``gemma4``.

Sliding-window and full-attention layers (``layer_types``) with their own head sizes and key/value head counts
(the full layers' ``global_head_dim`` / ``num_global_key_value_heads``, which transformers folds into
``per_layer_config``: read here from the projection shapes transformers defines); q/k RMS norms and a weightless
RMS norm of the values; attention scale 1. With ``attention_k_eq_v`` the full layers have no ``v_proj``: the keys'
projection gives the values (llama.cpp does the same when ``attn_v`` is absent). The last
``num_kv_shared_layers`` layers reuse the keys and values of the last earlier layer of their type and have no
projections (or cache) of their own.

Every layer runs a dense GELU MLP beside the routed experts: ``post_ffw_norm(post_ffw_norm_1(mlp(ffn_norm(h))) +
post_ffw_norm_2(experts(pre_ffw_norm_2(h))))``; the router reads the residual ``h`` itself (weightless RMS norm,
times ``router.scale`` -> ``ffn_gate_inp.scale``, times hidden^-0.5), softmax, top-k renormalised, and each chosen
expert's weight times ``router.per_expert_scale`` -> ``ffn_down_exps.scale`` (llama.cpp's per-expert output scale).
Experts are stored fused, ``gate_up_proj`` (experts, 2 ff, hidden) and ``down_proj`` (experts, hidden, ff). The
layer output is scaled by ``layer_scalar`` (``layer_output_scale``). Norms are plain weights (no +1).

Rope: the sliding layers rotate the whole head (base ``rope_theta`` of ``sliding_attention``); the full layers'
"proportional" rope rotates the first ``partial_rotary_factor`` of the frequencies of the whole global head and
leaves the rest, which llama.cpp runs as NEOX rope over the whole head with ``rope_freqs`` dividing the kept
frequencies by the rope ``factor`` and the others by 1e30 (no rotation), as its own converter writes.

Gemma's tokenizer (SentencePiece-style BPE: spaces as ``▁``, byte fallback) is written as llama.cpp's ``gemma4``
tokenizer, with its merges.

Refused (llama.cpp's graph cannot run them as transformers does): per-layer embeddings
(``hidden_size_per_layer_input``), dense models (``enable_moe_block`` false), attention biases, bidirectional
attention for text (``use_bidirectional_attention="all"``; ``"vision"`` leaves text causal), activations other
than tanh GELU, shared-KV layers whose source llama.cpp picks differently.
"""

from __future__ import annotations

from typing import Iterator

import gguf
import numpy as np
from gguf.constants import MODEL_TENSOR

from ggufmoe.arch.base import Architecture
from ggufmoe.arch.registry import register
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.source.tokenizer import GEMMA4

SLIDING, FULL = "sliding_attention", "full_attention"
NO_ROTATION = 1e30  # a rope_freqs divisor that leaves a frequency unrotated (llama.cpp's converter uses it)


@register
class Gemma4(Architecture):
    hf_architectures = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM")
    gguf_arch = "gemma4"
    # the per-expert output scales (``ffn_down_exps.scale``) are rows per expert besides the router's
    per_expert_rows = Architecture.per_expert_rows | {MODEL_TENSOR.FFN_DOWN_EXP}
    router_tensors = ("proj.weight", "per_expert_scale")  # the router's tensors with an axis of experts
    residual_router = "router"  # it reads the residual, the experts their own norm of it
    spm_tokenizer = GEMMA4  # Gemma's SentencePiece-style BPE: llama.cpp's gemma4 tokenizer (merges by rank, exact)

    @property
    def prefix(self) -> str:
        """The text model's tensors in the checkpoint: ``{prefix}layers.N...``."""
        nested = "model.language_model."
        return nested if f"{nested}embed_tokens.weight" in self.src else "model."

    @property
    def top_k(self) -> int:
        return int(self.cfg.top_k_experts)

    @property
    def sliding(self) -> list[bool]:
        """Per layer: whether it attends to a sliding window."""
        return [t == SLIDING for t in self.cfg.layer_types]

    @property
    def first_shared(self) -> int:
        """The first layer that reuses an earlier layer's keys and values (``n_layer`` when none does)."""
        return int(self.cfg.num_hidden_layers) - int(self.cfg.num_kv_shared_layers or 0)

    def attn(self, il: int) -> str:
        return f"{self.prefix}layers.{il}.self_attn"

    def first(self, swa: bool) -> int:
        """The first sliding (``swa``) or full layer (llama.cpp's gemma4 graph needs both kinds)."""
        self.require(swa in self.sliding, f"no {'sliding' if swa else 'full'}-attention layer")
        return self.sliding.index(swa)

    def head_size(self, swa: bool) -> int:
        """Head size of the sliding (``swa``) or full layers, as transformers defines their query projection."""
        return self.src.shape(f"{self.attn(self.first(swa))}.q_proj.weight")[0] // int(self.cfg.num_attention_heads)

    def kv_heads(self, swa: bool) -> int:
        """Key/value heads of the sliding (``swa``) or full layers, from the first such layer's key projection."""
        return self.src.shape(f"{self.attn(self.first(swa))}.k_proj.weight")[0] // self.head_size(swa)

    def check(self) -> None:
        c = self.cfg
        n = int(c.num_hidden_layers)
        self.require(bool(c.enable_moe_block), "enable_moe_block=false (a dense model)")
        self.require(not int(c.hidden_size_per_layer_input or 0),
                     f"per-layer embeddings (hidden_size_per_layer_input={c.hidden_size_per_layer_input})")
        self.require(not c.attention_bias, "attention biases")
        # "vision": images attend both ways, text causally (as llama.cpp runs text)
        self.require(c.use_bidirectional_attention != "all", "bidirectional attention ('all'; llama.cpp runs text "
                     "causally)")
        self.require(c.hidden_activation == "gelu_pytorch_tanh", f"activation {c.hidden_activation!r}")
        self.require(len(c.layer_types) == n and set(c.layer_types) == {SLIDING, FULL},
                     f"layer types {sorted(set(c.layer_types))} (llama.cpp: sliding and full layers)")
        self.require(c.layer_types[n - 1] == FULL, "a last layer that is not full attention")
        rope = c.rope_parameters
        self.require(rope[SLIDING].get("rope_type", "default") == "default",
                     f"sliding-window rope {rope[SLIDING].get('rope_type')!r}")
        self.require(rope[FULL].get("rope_type", "default") in ("default", "proportional"),
                     f"full-attention rope {rope[FULL].get('rope_type')!r}")
        for swa in (True, False):
            layers = [il for il in range(self.first_shared) if self.sliding[il] == swa]
            self.require(bool(layers), f"no {'sliding' if swa else 'full'} layer with keys and values of its own")
            heads = {(self.src.shape(f"{self.attn(il)}.q_proj.weight")[0],
                      self.src.shape(f"{self.attn(il)}.k_proj.weight")[0]) for il in layers}
            self.require(len(heads) == 1, f"{'sliding' if swa else 'full'} layers with different head sizes {heads}")
        for il in range(self.first_shared, n):  # llama.cpp reuses the cache of the last (full) or the one before
            src = self.first_shared - (2 if self.sliding[il] else 1)
            last = max(j for j in range(self.first_shared) if self.sliding[j] == self.sliding[il])
            self.require(src == last, f"shared-KV layer {il} reuses layer {last} (llama.cpp: layer {src})")

    # --- memory ---------------------------------------------------------------------
    def model_shape(self) -> ModelShape:
        """The full layers' heads, the sliding layers' own, and the shared-KV layers (no cache). The dense MLP beside
        the experts is not a term of its own: its peak (n_embd + 3 n_ff) stays below the experts' (3 top_k n_ff_exp)
        at Gemma 4's shapes, and a GGUF does not tell it from an unused ``feed_forward_length``."""
        c = self.cfg
        hd, hd_swa = self.head_size(False), self.head_size(True)
        kv, kv_swa = self.kv_heads(False), self.kv_heads(True)
        shared = range(self.first_shared, self.n_layer)
        return ModelShape(n_vocab=self.n_vocab, n_embd=int(c.hidden_size), n_layer=self.n_layer,
                          n_head=int(c.num_attention_heads), n_head_kv=kv, head_k=hd, head_v=hd,
                          n_expert=int(self.n_expert_kept or self.n_expert),
                          n_expert_used=int(self.n_expert_used or self.top_k), n_ff_exp=self.n_ff_exp,
                          n_swa=int(c.sliding_window), n_layer_swa=sum(self.sliding),
                          n_head_kv_swa=kv_swa if kv_swa != kv else 0, head_k_swa=hd_swa, head_v_swa=hd_swa,
                          n_layer_shared=len(shared), n_layer_shared_swa=sum(self.sliding[il] for il in shared),
                          n_tensors=self.n_tensors, graph_nodes_per_token=self.graph_nodes_per_token)

    # --- calibration ----------------------------------------------------------------
    @property
    def embedding_scale(self) -> float:
        """transformers' ``Gemma4TextScaledWordEmbedding`` multiplies the rows by sqrt(hidden) (llama.cpp's graph too)."""
        return float(self.cfg.hidden_size) ** 0.5

    @property
    def logit_softcap(self) -> float | None:
        cap = self.cfg.final_logit_softcapping
        return float(cap) if cap else None

    def layer_input(self, carry: dict) -> dict:
        """The keys and values the store layers left (per layer type) for the shared-KV layers after them."""
        from transformers.cache_utils import KVSharingDict

        kv = KVSharingDict()
        for kind in (SLIDING, FULL):
            if f"{kind}.keys" in carry:
                kv[kind] = (carry[f"{kind}.keys"], carry[f"{kind}.values"])
        return {"shared_kv_states": kv}

    def layer_output(self, out, handed: dict) -> tuple[object, dict]:
        """The hidden states, and what a store layer wrote into the shared-KV dict, handed on to the layers after."""
        return out, {f"{kind}.{what}": t for kind, (keys, values) in handed["shared_kv_states"].items()
                     for what, t in (("keys", keys), ("values", values))}

    def route_residual(self, router, x, top_k: int) -> tuple:
        """transformers' router (softmax, top-k renormalised, times the per-expert scale) at ``top_k`` experts per
        token, which it reads from the configuration."""
        cfg = router.config
        before, cfg.top_k_experts = cfg.top_k_experts, top_k
        try:
            _, weights, ids = router(x)
        finally:
            cfg.top_k_experts = before
        return ids, weights

    def routed_tail(self, layer, residual, routed):
        """transformers' layer after its experts: the dense MLP beside them, the two norms, the residual, the scalar
        (no per-layer inputs: refused)."""
        dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(residual)))
        return (residual + layer.post_feedforward_layernorm(dense + layer.post_feedforward_layernorm_2(routed))) \
            * layer.layer_scalar

    def layer_output_bytes(self, ctx: int) -> int:
        """With shared-KV layers, one sliding and one full layer's keys and values (float32) ride along."""
        if self.first_shared == self.n_layer:
            return 0
        return 4 * 2 * sum(self.kv_heads(swa) * self.head_size(swa) for swa in (True, False))

    # --- metadata -------------------------------------------------------------------
    def n_ff(self) -> list[int]:
        """The dense MLP's width per layer: doubled in the shared-KV layers with ``use_double_wide_mlp``."""
        c = self.cfg
        wide = bool(c.use_double_wide_mlp)
        return [int(c.intermediate_size) * (2 if wide and il >= self.first_shared else 1) for il in range(self.n_layer)]

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c = self.cfg
        ff = self.n_ff()
        kv = [self.kv_heads(swa) for swa in self.sliding]
        self.write_common_metadata(w, n_ff=ff if len(set(ff)) > 1 else ff[0],
                                   n_head_kv=kv if len(set(kv)) > 1 else kv[0])
        hd, hd_swa = self.head_size(False), self.head_size(True)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_key_length_swa(hd_swa)
        w.add_value_length_swa(hd_swa)
        w.add_rope_dimension_count(hd)  # proportional rope: the whole head, rope_freqs stops the rest
        w.add_rope_dimension_count_swa(hd_swa)
        w.add_sliding_window(int(c.sliding_window))
        w.add_sliding_window_pattern(self.sliding)
        w.add_shared_kv_layers(int(c.num_kv_shared_layers or 0))
        w.add_embedding_length_per_layer_input(0)  # llama.cpp requires the key
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))
        w.add_expert_feed_forward_length(self.n_ff_exp)
        self.write_expert_counts(w)

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        """The full layers' base (``rope.freq_base``) and the sliding layers' (``rope.freq_base_swa``)."""
        rope = self.cfg.rope_parameters
        w.add_rope_freq_base(float(rope[FULL]["rope_theta"]))
        w.add_rope_freq_base_swa(float(rope[SLIDING]["rope_theta"]))

    # --- tensors --------------------------------------------------------------------
    def rope_freqs(self) -> TensorSpec:
        """Divisors of the full layers' rope frequencies: transformers' rope ``factor`` for the rotated ones
        (proportional rope: the first ``partial_rotary_factor`` of them), 1e30 for the others."""
        rope = self.cfg.rope_parameters[FULL]
        half = self.head_size(False) // 2
        rotated = half
        if rope.get("rope_type") == "proportional":
            rotated = int(float(rope.get("partial_rotary_factor", 1.0)) * self.head_size(False) // 2)
        factor = float(rope.get("factor", 1.0))

        def load(_: int) -> np.ndarray:
            return np.array([factor] * rotated + [NO_ROTATION] * (half - rotated), dtype=np.float32)

        return TensorSpec("rope_freqs.weight", (half,), load)

    def attention(self, il: int) -> Iterator[TensorSpec]:
        p, a, b = f"{self.prefix}layers.{il}", self.attn(il), f"blk.{il}"
        yield self.plain(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight")
        yield self.plain(f"{b}.attn_q.weight", f"{a}.q_proj.weight")
        for name, hf in (("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_k_norm", "k_norm")):
            if f"{a}.{hf}.weight" in self.src:  # none in shared-KV layers, no v_proj where keys are values
                yield self.plain(f"{b}.{name}.weight", f"{a}.{hf}.weight")
        yield self.plain(f"{b}.attn_q_norm.weight", f"{a}.q_norm.weight")
        yield self.plain(f"{b}.attn_output.weight", f"{a}.o_proj.weight")
        yield self.plain(f"{b}.post_attention_norm.weight", f"{p}.post_attention_layernorm.weight")

    def feed_forward(self, il: int) -> Iterator[TensorSpec]:
        p, b = f"{self.prefix}layers.{il}", f"blk.{il}"
        yield self.plain(f"{b}.ffn_norm.weight", f"{p}.pre_feedforward_layernorm.weight")
        yield from self.dense_ffn(il, f"{p}.mlp")
        yield self.plain(f"{b}.post_ffw_norm_1.weight", f"{p}.post_feedforward_layernorm_1.weight")
        yield self.plain(f"{b}.ffn_gate_inp.weight", f"{p}.router.proj.weight")
        yield self.plain(f"{b}.ffn_gate_inp.scale", f"{p}.router.scale")
        yield self.plain(f"{b}.pre_ffw_norm_2.weight", f"{p}.pre_feedforward_layernorm_2.weight")
        gate_up = f"{p}.experts.gate_up_proj"
        ff = self.src.shape(gate_up)[1] // 2
        yield self.fused_expert_rows(f"{b}.ffn_gate_exps.weight", gate_up, slice(0, ff))
        yield self.fused_expert_rows(f"{b}.ffn_up_exps.weight", gate_up, slice(ff, 2 * ff))
        yield self.fused_expert_rows(f"{b}.ffn_down_exps.weight", f"{p}.experts.down_proj", slice(None))
        yield self.plain(f"{b}.ffn_down_exps.scale", f"{p}.router.per_expert_scale")
        yield self.plain(f"{b}.post_ffw_norm_2.weight", f"{p}.post_feedforward_layernorm_2.weight")
        yield self.plain(f"{b}.post_ffw_norm.weight", f"{p}.post_feedforward_layernorm.weight")
        yield self.plain(f"{b}.layer_output_scale.weight", f"{p}.layer_scalar")

    def tensors(self) -> Iterator[TensorSpec]:
        yield self.plain("token_embd.weight", f"{self.prefix}embed_tokens.weight")
        yield self.plain("output_norm.weight", f"{self.prefix}norm.weight")
        if "lm_head.weight" in self.src:
            yield self.plain("output.weight", "lm_head.weight")
        yield self.rope_freqs()
        for il in range(self.n_layer):  # the vision / audio towers (llama.cpp's mmproj) are left out
            yield from self.attention(il)
            yield from self.feed_forward(il)

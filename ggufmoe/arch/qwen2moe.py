"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM) -> llama.cpp ``qwen2moe``."""

from __future__ import annotations

from typing import Iterator

import gguf

from ggufmoe.arch.registry import register
from ggufmoe.arch.base import Architecture
from ggufmoe.model.tensor import TensorSpec


@register
class Qwen2Moe(Architecture):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_arch = "qwen2moe"

    def check(self) -> None:
        c = self.cfg
        # llama.cpp's qwen2moe graph never renormalises the top-k weights.
        self.require(not c.norm_topk_prob, "norm_topk_prob=true (llama.cpp's qwen2moe never normalises)")
        self.require(not c.mlp_only_layers and c.decoder_sparse_step == 1, "dense layers between MoE layers")
        self.require(not getattr(c, "use_sliding_window", False), "sliding-window attention")

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c = self.cfg
        self.write_common_metadata(w)
        w.add_expert_feed_forward_length(int(c.moe_intermediate_size))
        w.add_expert_shared_feed_forward_length(int(c.shared_expert_intermediate_size))
        self.write_expert_counts(w)

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        for il in range(c.num_hidden_layers):
            moe = f"model.layers.{il}.mlp"
            yield from self.gqa_attention(il, bias=bool(getattr(c, "qkv_bias", True)))
            yield from self.routed_experts(il, moe)
            yield self.plain(f"blk.{il}.ffn_gate_inp_shexp.weight", f"{moe}.shared_expert_gate.weight",
                             lambda t: t.reshape(-1), shape=(int(c.hidden_size),))
            yield from self.dense_ffn(il, f"{moe}.shared_expert", "_shexp")

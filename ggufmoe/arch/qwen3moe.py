"""Qwen3-MoE (Qwen3MoeForCausalLM) -> llama.cpp ``qwen3moe``."""

from __future__ import annotations

from typing import Iterator

import gguf

from ggufmoe.arch.registry import register
from ggufmoe.arch.base import Architecture
from ggufmoe.model.tensor import TensorSpec


@register
class Qwen3Moe(Architecture):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_arch = "qwen3moe"
    per_layer_expert_counts = True
    writes_head_dim = True

    def check(self) -> None:
        c = self.cfg
        # llama.cpp's qwen3moe graph always renormalises the top-k weights.
        self.require(bool(c.norm_topk_prob), "norm_topk_prob=false (llama.cpp's qwen3moe always normalises)")
        self.require(not c.mlp_only_layers and c.decoder_sparse_step == 1, "dense layers between MoE layers")
        self.require(not getattr(c, "use_sliding_window", False), "sliding-window attention")

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c = self.cfg
        self.write_common_metadata(w)
        w.add_expert_feed_forward_length(int(c.moe_intermediate_size))
        self.write_expert_counts(w)

    def tensors(self) -> Iterator[TensorSpec]:
        yield from self.embeddings_and_output()
        for il in range(self.cfg.num_hidden_layers):
            yield from self.gqa_attention(il, qk_norm=True, bias=bool(getattr(self.cfg, "attention_bias", False)))
            yield from self.routed_experts(il, f"model.layers.{il}.mlp")

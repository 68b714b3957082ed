"""OLMoE (OlmoeForCausalLM) -> llama.cpp ``olmoe``."""

from __future__ import annotations

from typing import Iterator

import gguf

from ggufmoe.arch.registry import register
from ggufmoe.arch.base import Architecture
from ggufmoe.model.tensor import TensorSpec


@register
class Olmoe(Architecture):
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_arch = "olmoe"

    def check(self) -> None:
        c = self.cfg
        self.require(not c.norm_topk_prob, "norm_topk_prob=true (llama.cpp's olmoe never normalises)")
        self.require(c.clip_qkv is None, "clip_qkv (llama.cpp's olmoe does not clip)")
        # llama.cpp sizes the k norm by n_embd: grouped-query attention is not supported.
        self.require(c.num_key_value_heads == c.num_attention_heads, "grouped-query attention")

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        self.write_common_metadata(w)
        self.write_expert_counts(w)

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        for il in range(c.num_hidden_layers):
            yield from self.gqa_attention(il, qk_norm=True, bias=bool(getattr(c, "attention_bias", False)))
            yield from self.routed_experts(il, f"model.layers.{il}.mlp")

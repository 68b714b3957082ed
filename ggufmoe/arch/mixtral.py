"""Mixtral (MixtralForCausalLM) -> llama.cpp ``llama`` with MoE feed-forward."""

from __future__ import annotations

from typing import Iterator

import gguf

from ggufmoe.arch.registry import register
from ggufmoe.arch.base import Architecture
from ggufmoe.model.tensor import TensorSpec


@register
class Mixtral(Architecture):
    hf_architectures = ("MixtralForCausalLM",)
    gguf_arch = "llama"
    writes_head_dim = True
    experts_key = "num_local_experts"

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        c = self.cfg
        self.require(getattr(c, "sliding_window", None) is None, "sliding-window attention")
        self.write_common_metadata(w)
        w.add_rope_dimension_count(self.head_dim)
        self.write_expert_counts(w)

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        for il in range(c.num_hidden_layers):
            # llama.cpp's llama rope is interleaved; HF's is rotate-half: permute q and k rows.
            yield from self.gqa_attention(il, permute_qk=True)
            yield from self.routed_experts(il, f"model.layers.{il}.block_sparse_moe",
                                           names=("w1", "w3", "w2"))

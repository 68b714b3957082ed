"""dots.llm1 (Dots1ForCausalLM) -> llama.cpp ``dots1``.

DeepSeek-V3's routing (:mod:`ggufmoe.arch.biased_routing`: sigmoid scores, the selection bias,
groups, leading dense blocks, shared experts) under multi-head attention with per-head RMS q/k norms
and NeoX rope. llama.cpp's dots1 has no sliding window and sizes K and V by the query heads, so
sliding layers and grouped-query attention are refused.
"""

from __future__ import annotations

from typing import Iterator

import gguf

from ggufmoe.arch.biased_routing import BiasedRoutingMoe
from ggufmoe.arch.registry import register
from ggufmoe.model.tensor import TensorSpec


@register
class Dots1(BiasedRoutingMoe):
    hf_architectures = ("Dots1ForCausalLM",)
    gguf_arch = "dots1"
    writes_head_dim = True

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        c = self.cfg
        self.require(all(t == "full_attention" for t in c.layer_types), "sliding-window layers")
        self.require(c.num_key_value_heads == c.num_attention_heads,
                     "grouped-query attention (llama.cpp's dots1 sizes K and V by the query heads)")
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")
        self.write_common_metadata(w)
        self.write_routing(w)

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        for il in range(c.num_hidden_layers):
            yield from self.gqa_attention(il, qk_norm=True, bias=bool(getattr(c, "attention_bias", False)))
            yield from self.feed_forward(il)

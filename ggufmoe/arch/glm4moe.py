"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (Glm4MoeForCausalLM) -> llama.cpp ``glm4moe``.

DeepSeek-V3's routing (:mod:`ggufmoe.arch.biased_routing`: sigmoid scores, the selection bias,
optional groups, leading dense blocks, shared experts) under grouped-query attention with
optional q/k/v biases and q/k norms, NeoX rope over the first ``partial_rotary_factor`` of each
head, and the norm after attention read as ``post_attention_norm``. The multi-token-prediction
layers stored after the last block are not written (llama.cpp runs the model without them).
"""

from __future__ import annotations

from typing import Iterator

import gguf

from ggufmoe.arch.biased_routing import BiasedRoutingMoe
from ggufmoe.arch.registry import register
from ggufmoe.model.tensor import TensorSpec


@register
class Glm4Moe(BiasedRoutingMoe):
    hf_architectures = ("Glm4MoeForCausalLM",)
    gguf_arch = "glm4moe"
    writes_head_dim = True

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        c = self.cfg
        self.require(self.rope_dims % 2 == 0 and self.rope_dims > 0, f"{self.rope_dims} rotary dimensions")
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")
        self.write_common_metadata(w)
        w.add_rope_dimension_count(self.rope_dims)
        self.write_routing(w)

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        for il in range(c.num_hidden_layers):
            yield from self.gqa_attention(il, qk_norm=bool(getattr(c, "use_qk_norm", False)),
                                          bias=bool(getattr(c, "attention_bias", False)), post_norm="post_attention_norm")
            yield from self.feed_forward(il)

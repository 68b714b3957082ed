"""ERNIE-4.5 MoE (Ernie4_5_MoeForCausalLM) -> llama.cpp ``ernie4_5-moe``.

The DeepSeek-V3 layout of :mod:`ggufmoe.arch.biased_routing` with its own names and keys.
Leading dense layers, then MoE layers with a softmax router whose selection bias
``moe_statics.e_score_correction_bias`` (stored 1 x experts) becomes ``exp_probs_b``, top-k weights
renormalised, optional shared experts, interleaved (GPT-J) rope as llama.cpp's NORM rope, optional
biases on the attention projections, usually tied embeddings. llama.cpp loads MoE tensors for every
layer after the dense ones, so only MoE in every layer from ``moe_layer_start_index`` on is converted.
"""

from __future__ import annotations

from typing import Iterator

import gguf
from ggufmoe.arch.base import Architecture
from ggufmoe.arch.biased_routing import BiasedRoutingMoe
from ggufmoe.arch.registry import register
from ggufmoe.model.tensor import TensorSpec

BIAS = "moe_statics.e_score_correction_bias"


@register
class Ernie45Moe(BiasedRoutingMoe):
    hf_architectures = ("Ernie4_5_MoeForCausalLM",)
    gguf_arch = "ernie4_5-moe"
    writes_head_dim = True
    experts_key = Architecture.experts_key
    router_tensors = Architecture.router_tensors + (BIAS,)

    @property
    def n_dense(self) -> int:
        return int(self.cfg.moe_layer_start_index)

    @property
    def n_shared(self) -> int:
        return int(getattr(self.cfg, "moe_num_shared_experts", 0) or 0)

    def check(self) -> None:
        c = self.cfg
        end = int(c.moe_layer_end_index)
        self.require(int(c.moe_layer_interval) == 1 and end in (-1, c.num_hidden_layers - 1),
                     f"MoE layers every {c.moe_layer_interval} from {c.moe_layer_start_index} to {end} (llama.cpp "
                     "needs MoE in every layer after the leading dense ones)")
        self.require(0 <= self.n_dense < c.num_hidden_layers, f"moe_layer_start_index {self.n_dense}")
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")
        self.require(not (c.use_bias and self.n_shared), "biases in the feed-forward layers")

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        self.write_common_metadata(w)
        w.add_leading_dense_block_count(self.n_dense)
        w.add_interleave_moe_layer_step(1)
        w.add_expert_feed_forward_length(self.n_ff_exp)
        if self.n_shared:
            w.add_expert_shared_feed_forward_length(self.n_shared * self.n_ff_exp)
        self.write_expert_counts(w)

    def routing_bias(self, il: int, mlp: str) -> Iterator[TensorSpec]:
        yield self.plain(f"blk.{il}.exp_probs_b.bias", f"{mlp}.{BIAS}", lambda t: t.reshape(-1), shape=(self.n_expert,))

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        for il in range(c.num_hidden_layers):
            yield from self.gqa_attention(il, bias=bool(c.use_bias))
            if c.use_bias:
                yield self.plain(f"blk.{il}.attn_output.bias", f"model.layers.{il}.self_attn.o_proj.bias")
            yield from self.feed_forward(il)

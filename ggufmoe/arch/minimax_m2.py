"""MiniMax-M2 (MiniMaxM2ForCausalLM) -> llama.cpp ``minimax-m2``.

Grouped-query attention with RMS q/k norms over the whole projection (all heads together), NeoX
rope over the first ``partial_rotary_factor`` of each head (released configs say ``rotary_dim``,
which transformers turns into that factor), and MoE in every layer: a sigmoid router whose
selection bias ``e_score_correction_bias`` belongs to the MoE block (-> ``exp_probs_b``), the top-k
weights always renormalised (llama.cpp's graph does so too), Mixtral's per-expert ``w1/w3/w2``.
"""

from __future__ import annotations

from typing import Iterator

import gguf
from gguf.constants import MODEL_TENSOR

from ggufmoe.arch.base import Architecture
from ggufmoe.arch.registry import register
from ggufmoe.model.tensor import TensorSpec

BIAS = "e_score_correction_bias"


@register
class MiniMaxM2(Architecture):
    hf_architectures = ("MiniMaxM2ForCausalLM",)
    gguf_arch = "minimax-m2"
    writes_head_dim = True
    experts_key = "num_local_experts"
    per_expert_rows = Architecture.per_expert_rows | {MODEL_TENSOR.FFN_EXP_PROBS_B}
    router_tensors = Architecture.router_tensors + (BIAS,)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        c = self.cfg
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")
        self.require(self.rope_dims % 2 == 0 and self.rope_dims > 0, f"{self.rope_dims} rotary dimensions")
        self.write_common_metadata(w)
        w.add_rope_dimension_count(self.rope_dims)
        w.add_expert_feed_forward_length(self.n_ff_exp)
        self.write_expert_counts(w)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)

    def tensors(self) -> Iterator[TensorSpec]:
        yield from self.embeddings_and_output()
        for il in range(self.cfg.num_hidden_layers):
            moe = f"model.layers.{il}.block_sparse_moe"
            yield from self.gqa_attention(il, qk_norm=True)
            yield from self.routed_experts(il, moe, names=("w1", "w3", "w2"))
            yield self.plain(f"blk.{il}.exp_probs_b.bias", f"{moe}.{BIAS}")

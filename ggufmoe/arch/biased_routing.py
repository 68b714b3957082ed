"""The MoE layout DeepSeek-V3 introduced and GLM-4.5 reuses, shared by their modules.

Leading dense blocks, then MoE blocks with ``n_shared_experts`` shared experts and a router that
scores experts with a sigmoid (or V2's softmax), may pick expert groups first, selects with a
per-expert bias (``e_score_correction_bias`` -> ``exp_probs_b``) that does not weigh the outputs,
renormalises the top-k weights and scales them by ``routed_scaling_factor``.
"""

from __future__ import annotations

from typing import Iterator

import gguf
from gguf.constants import MODEL_TENSOR

from ggufmoe.arch.base import Architecture
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.tensor import TensorSpec

SIGMOID, SOFTMAX = gguf.ExpertGatingFuncType.SIGMOID, gguf.ExpertGatingFuncType.SOFTMAX
BIAS = "e_score_correction_bias"


class BiasedRoutingMoe(Architecture):
    """Base of the DeepSeek-V3-style families; subclasses set :attr:`scoring`."""

    experts_key = "n_routed_experts"
    per_expert_rows = Architecture.per_expert_rows | {MODEL_TENSOR.FFN_EXP_PROBS_B}  # the routing bias
    router_tensors = Architecture.router_tensors + (BIAS,)

    @property
    def scoring(self) -> str:
        """The router's score function: ``sigmoid`` or ``softmax``."""
        return "sigmoid"

    @property
    def n_dense(self) -> int:
        """Leading dense (non-MoE) blocks."""
        return int(getattr(self.cfg, "first_k_dense_replace", 0) or 0)

    @property
    def n_shared(self) -> int:
        return int(getattr(self.cfg, "n_shared_experts", 0) or 0)

    @property
    def expert_groups(self) -> tuple[int, int] | None:
        """(groups, groups used) when group routing can exclude experts, else None."""
        n_group = int(getattr(self.cfg, "n_group", 1) or 1)
        topk_group = int(getattr(self.cfg, "topk_group", n_group) or n_group)
        if n_group > 1 and topk_group < n_group:
            return n_group, topk_group
        return None

    def write_routing(self, w: gguf.GGUFWriter) -> None:
        """The dense-block count and every key of the routed and shared experts."""
        c = self.cfg
        w.add_leading_dense_block_count(self.n_dense)
        w.add_expert_feed_forward_length(self.n_ff_exp)
        self.write_expert_counts(w)
        w.add_expert_shared_count(self.n_shared)
        w.add_expert_weights_scale(float(getattr(c, "routed_scaling_factor", 1.0) or 1.0))
        w.add_expert_weights_norm(bool(getattr(c, "norm_topk_prob", False)))
        w.add_expert_gating_func(SIGMOID if self.scoring == "sigmoid" else SOFTMAX)
        if self.expert_groups:
            w.add_expert_group_count(self.expert_groups[0])
            w.add_expert_group_used_count(self.expert_groups[1])

    def model_shape(self) -> ModelShape:
        s = super().model_shape()
        s.n_ff_shexp = self.n_shared * self.n_ff_exp
        s.n_dense = self.n_dense
        s.n_ff_dense = int(self.cfg.intermediate_size) if self.n_dense else 0
        return s

    def routing_bias(self, il: int, mlp: str) -> Iterator[TensorSpec]:
        """Layer ``il``'s selection bias, where the checkpoint has one."""
        if f"{mlp}.gate.{BIAS}" in self.src:
            yield self.plain(f"blk.{il}.exp_probs_b.bias", f"{mlp}.gate.{BIAS}")

    def feed_forward(self, il: int) -> Iterator[TensorSpec]:
        """Layer ``il``'s dense MLP, or its router, routing bias, routed and shared experts."""
        mlp = f"model.layers.{il}.mlp"
        if il < self.n_dense:
            yield from self.dense_ffn(il, mlp)
            return
        yield from self.routed_experts(il, mlp)
        yield from self.routing_bias(il, mlp)
        if self.n_shared:
            yield from self.dense_ffn(il, f"{mlp}.shared_experts", "_shexp")

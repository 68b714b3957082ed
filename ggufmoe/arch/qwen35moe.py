"""Qwen3.5/3.6-MoE (Qwen3_5MoeForConditionalGeneration) -> llama.cpp ``qwen35moe``.

The Qwen3-Next hybrid (:mod:`ggufmoe.arch.qwen3next`: Gated DeltaNet layers with a recurrent state, gated
full attention, every layer MoE with a sigmoid-gated shared expert), shipped as a vision-language model:
the text model's configuration is nested under ``text_config`` (read as transformers builds the causal LM,
:func:`~ggufmoe.source.hf_config.transformers_config`), its tensors carry the ``model.language_model.``
prefix, and ``model.visual.*`` (llama.cpp's mmproj) and ``mtp.*`` (multi-token prediction) are left out.

What differs from Qwen3-Next, as llama.cpp's converter and graph have it: the linear attention's input
projections are stored apart (``in_proj_qkv`` -> ``attn_qkv``, ``in_proj_z`` -> ``attn_gate``,
``in_proj_b`` -> ``ssm_beta``, ``in_proj_a`` -> ``ssm_alpha``); the graph broadcasts q/k over the value heads
tiled, so with fewer key than value heads every value-head axis is reordered grouped -> tiled (the V rows of
``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``/``in_proj_a`` rows, ``A_log``, ``dt_bias``, the V channels of
``conv1d``, the columns of ``out_proj``); the routed experts are stored fused (``gate_up_proj`` (experts,
2 ff, hidden), ``down_proj`` (experts, hidden, ff)) and split into gate and up; routing always renormalises
over the top-k (no ``norm_topk_prob``); rope is interleaved multi-axis (IMROPE), which for text (all axes
at the same position) is NEOX rope over the rotated dimensions, and llama.cpp requires its
``rope.dimension_sections`` (the checkpoint's ``mrope_section``, or [11, 11, 10, 0] as its converter writes).

A checkpoint saved by transformers' ``Qwen3_5MoeForCausalLM`` (``model.`` prefix, experts one by one, or a
config.json alone when planning) converts the same.
"""

from __future__ import annotations

from typing import Iterator

import gguf
import numpy as np

from ggufmoe.arch.base import rope_params
from ggufmoe.arch.deepseek2 import ReadForTwo
from ggufmoe.arch.qwen3next import Qwen3Next
from ggufmoe.arch.registry import register
from ggufmoe.model.tensor import TensorSpec

DEFAULT_SECTIONS = [11, 11, 10, 0]  # llama.cpp's converter, for checkpoints without mrope_section


@register
class Qwen35Moe(Qwen3Next):
    hf_architectures = ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM")
    gguf_arch = "qwen35moe"
    tiles_qk = True
    sensitivity_aliases = {"attn_gate": "attn_v", "ssm_beta": "attn_k", "ssm_alpha": "attn_k",
                           "ssm_out": "attn_output"}

    @property
    def prefix(self) -> str:
        nested = "model.language_model."
        return nested if f"{nested}embed_tokens.weight" in self.src else "model."

    def check(self) -> None:
        self.check_hybrid()  # routing: softmax renormalised over the top-k, as llama.cpp's graph hard-codes

    @property
    def rope_sections(self) -> list[int]:
        sections = [int(s) for s in rope_params(self.cfg).get("mrope_section") or DEFAULT_SECTIONS]
        self.require(len(sections) <= 4, f"mrope_section {sections} (llama.cpp takes at most 4 sections)")
        return sections + [0] * (4 - len(sections))

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_rope_dimension_sections(self.rope_sections)

    def input_projections(self, il: int, qkvz: ReadForTwo) -> Iterator[TensorSpec]:
        c = self.cfg
        p, b = f"{self.prefix}layers.{il}.linear_attn", f"blk.{il}"
        n_qk, dv = 2 * int(c.linear_num_key_heads) * int(c.linear_key_head_dim), int(c.linear_value_head_dim)

        def qkv(t: np.ndarray) -> np.ndarray:
            return np.concatenate([t[:n_qk], self.v_heads(t[n_qk:], dv)])

        yield self.plain(f"{b}.attn_qkv.weight", f"{p}.in_proj_qkv.weight", qkv)
        yield self.plain(f"{b}.attn_gate.weight", f"{p}.in_proj_z.weight", lambda t: self.v_heads(t, dv))
        yield self.plain(f"{b}.ssm_beta.weight", f"{p}.in_proj_b.weight", lambda t: self.v_heads(t, 1))
        yield self.plain(f"{b}.ssm_alpha.weight", f"{p}.in_proj_a.weight", lambda t: self.v_heads(t, 1))

    def moe_experts(self, il: int, moe: str) -> Iterator[TensorSpec]:
        gate_up = f"{moe}.experts.gate_up_proj"
        if gate_up not in self.src:  # saved by transformers: one expert at a time
            yield from super().moe_experts(il, moe)
            return
        ff, b = self.src.shape(gate_up)[1] // 2, f"blk.{il}"
        yield self.plain(f"{b}.ffn_gate_inp.weight", f"{moe}.gate.weight")
        yield self.fused_expert_rows(f"{b}.ffn_gate_exps.weight", gate_up, slice(0, ff))
        yield self.fused_expert_rows(f"{b}.ffn_up_exps.weight", gate_up, slice(ff, 2 * ff))
        yield self.fused_expert_rows(f"{b}.ffn_down_exps.weight", f"{moe}.experts.down_proj", slice(None))

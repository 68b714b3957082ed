"""gpt-oss (GptOssForCausalLM) -> llama.cpp ``gpt-oss``.

Grouped-query attention with q/k/v/o biases and a learned sink logit per head
(``attn_sinks``), sliding-window and full layers as ``layer_types`` says (written per layer as
``sliding_window_pattern``), NeoX rope with YaRN, a router with a bias whose top-k logits are
softmaxed, and experts with biases and the clamped SwiGLU ``(up + 1) * gate * sigmoid(1.702 gate)``.

The checkpoint stores each layer's experts fused: ``gate_up_proj`` (experts, hidden, 2 ff) with gate
and up interleaved (even and odd columns) and ``down_proj`` (experts, ff, hidden), or, as OpenAI
ships them, MXFP4 ``*_blocks`` / ``*_scales`` (experts, rows, ...) with the rows as outputs. MXFP4
experts carry ``source_type`` MXFP4 and their ggml bytes (:mod:`ggufmoe.source.mxfp4`): written as
MXFP4, they are the checkpoint's own codes and scales.
"""

from __future__ import annotations

from typing import Iterator

import gguf
import numpy as np
from gguf.constants import MODEL_TENSOR

from ggufmoe.arch.base import Architecture, rope_params
from ggufmoe.arch.registry import register
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.source import mxfp4

# llama.cpp's LLM_FFN_SWIGLU_OAI_MOE has these constants built in.
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
SLIDING, FULL = "sliding_attention", "full_attention"
BLOCKS, SCALES = "_blocks", "_scales"


@register
class GptOss(Architecture):
    hf_architectures = ("GptOssForCausalLM",)
    gguf_arch = "gpt-oss"
    writes_head_dim = True
    experts_key = "num_local_experts"
    rope_kinds = ("default", "yarn")
    swa_pattern = 2  # llama.cpp's gpt-oss default: sliding, full, sliding, ...
    # besides the routers, the experts' biases (2-D: experts x outputs) are rows per expert
    per_expert_rows = Architecture.per_expert_rows | {MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP,
                                                      MODEL_TENSOR.FFN_DOWN_EXP}

    @property
    def sliding(self) -> list[bool]:
        """Per layer: whether it attends to a sliding window."""
        types = list(getattr(self.cfg, "layer_types", None) or [])
        return [t == SLIDING for t in types]

    def model_shape(self) -> ModelShape:
        s = super().model_shape()
        s.n_layer_swa = sum(self.sliding)
        s.n_swa = int(self.cfg.sliding_window or 0) if s.n_layer_swa else 0
        return s

    def check(self) -> None:
        c = self.cfg
        self.require(abs(float(c.swiglu_limit) - SWIGLU_LIMIT) < 1e-6 and
                     abs(float(getattr(c, "swiglu_alpha", SWIGLU_ALPHA)) - SWIGLU_ALPHA) < 1e-6,
                     f"SwiGLU alpha {getattr(c, 'swiglu_alpha', SWIGLU_ALPHA)} / limit {c.swiglu_limit} "
                     f"(llama.cpp's gpt-oss graph fixes them at {SWIGLU_ALPHA} / {SWIGLU_LIMIT})")
        self.require(bool(c.attention_bias), "attention_bias=false (llama.cpp's gpt-oss reads q/k/v/o biases)")
        types = list(getattr(c, "layer_types", None) or [])
        self.require(len(types) == c.num_hidden_layers and set(types) <= {SLIDING, FULL},
                     f"layer_types {types}")
        self.require(not any(self.sliding) or c.sliding_window, "sliding layers without a sliding_window")
        self.require("lm_head.weight" in self.src or not self.src.has_weights,
                     "tied embeddings (llama.cpp's gpt-oss reads its own output matrix)")

    def caveats(self) -> list[str]:
        rope = rope_params(self.cfg)
        if self.rope_kind == "yarn" and not rope.get("truncate", True):
            return ["YaRN with truncate=false (as gpt-oss ships): llama.cpp always rounds YaRN's correction range "
                    "to whole dimensions, so a few rope frequencies differ slightly from transformers'"]
        return []

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c = self.cfg
        self.write_common_metadata(w)
        w.add_rope_dimension_count(self.head_dim)
        w.add_sliding_window(int(c.sliding_window or 0))
        w.add_sliding_window_pattern(self.sliding)
        w.add_expert_feed_forward_length(self.n_ff_exp)
        self.write_expert_counts(w)

    # --- tensors -----------------------------------------------------------------------------
    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        for il in range(c.num_hidden_layers):
            a, b = f"model.layers.{il}.self_attn", f"blk.{il}"
            yield from self.gqa_attention(il, bias=True, post_norm="post_attention_norm")
            yield self.plain(f"{b}.attn_output.bias", f"{a}.o_proj.bias")
            yield self.plain(f"{b}.attn_sinks.weight", f"{a}.sinks")
            yield from self.moe(il)

    def moe(self, il: int) -> Iterator[TensorSpec]:
        p, b = f"model.layers.{il}.mlp", f"blk.{il}"
        yield self.plain(f"{b}.ffn_gate_inp.weight", f"{p}.router.weight")
        yield self.plain(f"{b}.ffn_gate_inp.bias", f"{p}.router.bias")
        gate_up, down = f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"
        for kind, name, rows in (("gate", gate_up, slice(0, None, 2)), ("up", gate_up, slice(1, None, 2)),
                                 ("down", down, slice(None))):
            yield self.experts(f"{b}.ffn_{kind}_exps.weight", name, rows)
            yield self.plain(f"{b}.ffn_{kind}_exps.bias", f"{name}_bias", lambda t, r=rows: np.ascontiguousarray(t[:, r]),
                             shape=self._bias_shape(f"{name}_bias", rows))

    def _bias_shape(self, name: str, rows: slice) -> tuple[int, int]:
        n_expert, width = self.src.shape(name)
        return n_expert, len(range(width)[rows])

    def experts(self, gguf_name: str, hf_name: str, rows: slice) -> TensorSpec:
        """One of gate / up / down, expert by expert: ``rows`` of each expert's output rows."""
        if hf_name + BLOCKS in self.src:
            return self.mxfp4_experts(gguf_name, hf_name, rows)
        return self.fused_experts(gguf_name, hf_name, rows)

    def mxfp4_experts(self, gguf_name: str, hf_name: str, rows: slice) -> TensorSpec:
        """As :meth:`experts`, from MXFP4 ``blocks`` / ``scales``: dequantized, or as ggml MXFP4 bytes."""
        src = self.src
        blocks, scales = hf_name + BLOCKS, hf_name + SCALES
        self.require(scales in src, f"{blocks} without {scales}")
        n_expert, n_rows, groups, width = src.shape(blocks)
        self.require(width == mxfp4.BLOCK // 2 and src.shape(scales) == (n_expert, n_rows, groups),
                     f"MXFP4 {blocks} {src.shape(blocks)} with {scales} {src.shape(scales)}")

        def part(e: int) -> tuple[np.ndarray, np.ndarray]:
            return src.raw_rows(blocks, e, e + 1)[0][rows], src.raw_rows(scales, e, e + 1)[0][rows]

        def load(e: int) -> np.ndarray:
            return mxfp4.dequantize(*part(e))

        def raw(e: int) -> np.ndarray:
            return mxfp4.to_ggml(*part(e)).reshape(-1)

        return TensorSpec(gguf_name, (n_expert, len(range(n_rows)[rows]), groups * mxfp4.BLOCK), load, n_expert,
                          hf_name=hf_name, source_type=gguf.GGMLQuantizationType.MXFP4, raw=raw)

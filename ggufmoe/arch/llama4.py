"""Llama-4 text models (Llama4ForCausalLM: Scout, Maverick) -> llama.cpp ``llama4``.

MoE in every ``interleave_moe_layer_step``-th layer, dense MLPs (``intermediate_size_mlp``) between,
a shared expert beside the routed ones, top-k routing by logit whose sigmoid weights scale each
expert's *input*; attention with interleaved rope (llama.cpp's NORM rope, no permutation), every
fourth layer without rope (temperature-tuned queries instead) and attending to the whole context,
the others to chunks of ``attention_chunk_size`` with an RMS q/k norm. llama.cpp builds that
pattern in: chunks of 8192, a rope-less layer every 4, the temperature's 8192/0.1, q/k norms unless
the model has 128 experts; other settings are refused. Llama-3 rope scaling becomes
``rope_freqs`` (transformers' own frequencies, as divisors). The experts are stored fused,
``gate_up_proj`` (experts, hidden, 2 ff) and ``down_proj`` (experts, ff, hidden).

transformers computes these experts densely (every token through every expert, weighted by the
router's scores), with no routed-experts kernel to observe, so they are not calibrated
(:attr:`calibration_refused`).
"""

from __future__ import annotations

from typing import Iterator

import gguf
import numpy as np

from ggufmoe.arch.base import Architecture, rope_params
from ggufmoe.arch.registry import register
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.source.hf_config import transformers_config

CHUNK, NOPE_EVERY, TEMP_FLOOR, TEMP_SCALE = 8192, 4, 8192, 0.1  # llama.cpp's llama4 graph has them built in
CHUNKED = "chunked_attention"


@register
class Llama4(Architecture):
    hf_architectures = ("Llama4ForCausalLM",)
    gguf_arch = "llama4"
    writes_head_dim = True
    experts_key = "num_local_experts"
    rope_kinds = ("default", "llama3")
    swa_pattern = 4
    calibration_refused = ("its experts module computes every token through every expert (no routed-experts "
                           "kernel to observe)")

    @property
    def step(self) -> int:
        return int(self.cfg.interleave_moe_layer_step)

    def is_moe(self, il: int) -> bool:
        return (il + 1) % self.step == 0

    @property
    def chunked(self) -> list[bool]:
        return [t == CHUNKED for t in self.cfg.layer_types]

    def check(self) -> None:
        c = self.cfg
        n = c.num_hidden_layers
        self.require(list(c.moe_layers) == [il for il in range(n) if self.is_moe(il)],
                     f"MoE layers {list(c.moe_layers)} (llama.cpp: every interleave_moe_layer_step-th layer)")
        self.require(list(c.no_rope_layers) == [int((il + 1) % NOPE_EVERY != 0) for il in range(n)],
                     f"no_rope_layers {list(c.no_rope_layers)} (llama.cpp: rope in all but every {NOPE_EVERY}th)")
        self.require(self.chunked == [bool(r) for r in c.no_rope_layers] and c.attention_chunk_size == CHUNK,
                     f"attention chunks of {c.attention_chunk_size} in layers {self.chunked} (llama.cpp: {CHUNK}, "
                     "in the rope layers)")
        self.require(bool(c.attn_temperature_tuning) and int(c.floor_scale) == TEMP_FLOOR
                     and abs(float(c.attn_scale) - TEMP_SCALE) < 1e-9,
                     f"attention temperature tuning {c.attn_temperature_tuning} floor {c.floor_scale} scale "
                     f"{c.attn_scale} (llama.cpp: on, {TEMP_FLOOR}, {TEMP_SCALE})")
        self.require(bool(c.use_qk_norm) == (self.n_expert != 128),
                     f"use_qk_norm={c.use_qk_norm} with {self.n_expert} experts (llama.cpp: q/k norms unless 128)")
        self.require(not c.attention_bias, "attention biases")
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")

    def model_shape(self) -> ModelShape:
        s = super().model_shape()
        c = self.cfg
        s.n_ff_shexp = self.n_ff_exp
        s.n_dense = sum(not self.is_moe(il) for il in range(c.num_hidden_layers))
        s.n_ff_dense = int(c.intermediate_size_mlp) if s.n_dense else 0
        s.n_layer_swa = sum(self.chunked)
        s.n_swa = CHUNK if s.n_layer_swa else 0
        return s

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c = self.cfg
        self.write_common_metadata(w, n_ff=int(c.intermediate_size_mlp))
        w.add_rope_dimension_count(self.head_dim)
        w.add_interleave_moe_layer_step(self.step)
        w.add_expert_feed_forward_length(self.n_ff_exp)
        w.add_expert_shared_count(1)  # llama.cpp's llama4 has one shared expert as wide as a routed one
        w.add_sliding_window(CHUNK)  # any non-zero value: llama.cpp then chunks at its own 8192
        w.add_sliding_window_pattern(self.chunked)
        self.write_expert_counts(w)

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        """Base only: Llama-3 scaling is the ``rope_freqs`` tensor."""
        w.add_rope_freq_base(float(rope_params(self.cfg).get("rope_theta", 10000.0)))
        self.require(self.rope_kind in self.rope_kinds, f"rope scaling {self.rope_kind!r}")

    def rope_freqs(self) -> TensorSpec:
        """llama.cpp divides each rope frequency by its factor: transformers' default over its scaled ones."""
        d = self.head_dim
        base = float(rope_params(self.cfg)["rope_theta"])

        def load(_: int) -> np.ndarray:
            import torch
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            # transformers' own function, on the configuration it builds (the cached view is not one)
            scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers_config(self.src.path).get_text_config(), "cpu")
            plain = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            return (plain / scaled.double()).float().numpy()

        return TensorSpec("rope_freqs.weight", (d // 2,), load)

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        yield from self.embeddings_and_output()
        if self.rope_kind == "llama3":
            yield self.rope_freqs()
        for il in range(c.num_hidden_layers):
            ff, b = f"model.layers.{il}.feed_forward", f"blk.{il}"
            yield from self.gqa_attention(il)
            if not self.is_moe(il):
                yield from self.dense_ffn(il, ff)
                continue
            yield self.plain(f"{b}.ffn_gate_inp.weight", f"{ff}.router.weight")
            n_ff = self.n_ff_exp
            yield self.fused_experts(f"{b}.ffn_gate_exps.weight", f"{ff}.experts.gate_up_proj", slice(0, n_ff))
            yield self.fused_experts(f"{b}.ffn_up_exps.weight", f"{ff}.experts.gate_up_proj", slice(n_ff, None))
            yield self.fused_experts(f"{b}.ffn_down_exps.weight", f"{ff}.experts.down_proj", slice(None))
            yield from self.dense_ffn(il, f"{ff}.shared_expert", "_shexp")

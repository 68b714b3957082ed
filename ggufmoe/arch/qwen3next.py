"""Qwen3-Next (Qwen3NextForCausalLM) -> llama.cpp ``qwen3next``.

A hybrid: most layers are Gated DeltaNet linear attention (``linear_attention`` in ``layer_types``,
recurrent layers to llama.cpp), the others gated full attention (q_proj gives per head the query and
an output gate). Every layer is MoE: softmax routing renormalised over the top-k, plus a shared expert
scaled by ``sigmoid(shared_expert_gate)``.

Conversion (as llama.cpp's own converter does): the zero-centred RMS norms (transformers computes
``x * (1 + w)``) get ``w + 1``, except the gated norm of the linear attention (plain ``w``);
``A_log`` becomes ``ssm_a = -exp(A_log)``, ``dt_bias`` ``ssm_dt.bias``; the depthwise conv kernel
loses its middle axis; ``in_proj_qkvz`` (per key head ``[q, k, v, z]``) is split into ``attn_qkv``
(all q, all k, all v) and ``attn_gate`` (z); ``in_proj_ba`` stays interleaved per key head
(``ssm_ba``). llama.cpp's graph repeats q/k heads interleaved as transformers does, so no value-head
reordering (:attr:`Qwen3Next.tiles_qk`). Multi-token-prediction weights (``mtp.*``) are left out.

Qwen3.5-MoE (:mod:`ggufmoe.arch.qwen35moe`) is the same hybrid: it subclasses this module.

llama.cpp keeps a KV cache for the full-attention layers only, and a fixed F32 state per sequence
for the recurrent ones (:meth:`model_shape`).

Calibration runs transformers' own layers, the linear attention stateless over each chunk (every chunk a
sequence, as llama.cpp's imatrix runs them); ``attn_qkv`` and ``attn_gate`` both record the input of
``in_proj_qkvz`` (:attr:`~ggufmoe.model.tensor.TensorSpec.rows_of_source`) and, where the value heads are
reordered, ``ssm_out`` records its input in the GGUF's column order (``input_order``). Pruning is exact (softmax
over the kept experts, renormalised).
"""

from __future__ import annotations

from typing import ClassVar, Iterator

import gguf
import numpy as np

from ggufmoe.arch.base import Architecture
from ggufmoe.arch.deepseek2 import ReadForTwo
from ggufmoe.arch.registry import register
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.names import NewKeys
from ggufmoe.model.tensor import TensorSpec

LINEAR, FULL = "linear_attention", "full_attention"


def plus_one(t: np.ndarray) -> np.ndarray:
    return t + 1.0


@register
class Qwen3Next(Architecture):
    hf_architectures = ("Qwen3NextForCausalLM",)
    gguf_arch = "qwen3next"
    writes_head_dim = True
    # the new matrices take the defaults of their closest reference class
    sensitivity_aliases = {"attn_gate": "attn_v", "ssm_ba": "attn_k", "ssm_out": "attn_output"}
    # llama.cpp's graph broadcasts q/k over the value heads tiled (k0 k1 .. k0 k1 ..), where transformers repeats
    # each key head (k0 k0 .. k1 k1 ..): the value heads are then reordered grouped -> tiled (:meth:`v_heads`)
    tiles_qk: ClassVar[bool] = False
    graph_nodes_per_token = 40  # llama.cpp's graph budget for the chunked delta rule (llama-context.cpp)

    @property
    def prefix(self) -> str:
        """The text model's tensors in the checkpoint: ``{prefix}layers.N...``."""
        return "model."

    @property
    def recurrent(self) -> list[bool]:
        """Per layer: a linear-attention (recurrent) layer."""
        return [t == LINEAR for t in self.cfg.layer_types]

    def check(self) -> None:
        c = self.cfg
        # llama.cpp's qwen3next graph hard-codes softmax routing renormalised over the top-k, every layer MoE
        self.require(bool(c.norm_topk_prob), "norm_topk_prob=false (llama.cpp's qwen3next always normalises)")
        self.require(not c.mlp_only_layers and c.decoder_sparse_step == 1,
                     "dense layers between MoE layers (mlp_only_layers / decoder_sparse_step != 1)")
        self.check_hybrid()

    def check_hybrid(self) -> None:
        """What llama.cpp's graphs of both families hard-code: a shared expert in every layer, one head size for
        keys and values of the linear attention, value heads a multiple of key heads, SiLU, no attention bias."""
        c = self.cfg
        self.require(c.linear_key_head_dim == c.linear_value_head_dim,
                     f"linear_key_head_dim {c.linear_key_head_dim} != linear_value_head_dim {c.linear_value_head_dim}")
        self.require(c.linear_num_value_heads % c.linear_num_key_heads == 0,
                     "linear_num_value_heads not a multiple of linear_num_key_heads")
        self.require(len(c.layer_types) == c.num_hidden_layers and set(c.layer_types) <= {LINEAR, FULL},
                     f"layer types {sorted(set(c.layer_types))}")
        self.require(int(c.shared_expert_intermediate_size or 0) > 0, "no shared expert")
        self.require(not getattr(c, "attention_bias", False), "attention biases")
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")

    # --- memory ---------------------------------------------------------------------
    def model_shape(self) -> ModelShape:
        c = self.cfg
        s = super().model_shape()
        s.n_layer_recr = sum(self.recurrent)
        s.ssm_d_conv, s.ssm_d_state = int(c.linear_conv_kernel_dim), int(c.linear_key_head_dim)
        s.ssm_d_inner = int(c.linear_value_head_dim) * int(c.linear_num_value_heads)
        s.ssm_n_group = int(c.linear_num_key_heads)
        return s

    # --- metadata -------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check()
        c = self.cfg
        self.write_common_metadata(w)
        w.add_rope_dimension_count(self.rope_dims)
        w.add_expert_feed_forward_length(int(c.moe_intermediate_size))
        w.add_expert_shared_feed_forward_length(int(c.shared_expert_intermediate_size))
        self.write_expert_counts(w)
        w.add_ssm_conv_kernel(int(c.linear_conv_kernel_dim))
        w.add_ssm_inner_size(int(c.linear_value_head_dim) * int(c.linear_num_value_heads))
        w.add_ssm_state_size(int(c.linear_key_head_dim))
        w.add_ssm_time_step_rank(int(c.linear_num_value_heads))
        w.add_ssm_group_count(int(c.linear_num_key_heads))
        w.add_array(NewKeys.RECURRENT_LAYERS.format(arch=self.gguf_arch), self.recurrent)

    # --- tensors --------------------------------------------------------------------
    def v_heads(self, t: np.ndarray, head_dim: int, axis: int = 0) -> np.ndarray:
        """``t`` with its value heads (``head_dim`` entries each along ``axis``) in the order llama.cpp's graph
        pairs them with the key heads: grouped per key head as transformers stores them, or tiled
        (:attr:`tiles_qk`)."""
        c = self.cfg
        nk, nv = int(c.linear_num_key_heads), int(c.linear_num_value_heads)
        if not self.tiles_qk or nk == nv:
            return t
        t = np.moveaxis(t, axis, 0)
        tiled = t.reshape(nk, nv // nk, head_dim, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
        return np.ascontiguousarray(np.moveaxis(tiled, 0, axis))

    def split_qkvz(self, il: int, qkvz: ReadForTwo) -> Iterator[TensorSpec]:
        """``attn_qkv`` (all q, all k, all v rows) and ``attn_gate`` (z rows) from ``in_proj_qkvz``, whose rows
        are grouped per key head as ``[q, k, v, z]``."""
        c = self.cfg
        name = f"{self.prefix}layers.{il}.linear_attn.in_proj_qkvz.weight"
        nk, dk = int(c.linear_num_key_heads), int(c.linear_key_head_dim)
        vr = int(c.linear_num_value_heads) // nk * int(c.linear_value_head_dim)  # value (and z) rows per key head
        hidden = int(c.hidden_size)

        def groups() -> np.ndarray:
            return qkvz.get(name).reshape(nk, 2 * dk + 2 * vr, hidden)

        def qkv(_: int) -> np.ndarray:
            g = groups()
            return np.concatenate([g[:, :dk].reshape(-1, hidden), g[:, dk:2 * dk].reshape(-1, hidden),
                                   g[:, 2 * dk:2 * dk + vr].reshape(-1, hidden)])

        def z(_: int) -> np.ndarray:
            return np.ascontiguousarray(groups()[:, 2 * dk + vr:].reshape(-1, hidden))

        yield TensorSpec(f"blk.{il}.attn_qkv.weight", (nk * (2 * dk + vr), hidden), qkv, hf_name=name,
                         rows_of_source=True)
        yield TensorSpec(f"blk.{il}.attn_gate.weight", (nk * vr, hidden), z, hf_name=name,
                         rows_of_source=True)

    def input_projections(self, il: int, qkvz: ReadForTwo) -> Iterator[TensorSpec]:
        """The linear attention's projections of the layer input: q/k/v, the output gate z, beta and alpha."""
        yield from self.split_qkvz(il, qkvz)
        yield self.plain(f"blk.{il}.ssm_ba.weight", f"{self.prefix}layers.{il}.linear_attn.in_proj_ba.weight")

    def linear_attention(self, il: int, qkvz: ReadForTwo) -> Iterator[TensorSpec]:
        p, b = f"{self.prefix}layers.{il}.linear_attn", f"blk.{il}"
        c = self.cfg
        conv = self.src.shape(f"{p}.conv1d.weight")
        n_qk = 2 * int(c.linear_num_key_heads) * int(c.linear_key_head_dim)  # conv channels of q and k; v after
        dv = int(c.linear_value_head_dim)

        def conv1d(t: np.ndarray) -> np.ndarray:
            t = t.reshape(conv[0], conv[-1])
            return np.concatenate([t[:n_qk], self.v_heads(t[n_qk:], dv)])

        yield from self.input_projections(il, qkvz)
        yield self.plain(f"{b}.ssm_conv1d.weight", f"{p}.conv1d.weight", conv1d, shape=(conv[0], conv[-1]))
        yield self.plain(f"{b}.ssm_dt.bias", f"{p}.dt_bias", (lambda t: self.v_heads(t, 1)) if self.tiles_qk else None)
        yield self.plain(f"{b}.ssm_a", f"{p}.A_log", lambda t: -np.exp(self.v_heads(t, 1)))
        yield self.plain(f"{b}.ssm_norm.weight", f"{p}.norm.weight")  # a plain weight: no +1
        out = self.plain(f"{b}.ssm_out.weight", f"{p}.out_proj.weight",
                         (lambda t: self.v_heads(t, dv, axis=1)) if self.tiles_qk else None)
        if self.tiles_qk:  # its columns reordered as the value heads: so is its input (the imatrix's columns)
            out.input_order = tuple(self.v_heads(np.arange(out.shape[1]), dv).tolist())
        yield out

    def full_attention(self, il: int) -> Iterator[TensorSpec]:
        p, b = f"{self.prefix}layers.{il}.self_attn", f"blk.{il}"
        yield self.plain(f"{b}.attn_q.weight", f"{p}.q_proj.weight")  # per head [query, gate], as llama.cpp reads it
        yield self.plain(f"{b}.attn_k.weight", f"{p}.k_proj.weight")
        yield self.plain(f"{b}.attn_v.weight", f"{p}.v_proj.weight")
        yield self.plain(f"{b}.attn_output.weight", f"{p}.o_proj.weight")
        yield self.plain(f"{b}.attn_q_norm.weight", f"{p}.q_norm.weight", plus_one)
        yield self.plain(f"{b}.attn_k_norm.weight", f"{p}.k_norm.weight", plus_one)

    def tensors(self) -> Iterator[TensorSpec]:
        c = self.cfg
        qkvz = ReadForTwo(self.src)
        yield self.plain("token_embd.weight", f"{self.prefix}embed_tokens.weight")
        yield self.plain("output_norm.weight", f"{self.prefix}norm.weight", plus_one)
        if "lm_head.weight" in self.src:
            yield self.plain("output.weight", "lm_head.weight")
        for il, recurrent in enumerate(self.recurrent):  # mtp.* (multi-token prediction) is left out
            p, b, moe = f"{self.prefix}layers.{il}", f"blk.{il}", f"{self.prefix}layers.{il}.mlp"
            yield self.plain(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight", plus_one)
            yield from (self.linear_attention(il, qkvz) if recurrent else self.full_attention(il))
            yield self.plain(f"{b}.post_attention_norm.weight", f"{p}.post_attention_layernorm.weight", plus_one)
            yield from self.moe_experts(il, moe)
            yield self.plain(f"{b}.ffn_gate_inp_shexp.weight", f"{moe}.shared_expert_gate.weight",
                             lambda t: t.reshape(-1), shape=(int(c.hidden_size),))
            yield from self.dense_ffn(il, f"{moe}.shared_expert", "_shexp")

    def moe_experts(self, il: int, moe: str) -> Iterator[TensorSpec]:
        """The router and the routed experts of layer ``il`` (stored one by one)."""
        yield from self.routed_experts(il, moe)

"""GLM-5 (GlmMoeDsaForCausalLM) -> llama.cpp ``glm-dsa``.

DeepSeek-V3's latent attention and routing (:mod:`ggufmoe.arch.deepseek2`: ``kv_b_proj`` split into
``attn_k_b``/``attn_v_b``, sigmoid scores with the selection bias, groups, leading dense blocks, a shared
expert) under DeepSeek Sparse Attention: on a "full" layer (``indexer_types``) a lightning indexer scores
every earlier token (ReLU of its own queries against one key head, weighted per head) and attention keeps
the ``index_topk`` best; a "shared" layer reuses the selection of the last full layer before it. The
indexer's rope is interleaved like the attention's, so its tensors are copied as they are.

What llama.cpp's graph cannot run as transformers does is refused (:meth:`GlmMoeDsa.check`). The
multi-token-prediction layers stored after the last block are not written.

llama.cpp caches one latent row per layer and token (as deepseek2) plus the indexer's key on the full
layers (:meth:`GlmMoeDsa.model_shape`). A streamed calibration hands each layer the selection of the last full
layer before it, batch by batch (:meth:`GlmMoeDsa.layer_output`).
"""

from __future__ import annotations

from typing import Iterator

import gguf
from gguf.constants import MODEL_TENSOR

from ggufmoe.arch.deepseek2 import Deepseek2, ReadForTwo
from ggufmoe.arch.registry import register
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.names import NewKeys, tensor_name
from ggufmoe.model.tensor import TensorSpec

FULL, SHARED = "full", "shared"
DENSE, SPARSE = "dense", "sparse"
# the indexer's modules in the checkpoint (under ``self_attn.indexer``) -> their GGUF tensors
INDEXER = (("wq_b.weight", MODEL_TENSOR.INDEXER_ATTN_Q_B, "weight"), ("wk.weight", MODEL_TENSOR.INDEXER_ATTN_K, "weight"),
           ("k_norm.weight", MODEL_TENSOR.INDEXER_K_NORM, "weight"), ("k_norm.bias", MODEL_TENSOR.INDEXER_K_NORM, "bias"),
           ("weights_proj.weight", MODEL_TENSOR.INDEXER_PROJ, "weight"))


@register
class GlmMoeDsa(Deepseek2):
    hf_architectures = ("GlmMoeDsaForCausalLM",)
    gguf_arch = "glm-dsa"
    per_layer_expert_counts = False  # patches/per-layer-expert-count.patch does not cover this graph
    rope_kinds = ("default",)
    sensitivity_aliases = {**Deepseek2.sensitivity_aliases, "indexer.attn_q_b": "attn_q", "indexer.attn_k": "attn_k"}

    @property
    def scoring(self) -> str:
        return "sigmoid"

    @property
    def indexer_full(self) -> list[bool]:
        """Per block: the layer runs its own indexer (else it reuses the last full layer's selection)."""
        return [t == FULL for t in self.cfg.indexer_types[:self.n_layer]]

    @property
    def n_dense(self) -> int:
        """Leading dense blocks, as transformers builds them (``mlp_layer_types``)."""
        types = list(self.cfg.mlp_layer_types)
        return next((i for i, t in enumerate(types) if t != DENSE), len(types))

    def check(self) -> None:
        c = self.cfg
        mlp, indexers = list(c.mlp_layer_types[:self.n_layer]), list(c.indexer_types[:self.n_layer])
        self.require(set(mlp) <= {DENSE, SPARSE} and DENSE not in mlp[self.n_dense:],
                     f"mlp_layer_types {mlp}: llama.cpp's graph runs dense blocks only before the first MoE block")
        self.require(len(indexers) == self.n_layer and set(indexers) <= {FULL, SHARED},
                     f"indexer_types {indexers}: one of {FULL!r} / {SHARED!r} per layer")
        self.require(indexers[0] == FULL, "the first layer's indexer is 'shared' (there is no earlier selection)")
        d = int(c.index_head_dim)
        # llama.cpp rotates the indexer's queries and keys by a d x d Hadamard matrix it builds for powers of two
        self.require(d >= 64 and d & (d - 1) == 0, f"index_head_dim {d} (llama.cpp needs a power of two >= 64)")
        self.require(int(c.qk_rope_head_dim) <= d, f"index_head_dim {d} < qk_rope_head_dim {c.qk_rope_head_dim}")
        self.require(bool(getattr(c, "q_lora_rank", None)), "no q_lora_rank (the indexer reads the low-rank query)")
        self.require(not getattr(c, "attention_bias", False), "attention biases")
        self.require(c.hidden_act == "silu", f"activation {c.hidden_act!r}")

    def caveats(self) -> list[str]:
        return ["llama.cpp normalises the indexer's keys (a LayerNorm) with epsilon 0 where transformers uses 1e-6"]

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        c = self.cfg
        w.add_indexer_head_count(int(c.index_n_heads))
        w.add_indexer_key_length(int(c.index_head_dim))
        w.add_indexer_top_k(int(c.index_topk))
        # always written: without it llama.cpp takes every layer as full, or GLM-5.2's pattern from 1M tokens on
        w.add_array(NewKeys.INDEXER_TYPES.format(arch=self.gguf_arch), self.indexer_full)

    def attention(self, il: int, kv_b: ReadForTwo) -> Iterator[TensorSpec]:
        """The latent attention, then the indexer on a full layer."""
        yield from super().attention(il, kv_b)
        if self.indexer_full[il]:
            prefix = f"model.layers.{il}.self_attn.indexer"
            for hf, tensor, suffix in INDEXER:
                yield self.plain(tensor_name(tensor, il, suffix), f"{prefix}.{hf}")

    def tensors(self) -> Iterator[TensorSpec]:
        self.check()  # before listing tensors a refused layout may lack
        yield from super().tensors()

    def kv_elements_per_token(self) -> int:
        """The latent row of every layer (as deepseek2) plus the indexer's key on the full layers."""
        return self.model_shape().kv_elements_per_token

    def model_shape(self) -> ModelShape:
        c = self.cfg
        s = super().model_shape()
        s.n_layer_indexer = sum(self.indexer_full)
        s.head_indexer, s.n_head_indexer = int(c.index_head_dim), int(c.index_n_heads)
        return s

    # --- calibration: the indexer's selection goes from a full layer to the shared ones after it ----------
    def layer_output(self, out, handed: dict) -> tuple[object, dict]:
        hidden, topk_indices = out
        return hidden, {"prev_topk_indices": topk_indices}

    def layer_output_bytes(self, ctx: int) -> int:
        return 4 * min(int(self.cfg.index_topk), ctx)  # int32 indices of the tokens each token attends to

    def stand_in_output(self, hidden):
        return hidden, None

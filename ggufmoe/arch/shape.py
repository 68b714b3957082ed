"""The hyper-parameters llama.cpp's memory depends on, as an architecture writes them or a GGUF holds them."""

from __future__ import annotations

from dataclasses import dataclass

from ggufmoe.model.names import Keys
from ggufmoe.source.gguf_file import read_gguf


@dataclass
class ModelShape:
    """The hyper-parameters llama.cpp's caches and compute graph depend on, as written to GGUF."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_k: int          # K head size as cached (MLA: kv_lora_rank + rope dims)
    head_v: int          # V head size as cached (MLA: kv_lora_rank)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int = 0  # shared expert(s), all together
    n_ff_dense: int = 0  # dense (non-MoE) blocks: leading (DeepSeek, GLM) or interleaved (Llama-4)
    n_dense: int = 0
    mla: bool = False
    head_k_mla: int = 0  # MLA: qk_nope + qk_rope (the decompressed K head)
    n_swa: int = 0  # sliding window (tokens) of the sliding-window layers
    n_layer_swa: int = 0  # layers that attend to a sliding window only
    # recurrent (linear-attention) layers: no KV cache, a fixed F32 state per sequence instead
    n_layer_recr: int = 0
    ssm_d_conv: int = 0   # convolution kernel (``ssm.conv_kernel``)
    ssm_d_inner: int = 0  # ``ssm.inner_size``
    ssm_d_state: int = 0  # ``ssm.state_size``
    ssm_n_group: int = 0  # ``ssm.group_count``
    # DeepSeek sparse attention: layers that run the lightning indexer cache its key (one head) per token
    n_layer_indexer: int = 0
    head_indexer: int = 0  # ``attention.indexer.key_length``
    n_head_indexer: int = 0  # ``attention.indexer.head_count``

    @property
    def n_layer_kv(self) -> int:
        """Layers with a KV cache (llama.cpp's hybrid memory gives the recurrent ones none)."""
        return self.n_layer - self.n_layer_recr

    @property
    def kv_elements_per_token(self) -> int:
        indexer = self.n_layer_indexer * self.head_indexer
        if self.mla:
            return self.n_layer_kv * self.head_k + indexer
        return self.n_layer_kv * self.n_head_kv * (self.head_k + self.head_v) + indexer

    @property
    def n_embd_r(self) -> int:
        """Convolution state per recurrent layer and sequence (llama_hparams::n_embd_r, values)."""
        return max(self.ssm_d_conv - 1, 0) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    @property
    def n_embd_s(self) -> int:
        """Recurrent (SSM / delta-rule) state per recurrent layer and sequence (llama_hparams::n_embd_s)."""
        return self.ssm_d_state * self.ssm_d_inner

    @property
    def recurrent_elements_per_sequence(self) -> int:
        """F32 values of recurrent state per sequence, all recurrent layers."""
        return self.n_layer_recr * (self.n_embd_r + self.n_embd_s)

    @classmethod
    def from_gguf(cls, path, swa_pattern: int = 0) -> "ModelShape":
        """The shape as llama.cpp reads it from a GGUF file's metadata."""
        return cls.from_fields(read_gguf(path).fields, swa_pattern)

    @classmethod
    def from_fields(cls, f: dict, swa_pattern: int = 0) -> "ModelShape":
        """The shape from a GGUF's metadata (``GGUFReader.fields``). ``swa_pattern``: the family's default
        sliding-window period (every n-th layer full), for files that have a window but no pattern key."""
        a = f["general.architecture"].contents()

        def g(key, default=None):
            field = f.get(f"{a}.{key}")
            return field.contents() if field is not None else default

        n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
        n_vocab = g("vocab_size") or len(f["tokenizer.ggml.tokens"].data)
        mla = g("attention.key_length_mla") is not None
        ff = int(g("feed_forward_length", 0))
        n_layer, n_swa = int(g("block_count")), int(g("attention.sliding_window", 0))
        step = int(g("interleave_moe_layer_step", 1) or 1)  # MoE in every step-th layer (after the leading dense)
        lead = int(g("leading_dense_block_count", 0))
        n_dense = lead + sum((il + 1) % step != 0 for il in range(lead, n_layer))
        pattern = g("attention.sliding_window_pattern", swa_pattern)
        if isinstance(pattern, list):
            n_layer_swa = sum(bool(p) for p in pattern)
        else:  # llama.cpp's set_swa_pattern: layer il slides unless il % n == n - 1
            n_layer_swa = sum(il % int(pattern) < int(pattern) - 1 for il in range(n_layer)) if pattern else 0
        recurrent = g("attention.recurrent_layers")
        if isinstance(recurrent, list):
            n_layer_recr = sum(bool(r) for r in recurrent[:n_layer])
        elif g("full_attention_interval") is not None and g("ssm.inner_size") is not None:
            every = int(g("full_attention_interval"))  # llama.cpp: layer il recurrent unless (il + 1) % n == 0
            n_layer_recr = sum((il + 1) % every != 0 for il in range(n_layer))
        else:
            n_layer_recr = 0
        head_indexer = int(g("attention.indexer.key_length", 0))
        indexer_types = g(Keys.INDEXER_TYPES.removeprefix("{arch}."))  # absent: llama.cpp indexes every layer
        n_layer_indexer = (sum(bool(t) for t in indexer_types[:n_layer]) if isinstance(indexer_types, list) else n_layer
                           ) if head_indexer else 0
        return cls(n_vocab=int(n_vocab), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                   n_head_kv=int(g("attention.head_count_kv", n_head)),
                   head_k=int(g("attention.key_length", n_embd // n_head)),
                   head_v=int(g("attention.value_length", n_embd // n_head)),
                   n_expert=int(g("expert_count")), n_expert_used=int(g("expert_used_count")),
                   n_ff_exp=int(g("expert_feed_forward_length", ff)),
                   n_ff_shexp=int(g("expert_shared_feed_forward_length", 0)) or
                   int(g("expert_shared_count", 0)) * int(g("expert_feed_forward_length", ff)),
                   n_ff_dense=ff if n_dense else 0, n_dense=n_dense,
                   mla=mla, head_k_mla=int(g("attention.key_length_mla", 0)),
                   n_swa=n_swa if n_layer_swa else 0, n_layer_swa=n_layer_swa if n_swa else 0,
                   n_layer_recr=n_layer_recr, ssm_d_conv=int(g("ssm.conv_kernel", 0)),
                   ssm_d_inner=int(g("ssm.inner_size", 0)), ssm_d_state=int(g("ssm.state_size", 0)),
                   ssm_n_group=int(g("ssm.group_count", 0)), n_layer_indexer=n_layer_indexer,
                   head_indexer=head_indexer, n_head_indexer=int(g("attention.indexer.head_count", 0)))

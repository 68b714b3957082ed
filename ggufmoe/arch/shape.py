"""The hyper-parameters llama.cpp's memory depends on, as an architecture writes them or a GGUF holds them."""

from __future__ import annotations

from dataclasses import dataclass

from ggufmoe.model.names import NewKeys, arch_key

# llama.cpp's compressed attention (DeepSeek-V4, llama-kv-cache-dsv4.cpp): the ratios it implements
COMPRESS_SPARSE, COMPRESS_HEAVY = 4, 128
COMPRESS_RATIOS_KEY = "attention.compress_ratios"

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
    # sliding-window layers with their own head sizes / key-value heads (Gemma 4; 0: as the full layers)
    n_head_kv_swa: int = 0
    head_k_swa: int = 0
    head_v_swa: int = 0
    # layers that reuse an earlier layer's cache and have none of their own (Gemma 4's shared-KV layers), and
    # how many of them slide
    n_layer_shared: int = 0
    n_layer_shared_swa: int = 0
    # recurrent (linear-attention) layers: no KV cache, a fixed F32 state per sequence instead
    n_layer_recr: int = 0
    ssm_d_conv: int = 0   # convolution kernel (``ssm.conv_kernel``)
    ssm_d_inner: int = 0  # ``ssm.inner_size``
    ssm_d_state: int = 0  # ``ssm.state_size``
    ssm_n_group: int = 0  # ``ssm.group_count``
    # llama.cpp's budget of compute-graph nodes (``llama_context::graph_max_nodes``): the weights' tensor count and,
    # for families whose graph grows with the batch (the delta-rule hybrids), nodes per token of a ubatch
    n_tensors: int = 0
    graph_nodes_per_token: int = 0

    def graph_max_nodes(self, n_ubatch: int) -> int:
        """The graph nodes llama.cpp reserves its graph and scheduler bookkeeping for."""
        if self.graph_nodes_per_token:
            return max(self.graph_nodes_per_token * n_ubatch, 32 * self.n_tensors)
        return max(1024, 8 * self.n_tensors)
    # DeepSeek sparse attention: layers that run the lightning indexer cache its key (one head) per token
    n_layer_indexer: int = 0
    head_indexer: int = 0  # ``attention.indexer.key_length``
    n_head_indexer: int = 0  # ``attention.indexer.head_count``
    # compressed attention (DeepSeek-V4): every layer caches its keys over the sliding window, K only (``k_only``: V
    # is a view of K); the sparse layers (ratio 4) add a compressed key per 4 tokens and the indexer's key per 4
    # tokens, the heavy ones (ratio 128) a compressed key per 128 tokens; each compressor keeps an F32 state
    n_layer_csa: int = 0
    n_layer_hca: int = 0
    k_only: bool = False
    hc_streams: int = 0  # hyper-connection streams of the hidden state (0: one plain stream)

    @property
    def n_layer_kv(self) -> int:
        """Layers with a KV cache (llama.cpp's hybrid memory gives the recurrent ones none)."""
        return self.n_layer - self.n_layer_recr

    @property
    def kv_layers(self) -> tuple[int, int]:
        """(full-context, sliding-window) layers with a KV cache of their own."""
        swa = self.n_layer_swa - self.n_layer_shared_swa
        return self.n_layer_kv - self.n_layer_shared - swa, swa

    def kv_row(self, swa: bool, v_trans: bool = False) -> tuple[int, int]:
        """(K, V) values per cache cell of a full or sliding-window layer (MLA: no V). ``v_trans`` (llama.cpp without
        flash attention) pads every layer's V row to the widest layer's."""
        if self.mla or self.k_only:
            return self.n_head_kv * self.head_k, 0
        k, v = self.n_head_kv * self.head_k, self.n_head_kv * self.head_v
        k_swa = (self.n_head_kv_swa or self.n_head_kv) * (self.head_k_swa or self.head_k)
        v_swa = (self.n_head_kv_swa or self.n_head_kv) * (self.head_v_swa or self.head_v)
        if v_trans:
            v = v_swa = max(v, v_swa) if self.n_layer_swa else v
        return (k_swa, v_swa) if swa else (k, v)

    @property
    def kv_elements_per_token(self) -> int:
        """KV values per token of context over the layers with a cache of their own (sliding layers counted as full)."""
        full, swa = self.kv_layers
        indexer = self.n_layer_indexer * self.head_indexer  # DSA: the indexer's key, one head, on its layers
        return full * sum(self.kv_row(False)) + swa * sum(self.kv_row(True)) + indexer

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
        """F32 values of recurrent state per sequence, all recurrent layers, and the compressors' states: per
        compressor a key and a score row per state slot (sparse: two blocks of 4 slots of two heads' width, for the
        keys and for the indexer's; heavy: 128 slots of one head)."""
        sparse = self.n_layer_csa * 2 * (2 * COMPRESS_SPARSE) * 2 * (self.head_k + self.head_indexer)
        heavy = self.n_layer_hca * 2 * COMPRESS_HEAVY * self.head_k
        return self.n_layer_recr * (self.n_embd_r + self.n_embd_s) + sparse + heavy

    @classmethod
    def from_fields(cls, f: dict, n_tensors: int, swa_pattern: int = 0, graph_nodes_per_token: int = 0) -> "ModelShape":
        """The shape from a GGUF's metadata (``GGUFReader.fields``) and tensor count. ``swa_pattern``: the family's
        default sliding-window period (every n-th layer full), for files that have a window but no pattern key;
        ``graph_nodes_per_token``: its graph's nodes per ubatch token (:attr:`graph_nodes_per_token`)."""
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
        ratios = g(COMPRESS_RATIOS_KEY)  # compressed attention: every layer slides, K only
        if ratios is not None:
            swa_layers = [True] * n_layer
        elif isinstance(pattern, list):
            swa_layers = [bool(p) for p in pattern]
        else:  # llama.cpp's set_swa_pattern: layer il slides unless il % n == n - 1
            swa_layers = [bool(pattern) and il % int(pattern) < int(pattern) - 1 for il in range(n_layer)]
        n_layer_swa = sum(swa_layers)
        recurrent = g(arch_key(NewKeys.RECURRENT_LAYERS, a))
        if isinstance(recurrent, list):
            n_layer_recr = sum(bool(r) for r in recurrent[:n_layer])
        elif g("full_attention_interval") is not None and g("ssm.inner_size") is not None:
            every = int(g("full_attention_interval"))  # llama.cpp: layer il recurrent unless (il + 1) % n == 0
            n_layer_recr = sum((il + 1) % every != 0 for il in range(n_layer))
        else:
            n_layer_recr = 0
        kv = g("attention.head_count_kv", n_head)  # one per layer where layers differ (Gemma 4)
        kv_full = [int(kv[il]) for il in range(n_layer) if not swa_layers[il]] if isinstance(kv, list) else [int(kv)]
        kv_swa = [int(kv[il]) for il in range(n_layer) if swa_layers[il]] if isinstance(kv, list) else [0]
        shared = range(n_layer - int(g("attention.shared_kv_layers", 0)), n_layer)
        head_indexer = int(g("attention.indexer.key_length", 0))
        indexer_types = g(arch_key(NewKeys.INDEXER_TYPES, a))  # absent: llama.cpp indexes every layer
        n_layer_indexer = (sum(bool(t) for t in indexer_types[:n_layer]) if isinstance(indexer_types, list) else n_layer
                           ) if head_indexer and ratios is None else 0
        ratios = list(ratios or [])[:n_layer]
        return cls(n_vocab=int(n_vocab), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                   n_head_kv=kv_full[0], n_head_kv_swa=kv_swa[0] if kv_swa[0] != kv_full[0] else 0,
                   head_k_swa=int(g("attention.key_length_swa", 0)), head_v_swa=int(g("attention.value_length_swa", 0)),
                   n_layer_shared=len(shared), n_layer_shared_swa=sum(swa_layers[il] for il in shared),
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
                   head_indexer=head_indexer, n_head_indexer=int(g("attention.indexer.head_count", 0)),
                   n_layer_csa=ratios.count(COMPRESS_SPARSE), n_layer_hca=ratios.count(COMPRESS_HEAVY),
                   k_only=bool(ratios), hc_streams=int(g("hyper_connection.count", 0)),
                   n_tensors=n_tensors, graph_nodes_per_token=graph_nodes_per_token)

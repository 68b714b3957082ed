"""The compute-buffer peaks DeepSeek sparse attention adds to a layer (llama.cpp's ``glm-dsa`` graph), for
:func:`ggufmoe.plan.memory.compute_buffer_bytes`.

A layer with its own indexer projects ``n_head_indexer`` query heads of ``head_indexer`` values per token, ropes
and rotates them (each step a new tensor, two alive at a time) and scores every cell against the indexer's key
cache, masked by a second KQ mask (f16: llama.cpp's fused lightning indexer); every layer then builds its attention
mask from the top-k: the mask filled with -inf, the top-k cells set to 0, added to the causal mask (two more
masks the size of the KQ mask, f16 with flash attention, else f32).

Fitted to llama.cpp's reported compute buffer of tiny GLM-5 models (indexer heads 16/32, head size 64/128, hidden
64/128, context 256-8192, ubatch 128-1024, flash attention on and off): within 0.7 MiB at ubatch <= 512
(1.4 MiB at 1024: a peak by the output, with flash attention, not modelled); the per-token remainder
(the query projections beside them) is counted as ``n_q`` values, twice.
"""

from __future__ import annotations

from ggufmoe.arch.shape import ModelShape


def sparse_attention_peaks(s: ModelShape, attn: int, n_kv: int, t: int, flash_attn: bool) -> list[int]:
    """The peaks of a sparse-attention layer on top of ``attn`` (the dense attention peak), ``t`` tokens, ``n_kv``
    cells (none for a model without an indexer)."""
    if not s.n_layer_indexer:
        return []
    u, cells = 4 * t, n_kv * t
    n_q, q_indexer = s.n_head * s.head_k, s.n_head_indexer * s.head_indexer
    mask = 2 if flash_attn else 4  # bytes a KQ-mask value
    indexer = attn + 2 * cells + u * (2 * q_indexer + 2 * n_q)  # the indexer's query, two steps alive
    top_k = attn + cells * (2 + 2 * mask) + u * ((q_indexer + 2 * n_q) if flash_attn else (s.n_embd + n_q))
    return [indexer, top_k]

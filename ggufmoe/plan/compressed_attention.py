"""The compute-buffer peaks of compressed attention (llama.cpp's ``deepseek4`` graph: DeepSeek-V4), for
:func:`ggufmoe.plan.memory.compute_buffer_bytes`.

Every layer attends over its raw keys in the sliding window (K only: V is the same row) and, by its compression ratio,
over no more (sliding-only layers), all the ratio-128 keys, or the ratio-4 keys a lightning indexer picks (a top-k
mask over all of them). Four hyper-connection streams of ``n_embd`` carry the hidden state between layers. Sizes for
``T`` tokens, ``u = 4·T`` bytes a row of f32, masks f16 with flash attention (else f32), ``Q = u·n_head·head_k``:

* inputs, allocated first: the KQ masks of the raw, ratio-4 and ratio-128 cells, the indexer's mask (f16: llama.cpp's
  fused lightning indexer) and the token embeddings' slot (``u·n_embd``);
* the stack under a layer's query: the streams and the rows the allocator leaves between them. A query wider than the
  streams (``n_head·head_k > 4·n_embd``, V4's shapes) fits none of their holes and sits above two streams and three
  rows of ``n_embd`` (three streams and two rows with flash attention, where no KQ scores take the FFN's place);
  otherwise the stack is ``2·streams + 1`` rows;
* the query: the stack + 2·Q (its projection, then its normalised and roped copy);
* a layer's attention over ``n`` = raw + compressed cells: its keys copied to f16 (``n·head_k·2`` bytes: concatenated
  on compressed layers, and transposed for KQV without flash attention) in a stream's hole when they fit one together
  (``u·4·n_embd``), else in the query projection's hole (Q) as far as they fit, the rest above; without flash
  attention the KQ scores ``u·n·n_head`` above, unless they fit what is left of that hole;
* flash attention's output (Q) above the query, on the stack of two streams and three rows, when a key copy or the
  masks (a ratio-4 layer's two top-k masks and the concatenated one) took the query projection's hole;
* ratio-4 layers, above the attention: the indexer's query ``u·n_head_indexer·head_indexer`` (projected, then roped:
  two alive), then its scores over the ratio-4 cells (f32); or the top-k mask: the input mask filled, then set and
  added to it (two masks of the ratio-4 cells), then the mask over all ``n`` cells; what fits the hole the attention
  left (the query's slots and the keys', together when the query is wide and not rotated, else the largest: llama.cpp
  rotates query and keys when ``head_k == head_indexer``) adds nothing;
* routed experts: two streams and two rows, then the up projection and SwiGLU of the top-k (the gate in a hole) and
  their down projection.

The logits are :func:`~ggufmoe.plan.memory.compute_buffer_bytes`' own peak. Checked against llama.cpp's reported CPU
compute buffer (metadata-only loads; ubatch 128-512, flash attention on and off, ``swa_full`` on and off): tiny models
(hidden 64-128, 2-8 heads of 64-128, indexer 16-64 heads of 64-128, top-k 16-64, window 32-128, 4-8 layers; context
512-16384) within 0.9 MiB; at V4's widths (context 4096-65536) without flash attention -6 %..+1 % (V4-Flash, 4 and 43
layers; V4-Pro, 61 layers), with it -8 %..+11 % (Flash) and -13 %..+11 % (Pro): which layer's output lands above its
query, and on how deep a stack, varies with depth and context. Widths between (hidden 256-512) within -10 %..+14 %.
"""

from __future__ import annotations

from ggufmoe.arch.shape import COMPRESS_HEAVY, COMPRESS_SPARSE, ModelShape


def compressed_layer_cells(s: ModelShape, kv_cells: int) -> tuple[int, int]:
    """(ratio-4, ratio-128) cells of the compressed caches for ``kv_cells`` cells of context (a key per 4 or per 128
    tokens, each padded to 256), 0 for a kind the model has no layer of."""
    return tuple(-(-(-(-kv_cells // ratio)) // 256) * 256 if n else 0
                 for ratio, n in ((COMPRESS_SPARSE, s.n_layer_csa), (COMPRESS_HEAVY, s.n_layer_hca)))


def _indexer_and_top_k(hole: int, query: int, score: int, fill: int, mask: int) -> int:
    """What a ratio-4 layer's indexer (its query ``query``, twice, and its scores ``score``) and top-k mask (two masks
    ``fill`` and the concatenated ``mask``) add above the attention, given the hole ``hole`` the attention left."""
    if 2 * query <= hole:
        indexer = score if score > hole - query else 0
    elif query <= hole:
        indexer = max(query, score)
    else:
        indexer = max(2 * query, query + score)
    if 2 * fill + mask <= hole:
        return indexer
    return max(indexer, (fill if fill > hole else 0) + (fill if 2 * fill > hole else 0) + mask)


def compressed_attention_peaks(s: ModelShape, t: int, n_raw: int, n_sparse: int, n_heavy: int,
                               flash_attn: bool) -> list[int]:
    """The peaks of a compressed-attention model for ``t`` tokens: ``n_raw`` raw cells (the window's), ``n_sparse``
    ratio-4 and ``n_heavy`` ratio-128 cells (0 without such layers)."""
    u, e, streams = 4 * t, s.n_embd, s.hc_streams
    m = 2 if flash_attn else 4  # bytes a KQ-mask value
    q = u * s.n_head * s.head_k
    inputs = t * m * (n_raw + n_sparse + n_heavy) + 2 * t * n_sparse + u * e
    wide = s.n_head * s.head_k > streams * e
    if wide:
        rows = 3 * streams + 2 if flash_attn else 2 * streams + 3
    else:
        rows = 2 * streams + 1
    stack = inputs + u * e * rows
    peaks = [stack + 2 * q, inputs + u * e * (2 * streams + 2) + u * s.n_expert_used * (2 * s.n_ff_exp + e)]
    n_sliding = s.n_layer - s.n_layer_csa - s.n_layer_hca
    for n_comp, n_layers, sparse in ((0, n_sliding, False), (n_sparse, s.n_layer_csa, True),
                                     (n_heavy, s.n_layer_hca, False)):
        if not n_layers:
            continue
        n = n_raw + n_comp
        keys = n * s.head_k * 2  # an f16 copy of the keys
        copies = bool(n_comp) + (not flash_attn)
        mask = n * t * m if n_comp else 0
        fill = n_sparse * t * m if sparse else 0
        in_stream_hole = copies * keys <= u * streams * e
        in_query_hole = 0 if in_stream_hole else min(copies, q // keys)
        above = 0 if in_stream_hole else (copies - in_query_hole) * keys
        top = stack + 2 * q + above
        if flash_attn:
            hole = q - in_query_hole * keys
            # the masks outgrow the rows' holes (the streams' when the keys went above the query)
            masks_in_hole = 2 * fill + mask > u * e * (1 if keys <= q else streams)
            if n_comp and (in_query_hole or masks_in_hole):
                peaks.append(inputs + u * e * (2 * streams + 3) + 3 * q + above)
        else:
            scores = n * t * s.n_head * 4
            top += scores if scores > q - in_query_hole * keys else 0
            hole = 2 * q + keys if wide and s.head_k != s.head_indexer else max(q, keys)
        if sparse:
            top += _indexer_and_top_k(hole, u * s.n_head_indexer * s.head_indexer, n_sparse * t * 4, fill, mask)
        peaks.append(top)
    return peaks

"""The memory model of the planner: llama.cpp's runtime memory (weights, KV cache, compute buffers, process) for a
context length. Exact file sizes: :mod:`ggufmoe.gguf.header`.

Runtime memory is a model of llama.cpp's CPU backend (llama-cpp-python 0.3.36), checked against the buffer sizes
llama.cpp reports and the peak RSS of a child process (``eval/bench_memory.py``, ``eval/results/memory.md``), for the
machine a plan targets (:mod:`ggufmoe.plan.target`). Full offload to a GPU (a cuda target) follows llama.cpp's
source and is not checked against a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from ggufmoe.arch.shape import ModelShape
from ggufmoe.gguf.header import header_bytes
from ggufmoe.model.names import EMBEDDING, EXPERT_TENSORS, OUTPUT, role
from ggufmoe.model.qtypes import FLOAT_TYPES
from ggufmoe.source.gguf_file import read_gguf
from ggufmoe.plan.compressed_attention import compressed_attention_peaks, compressed_layer_cells
from ggufmoe.plan.kv_types import DEFAULT_KV_TYPE, KvType, kv_qtype
from ggufmoe.plan.process import process_bytes
from ggufmoe.plan.sparse_attention import sparse_attention_peaks
from ggufmoe.plan.target import HOST, Target

# --------------------------------------------------------------------------------------------
# weights in memory: mapped file pages and CPU repacking

T = gguf.GGMLQuantizationType


def is_repacked(name: str, shape: tuple[int, ...], qtype, repack: dict) -> bool:
    """Whether llama.cpp puts this weight in the CPU_REPACK buffer: a matrix used by MUL_MAT (2-D)
    or MUL_MAT_ID (3-D ``*_exps``), of a repackable type, rows (ggml ne[1]) a multiple of 8 (4).
    ``token_embd`` is read with GET_ROWS and stays mapped."""
    mult = repack.get(qtype)
    tensor = role(name)
    if mult is None or len(shape) < 2 or tensor == EMBEDDING:
        return False
    if len(shape) == 3 and tensor not in EXPERT_TENSORS:
        return False  # 3-D weights used by batched MUL_MAT (DeepSeek attn_k_b / attn_v_b)
    return shape[-2] % mult == 0


def placement(name: str, target: Target, tied: bool) -> tuple[bool, bool]:
    """(in host memory, in GPU memory) of a weight. With every layer offloaded llama.cpp keeps the input
    layer on the CPU (``dev_input``, llama-model.cpp: token_embd, read by GET_ROWS, which CUDA never takes
    for a weight on the host) and puts the repeating and output layers on the GPU; a model without
    ``output.weight`` reads token_embd as its output there too (a GPU copy)."""
    if not target.offload:
        return True, False
    if role(name) == EMBEDDING:
        return True, tied
    return False, True


CUDA_ALIGNMENT = 128  # ggml-cuda's buffer alignment
CUDA_ROW_PADDING = 512  # MATRIX_ROW_PADDING: a quantized tensor is allocated with its last row padded to it


def gpu_tensor_bytes(shape: tuple[int, ...], qtype, nbytes: int) -> int:
    """A weight's size in a CUDA buffer (``ggml_backend_cuda_buffer_type_get_alloc_size``, aligned)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if block > 1 and shape[-1] % CUDA_ROW_PADDING:
        nbytes += (CUDA_ROW_PADDING - shape[-1] % CUDA_ROW_PADDING) // block * size
    return gguf.GGUFWriter.ggml_pad(nbytes, CUDA_ALIGNMENT)


@dataclass
class WeightMemory:
    mapped: int    # resident pages of the memory-mapped file(s)
    repacked: int  # anonymous copies made by the CPU backend's repacking
    gpu: int = 0   # weights copied to GPU memory (a cuda target)

    @property
    def total(self) -> int:
        """Host memory."""
        return self.mapped + self.repacked


def _file_tensors(source) -> list[list[tuple[str, tuple[int, ...], object, int, int]]]:
    """Per file: (name, numpy-order shape, type, nbytes, absolute data offset) of each tensor."""
    if isinstance(source, gguf.GGUFWriter):
        files = []
        for i, tensors in enumerate(source.tensors):
            offset = gguf.GGUFWriter.ggml_pad(header_bytes(source, i), source.data_alignment)
            rows = []
            for name, ti in tensors.items():
                rows.append((name, tuple(int(d) for d in ti.shape), ti.dtype, ti.nbytes, offset))
                offset += gguf.GGUFWriter.ggml_pad(ti.nbytes, source.data_alignment)
            files.append(rows)
        return files
    paths = [source] if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else list(source)
    files = []
    for path in paths:
        r = read_gguf(path)
        files.append([(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, int(t.n_bytes),
                       int(t.data_offset)) for t in r.tensors])
    return files


def weight_memory(source, target: Target = HOST) -> WeightMemory:
    """Resident weight bytes once llama.cpp has loaded a model (mmap, Linux) on ``target``: ``source`` is
    a prepared :class:`GGUFWriter` (nothing written yet) or the GGUF file(s).

    llama.cpp maps each file with ``MAP_POPULATE``: every page is resident right after loading,
    whichever experts are used later, and stays so (clean pages the kernel may drop under
    pressure). It then unmaps what lies before the first and after the last tensor it serves
    from the mapping (whole pages). Tensors of a repacked type (:meth:`Target.repack_types`) are
    copied into anonymous memory; their file pages between mapped tensors stay resident as well.
    Offloaded tensors (:func:`placement`) are copied to the GPU and their pages unmapped likewise.
    """
    repack = target.repack_types()
    files = _file_tensors(source)
    tied = not any(role(row[0]) == OUTPUT for rows in files for row in rows)
    page = 4096
    mapped = repacked = gpu = 0
    for rows in files:
        first, last = None, 0
        for name, shape, qtype, nbytes, offset in rows:
            host, on_gpu = placement(name, target, tied)
            if on_gpu:
                gpu += gpu_tensor_bytes(shape, qtype, nbytes)
            if not host:
                continue
            if is_repacked(name, shape, qtype, repack):
                repacked += nbytes
            else:
                first = offset if first is None else min(first, offset)
                last = max(last, offset + nbytes)
        if first is not None:
            mapped += gguf.GGUFWriter.ggml_pad(last, page) - first // page * page
    return WeightMemory(mapped, repacked, gpu)


# --------------------------------------------------------------------------------------------
# runtime memory

MiB = 1 << 20

# llama.cpp's own structures once a model is loaded (vocab, merges, tensor metadata, context objects) and
# llama-cpp-python's Llama object: 3.4 MB + 320 B per vocabulary entry (150 B for the token, ~170 B for its BPE
# merge: measured with metadata-only loads of 6k-150k vocabularies).
RUNTIME_BASE_BYTES = 3_400_000
RUNTIME_BYTES_PER_TOKEN = 320
# Small buffers not modelled one by one (CPU threadpool, scratch of ops, Python objects).
MISC_BYTES = 1 * MiB
# llama.cpp's bookkeeping per budgeted compute-graph node (graph metadata, scheduler and allocator tables): 867 B,
# measured on qwen35moe's peak RSS at 20480 and 5120 nodes; the default 1024 nodes are in RUNTIME_BASE_BYTES
GRAPH_BYTES_PER_NODE, GRAPH_NODES_MEASURED = 867, 1024
# Stated OS margin: page tables for the mapping (8 B per 4 KiB page = 0.2 %) and headroom for
# allocator fragmentation and the error of the compute-buffer formula: 1 % of weights + KV + compute (the
# process carries its own spread, :data:`ggufmoe.plan.process.BASELINE_SPREAD_BYTES`).
OS_MARGIN_FRACTION = 0.01


@dataclass
class RuntimeMemory:
    """Host memory (``total``) and, with every layer offloaded to a GPU, GPU memory (``gpu_total``)."""

    weights: int   # the GGUF tensor data, memory-mapped (plus repacked copies); offloaded: the host's part
    kv_cache: int  # for n_ctx tokens at the KV type, with recurrent layers' state (offloaded: 0, in GPU memory)
    compute: int   # llama.cpp compute buffers (CPU backend), output/logits buffer included
    reserve: int   # the process (Python with llama_cpp, llama.cpp's runtime structures, batch arrays) and a stated OS margin
    gpu_weights: int = 0   # offloaded weights in CUDA buffers
    gpu_kv_cache: int = 0
    gpu_compute: int = 0   # the CUDA compute buffer and ggml's CUDA pool
    gpu_reserve: int = 0   # the CUDA context and a stated margin

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.reserve

    @property
    def gpu_total(self) -> int:
        return self.gpu_weights + self.gpu_kv_cache + self.gpu_compute + self.gpu_reserve


def kv_size(ctx: int) -> int:
    """KV cells llama.cpp allocates for ``n_ctx = ctx``: padded to a multiple of 256."""
    return -(-ctx // 256) * 256


def swa_kv_size(shape: ModelShape, ctx: int, n_ubatch: int = 512, swa_full: bool = True) -> int:
    """KV cells of a sliding-window layer: the full count with ``swa_full`` (llama.cpp's library default,
    which llama-cpp-python keeps), else the window plus one ubatch, padded to 256 (llama-server's default)."""
    full = kv_size(ctx)
    return full if swa_full else min(full, -(-(shape.n_swa + n_ubatch) // 256) * 256)


def kv_cache_bytes(shape: ModelShape, ctx: int, kv_type: KvType = DEFAULT_KV_TYPE, n_ubatch: int = 512,
                   swa_full: bool = True, flash_attn: bool = False) -> int:
    """llama.cpp's KV buffer: per layer with a cache of its own a K and a V row per cell (:meth:`ModelShape.kv_row`:
    none with MLA, where V is a view of K; without flash attention V rows padded to the widest layer's), at the KV
    type's ggml row size; sliding-window layers have :func:`swa_kv_size` cells; recurrent layers have none
    (:func:`recurrent_state_bytes`), nor have layers that reuse another's cache; indexer layers (sparse attention)
    add one key a cell; compressed attention adds its compressed keys
    (:func:`~ggufmoe.plan.compressed_attention.compressed_layer_cells`), and the sparse layers their indexer's."""
    qt = kv_qtype(kv_type)
    full, swa = shape.kv_layers

    def per_cell(sliding: bool) -> int:
        return sum(_row_size(qt, n) for n in shape.kv_row(sliding, v_trans=not flash_attn))

    indexer = shape.n_layer_indexer * kv_size(ctx) * _row_size(qt, shape.head_indexer)
    sparse, heavy = compressed_layer_cells(shape, kv_size(ctx))
    compressed = (shape.n_layer_csa * sparse * (_row_size(qt, shape.head_k) + _row_size(qt, shape.head_indexer))
                  + shape.n_layer_hca * heavy * _row_size(qt, shape.head_k))
    return (full * kv_size(ctx) * per_cell(False) + swa * swa_kv_size(shape, ctx, n_ubatch, swa_full) * per_cell(True)
            + indexer + compressed)


def recurrent_state_bytes(shape: ModelShape, n_seq: int = 1) -> int:
    """llama.cpp's recurrent-state buffer (``llama_memory_recurrent``, the RS buffer) of a model with recurrent
    layers: per layer a convolution state (``n_embd_r``) and a recurrent state (``n_embd_s``) per sequence, always
    F32 whatever the KV type, independent of the context length. ``n_seq``: llama.cpp's rows,
    max(1, n_seq_max) x (1 + n_rs_seq); llama-cpp-python sets neither (1)."""
    return 4 * shape.recurrent_elements_per_sequence * max(1, n_seq)


def compute_buffer_bytes(shape: ModelShape, ctx: int, n_ubatch: int = 512, flash_attn: bool = False,
                         n_outputs: int | None = None, swa_full: bool = True) -> int:
    """Size of llama.cpp's CPU compute buffer (``sched_reserve: CPU compute buffer size``).

    llama.cpp reserves the graph of one full ubatch (T = min(n_ubatch, ctx) tokens, every KV
    cell used, T outputs) and ggml-alloc packs its intermediate tensors into one buffer; its
    size is the largest of a few peaks (f32 tensors, 4·T bytes per row of T tokens):

    * a layer stack S that every peak inside a layer sits on: 3·n_embd (the residual, its
      input and a freed norm output) + the query's holes (2·n_q without flash attention, n_q
      with; n_q = n_head·head_k, MLA: n_head·(kv_lora_rank + rope)) + the V-cache row indices
      (2·n_head_kv·head_v, int64, without flash attention) + the KQ mask (n_kv·T, f32, or f16
      with flash attention);
    * attention: S + KQ scores n_kv·T·n_head (or the flash-attention output n_q);
    * routed experts: S + gate, up and their SwiGLU, 3·top_k·n_ff_exp; S + 3·top_k·n_ff_exp +
      top_k·n_embd for the down projection when it cannot reuse the gate/up space
      (n_embd > 2·n_ff_exp);
    * shared expert / leading dense FFN: S + n_embd + 3·n_ff;
    * output: logits n_vocab·n_outputs + 2·n_embd·n_outputs (n_outputs = T as reserved).

    A model with sliding-window layers has a second KQ mask, over the window's cells (:func:`swa_kv_size`); the
    attention scores use the full cache's n_kv (its full layers). Sparse attention: :mod:`.sparse_attention`;
    compressed attention (DeepSeek-V4: its own layer stack, no full layers): :mod:`.compressed_attention`.

    ``n_outputs`` set to 1 gives what a run that asks for the last token's logits only touches.
    The routed expert count enters only through router-sized tensors (n_expert·T), which fit in
    the holes; pruning changes the buffer through top-k only. Checked against llama.cpp's
    reported size (eval/results/memory.md): the reference and tiny test models within 0.7 MiB,
    real model shapes (metadata-only loads) within -7.4 %/+0.3 %; the largest misses are output
    peaks of shared-expert models (Qwen1.5-MoE, DeepSeek), which sit on a few more n_embd-sized
    holes than the 2·n_embd counted.
    """
    t = min(n_ubatch, ctx)
    n_out = t if n_outputs is None else min(n_outputs, t)
    n_kv = kv_size(ctx)
    u = 4 * t
    e, s = shape.n_embd, shape
    output = 4 * n_out * (s.n_vocab + 2 * e)
    if s.n_layer_csa or s.n_layer_hca:
        return int(max(compressed_attention_peaks(s, t, swa_kv_size(s, ctx, n_ubatch, swa_full),
                                                  *compressed_layer_cells(s, n_kv), flash_attn) + [output]))
    if s.mla:
        n_q = s.n_head * s.head_k                       # absorbed query: kv_lora_rank + rope per head
        q_holes = n_q if flash_attn else n_q + s.n_head * (s.head_k_mla + s.head_v)
        v_idx = 0
    else:
        n_q = s.n_head * s.head_k
        q_holes = n_q if flash_attn else 2 * n_q
        v_idx = 0 if flash_attn else 2 * s.n_head_kv * s.head_v
    mask = n_kv * t * (2 if flash_attn else 4)
    if s.n_layer_swa:  # full and sliding-window layers each have their mask, both alive within the layers
        mask += swa_kv_size(s, ctx, n_ubatch, swa_full) * t * (2 if flash_attn else 4)
    stack = u * (3 * e + q_holes + v_idx) + mask
    attn = stack + (u * n_q if flash_attn else 4 * n_kv * t * s.n_head)
    if s.mla and not flash_attn:
        attn += n_kv * s.head_v * 2                    # V made contiguous from the latent cache (f16)
    k, ff = s.n_expert_used, s.n_ff_exp
    peaks = [attn, stack + u * 3 * k * ff, output]
    peaks += sparse_attention_peaks(s, attn, n_kv, t, flash_attn)
    if e > 2 * ff:
        peaks.append(stack + u * (3 * k * ff + k * e))
    if s.n_ff_shexp:
        peaks.append(stack + u * (e + 3 * s.n_ff_shexp))
    if s.n_dense:
        peaks.append(stack + u * 3 * s.n_ff_dense)
    return int(max(peaks))


def work_buffer_bytes(shape: ModelShape, ctx: int, n_ubatch: int = 512, flash_attn: bool = False,
                      kv_type: KvType = DEFAULT_KV_TYPE, swa_full: bool = True) -> int:
    """The CPU backend's work buffer (malloc'd outside the compute buffer): the largest matmul
    operand converted to the weight's dot-product type. Without flash attention that is the
    KQ scores converted to the V cache type (f16: n_kv·T·n_head·2 bytes; compressed attention: n_kv the window's
    raw cells and the widest layer's compressed cells); otherwise the activations of the widest weight matmul (at
    most 2 bytes a value)."""
    t, s = min(n_ubatch, ctx), shape
    acts = 2 * t * max(s.n_embd, s.n_head * s.head_k, s.n_expert_used * s.n_ff_exp, s.n_ff_shexp, s.n_ff_dense)
    if flash_attn or kv_qtype(kv_type) == T.F32:
        return acts
    n_kv = kv_size(ctx)
    if s.n_layer_csa or s.n_layer_hca:
        n_kv = swa_kv_size(s, ctx, n_ubatch, swa_full) + max(compressed_layer_cells(s, n_kv))
    return max(acts, n_kv * t * s.n_head * 2)


# With every layer offloaded (a cuda target): estimates, NOT measured (no GPU was available): host memory
# the CUDA runtime, driver and cuBLAS add to the process, and GPU memory the CUDA context and cuBLAS
# workspaces take before any buffer.
CUDA_HOST_BYTES = 256 * MiB
CUDA_CONTEXT_BYTES = 512 * MiB


def offloaded_host_compute_bytes(shape: ModelShape, ctx: int, n_ubatch: int = 512, swa_full: bool = True) -> int:
    """The host (CUDA_Host) compute buffer with every layer offloaded. llama.cpp's scheduler places every
    graph input on the CPU (ggml-backend.cpp, cause "1.inp") and copies it to the GPU: the KQ mask(s)
    (f32, n_kv per token, also with flash attention, which casts a copy), token ids, positions and KV
    cell indices (a few int32/int64 per token); and GET_ROWS of the token embedding runs there too
    (n_embd f32 per token)."""
    t = min(n_ubatch, ctx)
    mask = kv_size(ctx) * t * 4
    if shape.n_layer_swa:
        mask += swa_kv_size(shape, ctx, n_ubatch, swa_full) * t * 4
    return mask + 4 * t * shape.n_embd + 32 * t


def runtime_memory(arch, weights_bytes: int, ctx: int, kv_type: KvType = DEFAULT_KV_TYPE, n_batch: int = 512,
                   n_ubatch: int = 512, *, flash_attn: bool | None = None, repacked_bytes: int = 0,
                   logits_all: bool = True, process: int | None = None,
                   shape: ModelShape | None = None, swa_full: bool = True, gpu_weights_bytes: int = 0,
                   target: Target = HOST) -> RuntimeMemory:
    """Peak memory of llama.cpp (CPU backend, llama-cpp-python 0.3.36) serving ``ctx`` tokens.

    ``weights_bytes``: the resident weight bytes (the tensor data, or ``weight_memory(w).mapped``);
    ``repacked_bytes``: anonymous copies of repacked tensors (``weight_memory(w).repacked``).
    ``flash_attn``: None follows llama-cpp-python (off) unless the KV type is quantized, which
    needs it (llama.cpp turns it on); llama.cpp's own CLI/server default enables it on CPU.
    ``logits_all``: a batch may ask for the logits of all its tokens (perplexity, log-probs),
    llama.cpp's worst case; False models runs that take the last token's logits only.
    ``process``: the process before it loads a model (default: :func:`~ggufmoe.plan.process.process_bytes`,
    measured here: the whole process is counted, as ``validate`` measures it).
    ``shape`` overrides the hyper-parameters read from ``arch`` (e.g. :func:`ggufmoe.arch.registry.gguf_shape`).
    ``swa_full``: sliding-window layers cache the whole context (llama-cpp-python's default) or the
    window only (llama-server's ``--swa-full`` off).

    A ``target`` that offloads every layer (cuda) puts ``gpu_weights_bytes`` (``weight_memory(w).gpu``),
    the KV cache (``offload_kqv``, llama.cpp's default) and the compute graph in GPU memory; the host
    keeps the token embedding's pages, the graph inputs (:func:`offloaded_host_compute_bytes`), the
    logits buffer (pinned host memory, llama-context.cpp ``output_reserve``) and the process. Not checked
    against a GPU.
    """
    shape = shape or arch.model_shape()
    process = process_bytes() if process is None else process
    qt = kv_qtype(kv_type)
    if flash_attn is None:
        flash_attn = qt not in FLOAT_TYPES
    elif not flash_attn and qt not in FLOAT_TYPES:
        raise ValueError(f"a {kv_type} KV cache needs flash attention "
                         "(llama.cpp refuses a quantized V cache without it)")
    n_batch = min(n_batch, kv_size(ctx))
    n_ubatch = min(n_ubatch, n_batch)
    kv = kv_cache_bytes(shape, ctx, kv_type, n_ubatch, swa_full, flash_attn) + recurrent_state_bytes(shape)
    n_out = n_batch if logits_all else 1
    graph = compute_buffer_bytes(shape, ctx, n_ubatch, flash_attn, None if logits_all else 1, swa_full)
    work = work_buffer_bytes(shape, ctx, n_ubatch, flash_attn, kv_type, swa_full)
    output = 4 * shape.n_vocab * n_out                                # output buffer (logits of n_out tokens)
    weights = weights_bytes + repacked_bytes
    nodes = max(0, shape.graph_max_nodes(n_ubatch) - GRAPH_NODES_MEASURED)
    runtime = RUNTIME_BASE_BYTES + RUNTIME_BYTES_PER_TOKEN * shape.n_vocab + GRAPH_BYTES_PER_NODE * nodes
    batch = n_batch * min(4 * kv_size(ctx) + 16, 4096)           # llama-cpp-python's llama_batch seq_id arrays
    if target.offload:
        compute = offloaded_host_compute_bytes(shape, ctx, n_ubatch, swa_full) + output + MISC_BYTES
        gpu_compute = graph + work  # the pool holds what the CPU's work buffer would: the widest converted operand
        margin = int(OS_MARGIN_FRACTION * (weights + compute))
        return RuntimeMemory(weights=weights, kv_cache=0, compute=compute,
                             reserve=process + CUDA_HOST_BYTES + runtime + batch + margin,
                             gpu_weights=gpu_weights_bytes, gpu_kv_cache=kv, gpu_compute=gpu_compute,
                             gpu_reserve=CUDA_CONTEXT_BYTES + int(OS_MARGIN_FRACTION * (gpu_weights_bytes + kv
                                                                                         + gpu_compute)))
    compute = graph + output + work + MISC_BYTES
    margin = int(OS_MARGIN_FRACTION * (weights + kv + compute))
    return RuntimeMemory(weights=weights, kv_cache=kv, compute=compute,
                         reserve=process + runtime + batch + margin)


def _row_size(qt: gguf.GGMLQuantizationType, n: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qt]
    if n % block:
        raise ValueError(f"a KV row of {n} values is not a multiple of {qt.name}'s block of {block}")
    return n // block * size


def gguf_runtime_memory(arch, files, ctx: int, kv_type: KvType = DEFAULT_KV_TYPE, target: Target = HOST,
                        **kw) -> RuntimeMemory:
    """:func:`runtime_memory` of written GGUF file(s) on ``target``: mapped pages, repacked copies and GPU copies."""
    wm = weight_memory(files, target)
    return runtime_memory(arch, wm.mapped, ctx, kv_type, repacked_bytes=wm.repacked, gpu_weights_bytes=wm.gpu,
                          target=target, **kw)

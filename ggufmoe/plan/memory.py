"""The memory model of the planner: llama.cpp's runtime memory (weights, KV cache, compute
buffers, process) for a context length. Exact file sizes: :mod:`ggufmoe.gguf.header`.

Runtime memory is a model of llama.cpp's CPU backend (llama-cpp-python 0.3.36), checked
against the buffer sizes llama.cpp reports and the peak RSS of a child process
(``eval/bench_memory.py``, ``eval/results/memory.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGUFWriter

from ggufmoe.arch.shape import ModelShape
from ggufmoe.gguf.header import header_bytes
from ggufmoe.model.names import EMBEDDING, EXPERT_TENSORS, role
from ggufmoe.source.gguf_file import read_gguf
from ggufmoe.model.qtypes import FLOAT_TYPES

# --------------------------------------------------------------------------------------------
# weights in memory: mapped file pages and CPU repacking
# --------------------------------------------------------------------------------------------

T = gguf.GGMLQuantizationType

# Types the CPU backend repacks at load into an interleaved layout (ggml-cpu/repack.cpp,
# ``ggml_repack_get_optimal_repack_type``), with the row multiple (ggml ne[1]) it needs.
REPACK_X86_AVX2 = {T.Q4_0: 8, T.Q4_K: 8, T.IQ4_NL: 8, T.MXFP4: 8}
REPACK_X86_AVX512 = {**REPACK_X86_AVX2, T.Q2_K: 8}
REPACK_ARM_DOTPROD = {T.Q4_0: 4, T.Q4_K: 8, T.Q5_K: 8, T.Q6_K: 8, T.IQ4_NL: 4, T.MXFP4: 4, T.Q8_0: 4}


def local_repack_types() -> dict[gguf.GGMLQuantizationType, int]:
    """The repacked types of the llama.cpp build installed here, from its system info."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    parts = (p.partition("=") for p in info.replace("CPU :", "|").split("|"))
    flags = {k.strip(): v.strip() == "1" for k, _, v in parts}
    if not flags.get("REPACK", False):
        return {}
    if flags.get("AVX512"):
        return dict(REPACK_X86_AVX512)
    if flags.get("AVX2"):
        return dict(REPACK_X86_AVX2)
    if flags.get("DOTPROD") or flags.get("MATMUL_INT8"):
        return dict(REPACK_ARM_DOTPROD)
    return {}


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


@dataclass
class WeightMemory:
    mapped: int    # resident pages of the memory-mapped file(s)
    repacked: int  # anonymous copies made by the CPU backend's repacking

    @property
    def total(self) -> int:
        return self.mapped + self.repacked


def _file_tensors(source) -> list[list[tuple[str, tuple[int, ...], object, int, int]]]:
    """Per file: (name, numpy-order shape, type, nbytes, absolute data offset) of each tensor."""
    if isinstance(source, GGUFWriter):
        files = []
        for i, tensors in enumerate(source.tensors):
            offset = GGUFWriter.ggml_pad(header_bytes(source, i), source.data_alignment)
            rows = []
            for name, ti in tensors.items():
                rows.append((name, tuple(int(d) for d in ti.shape), ti.dtype, ti.nbytes, offset))
                offset += GGUFWriter.ggml_pad(ti.nbytes, source.data_alignment)
            files.append(rows)
        return files
    paths = [source] if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else list(source)
    files = []
    for path in paths:
        r = read_gguf(path)
        files.append([(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, int(t.n_bytes),
                       int(t.data_offset)) for t in r.tensors])
    return files


def weight_memory(source, repack: dict | None = None) -> WeightMemory:
    """Resident weight bytes once llama.cpp has loaded a model (mmap, Linux): ``source`` is a
    prepared :class:`GGUFWriter` (nothing written yet) or the GGUF file(s).

    llama.cpp maps each file with ``MAP_POPULATE``: every page is resident right after loading,
    whichever experts are used later, and stays so (clean pages the kernel may drop under
    pressure). It then unmaps what lies before the first and after the last tensor it serves
    from the mapping (whole pages). Tensors of a repacked type are copied into anonymous
    memory; their file pages between mapped tensors stay resident as well. With
    ``repack=None`` the types of the local llama.cpp build are used; pass ``{}`` for a build or
    a run without repacking (``use_extra_bufts=false`` / ``--no-repack``).
    """
    repack = local_repack_types() if repack is None else repack
    page = 4096
    mapped = repacked = 0
    for rows in _file_tensors(source):
        first, last = None, 0
        for name, shape, qtype, nbytes, offset in rows:
            if is_repacked(name, shape, qtype, repack):
                repacked += nbytes
            else:
                first = offset if first is None else min(first, offset)
                last = max(last, offset + nbytes)
        if first is not None:
            mapped += GGUFWriter.ggml_pad(last, page) - first // page * page
    return WeightMemory(mapped, repacked)


# --------------------------------------------------------------------------------------------
# runtime memory
# --------------------------------------------------------------------------------------------

MiB = 1 << 20
KV_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}

# The process: peak RSS of a fresh Python 3.11 that has imported llama_cpp 0.3.36 and loaded
# nothing (measured by eval/bench_memory.py: 43.5 MB = 41.5 MiB, 22 MB of it library pages), plus
# the code pages of libllama / libggml-cpu that loading and the first eval touch (3.0 MiB more
# RssFile, measured). A llama.cpp binary (llama-server) starts smaller: pass ``process_bytes``.
PROCESS_BYTES = 43_600_000 + 3 * MiB
# llama.cpp's own structures once a model is loaded (vocab, merges, tensor metadata, context
# objects) and llama-cpp-python's Llama object: 3.4 MB + 320 B per vocabulary entry (150 B for
# the token, ~170 B for its BPE merge: measured with metadata-only loads of 6k-150k vocabularies).
RUNTIME_BASE_BYTES = 3_400_000
RUNTIME_BYTES_PER_TOKEN = 320
# Small buffers not modelled one by one (CPU threadpool, scratch of ops, Python objects).
MISC_BYTES = 1 * MiB
# Stated OS margin: page tables for the mapping (8 B per 4 KiB page = 0.2 %) and headroom for
# allocator fragmentation and the error of the compute-buffer formula: 1 % of weights + KV + compute.
OS_MARGIN_FRACTION = 0.01


@dataclass
class RuntimeMemory:
    weights: int   # the GGUF tensor data, memory-mapped (plus repacked copies)
    kv_cache: int  # for n_ctx tokens at the KV type
    compute: int   # llama.cpp compute buffers (CPU backend), output/logits buffer included
    reserve: int   # the process itself (libraries, Python or llama.cpp runtime) and a stated OS margin

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.reserve


def kv_size(ctx: int) -> int:
    """KV cells llama.cpp allocates for ``n_ctx = ctx``: padded to a multiple of 256."""
    return -(-ctx // 256) * 256


def swa_kv_size(shape: ModelShape, ctx: int, n_ubatch: int = 512, swa_full: bool = True) -> int:
    """KV cells of a sliding-window layer: the full count with ``swa_full`` (llama.cpp's library default,
    which llama-cpp-python keeps), else the window plus one ubatch, padded to 256 (llama-server's default)."""
    full = kv_size(ctx)
    return full if swa_full else min(full, -(-(shape.n_swa + n_ubatch) // 256) * 256)


def kv_cache_bytes(shape: ModelShape, ctx: int, kv_type: str = "f16", n_ubatch: int = 512,
                   swa_full: bool = True) -> int:
    """llama.cpp's KV buffer: per layer a K row of head_k x n_head_kv values per cell (and a V
    row, except with MLA where V is a view of K), at the KV type's ggml row size; sliding-window
    layers have :func:`swa_kv_size` cells."""
    qt = _kv_type(kv_type)
    if shape.mla:
        per_cell = _row_size(qt, shape.head_k)
    else:
        per_cell = _row_size(qt, shape.n_head_kv * shape.head_k) + _row_size(qt, shape.n_head_kv * shape.head_v)
    cells = ((shape.n_layer - shape.n_layer_swa) * kv_size(ctx)
             + shape.n_layer_swa * swa_kv_size(shape, ctx, n_ubatch, swa_full))
    return cells * per_cell


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

    A model with sliding-window layers has a second KQ mask, over the window's cells
    (:func:`swa_kv_size`); the attention scores use the full cache's n_kv (its full layers).

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
    peaks = [attn, stack + u * 3 * k * ff, 4 * n_out * (s.n_vocab + 2 * e)]
    if e > 2 * ff:
        peaks.append(stack + u * (3 * k * ff + k * e))
    if s.n_ff_shexp:
        peaks.append(stack + u * (e + 3 * s.n_ff_shexp))
    if s.n_dense:
        peaks.append(stack + u * 3 * s.n_ff_dense)
    return int(max(peaks))


def work_buffer_bytes(shape: ModelShape, ctx: int, n_ubatch: int = 512, flash_attn: bool = False,
                      kv_type: str = "f16") -> int:
    """The CPU backend's work buffer (malloc'd outside the compute buffer): the largest matmul
    operand converted to the weight's dot-product type. Without flash attention that is the
    KQ scores converted to the V cache type (f16: n_kv·T·n_head·2 bytes); otherwise the
    activations of the widest weight matmul (at most 2 bytes a value)."""
    t, s = min(n_ubatch, ctx), shape
    acts = 2 * t * max(s.n_embd, s.n_head * s.head_k, s.n_expert_used * s.n_ff_exp, s.n_ff_shexp, s.n_ff_dense)
    if flash_attn or _kv_type(kv_type) == T.F32:
        return acts
    return max(acts, kv_size(ctx) * t * s.n_head * 2)


def runtime_memory(arch, weights_bytes: int, ctx: int, kv_type: str = "f16", n_batch: int = 512,
                   n_ubatch: int = 512, *, flash_attn: bool | None = None, repacked_bytes: int = 0,
                   logits_all: bool = True, process_bytes: int = PROCESS_BYTES,
                   shape: ModelShape | None = None, swa_full: bool = True) -> RuntimeMemory:
    """Peak memory of llama.cpp (CPU backend, llama-cpp-python 0.3.36) serving ``ctx`` tokens.

    ``weights_bytes``: the resident weight bytes (the tensor data, or ``weight_memory(w).mapped``);
    ``repacked_bytes``: anonymous copies of repacked tensors (``weight_memory(w).repacked``).
    ``flash_attn``: None follows llama-cpp-python (off) unless the KV type is quantized, which
    needs it (llama.cpp turns it on); llama.cpp's own CLI/server default enables it on CPU.
    ``logits_all``: a batch may ask for the logits of all its tokens (perplexity, log-probs),
    llama.cpp's worst case; False models runs that take the last token's logits only.
    ``shape`` overrides the hyper-parameters read from ``arch`` (e.g. ``ModelShape.from_gguf``).
    ``swa_full``: sliding-window layers cache the whole context (llama-cpp-python's default) or the
    window only (llama-server's ``--swa-full`` off).
    """
    shape = shape or arch.model_shape()
    qt = _kv_type(kv_type)
    if flash_attn is None:
        flash_attn = qt not in FLOAT_TYPES
    elif not flash_attn and qt not in FLOAT_TYPES:
        raise ValueError(f"a {kv_type} KV cache needs flash attention "
                         "(llama.cpp refuses a quantized V cache without it)")
    n_batch = min(n_batch, kv_size(ctx))
    n_ubatch = min(n_ubatch, n_batch)
    kv = kv_cache_bytes(shape, ctx, kv_type, n_ubatch, swa_full)
    n_out = n_batch if logits_all else 1
    compute = (compute_buffer_bytes(shape, ctx, n_ubatch, flash_attn, None if logits_all else 1)
               + 4 * shape.n_vocab * n_out                       # output buffer (logits of n_out tokens)
               + work_buffer_bytes(shape, ctx, n_ubatch, flash_attn, kv_type) + MISC_BYTES)
    weights = weights_bytes + repacked_bytes
    runtime = RUNTIME_BASE_BYTES + RUNTIME_BYTES_PER_TOKEN * shape.n_vocab
    batch = n_batch * min(4 * kv_size(ctx) + 16, 4096)           # llama-cpp-python's llama_batch seq_id arrays
    margin = int(OS_MARGIN_FRACTION * (weights + kv + compute))
    return RuntimeMemory(weights=weights, kv_cache=kv, compute=compute,
                         reserve=process_bytes + runtime + batch + margin)


def _kv_type(kv_type: str) -> gguf.GGMLQuantizationType:
    try:
        return KV_TYPES[kv_type.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r} (one of {', '.join(KV_TYPES)})") from None


def _row_size(qt: gguf.GGMLQuantizationType, n: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qt]
    if n % block:
        raise ValueError(f"a KV row of {n} values is not a multiple of {qt.name}'s block of {block}")
    return n // block * size


def gguf_runtime_memory(arch, files, ctx: int, kv_type: str = "f16", **kw) -> RuntimeMemory:
    """:func:`runtime_memory` of written GGUF file(s): mapped pages and repacked copies as llama.cpp here makes them."""
    wm = weight_memory(files)
    return runtime_memory(arch, wm.mapped, ctx, kv_type, repacked_bytes=wm.repacked, **kw)

"""Planned vs measured memory of llama.cpp: `ggufmoe.plan.memory.runtime_memory` against the peak RSS
of llama.cpp running a full context, and the compute-buffer formula against llama.cpp's own numbers.

    python eval/bench_memory.py [MODEL_DIR] [--ctx 512,2048,4096] [--no-shapes]

1. The reference model is converted at F16, Q8_0, Q4_K and pruned (12 of 24 experts kept, REAP,
   Q8_0). For each file and context a fresh Python child loads it with llama-cpp-python
   (n_ctx = ctx, n_batch = n_ubatch = 512, 2 threads, mmap, flash attention off), evaluates
   ctx random tokens in batches of 512 and exits; its peak RSS is its VmHWM at exit (see
   `run_child` for why not ru_maxrss). "all logits" asks for every token's logits (llama.cpp's worst case, what
   `runtime_memory` predicts by default), "last logits" for the last token of each batch
   (`logits_all=False`).
2. The compute-buffer formula against the size llama.cpp reports (``sched_reserve: CPU compute
   buffer size``) for the reference and the tiny test models (real loads), and for the shapes
   of real models (DeepSeek-V3, Qwen3-30B-A3B, Qwen3-235B-A22B, Mixtral-8x7B, OLMoE, Qwen1.5-MoE)
   through metadata-only GGUFs (sparse files) loaded with ``no_alloc``: llama.cpp plans its
   buffers without allocating anything.

Writes eval/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MiB = 1 << 20
N_BATCH = 512

CHILD = r'''
import json, os, random, re, sys, tempfile
path, ctx, mode, flash = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
def peak():  # VmHWM: high-water RSS of this process image (ru_maxrss would include the parent's, see below)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
import llama_cpp
if path == "none":
    print(json.dumps(dict(peak=peak())))
    sys.exit(0)
log = tempfile.TemporaryFile()
saved = os.dup(2); os.dup2(log.fileno(), 2)
kv = getattr(llama_cpp, "GGML_TYPE_" + sys.argv[6].upper())
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=int(sys.argv[5]), n_ubatch=int(sys.argv[5]), n_threads=2,
                      verbose=True, flash_attn=flash, type_k=kv, type_v=kv, swa_full=sys.argv[7] == "1")
rnd = random.Random(0)
tokens = [rnd.randrange(1, llm.n_vocab()) for _ in range(ctx)]
if mode != "load":
    for i in range(0, ctx, llm.n_batch):  # what Llama.eval does, without keeping the logits in Python
        llm._batch.set_batch(tokens[i:i + llm.n_batch], n_past=i, logits_all=mode == "all")
        llm._ctx.decode(llm._batch)
os.dup2(saved, 2); log.seek(0); text = log.read().decode(errors="replace")
mib = lambda pat: round(sum(float(x) for x in re.findall(pat, text)) * 2**20)
print(json.dumps(dict(compute=mib(r"CPU compute buffer size =\s*([\d.]+) MiB"),
                      kv=mib(r"CPU KV buffer size =\s*([\d.]+) MiB"),
                      rs=mib(r"CPU RS buffer size =\s*([\d.]+) MiB") + mib(r"CPU DSV4 \w+ state buffer size =\s*([\d.]+) MiB"),
                      mapped=mib(r"CPU_Mapped model buffer size =\s*([\d.]+) MiB"),
                      repack=mib(r"CPU_REPACK model buffer size =\s*([\d.]+) MiB"), peak=peak())))
'''

NO_ALLOC_CHILD = r'''
import json, os, re, sys, tempfile
import llama_cpp as L
path, ctx, ub, flash, swa_full = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
log = tempfile.TemporaryFile(); saved = os.dup(2); os.dup2(log.fileno(), 2)
L.llama_backend_init()
mp = L.llama_model_default_params(); mp.no_alloc = True; mp.load_mode = L.LLAMA_LOAD_MODE_NONE
model = L.llama_model_load_from_file(path.encode(), mp)
cp = L.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads = ctx, max(ub, 512), ub, 2
cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
cp.swa_full = swa_full
ok = bool(L.llama_init_from_model(model, cp))
os.dup2(saved, 2); log.seek(0); text = log.read().decode(errors="replace")
mib = lambda pat: round(sum(float(x) for x in re.findall(pat, text)) * 2**20)
print(json.dumps(dict(ok=ok, compute=mib(r"CPU compute buffer size =\s*([\d.]+) MiB"),
                      kv=mib(r"llama_kv_cache: size =\s*([\d.]+) MiB"),
                      rs=mib(r"llama_memory_recurrent: size =\s*([\d.]+) MiB")
                         + mib(r"llama_dsv4_comp_state: \w+ ratio = .* size =\s*([\d.]+) MiB"))))
'''


def run_child(gguf_path: str | Path, ctx: int, mode: str = "all", flash_attn: bool = False,
              n_batch: int = N_BATCH, kv_type: str = "f16", swa_full: bool = True) -> tuple[int, dict]:
    """Peak RSS (bytes) of a fresh Python running llama.cpp on ``gguf_path``, and the buffer sizes
    llama.cpp logged. ``gguf_path="none"``: import llama_cpp only.

    The peak is the child's VmHWM (/proc/self/status at exit): the high-water RSS of its own
    image. ``ru_maxrss`` (getrusage in the child, or ``os.wait4`` here) is not usable from a big
    parent: Linux carries the pre-exec high-water mark of the forked copy of the parent into the
    child's maxrss (``setmax_mm_hiwater_rss`` in exec), so a parent with torch imported (~290 MB)
    would read as the child's peak. The wait4 value is returned in the dict as ``ru_maxrss``."""
    with tempfile.TemporaryFile() as out:
        cmd = [sys.executable, "-c", CHILD, str(gguf_path), str(ctx), mode, "1" if flash_attn else "0", str(n_batch),
               kv_type, "1" if swa_full else "0"]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp child failed on {gguf_path} ctx {ctx}: {err[-500:]}")
        out.seek(0)
        text = out.read().decode().strip()
    info = json.loads(text.splitlines()[-1])
    info["ru_maxrss"] = usage.ru_maxrss * 1024
    return info["peak"], info


def llama_reserved(gguf_path: str | Path, ctx: int, n_ubatch: int, flash_attn: bool, swa_full: bool = True) -> dict:
    """Buffer sizes llama.cpp plans for a metadata-only GGUF (``no_alloc``: nothing allocated); the KV size
    sums the caches llama.cpp logs (two for sliding-window models); ``rs``: the recurrent-state buffer of
    models with recurrent layers."""
    r = subprocess.run([sys.executable, "-c", NO_ALLOC_CHILD, str(gguf_path), str(ctx), str(n_ubatch),
                        "1" if flash_attn else "0", "1" if swa_full else "0"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"no_alloc load of {gguf_path} failed: {r.stderr[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# GGUFs of the reference model
# --------------------------------------------------------------------------------------------

def reference_ggufs(model: Path, tmp: Path) -> list[tuple[str, Path, int | None]]:
    """(label, path, experts kept) of the converted reference model."""
    import tiny_models

    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.prune.criteria import PruneRequest
    from ggufmoe.stats.collect import collect_stats
    from ggufmoe.stats.file import save_stats
    from ggufmoe.quant.rules import TypeRules

    out = []
    for t in ("F16", "Q8_0", "Q4_K"):
        p = tmp / f"ref-{t}.gguf"
        convert(model, ConvertOptions(out=p, types=TypeRules.parse(t), progress=False))
        out.append((t, p, None))
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:60000]
    save_stats(collect_stats(model, text, ctx=512, progress=False), tmp / "stats.gguf")
    p = tmp / "ref-pruned12-Q8_0.gguf"
    convert(model, ConvertOptions(out=p, types=TypeRules.parse("Q8_0"), stats=tmp / "stats.gguf",
                                  prune=PruneRequest(keep=12, criterion="reap"), progress=False))
    out.append(("Q8_0, 12/24 experts", p, 12))
    return out


def predicted(model: Path, gguf_path: Path, keep: int | None, ctx: int, logits_all: bool, flash_attn: bool = False,
              kv_type: str = "f16"):
    from ggufmoe.arch import architecture_for
    from ggufmoe.arch.registry import gguf_shape
    from ggufmoe.plan.memory import runtime_memory, weight_memory
    from ggufmoe.source.hf import HFSource

    arch = architecture_for(HFSource(model))
    if keep:
        arch.n_expert_kept = keep
    assert arch.model_shape() == gguf_shape(gguf_path), "module and file disagree on the shape"
    wm = weight_memory(gguf_path)
    return runtime_memory(arch, wm.mapped, ctx, kv_type, n_batch=N_BATCH, n_ubatch=N_BATCH, flash_attn=flash_attn,
                          repacked_bytes=wm.repacked, logits_all=logits_all), wm


# --------------------------------------------------------------------------------------------
# compute buffers at real shapes: metadata-only GGUFs
# --------------------------------------------------------------------------------------------

def real_shapes() -> dict:
    import transformers as T

    n = 4  # layers: the buffers do not depend on depth beyond the first dense / MoE blocks
    qwen3 = dict(num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, num_hidden_layers=n,
                 norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960)
    return {
        "DeepSeek-V3": (T.DeepseekV3Config(num_hidden_layers=n, first_k_dense_replace=1), "DeepseekV3ForCausalLM"),
        "Qwen3-30B-A3B": (T.Qwen3MoeConfig(hidden_size=2048, num_attention_heads=32, moe_intermediate_size=768,
                                           intermediate_size=6144, **qwen3), "Qwen3MoeForCausalLM"),
        "Qwen3-235B-A22B": (T.Qwen3MoeConfig(hidden_size=4096, num_attention_heads=64, moe_intermediate_size=1536,
                                             intermediate_size=12288, **qwen3), "Qwen3MoeForCausalLM"),
        "Mixtral-8x7B": (T.MixtralConfig(
            vocab_size=32000, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
            num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=n, max_position_embeddings=32768),
            "MixtralForCausalLM"),
        "OLMoE-1B-7B": (T.OlmoeConfig(
            vocab_size=50304, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024,
            num_experts=64, num_experts_per_tok=8, num_hidden_layers=n, max_position_embeddings=4096),
            "OlmoeForCausalLM"),
        "Qwen1.5-MoE-A2.7B": (T.Qwen2MoeConfig(
            vocab_size=151936, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
            intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
            num_experts_per_tok=4, num_hidden_layers=n, max_position_embeddings=8192), "Qwen2MoeForCausalLM"),
        # transformers' defaults are Qwen3-Next-80B-A3B's: 3 linear-attention (recurrent) layers, then a full one
        "Qwen3-Next-80B-A3B": (T.Qwen3NextConfig(num_hidden_layers=n, max_position_embeddings=262144),
                               "Qwen3NextForCausalLM"),
        # transformers' defaults are V4-Flash's; a sliding-only layer (the hash-routed one), then ratio 4, 128 and 4
        "DeepSeek-V4-Flash": (T.DeepseekV4Config(
            num_hidden_layers=n, layer_types=["sliding_attention", "compressed_sparse_attention",
                                              "heavily_compressed_attention", "compressed_sparse_attention"],
            mlp_layer_types=["hash_moe", "moe", "moe", "moe"]), "DeepseekV4ForCausalLM"),
    }


def write_metadata_only(cfg, architecture: str, out: Path):
    """A GGUF with the metadata and tensor infos of ``cfg`` (Q4_K weights) and no data: a sparse
    file of the exact size. Returns the architecture module."""
    import gguf
    import numpy as np
    import tiny_models

    from ggufmoe.arch import ARCHITECTURES
    from ggufmoe.plan.layout import assign_types, write_general_metadata
    from ggufmoe.source.config import ConfigSource
    from ggufmoe.gguf.header import shard_bytes
    from ggufmoe.prune.criteria import PruneRequest, choose_experts
    from ggufmoe.prune.apply import prune_model, write_provenance
    from ggufmoe.quant.rules import TypeRules
    from ggufmoe.source.tokenizer import write_tokenizer

    cfg.architectures = [architecture]
    cfg.save_pretrained(out.parent / f"{out.stem}-config")
    src = ConfigSource(out.parent / f"{out.stem}-config")
    arch = ARCHITECTURES[architecture](src, cfg)
    prune = choose_experts(arch, None, PruneRequest())
    types = TypeRules.parse("Q4_K")
    arch, specs = prune_model(arch, prune)
    plans = assign_types(specs, types, None)
    w = gguf.GGUFWriter(None, arch.gguf_arch)
    write_general_metadata(w, src, arch, types)
    arch.write_metadata(w)
    write_provenance(w, src.name, prune)
    write_tokenizer(w, tiny_models.REF_MODEL, int(cfg.vocab_size))  # the reference tokenizer, padded
    for p in plans:
        w.add_tensor_info(p.spec.name, p.spec.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    size = shard_bytes(w)[0]
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    os.truncate(out, size)
    return arch


# --------------------------------------------------------------------------------------------

def pct(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    import tiny_models

    ap.add_argument("model", nargs="?", default=str(tiny_models.REF_MODEL))
    ap.add_argument("--ctx", default="512,2048,4096")
    ap.add_argument("--no-shapes", action="store_true", help="skip the compute-buffer comparison")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "memory.md"))
    args = ap.parse_args()
    model = Path(args.model)
    ctxs = [int(c) for c in args.ctx.split(",")]

    from ggufmoe.plan.memory import MISC_BYTES, OS_MARGIN_FRACTION, compute_buffer_bytes
    from ggufmoe.plan.process import LLAMA_CODE_BYTES, interpreter_baseline
    from ggufmoe.plan.target import local_repack_types
    from ggufmoe.arch.registry import gguf_shape

    base_rss, _ = run_child("none", 0)
    lines = [
        "# Runtime memory of llama.cpp: planned vs measured",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        "llama-cpp-python 0.3.36 (CPU; repacks " + ", ".join(t.name for t in local_repack_types()) + "). "
        "Measured by `eval/bench_memory.py`.",
        "",
        "Each row: a fresh Python child loads the GGUF with llama-cpp-python (n_ctx = ctx, n_batch = n_ubatch = "
        f"{N_BATCH}, 2 threads, mmap, flash attention off) and evaluates ctx random tokens; peak RSS is "
        "the child's VmHWM at exit (its `ru_maxrss` would include the high-water mark of the forked parent, "
        "which has torch loaded, because Linux carries it across exec). *all logits*: every token's logits are "
        "requested "
        "(llama.cpp's worst case; `runtime_memory(...)` default); *last logits*: the last token of each "
        "batch only (`logits_all=False`).",
        "",
        f"Process baseline measured now (fresh Python that imports llama_cpp, loads nothing): "
        f"{base_rss / MiB:.1f} MiB; plans measure it the same way ({interpreter_baseline() / MiB:.1f} MiB) and add "
        f"{LLAMA_CODE_BYTES / MiB:.1f} MiB of library pages touched on load/eval. Process also holds llama.cpp's vocab/model structures "
        "(3.4 MB + 320 B per token), llama-cpp-python's batch and the stated OS margin "
        f"({OS_MARGIN_FRACTION:.0%} of weights + KV + compute). Compute includes the compute buffer, the "
        f"logits buffer, the CPU work buffer and {MISC_BYTES / MiB:.0f} MiB of small buffers.",
        "",
        "| GGUF | ctx | logits | weights (mapped + repacked) | KV | compute | process | predicted "
        "| measured peak RSS | error |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        ggufs = reference_ggufs(model, Path(tmp))
        llama_numbers = []
        for label, path, keep in ggufs:
            for ctx in ctxs:
                for mode in ("all", "last"):
                    rss, logged = run_child(path, ctx, mode)
                    mem, wm = predicted(model, path, keep, ctx, logits_all=mode == "all")
                    err = (mem.total - rss) / rss
                    worst = max(worst, abs(err))
                    lines.append(
                        f"| {label} | {ctx} | {mode} | {wm.mapped / MiB:.1f} + {wm.repacked / MiB:.1f} MiB | "
                        f"{mem.kv_cache / MiB:.1f} MiB | {mem.compute / MiB:.1f} MiB | {mem.reserve / MiB:.1f} MiB | "
                        f"{mem.total / MiB:.1f} MiB | {rss / MiB:.1f} MiB | {pct(mem.total, rss)} |")
                    print(lines[-1], flush=True)
                    if mode == "all":
                        llama_numbers.append((label, ctx, logged, wm, mem))
        lines += ["", f"Largest error: {100 * worst:.1f} % (target: 5 %).", "",
                  "Other settings (flash attention on, quantized KV cache, which needs it):", "",
                  "| GGUF | ctx | FA | KV type | logits | predicted | measured peak RSS | error |",
                  "|---|---:|:---:|---|---|---:|---:|---:|"]
        for label, path, keep in ggufs:
            if label not in ("F16", "Q4_K"):
                continue
            for kv_type in ("f16", "q8_0", "q4_0"):
                for mode in ("all", "last"):
                    rss, _ = run_child(path, 4096, mode, flash_attn=True, kv_type=kv_type)
                    mem, _ = predicted(model, path, keep, 4096, mode == "all", flash_attn=True, kv_type=kv_type)
                    worst = max(worst, abs(mem.total - rss) / rss)
                    lines.append(f"| {label} | 4096 | yes | {kv_type} | {mode} | {mem.total / MiB:.1f} MiB | "
                                 f"{rss / MiB:.1f} MiB | {pct(mem.total, rss)} |")
                    print(lines[-1], flush=True)
        lines += ["", f"Largest error over both tables: {100 * worst:.1f} %.", ""]

        lines += [
            "## The parts against llama.cpp's own numbers",
            "",
            "What llama.cpp logged in the same runs (`load_tensors: CPU_Mapped/CPU_REPACK model buffer size`, "
            "`llama_kv_cache: CPU KV buffer size`, `sched_reserve: CPU compute buffer size`) next to the model.",
            "",
            "| GGUF | ctx | mapped: llama.cpp / model | repacked | KV | compute buffer |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, ctx, logged, wm, mem in llama_numbers:
            shape = gguf_shape(ggufs[[g[0] for g in ggufs].index(label)][1])
            cb = compute_buffer_bytes(shape, ctx, N_BATCH)
            lines.append(f"| {label} | {ctx} | {logged['mapped'] / MiB:.2f} / {wm.mapped / MiB:.2f} MiB | "
                         f"{logged['repack'] / MiB:.2f} / {wm.repacked / MiB:.2f} MiB | "
                         f"{logged['kv'] / MiB:.2f} / {mem.kv_cache / MiB:.2f} MiB | "
                         f"{logged['compute'] / MiB:.2f} / {cb / MiB:.2f} MiB |")

        if not args.no_shapes:
            lines += compute_buffer_section(Path(tmp))

    lines += ["", "## Notes", "", *NOTES]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compute_buffer_section(tmp: Path) -> list[str]:
    import tiny_models

    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.arch.registry import gguf_shape
    from ggufmoe.plan.memory import compute_buffer_bytes, kv_cache_bytes
    from ggufmoe.quant.rules import TypeRules

    lines = [
        "",
        "## Compute buffer: formula vs llama.cpp",
        "",
        "`compute_buffer_bytes` against `sched_reserve: CPU compute buffer size` (n_ubatch 512). Tiny test "
        "models (tests/tiny_models.py, F16) are real loads; real model shapes are metadata-only GGUFs (4 "
        "layers, reference tokenizer padded to the vocabulary size) loaded with `no_alloc`. FA: flash attention. "
        "KV sizes of all rows agree exactly with llama.cpp's.",
        "",
        "| model | ctx | FA | llama.cpp | formula | error |",
        "|---|---:|:---:|---:|---:|---:|",
    ]
    errs = []
    models = []
    for name in ("qwen3moe", "qwen2moe", "mixtral", "olmoe", "deepseek3"):
        tiny_models.build(name, tmp / name)
        p = tmp / f"{name}.gguf"
        convert(tmp / name, ConvertOptions(out=p, types=TypeRules.parse("F16"), progress=False))
        models.append((f"tiny {name}", p, (512, 4096)))
    for name, (cfg, architecture) in real_shapes().items():
        p = tmp / f"{name}.gguf"
        write_metadata_only(cfg, architecture, p)
        models.append((name, p, (4096, 16384)))
    for label, p, ctxs in models:
        shape = gguf_shape(p)
        for ctx in ctxs:
            for fa in (False, True):
                got = llama_reserved(p, ctx, 512, fa)
                assert got["kv"] == 0 or abs(got["kv"] - kv_cache_bytes(shape, ctx, flash_attn=fa)) < 0.01 * MiB, \
                    (label, ctx, fa)
                pred = compute_buffer_bytes(shape, ctx, 512, fa)
                errs.append((pred - got["compute"]) / got["compute"])
                lines.append(f"| {label} | {ctx} | {'yes' if fa else 'no'} | {got['compute'] / MiB:.2f} MiB | "
                             f"{pred / MiB:.2f} MiB | {pct(pred, got['compute'])} |")
                print(lines[-1], flush=True)
    lines += ["", f"Error range: {100 * min(errs):+.1f} % … {100 * max(errs):+.1f} %."]
    return lines


NOTES = [
    "- Weights: llama.cpp maps the file with `MAP_POPULATE`, so every page of the mapped range is resident "
    "right after loading, before any token is evaluated, whichever experts the tokens route to (RSS of the "
    "mapping after load = llama.cpp's `CPU_Mapped` size, for the pruned file too). Under memory pressure the "
    "kernel may drop clean pages of rarely used experts and fault them back in, so RSS can shrink below this; "
    "the peak counts them all.",
    "- Repacking: on this CPU (AVX2/AVX512) llama.cpp copies Q4_0, Q4_K, IQ4_NL, MXFP4 (and Q2_K with AVX512) "
    "matrices into an interleaved layout in anonymous memory; their file pages stay resident too, so a Q4_K "
    "file costs about twice its size in RSS (Q4_K rows: 15.1 MiB mapped + 16.7 MiB repacked for a 17.9 MiB "
    "file). `weight_memory` reports both; `use_extra_bufts=False` (llama-cpp-python) / `--no-repack` avoids it.",
    "- The CPU work buffer without flash attention holds the KQ scores converted to F16 for the KQV "
    "product: n_kv x n_ubatch x n_head x 2 bytes, half the size of the scores themselves (8 MiB at ctx 2048 "
    "here); it is outside llama.cpp's reported compute buffer but in RSS.",
    "- llama-cpp-python extras not in llama.cpp: its `llama_batch` (seq_id arrays sized n_ctx per token, "
    "about n_batch pages touched) is counted in the reserve; `Llama(logits_all=True)` keeps n_ctx x n_vocab "
    "float32 scores in Python (`Llama.scores`, 96 MiB at ctx 4096 for this vocabulary), which is not "
    "modelled; the benchmark decodes through `Llama._ctx.decode` so nothing is kept.",
]


if __name__ == "__main__":
    main()

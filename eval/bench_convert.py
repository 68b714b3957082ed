"""ggufmoe convert against llama.cpp's two steps on a DeepSeek-V3-shaped FP8 checkpoint.

    python eval/bench_convert.py [--layers 2] [--experts 32] [--repeat 3] [--rss-experts 64]
                                 [--work DIR] [--llama-cpp DIR] [--threads N] [--keep] [--ggufmoe-only]

``--ggufmoe-only`` re-measures ggufmoe alone and keeps llama.cpp's runs, the output comparison and the
profile from the earlier report (labelled with that run's date).

A benchmark, not a test. It makes a synthetic DeepSeek-V3 checkpoint (``tools/make_synthetic.py``:
real per-layer shapes, FP8 e4m3 with 128x128 block scales, few layers and experts) and converts it to
the same mix of types two ways:

* ggufmoe: ``ggufmoe convert SRC -o OUT --type Q4_K --tensor-type ...  --imatrix IM`` — one pass.
* llama.cpp: its converter ``convert_hf_to_gguf.py --outtype bf16`` (llama.cpp's source tree, its own
  gguf-py, run with this venv's python), then llama.cpp's ``llama_model_quantize`` (through
  ``ggufmoe.runtime.llama_quantize``) with the same per-tensor types (``tt_overrides``) and importance matrix.

The mix (first matching rule wins, the same rules both ways): routed experts ``ffn_*_exps`` IQ2_XXS,
shared expert ``ffn_*_shexp`` Q6_K, attention ``attn_*`` Q4_K (``attn_k_b``, rows of 128, falls back to
Q5_0 both ways), the dense FFN Q4_K, ``token_embd`` Q4_K, ``output`` Q6_K; norms, routers and the
routing bias F32.

Importance matrix: all ones (``ggufmoe.imatrix.save_imatrix``), one row per expert, for every
quantized matrix except ``token_embd`` (never in an imatrix) and MLA's ``attn_k_b``/``attn_v_b`` (3-D:
llama.cpp wants one row per head there; ggufmoe takes one row, or one per head). ``ggufmoe calibrate`` cannot make a real
one here: transformers refuses the FP8 checkpoint without ``accelerate`` and would need the model in
float32 (16+ GB) on the CPU.

Measurements, per pipeline and repeat (median over ``--repeat``; the pipelines alternate which runs
first):

* wall time of every step, each a fresh child process started with ``subprocess.Popen``;
* peak RSS: the process tree (the child and its descendants: llama_quantize runs llama.cpp in a
  grandchild) is polled every 50 ms in ``/proc/PID/status``; per process ``VmHWM`` (its own high-water
  mark, reset at exec — unlike ``ru_maxrss``, which after a fork+exec also carries the parent's
  high-water mark), reported as the largest of any process, plus the largest ``RssAnon`` seen
  (``RssFile`` is memory-mapped file pages: clean, reclaimable, but counted in RSS). ``ru_maxrss``
  from ``os.wait4`` is recorded as a cross-check (the harness imports nothing heavy, so it is small);
* bytes written: the sizes of every file the pipeline leaves (llama.cpp's intermediate BF16 GGUF
  included), and the block-output count ``ru_oublock`` x 512 from ``os.wait4`` (bytes dirtied);
* page cache: before every pipeline the checkpoint's pages are dropped from the page cache
  (``posix_fadvise(DONTNEED)`` on its files, nothing global), so each run reads its source from disk, as a
  real 671B conversion would. Between llama.cpp's two steps the BF16 file is flushed (``fdatasync``) and
  dropped from the cache the same way, outside the timed steps (the time is reported as ``flush``): at
  real scale (1.3 TB of BF16) it cannot stay in memory either. Every output is flushed after its
  pipeline, outside the timing, so one run's write-back does not slow the next.

Output equality: the two final GGUFs are compared tensor by tensor (type, shape, bytes) and key by key.
For each class of tensors that differs, one part (expert 0 of an expert tensor) is requantized by
ggufmoe's quantizer from the checkpoint's float32 values rounded to BF16: when that reproduces
llama.cpp's bytes exactly, the difference is llama.cpp's BF16 intermediate file and nothing else.

Bounded memory: ``ggufmoe convert`` also runs on a checkpoint with ``--rss-experts`` routed experts
(default 2x) and the peak RSS at the two sizes is compared.

Writes eval/results/convert_ds3.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
LLAMA_CPP = Path("/tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp")
GIB = 2**30

# (GGUF tensor-name regex, type); first match wins, in ggufmoe (re.search) and llama.cpp (std::regex_search).
MIX = [
    (r"ffn_(gate|up|down)_exps", "IQ2_XXS"),
    (r"ffn_(gate|up|down)_shexp", "Q6_K"),
    (r"attn_", "Q4_K"),
    (r"ffn_(gate|up|down)\.weight", "Q4_K"),
    (r"token_embd\.weight", "Q4_K"),
    (r"^output\.weight$", "Q6_K"),
]
# The bounded-memory runs: the same rules with the routed experts at Q8_0 (IQ2_XXS takes 70% of the time
# and needs no more memory than Q8_0: one expert slice in float32 either way).
RSS_MIX = [(p, "Q8_0" if t == "IQ2_XXS" else t) for p, t in MIX]
GGUFMOE_DEFAULT = "Q4_K"  # general.file_type MOSTLY_Q4_K_M, as the llama.cpp run below
LLAMA_FTYPE = "Q4_K_M"  # every quantized tensor is matched by a MIX rule, so the ftype only names the file


# ---------------------------------------------------------------------------------------------------
# measuring a child process tree

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def measure(cmd: list[str], env: dict | None = None, log: Path | None = None, poll: float = 0.05) -> dict:
    """Run ``cmd``; wall time, peak RSS (largest VmHWM of any process in its tree), largest RssAnon,
    ru_maxrss and ru_oublock of the waited-for child. Fails loudly on a non-zero exit."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    hwm: dict[int, int] = {}
    anon = file = rss_sum = 0
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        cur_sum = 0
        for q in _tree(p.pid):
            s = _status(q)
            if "VmHWM" in s:
                hwm[q] = max(hwm.get(q, 0), s["VmHWM"])
                anon = max(anon, s.get("RssAnon", 0))
                file = max(file, s.get("RssFile", 0))
                cur_sum += s.get("VmRSS", 0)
        rss_sum = max(rss_sum, cur_sum)
        time.sleep(poll)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode})\n{tail}")
    return {"wall": wall, "peak_rss": max(hwm.values(), default=0), "peak_rss_anon": anon, "peak_rss_file": file,
            "peak_rss_tree_sum": rss_sum, "ru_maxrss": usage.ru_maxrss * 1024, "oublock_bytes": usage.ru_oublock * 512,
            "processes": len(hwm)}


def drop_cache(paths) -> None:
    """Flush and drop these files' pages from the page cache (only these files)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def flush(paths) -> float:
    t0 = time.perf_counter()
    drop_cache(paths)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# the pipelines

def ggufmoe_cmd(src: Path, out: Path, imatrix: Path, threads: int, mix=MIX) -> list[str]:
    cmd = [str(Path(PY).with_name("ggufmoe")), "convert", str(src), "-o", str(out), "--type", GGUFMOE_DEFAULT,
           "--imatrix", str(imatrix), "--threads", str(threads), "-q"]
    for pattern, t in mix:
        cmd += ["--tensor-type", f"{pattern}={t}"]
    return cmd


def run_ggufmoe(src: Path, work: Path, imatrix: Path, threads: int, tag: str, mix=MIX) -> dict:
    out = work / f"ggufmoe-{tag}.gguf"
    drop_cache(src.glob("*.safetensors"))
    m = measure(ggufmoe_cmd(src, out, imatrix, threads, mix), log=work / f"ggufmoe-{tag}.log")
    size = out.stat().st_size
    fl = flush([out])
    return {"steps": {"convert": m}, "wall": m["wall"], "peak_rss": m["peak_rss"], "peak_rss_anon": m["peak_rss_anon"],
            "bytes_written": size, "files": {out.name: size}, "oublock_bytes": m["oublock_bytes"], "flush": fl,
            "out": str(out)}


def run_llama(src: Path, work: Path, imatrix: Path, threads: int, llama_cpp: Path, tag: str) -> dict:
    bf16, out = work / f"llama-{tag}-bf16.gguf", work / f"llama-{tag}.gguf"
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
    drop_cache(src.glob("*.safetensors"))
    conv = measure([PY, str(llama_cpp / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16",
                    "--outfile", str(bf16)], env=env, log=work / f"llama-{tag}-convert.log")
    fl = flush([bf16])
    quant = measure([PY, __file__, "--_llama-quantize", str(bf16), str(out), str(imatrix), str(threads)],
                    log=work / f"llama-{tag}-quantize.log")
    files = {bf16.name: bf16.stat().st_size, out.name: out.stat().st_size}
    fl += flush([out])
    return {"steps": {"convert_hf_to_gguf": conv, "llama_model_quantize": quant},
            "wall": conv["wall"] + quant["wall"], "peak_rss": max(conv["peak_rss"], quant["peak_rss"]),
            "peak_rss_anon": max(conv["peak_rss_anon"], quant["peak_rss_anon"]),
            "bytes_written": sum(files.values()), "files": files,
            "oublock_bytes": conv["oublock_bytes"] + quant["oublock_bytes"], "flush": fl,
            "out": str(out), "bf16": str(bf16)}


def _llama_quantize_child(src: str, dst: str, imatrix: str, threads: str) -> None:
    """Internal: llama.cpp's llama_model_quantize with the MIX overrides (ggufmoe.runtime.llama_quantize)."""
    sys.path.insert(0, str(ROOT))
    from ggufmoe.stats.imatrix import load_imatrix
    from ggufmoe.runtime.llama_quantize import llama_quantize

    llama_quantize(src, dst, LLAMA_FTYPE, imatrix=load_imatrix(imatrix), tensor_types=MIX, threads=int(threads))


# ---------------------------------------------------------------------------------------------------
# inputs: checkpoint and importance matrix

def ensure_model(path: Path, layers: int, experts: int, seed: int, tokenizer: Path,
                 family: str = "deepseek-v3") -> dict:
    """Make the synthetic checkpoint (``tools/make_synthetic.py --family``) unless ``path`` already holds the same one."""
    stamp = path / "synthetic.json"
    want = {"layers": layers, "experts": experts, "seed": seed, "tokenizer": str(tokenizer)}
    if family != "deepseek-v3":
        want["family"] = family
    if stamp.is_file() and json.loads(stamp.read_text()).get("args") == want:
        return json.loads(stamp.read_text())
    if path.exists():
        import shutil
        shutil.rmtree(path)
    cmd = [PY, str(ROOT / "tools" / "make_synthetic.py"), str(path), "--layers", str(layers), "--experts", str(experts),
           "--seed", str(seed), "--tokenizer", str(tokenizer), "--family", family, "-q"]
    print(f"making {path.name} ...", flush=True)
    m = measure(cmd, log=path.parent / f"{path.name}.make.log")
    info = json.loads((path.parent / f"{path.name}.make.log").read_text().strip().splitlines()[-1])
    info.update(args=want, make_wall=m["wall"], make_peak_rss=m["peak_rss"])
    stamp.write_text(json.dumps(info, indent=2))
    return info


def _ones_imatrix_child(model: str, out: str) -> None:
    """Internal: an importance matrix of ones for every quantized matrix of ``model`` (see the docstring)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from ggufmoe.arch import architecture_for
    from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry, save_imatrix
    from ggufmoe.source.hf import HFSource

    entries = {}
    for s in architecture_for(HFSource(model)).tensors():
        if len(s.shape) < 2 or any(k in s.name for k in ("token_embd", "attn_k_b", "attn_v_b", "ffn_gate_inp")):
            continue
        n = s.n_parts if s.is_expert else 1
        entries[s.name] = ImatrixEntry(np.ones((n, s.shape[-1]), np.float32), np.ones(n, np.float32))
    save_imatrix(Imatrix(entries, ["synthetic: all ones"], 1, 512), out)


# ---------------------------------------------------------------------------------------------------
# comparing the outputs

def _compare_child(ours: str, theirs: str, model: str, imatrix: str, out_json: str) -> None:
    """Internal: tensor-by-tensor and key-by-key comparison; a BF16 explanation check per differing class."""
    sys.path.insert(0, str(ROOT))
    import hashlib
    import re

    import gguf
    import numpy as np
    import torch

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    rows, classes = [], {}
    for name in sorted(set(ta) | set(tb)):
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None:
            rows.append({"name": name, "status": "only in " + ("llama.cpp" if x is None else "ggufmoe")})
            continue
        r = {"name": name, "type_ggufmoe": x.tensor_type.name, "type_llama": y.tensor_type.name,
             "shape": [int(d) for d in x.shape], "nbytes": int(x.n_bytes)}
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            r["status"] = "type/shape differ"
        else:
            same = hashlib.sha256(np.ascontiguousarray(x.data).view(np.uint8)).digest() == \
                hashlib.sha256(np.ascontiguousarray(y.data).view(np.uint8)).digest()
            r["status"] = "identical" if same else "bytes differ"
            if not same:
                xa, ya = np.asarray(x.data).reshape(-1), np.asarray(y.data).reshape(-1)
                r["bytes_differing_pct"] = float(100 * np.count_nonzero(xa.view(np.uint8) != ya.view(np.uint8))
                                                 / xa.view(np.uint8).size)
        rows.append(r)
        if r.get("status") == "bytes differ":
            classes.setdefault(re.sub(r"^blk\.\d+\.", "blk.N.", name), name)

    def kv(reader):
        out = {}
        for k, f in reader.fields.items():
            if k.startswith("GGUF."):
                continue
            try:
                v = f.contents()
            except Exception:  # noqa: BLE001 - an odd field: compare its raw parts
                v = [p.tobytes().hex() for p in f.parts]
            out[k] = v
        return out

    ka, kb = kv(a), kv(b)
    keys = {"only_ggufmoe": sorted(set(ka) - set(kb)), "only_llama": sorted(set(kb) - set(ka)),
            "differ": sorted(k for k in set(ka) & set(kb) if ka[k] != kb[k])}
    keys["differ_values"] = {k: [str(ka[k])[:120], str(kb[k])[:120]] for k in keys["differ"]}

    # Does quantizing the BF16-rounded float32 values reproduce llama.cpp's bytes?
    from ggufmoe.arch import architecture_for
    from ggufmoe.stats.imatrix import load_imatrix
    from ggufmoe.quant.ggml import Quantizer
    from ggufmoe.source.hf import HFSource

    arch = architecture_for(HFSource(model))
    specs = {s.name: s for s in arch.tensors()}
    im = load_imatrix(imatrix)
    checks = {}
    with Quantizer() as q:
        for cls, name in sorted(classes.items()):
            spec, y = specs[name], tb[name]
            part = torch.from_numpy(spec.load(0))
            rounded = part.to(torch.bfloat16).float()
            row = im.row(name, spec.source_expert(0) if spec.is_expert else None)
            t = gguf.GGMLQuantizationType(int(y.tensor_type))
            data = np.ascontiguousarray(y.data).view(np.uint8).reshape(-1)
            n = data.size // spec.n_parts
            got_bf16 = q.quantize(rounded.numpy(), t, row)
            got_f32 = q.quantize(part.numpy(), t, row)
            checks[cls] = {"tensor": name, "part": 0, "type": t.name,
                           "bf16_rounded_equals_llama": bool(np.array_equal(got_bf16, data[:n])),
                           "f32_equals_llama": bool(np.array_equal(got_f32, data[:n])),
                           "values_changed_by_bf16_pct": float(100 * (rounded != part).float().mean())}
    Path(out_json).write_text(json.dumps({"tensors": rows, "keys": keys, "bf16_checks": checks}, indent=1))


# ---------------------------------------------------------------------------------------------------
# report

def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "kernel": platform.release()}


def med(runs: list[dict], key: str, step: str | None = None) -> float:
    vals = [(r["steps"][step] if step else r)[key] for r in runs]
    return float(statistics.median(vals))


def fmt_s(x: float) -> str:
    return f"{x:,.1f} s"


def fmt_b(x: float) -> str:
    return f"{x / GIB:,.2f} GiB"


def report(res: dict) -> str:
    g, ll = res["ggufmoe"], res["llama"]
    m, model = res["machine"], res["model"]
    earlier = res.get("earlier_date")
    llama_label = f"llama.cpp ({earlier})" if earlier else "llama.cpp"
    measured = (f"Measured by `eval/bench_convert.py` ({res['date']}); medians of {len(g)} runs per pipeline, "
                "alternating which pipeline runs first.") if not earlier else (
        f"Measured by `eval/bench_convert.py`: ggufmoe on {res['date']} (`--ggufmoe-only`, "
        f"{f'median of {len(g)} runs' if len(g) > 1 else 'one run'}); llama.cpp's numbers (median of {len(ll)} runs), the comparison of the "
        f"outputs and the profile are kept from the earlier run of {earlier}, same machine, checkpoint and mix.")
    lines = [
        "# Converting a DeepSeek-V3-shaped FP8 checkpoint: ggufmoe against llama.cpp",
        "",
        measured,
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory'] / GIB:.1f} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; a shared virtual machine (timings vary with its neighbours). "
        f"Quantization threads: {res['threads']} both ways.",
        "",
        f"Checkpoint: `tools/make_synthetic.py --layers {model['layers']} --experts {model['experts']} --seed "
        f"{model['seed']}` — DeepSeek-V3's own per-layer shapes (hidden 7168, MLA, 128 heads, dense FFN 18432, "
        f"expert FFN 2048, vocabulary 129280), {model['layers']} layers (1 dense + {model['layers'] - 1} MoE), "
        f"{model['experts']} routed experts + 1 shared, top-8, 8 groups; FP8 e4m3 with 128x128 block scales "
        f"as the official release; {model['params'] / 1e9:.2f} B parameters, {model['bytes'] / 1e9:.2f} GB in "
        f"{model['shards']} shards. Tokenizer: Llama-3's vocabulary (128256 tokens, rebuilt from llama.cpp's "
        "`models/ggml-vocab-llama-bpe.gguf`), padded to 129280 by both converters — llama.cpp's converter "
        "recognises a tokenizer only by a hash of its output, and DeepSeek-V3's own is not available here.",
        "",
        "Types (same rules both ways, first match wins): routed experts IQ2_XXS, shared expert Q6_K, attention "
        "Q4_K (`attn_k_b` falls back to Q5_0 both ways), dense FFN Q4_K, `token_embd` Q4_K, `output` Q6_K; "
        "norms, routers, routing bias F32. Importance matrix: **all ones** (synthetic, written with "
        "`ggufmoe.imatrix.save_imatrix`; no entries for `token_embd`, `attn_k_b`, `attn_v_b`): "
        f"`ggufmoe calibrate` cannot run on this checkpoint here — {res['calibrate_note']}",
        "",
        "Commands: ggufmoe — `ggufmoe convert SRC -o OUT --type Q4_K --tensor-type ... --imatrix ONES`; "
        "llama.cpp — `convert_hf_to_gguf.py SRC --outtype bf16` (llama.cpp's tree "
        f"`{res['llama_cpp']}`, its gguf-py) then `llama_model_quantize` (ftype Q4_K_M, `tt_overrides` = the "
        "rules, same imatrix) through `ggufmoe.runtime.llama_quantize`.",
        "",
        f"| | ggufmoe | llama.cpp (convert + quantize{'; run of ' + earlier if earlier else ''}) | ratio | target |",
        "|---|---:|---:|---:|---|",
    ]
    gw, lw = med(g, "wall"), med(ll, "wall")
    gb, lb = med(g, "bytes_written"), med(ll, "bytes_written")
    gr, lr = med(g, "peak_rss"), med(ll, "peak_rss")
    ga, la = med(g, "peak_rss_anon"), med(ll, "peak_rss_anon")
    ok = res["acceptance"]
    lines += [
        f"| wall time | {fmt_s(gw)} | {fmt_s(lw)} ({fmt_s(med(ll, 'wall', 'convert_hf_to_gguf'))} + "
        f"{fmt_s(med(ll, 'wall', 'llama_model_quantize'))}) | {gw / lw:.2f}x | <= 0.75x: "
        f"{'met' if ok['time'] else '**missed**'} |",
        f"| bytes written | {fmt_b(gb)} | {fmt_b(lb)} (BF16 {fmt_b(statistics.median(r['files'][Path(r['bf16']).name] for r in ll))}"
        f" + final) | {gb / lb:.2f}x | <= 0.5x: {'met' if ok['bytes'] else '**missed**'} |",
        f"| peak RSS (largest process VmHWM) | {fmt_b(gr)} | {fmt_b(lr)} (convert {fmt_b(med(ll, 'peak_rss', 'convert_hf_to_gguf'))}, "
        f"quantize {fmt_b(med(ll, 'peak_rss', 'llama_model_quantize'))}) | {gr / lr:.2f}x | < 3 GiB: "
        f"{'met' if ok['rss'] else '**missed**'} |",
        f"| peak anonymous RSS (RssAnon) | {fmt_b(ga)} | {fmt_b(la)} | {ga / la:.2f}x | |",
        f"| flush of outputs (not timed above) | {fmt_s(med(g, 'flush'))} | {fmt_s(med(ll, 'flush'))} | | |",
        "",
    ]
    before = res.get("earlier_ggufmoe")
    if before:
        b = before["runs"]
        lines += [f"ggufmoe in the previous report ({before['date']}): wall "
                  f"{fmt_s(med(b, 'wall'))}, peak RSS {fmt_b(med(b, 'peak_rss'))}, RssAnon "
                  f"{fmt_b(med(b, 'peak_rss_anon'))} (median of {len(b)}).", ""]
    lines += [
        "Every run:",
        "",
        "| pipeline | run | step | wall | peak RSS | RssAnon | ru_maxrss | ru_oublock x 512 | files |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in (("ggufmoe", g), (llama_label, ll)):
        for i, r in enumerate(runs, 1):
            for step, s in r["steps"].items():
                lines.append(f"| {label} | {i} | {step} | {fmt_s(s['wall'])} | {fmt_b(s['peak_rss'])} | "
                             f"{fmt_b(s['peak_rss_anon'])} | {fmt_b(s['ru_maxrss'])} | {fmt_b(s['oublock_bytes'])} | |")
            lines.append(f"| {label} | {i} | files written | | | | | | {fmt_b(r['bytes_written'])} |")
    cmp = res["compare"]
    st = {}
    for t in cmp["tensors"]:
        st.setdefault(t["status"], []).append(t)
    lines += ["", "## Are the outputs the same?", ""]
    if earlier:
        lines += [f"(Compared in the run of {earlier}.)", ""]
    lines.append(f"Final files: ggufmoe {fmt_b(g[-1]['files'][Path(g[-1]['out']).name])}, llama.cpp "
                 f"{fmt_b(ll[-1]['files'][Path(ll[-1]['out']).name])}; byte-identical: "
                 f"{'yes' if res['files_identical'] else 'no'}.")
    lines.append("")
    lines.append("Tensors: " + ", ".join(f"{len(v)} {k}" for k, v in sorted(st.items())) + ".")
    same: dict[str, str] = {}
    import re
    for t in st.get("identical", []):
        same.setdefault(re.sub(r"^blk\.\d+\.", "blk.N.", t["name"]), t["type_ggufmoe"])
    if same:
        lines.append("Identical: " + ", ".join(f"`{c}` ({t})" for c, t in sorted(same.items())) + ".")
    lines.append("")
    if st.get("bytes differ") or st.get("type/shape differ"):
        lines += ["| tensor class | type | tensors differing | bytes differing | quantizing the BF16-rounded values "
                  "reproduces llama.cpp | values changed by BF16 rounding |", "|---|---|---:|---:|:---:|---:|"]
        by_cls: dict[str, list] = {}
        for t in st.get("bytes differ", []) + st.get("type/shape differ", []):
            by_cls.setdefault(re.sub(r"^blk\.\d+\.", "blk.N.", t["name"]), []).append(t)
        for cls, ts in sorted(by_cls.items()):
            c = cmp["bf16_checks"].get(cls, {})
            pct = statistics.mean(t.get("bytes_differing_pct", 100.0) for t in ts)
            lines.append(f"| `{cls}` | {ts[0]['type_ggufmoe']} / {ts[0]['type_llama']} | {len(ts)} | {pct:.1f}% | "
                         f"{'yes' if c.get('bf16_rounded_equals_llama') else 'no'} | "
                         f"{c.get('values_changed_by_bf16_pct', float('nan')):.1f}% |")
        lines.append("")
    k = cmp["keys"]
    lines.append(f"Metadata keys only in ggufmoe's file: {', '.join(f'`{x}`' for x in k['only_ggufmoe']) or 'none'}; "
                 f"only in llama.cpp's: {', '.join(f'`{x}`' for x in k['only_llama']) or 'none'}; "
                 f"with different values: {', '.join(f'`{x}`' for x in k['differ']) or 'none'}.")
    lines += ["", res.get("compare_note", ""), ""]
    rss = res.get("rss_scaling")
    if rss:
        a, b, mr = rss["small"], rss["large"], rss["main"]
        lines += [
            "## Bounded memory: peak RSS of `ggufmoe convert` at two sizes",
            "",
            f"Same layers and rules, {a['experts']} vs {b['experts']} routed experts per MoE layer, one run each, with "
            "the routed experts at Q8_0 instead of IQ2_XXS (IQ2_XXS is 70% of the time and holds no more memory: "
            "one expert slice in float32 either way); the first row is the realistic mix above, for reference.",
            "",
            "| experts | routed experts as | checkpoint | runs | wall | peak RSS | RssAnon |",
            "|---:|---|---:|---:|---:|---:|---:|",
            f"| {mr['experts']} | IQ2_XXS | {mr['bytes'] / 1e9:.2f} GB | {mr['runs']}{' (median)' if mr['runs'] > 1 else ''} | "
            f"{fmt_s(mr['wall'])} | "
            f"{fmt_b(mr['peak_rss'])} | {fmt_b(mr['peak_rss_anon'])} |",
        ]
        for x in (a, b):
            lines.append(f"| {x['experts']} | Q8_0 | {x['bytes'] / 1e9:.2f} GB | {x['runs']} | {fmt_s(x['wall'])} | "
                         f"{fmt_b(x['peak_rss'])} | {fmt_b(x['peak_rss_anon'])} |")
        lines += [
            "",
            f"Difference {a['experts']} -> {b['experts']} experts: peak RSS {rss['rss_diff_pct']:+.1f}%, RssAnon "
            f"{rss['anon_diff_pct']:+.1f}% (target < 10%: peak RSS "
            f"{'met' if abs(rss['rss_diff_pct']) < 10 else '**missed**'}, RssAnon "
            f"{'met' if abs(rss['anon_diff_pct']) < 10 else '**missed**'}).",
            "",
        ]
        old = (before or {}).get("rss_scaling")
        if old:
            lines += [f"In the previous report ({before['date']}): peak RSS {fmt_b(old['small']['peak_rss'])} and "
                      f"{fmt_b(old['large']['peak_rss'])}, RssAnon {fmt_b(old['small']['peak_rss_anon'])} and "
                      f"{fmt_b(old['large']['peak_rss_anon'])} at {old['small']['experts']} and "
                      f"{old['large']['experts']} experts.", ""]
    prof = res.get("profile")
    if prof:
        lines += [
            "## Where ggufmoe's time goes",
            "",
            ("" if not earlier else f"From the run of {earlier}. ")
            + f"`eval/profile_convert.py` (ggufmoe's `convert()` in one process with timers around the safetensors "
            f"reads and the FP8 dequantization, both in convert's read-ahead thread and overlapped with quantization, "
            f"and around every quantizer call; page cache warm), same checkpoint and mix: "
            f"{fmt_s(prof['total_seconds'])} in all.",
            "",
            "| part | seconds | share | calls | M values/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in prof["rows"]:
            lines.append(f"| {r['what']} | {r['seconds']:.1f} | {r['share_pct']:.1f}% | {r.get('calls', '')} | "
                         + (f"{r['Melements_per_s']:.1f}" if r.get("calls") else "") + " |")
        lines.append("")
    if res.get("findings"):
        lines += ["## Findings", "", res["findings"], ""]
    return "\n".join(lines)


def compare_outputs(res: dict, work: Path, model_dir: Path, imatrix: Path, keep: bool) -> None:
    """Compare the last outputs of both pipelines (``res["compare"]``, ``files_identical``, ``compare_note``)."""
    g_out, l_out = Path(res["ggufmoe"][-1]["out"]), Path(res["llama"][-1]["out"])
    cmp_json = work / "compare.json"
    print("comparing outputs ...", flush=True)
    measure([PY, __file__, "--_compare", str(g_out), str(l_out), str(model_dir), str(imatrix), str(cmp_json)],
            log=work / "compare.log")
    res["compare"] = json.loads(cmp_json.read_text())
    res["files_identical"] = subprocess.run(["cmp", "-s", str(g_out), str(l_out)]).returncode == 0
    checks = res["compare"]["bf16_checks"]
    if checks and all(c["bf16_rounded_equals_llama"] for c in checks.values()):
        res["compare_note"] = ("Every tensor class that differs is reproduced exactly by ggufmoe's quantizer from the "
                               "checkpoint's values rounded to BF16: the only difference is llama.cpp's BF16 "
                               "intermediate file, which rounds the dequantized FP8 weights (an FP8 value times a "
                               "float32 block scale needs up to 28 significant bits; BF16 keeps 8). ggufmoe "
                               "quantizes the exact float32 values.")
    else:
        res["compare_note"] = "Some differing tensors are not explained by BF16 rounding alone: see compare.json."
    if not keep:
        g_out.unlink(missing_ok=True)
        l_out.unlink(missing_ok=True)


EARLIER_KEYS = ("llama", "compare", "files_identical", "compare_note", "profile")


def keep_earlier(res: dict, earlier: dict) -> None:
    """llama.cpp's runs, the output comparison and the profile from an earlier report, with its date."""
    res.update({k: earlier[k] for k in EARLIER_KEYS if k in earlier})
    res["earlier_date"] = earlier.get("earlier_date", earlier["date"])
    res["earlier_ggufmoe"] = {"date": earlier["date"], "runs": earlier["ggufmoe"],
                              "rss_scaling": earlier.get("rss_scaling")}


# ---------------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        mode, args = sys.argv[1], sys.argv[2:]
        {"--_llama-quantize": _llama_quantize_child, "--_ones-imatrix": _ones_imatrix_child,
         "--_compare": _compare_child}[mode](*args)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="layers of the synthetic model (default 2: 1 dense + 1 MoE)")
    ap.add_argument("--experts", type=int, default=32, help="routed experts (default 32)")
    ap.add_argument("--rss-experts", type=int, default=None, help="experts of the second size (default 2x; 0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=Path("/work/synth"), help="checkpoints and outputs (tens of GB)")
    ap.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs and checkpoints")
    ap.add_argument("--findings", type=Path, help="markdown appended to the report as its findings")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "convert_ds3.md")
    ap.add_argument("--profile", type=Path, help="JSON from eval/profile_convert.py to include (with --render)")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from its .json (and --findings)")
    ap.add_argument("--ggufmoe-only", action="store_true",
                    help="run only ggufmoe (its repeats and the two sizes); llama.cpp's runs, the comparison of the "
                         "outputs and the profile are kept from the earlier report's .json, labelled with its date")
    args = ap.parse_args()
    if args.render:
        res = json.loads(args.out.with_suffix(".json").read_text())
        if args.findings and args.findings.is_file():
            res["findings"] = args.findings.read_text().strip()
        if args.profile and args.profile.is_file():
            res["profile"] = json.loads(args.profile.read_text())
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        args.out.write_text(report(res) + "\n")
        print(report(res))
        return
    rss_experts = 2 * args.experts if args.rss_experts is None else args.rss_experts
    earlier = json.loads(args.out.with_suffix(".json").read_text()) if args.ggufmoe_only else None

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.llama_cpp / "models" / "ggml-vocab-llama-bpe.gguf"
    model_dir = work / f"ds3-l{args.layers}-e{args.experts}"
    model = ensure_model(model_dir, args.layers, args.experts, args.seed, tokenizer)
    imatrix = work / f"ones-l{args.layers}-e{args.experts}.imatrix.gguf"
    measure([PY, __file__, "--_ones-imatrix", str(model_dir), str(imatrix)])

    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": args.threads,
                 "llama_cpp": str(args.llama_cpp), "model": model, "mix": MIX, "ggufmoe": [], "llama": [],
                 "calibrate_note": "`ggufmoe calibrate` loads the model with transformers, which stops at "
                                   "\"Loading an FP8 quantized model requires accelerate (`pip install "
                                   "accelerate`)\"; with it, FP8 needs a GPU, and dequantized to float32 the "
                                   f"{model['params'] / 1e9:.1f} B parameters need {model['params'] * 4 / 1e9:.0f} GB."}
    pipelines = ("ggufmoe",) if earlier else ("ggufmoe", "llama")
    for r in range(args.repeat):
        order = pipelines if r % 2 == 0 else pipelines[::-1]
        for which in order:
            print(f"run {r + 1}/{args.repeat}: {which} ...", flush=True)
            if which == "ggufmoe":
                x = run_ggufmoe(model_dir, work, imatrix, args.threads, f"r{r}")
            else:
                x = run_llama(model_dir, work, imatrix, args.threads, args.llama_cpp, f"r{r}")
            res[which].append(x)
            print(f"  wall {x['wall']:.1f} s, peak RSS {x['peak_rss'] / GIB:.2f} GiB, written "
                  f"{x['bytes_written'] / GIB:.2f} GiB", flush=True)
            if r < args.repeat - 1:  # keep only the last outputs, for the comparison
                for f in x["files"]:
                    (work / f).unlink(missing_ok=True)
        (work / f"llama-r{r}-bf16.gguf").unlink(missing_ok=True)

    if earlier:
        keep_earlier(res, earlier)
        if not args.keep:
            Path(res["ggufmoe"][-1]["out"]).unlink(missing_ok=True)
    else:
        compare_outputs(res, work, model_dir, imatrix, args.keep)
    gw, lw = med(res["ggufmoe"], "wall"), med(res["llama"], "wall")
    res["acceptance"] = {"time": gw <= 0.75 * lw,
                         "bytes": med(res["ggufmoe"], "bytes_written") <= 0.5 * med(res["llama"], "bytes_written"),
                         "rss": med(res["ggufmoe"], "peak_rss") < 3 * GIB}

    if rss_experts:
        runs = {}
        for n in (args.experts, rss_experts):
            d = work / f"ds3-l{args.layers}-e{n}"
            info = ensure_model(d, args.layers, n, args.seed, tokenizer)
            im = work / f"ones-l{args.layers}-e{n}.imatrix.gguf"
            measure([PY, __file__, "--_ones-imatrix", str(d), str(im)])
            print(f"bounded memory: ggufmoe on {n} experts (experts at Q8_0) ...", flush=True)
            x = run_ggufmoe(d, work, im, args.threads, f"rss-e{n}", RSS_MIX)
            Path(x["out"]).unlink(missing_ok=True)
            runs[n] = {"experts": n, "bytes": info["bytes"], "runs": 1, "wall": x["wall"], "peak_rss": x["peak_rss"],
                       "peak_rss_anon": x["peak_rss_anon"], "run": x}
            if n != args.experts and not args.keep:
                import shutil
                shutil.rmtree(d, ignore_errors=True)
        small, large = runs[args.experts], runs[rss_experts]
        main_runs = {"experts": args.experts, "bytes": model["bytes"], "runs": len(res["ggufmoe"]), "wall": gw,
                     "peak_rss": med(res["ggufmoe"], "peak_rss"), "peak_rss_anon": med(res["ggufmoe"], "peak_rss_anon")}
        res["rss_scaling"] = {"small": small, "large": large, "main": main_runs, "mix": RSS_MIX,
                              "rss_diff_pct": 100 * (large["peak_rss"] / small["peak_rss"] - 1),
                              "anon_diff_pct": 100 * (large["peak_rss_anon"] / small["peak_rss_anon"] - 1)}
    if args.findings and args.findings.is_file():
        res["findings"] = args.findings.read_text().strip()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    text = report(res)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

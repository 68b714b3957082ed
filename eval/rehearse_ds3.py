"""Scale rehearsal at DeepSeek-V3 width: calibrate (streamed) -> plan -> convert -> validate, each step its own process.

    python eval/rehearse_ds3.py [--sizes 2x32,4x32,2x64] [--chain 2x32] [--tokens 2048] [--ctx 512]
                                [--max-memory 4GiB] [--budget 2.7GiB] [--pin REGEX=TYPE ...] [--below 0.5]
                                [--search 1.1,1.25,1.5,2] [--threads N] [--work DIR] [--disk-gbps 3] [--keep]
                                [--render | --chain-only | --add --sizes 8x32]

``--chain-only`` redoes the chain from the statistics a full run left in WORK and merges it into the JSON;
``--add`` calibrates more sizes the same way and merges them; ``--render`` rewrites the report from the JSON.
When validate fails at the plan's prediction it is retried at the ``--search`` multiples until one runs.

A benchmark, not a test (issue 14, "What to build" 3 and acceptance 2). It makes synthetic FP8 checkpoints
with ``tools/make_synthetic.py`` (DeepSeek-V3's own per-layer shapes: hidden 7168, MLA, YaRN, 128 heads,
dense FFN 18432, experts of FFN 2048 + 1 shared, top-8 of 8 groups, sigmoid routing with
``e_score_correction_bias``; FP8 e4m3 with 128x128 block scales), one size at a time (``LAYERSxEXPERTS``,
the first layer dense), deleted after use unless ``--keep``, and runs the real CLI on them:

* ``ggufmoe calibrate SRC --text tests/data/calib.txt --max-tokens N --ctx C --max-memory M`` at every size
  (streamed layer by layer, the default; the same tokens at every size), so peak RSS can be compared as
  layers and experts double;
* at the ``--chain`` size, then: ``ggufmoe plan SRC --budget B --ctx VCTX --stats STATS`` (when that refuses
  for lack of measured sensitivities, ``plan`` from shape defaults, said so in the report), ``ggufmoe convert
  SRC --plan PLAN --stats STATS``, ``ggufmoe validate OUT --memory-limit <the plan's predicted memory>``
  (must run) and ``--memory-limit <--below x that>`` (must fail with one line and exit code 1).

Every step is a fresh child process (``eval/bench_convert.py``'s ``measure``: the largest ``VmHWM`` of any
process of its tree, polled every 50 ms, the largest ``RssAnon``, and ``ru_maxrss`` from ``os.wait4``);
the load average is read before and after each step. Before each calibration the checkpoint's pages are
dropped from the page cache (``posix_fadvise``, these files only), so the weights come from disk.

Calibration runs the CLI's own entry point (``ggufmoe.cli:main``, the same code as the ``ggufmoe``
command) in a child that first wraps timers around the streamed run's stages (``StreamedRun.embed``,
``.layer``, ``.run_experts``, ``.output``; any that do not exist are simply not timed) and samples its own
RSS every 20 ms per stage: so the dense layer, each MoE layer's first phase (attention, shared expert,
routing) and its routed-expert phase are timed and their peak RSS known. ``python -c 'import torch,
transformers'`` is measured alone as the baseline.

The report derives from the raw numbers (all in the JSON): peak RSS growth when layers and experts double
(target < 10%), peak RSS against a bound computed from the shapes, throughput in token-layers per second,
and a projection for DeepSeek-V3 671B (61 layers, 58 MoE of 256 experts, 100k calibration tokens) on a
64-core host and on one H100/H200 (not measured: no GPU here). ``--render`` rewrites the report from the
JSON. Writes eval/results/rehearse_ds3.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import GIB, PY, drop_cache, ensure_model, machine, measure  # noqa: E402

GGUFMOE = str(Path(PY).with_name("ggufmoe"))
TOKENIZER = ROOT / "models" / "refmoe-qwen3"  # make_synthetic's default tokenizer (padded to 129280)
CALIB = ROOT / "tests" / "data" / "calib.txt"
OUT = ROOT / "eval" / "results" / "rehearse_ds3.md"
GB = 1e9

# Assumptions of the projection (stated in the report; none of them is measured here).
H100_FP32_FLOPS = 67e12  # H100 SXM / H200: FP32 (non-tensor-core) peak; torch runs float32 matmuls without TF32 by default
GPU_EFFICIENCY = 0.5  # of that peak, for the large matmuls of a layer
PCIE_GBPS = 20.0  # host -> GPU, pageable float32 tensors (PCIe Gen5 x16 is 64 GB/s theoretical)
HOST_CORES = 64
DSV3_TOKENS = 100_000


# ---------------------------------------------------------------------------------------------------
# the calibrate child: the CLI's entry point with timers around the streamed run's stages

def _calibrate_child(timings_path: str, *argv: str) -> None:
    import threading

    sys.path.insert(0, str(ROOT))
    page = os.sysconf("SC_PAGE_SIZE")
    phases: dict[str, dict] = {}
    stack: list[list] = [["startup", time.perf_counter(), time.process_time()]]  # name, wall and CPU at entry
    info: dict = {"wrapped": []}
    lock = threading.RLock()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def phase(name: str) -> dict:
        return phases.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss": 0, "order": len(phases)})

    def charge(now: float, cpu: float) -> None:
        """Time since the top stage was (re)entered goes to it (exclusive of nested stages)."""
        top = stack[-1]
        p = phase(top[0])
        p["seconds"] += now - top[1]
        p["cpu_seconds"] += cpu - top[2]
        top[1], top[2] = now, cpu

    def push(name: str) -> None:
        with lock:
            charge(time.perf_counter(), time.process_time())
            phase(name)["peak_rss"] = max(phase(name)["peak_rss"], rss())
            stack.append([name, time.perf_counter(), time.process_time()])

    def pop() -> None:
        with lock:
            charge(time.perf_counter(), time.process_time())
            name = stack.pop()[0]
            p = phase(name)
            p["peak_rss"] = max(p["peak_rss"], rss())
            p["vmhwm_after"] = hwm()
            stack[-1][1], stack[-1][2] = time.perf_counter(), time.process_time()

    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            try:
                r = rss()
            except OSError:
                continue
            with lock:
                p = phase(stack[-1][0])
                p["peak_rss"] = max(p["peak_rss"], r)

    threading.Thread(target=sample, daemon=True).start()
    try:
        from ggufmoe.stats import stream

        def wrap(cls, name: str, label) -> None:
            f = getattr(cls, name, None) if cls is not None else None
            if f is None:
                return

            def timed(self, *a, **kw):
                push(label(self, a))
                try:
                    return f(self, *a, **kw)
                finally:
                    pop()
            setattr(cls, name, timed)
            info["wrapped"].append(f"{cls.__name__}.{name}")

        def layer_label(self, a) -> str:
            k = a[1]
            return f"layer {k} ({'moe' if k in getattr(self, 'moe_layers', ()) else 'dense'})"

        run_cls, skel_cls = getattr(stream, "StreamedRun", None), getattr(stream, "Skeleton", None)
        wrap(run_cls, "embed", lambda self, a: "embed")
        wrap(run_cls, "layer", layer_label)
        wrap(run_cls, "run_experts", lambda self, a: f"layer {a[0]} (moe) experts")
        wrap(run_cls, "output", lambda self, a: "output")
        wrap(skel_cls, "materialize", lambda self, a: f"{stack[-1][0]} weights")  # read + dequantize one layer
        plan = getattr(run_cls, "plan", None) if run_cls is not None else None
        if plan is not None:
            def planned(self, *a, **kw):
                b = plan(self, *a, **kw)
                info["budget"] = {k: v for k, v in vars(b).items() if isinstance(v, (int, float, bool))}
                info.update(rows=int(self.rows), n_chunks=int(self.n_chunks), n_layers=int(self.n_layers),
                            n_batches=len(self.batches), max_batch=max(int(x.numel()) for x in self.batches),
                            width=int(self.width), moe_layers=sorted(int(k) for k in self.moe_layers))
                return b
            run_cls.plan = planned
        from ggufmoe.cli import main as cli_main

        sys.argv = ["ggufmoe", *argv]
        cli_main()
    finally:
        stop.set()
        with lock:
            charge(time.perf_counter(), time.process_time())
        info["phases"] = phases
        info["vmhwm"] = hwm()
        info["cpu_seconds"] = time.process_time()
        Path(timings_path).write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------------------------------------------
# running steps

def step(cmd: list[str], log: Path, timeout: float | None = None) -> dict:
    """``cmd`` in its own process tree, measured; its exit code is recorded, not raised. Load average around it."""
    rc_file = log.with_suffix(".rc")
    rc_file.unlink(missing_ok=True)
    wrapped = ["sh", "-c", f'"$@"; echo $? > {rc_file}', "sh", *cmd]
    if timeout:
        wrapped = ["timeout", str(int(timeout)), *wrapped]
    load0 = os.getloadavg()
    m = measure(wrapped, log=log)
    m["load_start"], m["load_end"] = list(load0), list(os.getloadavg())
    m["rc"] = int(rc_file.read_text().strip()) if rc_file.is_file() else -1
    rc_file.unlink(missing_ok=True)
    m["cmd"] = " ".join(cmd)
    m["log_tail"] = log.read_text(errors="replace").replace("\r", "\n")[-2500:]
    return m


def step_retrying(cmd: list[str], log: Path, what: str, tries: int = 3) -> dict:
    """As :func:`step`; an ImportError (the package being edited under us) waits 150 s and runs again."""
    for i in range(tries):
        m = step(cmd, log)
        if m["rc"] == 0 or not re.search(r"ImportError|cannot import name|ModuleNotFoundError", m["log_tail"]):
            return m
        print(f"  {what}: ImportError, retrying in 150 s ({i + 1}/{tries})", flush=True)
        time.sleep(150)
    return m


def say(m: dict, what: str) -> None:
    print(f"  {what}: rc {m['rc']}, {m['wall']:.1f} s, peak RSS {m['peak_rss'] / GIB:.2f} GiB, load "
          f"{m['load_start'][0]:.2f} -> {m['load_end'][0]:.2f}", flush=True)


def disk_read_gbps(path: Path, nbytes: int = 1 << 30) -> float:
    """Sequential read speed of one file from disk (its pages dropped first)."""
    drop_cache([path])
    fd = os.open(path, os.O_RDONLY)
    try:
        t0, n = time.perf_counter(), 0
        while n < nbytes:
            b = os.read(fd, 64 << 20)
            if not b:
                break
            n += len(b)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    drop_cache([path])
    return n / dt / GB


def calibrate(src: Path, work: Path, tag: str, args) -> dict:
    stats = work / f"{tag}.stats.gguf"
    stats.unlink(missing_ok=True)
    shutil.rmtree(work / f".{stats.name}.partial", ignore_errors=True)
    timings = work / f"{tag}.calibrate.timings.json"
    timings.unlink(missing_ok=True)
    drop_cache(src.glob("*.safetensors"))
    cmd = [PY, __file__, "--_calibrate", str(timings), "calibrate", str(src), "--text", str(args.text), "-o",
           str(stats), "--max-tokens", str(args.tokens), "--chunk", str(args.ctx), "--max-memory", args.max_memory, "-q",
           *getattr(args, "calibrate_arg", [])]
    m = step_retrying(cmd, work / f"{tag}.calibrate.log", "calibrate")
    m["timings"] = json.loads(timings.read_text()) if timings.is_file() else None
    m["stats"] = str(stats)
    m["partial_left"] = (work / f".{stats.name}.partial").exists()
    say(m, f"calibrate {tag}")
    return m


def plan_summary(path: Path) -> dict:
    p = json.loads(path.read_text())
    by_type: dict[str, int] = {}
    for name, t in p["types"].items():
        by_type[t] = by_type.get(t, 0) + int(p["tensor_bytes"].get(name, 0))
    return {"budget": p["budget"], "ctx": p["ctx"], "file_bytes": p["file_bytes"], "memory": p["memory"],
            "keep": p["keep"], "n_expert": p["n_expert"], "top_k": p["top_k"], "top_k_source": p["top_k_source"],
            "criterion": p["criterion"], "predicted_kld": p["predicted_kld"], "notes": p.get("notes", []),
            "stats": p.get("stats"), "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "candidates": p.get("candidates", [])}


def chain(src: Path, stats: Path, work: Path, tag: str, args) -> dict:
    res: dict = {"size": tag, "budget": args.budget, "ctx": args.validate_ctx, "pins": args.pin}
    plan_file, out = work / f"{tag}.plan.json", work / f"{tag}.gguf"
    pins = [x for p in args.pin for x in ("--tensor-type", p)]
    base = [GGUFMOE, "plan", str(src), "--budget", args.budget, "--ctx", str(args.validate_ctx), *pins,
            "-o", str(plan_file), "-q", *getattr(args, "plan_arg", [])]
    plan_file.unlink(missing_ok=True)
    attempts = [("with --stats", base + ["--stats", str(stats)])]
    if args.plan_fallback:
        attempts.append(("shape defaults (no --stats)", base))
    res["plan_attempts"] = []
    for label, cmd in attempts:
        m = step_retrying(cmd, work / f"{tag}.plan.log", "plan")
        m["mode"] = label
        res["plan_attempts"].append(m)
        say(m, f"plan ({label})")
        if m["rc"] == 0 and plan_file.is_file():
            break
    if not plan_file.is_file():
        res["failed"] = "plan"
        return res
    res["plan"] = plan_summary(plan_file)
    res["plan_mode"] = res["plan_attempts"][-1]["mode"]

    out.unlink(missing_ok=True)
    shutil.rmtree(work / f".{out.name}.partial", ignore_errors=True)
    m = step_retrying([GGUFMOE, "convert", str(src), "--plan", str(plan_file), "--stats", str(stats), "-o", str(out),
                       "--threads", str(args.threads), "-q"], work / f"{tag}.convert.log", "convert")
    say(m, "convert")
    res["convert"] = m
    if m["rc"] != 0 or not out.is_file():
        res["failed"] = "convert"
        return res
    res["file_bytes"] = out.stat().st_size
    res["imatrix_key_bytes"] = imatrix_key_bytes(out)
    drop_cache([out])

    predicted = int(res["plan"]["memory"]["total"])

    def validate(limit: int, key: str) -> dict:
        m = step([GGUFMOE, "validate", str(out), "--memory-limit", str(limit), "--ctx", str(args.validate_ctx),
                  "--n-predict", "8", "--threads", str(args.threads), "--timeout", "900"], work / f"{tag}.{key}.log")
        m["limit"] = limit
        m["stderr_lines"] = [ln for ln in m["log_tail"].splitlines() if ln.startswith("error")]
        m["traceback"] = "Traceback" in m["log_tail"]
        say(m, f"{key} at {limit / GIB:.2f} GiB")
        return m

    res["validate"] = validate(predicted, "validate")
    if res["validate"]["rc"] != 0:  # how much more than predicted does it take?
        res["validate_search"] = []
        for factor in args.search:
            m = validate(int(predicted * factor), f"validate_x{factor:g}")
            m["factor"] = factor
            res["validate_search"].append(m)
            if m["rc"] == 0:
                break
    res["validate_below"] = validate(int(predicted * args.below), "validate_below")
    if not args.keep:
        out.unlink(missing_ok=True)
    return res


def imatrix_key_bytes(gguf_path: Path) -> int | None:
    """Bytes the ``quantize.imatrix.*`` keys take in a GGUF's header (read in a child: gguf-py, numpy)."""
    code = ("import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); print(sum(sum(p.nbytes for p in f.parts) "
            "for k, f in r.fields.items() if k.startswith('quantize.imatrix.')))")
    try:
        return int(subprocess.run([PY, "-c", code, str(gguf_path)], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# shapes: parameters, FLOPs and the memory bound of one layer's step

def shapes(cfg: dict) -> dict:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    ffn, eff = cfg["intermediate_size"], cfg["moe_intermediate_size"]
    n_exp, shared, top_k = cfg["n_routed_experts"], cfg["n_shared_experts"], cfg["num_experts_per_tok"]
    attn_mats = {"q_a": h * qr, "q_b": qr * heads * (dn + dr), "kv_a": h * (kvr + dr), "kv_b": kvr * heads * (dn + dv),
                 "o": heads * dv * h}
    attn = sum(attn_mats.values()) + qr + kvr + 2 * h  # + the q_a, kv_a and two layer norms
    dense = attn + 3 * h * ffn
    expert = 3 * h * eff
    moe_nonexpert = attn + shared * expert + n_exp * h + n_exp  # + router and routing bias
    largest = max(list(attn_mats.values()) + [h * ffn, h * eff * shared])  # one matrix, elements
    return {"h": h, "heads": heads, "dn": dn, "dr": dr, "dv": dv, "qr": qr, "kvr": kvr, "ffn": ffn, "eff": eff,
            "n_exp": n_exp, "shared": shared, "top_k": top_k, "attn_params": attn, "attn_matmul_params": sum(attn_mats.values()),
            "dense_params": dense, "moe_nonexpert_params": moe_nonexpert, "expert_params": expert,
            "largest_matrix": largest, "n_layers": cfg["num_hidden_layers"], "n_dense": cfg["first_k_dense_replace"],
            "vocab": cfg["vocab_size"]}


def flops_per_token(s: dict, ctx: int) -> dict:
    """Forward FLOPs of one token through one layer (2 per multiply-add); attention over a causal chunk of ctx."""
    attn_proj = 2 * s["attn_matmul_params"]
    attn_scores = 2 * s["heads"] * (s["dn"] + s["dr"] + s["dv"]) * (ctx + 1) / 2
    dense_ffn = 2 * 3 * s["h"] * s["ffn"]
    router = 2 * s["h"] * s["n_exp"]
    shared = 2 * s["shared"] * s["expert_params"]
    routed = 2 * s["top_k"] * s["expert_params"]
    return {"attn_proj": attn_proj, "attn_scores": attn_scores, "dense_ffn": dense_ffn, "router": router,
            "shared": shared, "routed": routed, "dense_layer": attn_proj + attn_scores + dense_ffn,
            "moe_layer": attn_proj + attn_scores + router + shared + routed,
            "moe_phase1": attn_proj + attn_scores + router + shared}


def per_token_activations(s: dict, ctx: int) -> int:
    """Bytes of one token's activations in one layer's forward: every intermediate of the largest layer (none
    freed early: MLA attention, then the dense FFN), float32, plus one row of attention scores per head."""
    h, H = s["h"], s["heads"]
    attn = (2 * s["qr"] + 2 * H * (s["dn"] + s["dr"]) + (s["kvr"] + s["dr"]) + s["kvr"] + H * (s["dn"] + s["dv"])
            + H * (s["dn"] + s["dr"]) + 3 * H * s["dv"] + h + 3 * h)
    ffn = 4 * max(s["ffn"], s["eff"] * s["shared"]) + h
    return 4 * (attn + ffn) + 4 * H * ctx


def memory_bound(s: dict, rows: int, batch_tokens: int, ctx: int, max_memory: int, baseline: int,
                 moe: bool = True) -> dict:
    """The bound on calibrate's peak RSS, term by term (bytes)."""
    expert = 4 * s["expert_params"]
    ahead = min(1 << 30, max(expert, max_memory // 16))  # the read-ahead policy calibrate documents
    n_ahead = max(1, ahead // expert)
    terms = {
        "baseline": baseline,
        "layer_weights": 4 * max(s["dense_params"], s["moe_nonexpert_params"]),
        "largest_matrix_fp8": s["largest_matrix"] * 1,
        "experts": (n_ahead + 1) * expert + (2 * expert) // 3 if moe else 0,
        "stores": (3 if moe else 2) * rows * s["h"] * 4,
        "activations": batch_tokens * per_token_activations(s, ctx),
        "expert_activations": batch_tokens * (3 * s["eff"] + s["h"]) * 4 if moe else 0,
    }
    terms["total"] = sum(terms.values())
    terms["n_ahead"] = n_ahead
    return terms


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise SystemExit(f"cannot read size {text!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


# ---------------------------------------------------------------------------------------------------
# analysis

KINDS = ("dense_weights", "dense", "moe_weights", "moe_phase1", "moe_experts")


def stage_kind(name: str) -> str:
    """'layer 3 (moe) experts' -> 'moe_experts', 'layer 0 (dense) weights' -> 'dense_weights', ..."""
    m = re.fullmatch(r"layer \d+ \((dense|moe)\)( weights| experts)?", name)
    if not m:
        return name.replace(" ", "_")
    kind, sub = m.group(1), (m.group(2) or "").strip()
    return f"{kind}_{sub}" if sub else ("dense" if kind == "dense" else "moe_phase1")


def layer_times(t: dict | None) -> dict:
    """Per kind of stage (KINDS and the rest): wall and CPU seconds of every layer, and the peak RSS seen."""
    out: dict = {"wall": {}, "cpu": {}, "peak": {}}
    for name, p in sorted(((t or {}).get("phases") or {}).items(), key=lambda kv: kv[1]["order"]):
        k = stage_kind(name)
        out["wall"].setdefault(k, []).append(p["seconds"])
        out["cpu"].setdefault(k, []).append(p.get("cpu_seconds", 0.0))
        out["peak"][k] = max(out["peak"].get(k, 0), p["peak_rss"])
    for clock in ("wall", "cpu"):
        out[f"layers_{clock}"] = sum(sum(out[clock].get(k, [])) for k in KINDS)
    return out


def mean(xs) -> float:
    xs = list(xs or [])
    return sum(xs) / len(xs) if xs else 0.0


def analyse(res: dict) -> None:
    """Everything derived: growth, bound, throughput, projection. Stored in res['analysis']."""
    runs = {r["size"]: r for r in res["calibrate"] if r["step"]["rc"] == 0}
    base_rss = res["baseline"]["peak_rss"]
    a: dict = {"sizes": {}}
    ctx = res["args"]["ctx"]
    mm = parse_size(res["args"]["max_memory"])
    for tag, r in runs.items():
        s = shapes(r["config"])
        t = r["step"].get("timings") or {}
        rows = t.get("rows") or res["args"]["tokens"]
        batch = t.get("max_batch") or min(rows, 4096)
        b = memory_bound(s, rows, batch, ctx, mm, base_rss)
        lt = layer_times(t)
        f = flops_per_token(s, ctx)
        n_moe = s["n_layers"] - s["n_dense"]
        fl = rows * (s["n_dense"] * f["dense_layer"] + n_moe * f["moe_layer"])
        x = {"rows": rows, "batch_tokens": batch, "bound": b, "layer_times": lt, "flops": fl,
             "peak_rss": r["step"]["peak_rss"], "ru_maxrss": r["step"]["ru_maxrss"],
             "bound_ok": r["step"]["peak_rss"] <= b["total"], "layers": s["n_layers"], "experts": s["n_exp"],
             "token_layers": rows * s["n_layers"], "tl_per_s_step": rows * s["n_layers"] / r["step"]["wall"],
             "cpu_seconds": t.get("cpu_seconds"),
             "tool_per_token": (t.get("budget") or {}).get("per_token"),
             "tool_fixed": (t.get("budget") or {}).get("fixed")}
        if lt["peak"].get("dense"):  # what a forward took in layer 0: its peak less its weights, the stores, the baseline
            x["measured_per_token"] = (lt["peak"]["dense"] - base_rss - b["layer_weights"] - b["stores"]) / batch
        if lt["layers_wall"]:
            w, c = lt["wall"], lt["cpu"]
            x["tl_per_s_layers"] = rows * s["n_layers"] / lt["layers_wall"]
            x["gflops_layers"] = fl / lt["layers_wall"] / 1e9
            x["gflop_per_cpu_s_layers"] = fl / max(lt["layers_cpu"], 1e-9) / 1e9
            if w.get("dense"):  # the forward alone (weights read before it)
                x["dense_tok_s"] = rows / mean(w["dense"])
                x["dense_gflop_per_cpu_s"] = rows * f["dense_layer"] / max(mean(c["dense"]), 1e-9) / 1e9
            if w.get("moe_phase1"):
                x["moe_p1_tok_s"] = rows / mean(w["moe_phase1"])
                x["moe_p1_gflop_per_cpu_s"] = rows * f["moe_phase1"] / max(mean(c["moe_phase1"]), 1e-9) / 1e9
            if w.get("moe_experts"):
                x["moe_exp_tok_s"] = rows / mean(w["moe_experts"])
                x["moe_layer_tok_s"] = rows / (mean(w.get("moe_weights")) + mean(w["moe_phase1"]) + mean(w["moe_experts"]))
        a["sizes"][tag] = x

    def growth(small: str, large: str) -> dict | None:
        if small not in a["sizes"] or large not in a["sizes"]:
            return None
        p, q = a["sizes"][small], a["sizes"][large]
        g = {"from": small, "to": large, "peak_rss_pct": 100 * (q["peak_rss"] / p["peak_rss"] - 1)}
        for k in ("moe_phase1", "moe_experts"):
            pp, qq = p["layer_times"]["peak"].get(k), q["layer_times"]["peak"].get(k)
            if pp and qq:
                g[f"{k}_peak_pct"] = 100 * (qq / pp - 1)
        return g

    first = res["calibrate"][0]["size"] if res["calibrate"] else None
    if first:
        L0, E0 = (int(v) for v in first.split("x"))
        a["growth_layers"] = growth(first, f"{2 * L0}x{E0}")
        a["growth_experts"] = growth(first, f"{L0}x{2 * E0}")
        a["growth_both"] = growth(first, f"{2 * L0}x{2 * E0}")
        a["vs_reference"] = [growth(first, tag) for tag in a["sizes"] if tag != first]
        a["creep"] = creep(res, a)
        # the routed-expert phase with the experts doubled at the same tokens: the cost of one more expert
        big = a["sizes"].get(f"{L0}x{2 * E0}")
        small = a["sizes"].get(first)
        if big and small and small["layer_times"]["wall"].get("moe_experts") and big["layer_times"]["wall"].get("moe_experts"):
            ec = {"experts_small": E0, "experts_large": 2 * E0}
            for clock in ("wall", "cpu"):
                p2s = mean(small["layer_times"][clock]["moe_experts"])
                p2l = mean(big["layer_times"][clock]["moe_experts"])
                ec[clock] = {"p2_small": p2s, "p2_large": p2l, "per_expert_s": (p2l - p2s) / E0,
                             "token_part_s": p2s - E0 * (p2l - p2s) / E0}
            a["expert_cost"] = ec
    a["projection"] = project(res, a)
    res["analysis"] = a
    res["failures"] = failures(res)


def creep(res: dict, a: dict) -> dict | None:
    """Does the RSS of MoE layers rise from layer to layer? Least-squares slope of each stage's peak RSS over the
    layer index, in the run with the most MoE layers, and what it would add over DeepSeek-V3's 58 MoE layers."""
    best = None
    for r in res["calibrate"]:
        t = (r["step"].get("timings") or {}).get("phases") or {}
        per: dict[str, list] = {}
        for name, p in t.items():
            m = re.fullmatch(r"layer (\d+) \(moe\)( weights| experts)?", name)
            if m:
                per.setdefault(stage_kind(name), []).append((int(m.group(1)), p["peak_rss"]))
        n = len(per.get("moe_phase1", []))
        if n >= 3 and (best is None or n > best[1]):
            best = (r["size"], n, per)
    if best is None:
        return None
    tag, n, per = best
    out = {"size": tag, "moe_layers": n, "stages": {}}
    for kind, pts in per.items():
        pts.sort()
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        mx, my = mean(xs), mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in pts) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
        half = pts[len(pts) // 2:]  # the later layers alone: does the rise level off?
        hx, hy = mean([x for x, _ in half]), mean([y for _, y in half])
        late = sum((x - hx) * (y - hy) for x, y in half) / max(sum((x - hx) ** 2 for x, _ in half), 1e-9)
        out["stages"][kind] = {"layers": xs, "peak_rss": ys, "slope_per_layer": slope,
                               "over_58_moe_layers": slope * 57, "late_slope_per_layer": late,
                               "late_layers": [x for x, _ in half], "late_over_58": late * 57}
    return out


def failures(res: dict) -> list[str]:
    """What did not go as the rehearsal asks, from the raw numbers."""
    out, a = [], res["analysis"]
    for r in res["calibrate"]:
        if r["step"]["rc"] != 0:
            out.append(f"calibrate {r['size']}: exit {r['step']['rc']}: {_err(r['step'])}")
    c = res.get("chain")
    if c:
        pa = c["plan_attempts"][0]
        if pa["rc"] != 0:
            out.append(f"`plan --stats` refused: {_err(pa)}. With --stats, plan needs measured sensitivities, and "
                       "today those come only from whole-model probes (one F16 conversion of the model per tensor "
                       "class, each scored in llama.cpp), which a 4 B-parameter checkpoint on 2 cores cannot afford "
                       "here (issue 14's local sensitivities are to replace them). The chain used: "
                       + (c.get("plan_mode") or "nothing") + ", then `convert --plan --stats` (the calibrated "
                       "importance matrix shapes the quantization)")
        if c.get("failed"):
            out.append(f"the chain on {c['size']} stopped at {c['failed']}")
        v = c.get("validate")
        if v and v["rc"] != 0:
            ok = [m for m in c.get("validate_search", []) if m["rc"] == 0]
            above = _above(ok[0]["log_tail"]) if ok else None
            pred = c["plan"]["memory"]["total"]
            out.append(f"validate at the plan's predicted memory ({gib(v['limit'])}) failed: {_err(v)}; "
                       + (f"it runs at {ok[0]['factor']:g}x ({gib(ok[0]['limit'])})" if ok else
                          f"it did not run at up to {max([m['factor'] for m in c.get('validate_search', [])] or [1]):g}x")
                       + (f", where its peak RSS above the baseline is {gib(above['rss'])} ({above['rss'] / pred:.2f}x the "
                          f"prediction) and its address space {gib(above['vm'])} ({above['vm'] / pred:.2f}x): the "
                          "prediction holds for RSS; RLIMIT_AS, the limit validate falls back to without a cgroup, "
                          "counts address space" if above else ""))
        vb = c.get("validate_below")
        if vb and (vb["rc"] != 1 or vb["traceback"] or len(vb["stderr_lines"]) != 1):
            out.append(f"validate well below the prediction did not fail cleanly: exit {vb['rc']}: {_err(vb)}")
    for key in ("growth_layers", "growth_experts", "growth_both"):
        g = a.get(key)
        if g and abs(g["peak_rss_pct"]) >= 10:
            out.append(f"peak RSS grew {g['peak_rss_pct']:+.1f}% from {g['from']} to {g['to']} (target < 10%)")
    mm = parse_size(res["args"]["max_memory"])
    overs = []
    for tag, x in a["sizes"].items():
        if not x["bound_ok"]:
            out.append(f"{tag}: peak RSS {gib(x['peak_rss'])} above the bound {gib(x['bound']['total'])}")
        over = x["peak_rss"] - res["baseline"]["peak_rss"] - mm
        if over > 0:
            overs.append(f"{tag} by {gib(over)}")
    if overs:
        x = next(iter(a["sizes"].values()))
        why = (f": it budgets {x['tool_per_token'] / 1e6:.2f} MB of activations per token of a forward, while layer 0 "
               f"(dense) took {x['measured_per_token'] / 1e6:.2f} MB per token (its peak RSS less its float32 weights, the "
               f"hidden-state stores and the baseline, over T_b = {x['batch_tokens']})" if x.get("tool_per_token") and x.get("measured_per_token") else "")
        out.append(f"calibrate's peak RSS exceeds --max-memory {res['args']['max_memory']} + the baseline (the bound "
                   f"it states for its working set): {', '.join(overs)}" + why)
    cr = a.get("creep")
    if cr and cr["stages"].get("moe_phase1") and cr["stages"]["moe_phase1"]["late_slope_per_layer"] > 4 * 2**20:
        p1 = cr["stages"]["moe_phase1"]
        out.append(f"not settled: the MoE layers' peak RSS still rises {p1['late_slope_per_layer'] / 2**20:+,.0f} MiB per "
                   f"layer over the later half of {cr['size']}'s {cr['moe_layers']} MoE layers (the process peak, in layer 0, "
                   "is flat); at DeepSeek-V3's depth that could overtake layer 0")
    if res.get("total_wall", 0) > 25 * 60:
        out.append(f"the rehearsal took {secs(res['total_wall'])} (aim: under 25 min) on this loaded machine")
    return out


def project(res: dict, a: dict) -> dict | None:
    """DeepSeek-V3 671B, 100k tokens: this machine's measured rates (wall and CPU), scaled, with the arithmetic."""
    cfg = res.get("dsv3_config")
    first = a["sizes"].get(res["calibrate"][0]["size"]) if res.get("calibrate") else None
    if not cfg or not first or not first["layer_times"]["layers_wall"] or not first["layer_times"]["wall"].get("moe_experts"):
        return None
    s = shapes(cfg)
    ctx = res["args"]["ctx"]
    f = flops_per_token(s, ctx)
    n_moe = s["n_layers"] - s["n_dense"]
    N = DSV3_TOKENS
    cores = res["machine"]["cores"]
    rows = first["rows"]
    ec = a.get("expert_cost")
    rates, parts = {}, {}
    for clock in ("wall", "cpu"):
        lt = first["layer_times"][clock]
        r = {"dense_weights": mean(lt.get("dense_weights")), "dense_tok": mean(lt.get("dense")) / rows,
             "moe_weights": mean(lt.get("moe_weights")), "moe_p1_tok": mean(lt.get("moe_phase1")) / rows}
        if ec and ec[clock]["per_expert_s"] > 0:
            r["expert"], r["moe_p2_tok"] = ec[clock]["per_expert_s"], ec[clock]["token_part_s"] / rows
        else:  # no experts-doubling pair (or noise): the whole phase charged to the tokens
            r["expert"], r["moe_p2_tok"] = 0.0, mean(lt.get("moe_experts")) / rows
        rates[clock] = r
        parts[clock] = {
            "layer_weights": s["n_dense"] * r["dense_weights"] + n_moe * r["moe_weights"],
            "tokens": N * (s["n_dense"] * r["dense_tok"] + n_moe * (r["moe_p1_tok"] + r["moe_p2_tok"])),
            "experts": n_moe * s["n_exp"] * r["expert"],
        }
        parts[clock]["total"] = sum(parts[clock].values())
    fp8_bytes = (s["n_layers"] * s["attn_matmul_params"] + s["n_dense"] * 3 * s["h"] * s["ffn"]
                 + n_moe * (s["n_exp"] + s["shared"]) * s["expert_params"])  # FP8 linear weights, 1 byte each
    bf16_bytes = 2 * (2 * s["vocab"] * s["h"] + n_moe * s["n_exp"] * s["h"])  # embeddings, output, routers
    read_bytes = fp8_bytes + bf16_bytes
    disk = read_bytes / (res["args"]["disk_gbps"] * GB)
    total_flops = N * (s["n_dense"] * f["dense_layer"] + n_moe * f["moe_layer"])
    cpu = parts["cpu"]
    host = {"tokens": cpu["tokens"] / HOST_CORES, "weights": (cpu["layer_weights"] + cpu["experts"]) / HOST_CORES,
            "disk": disk}
    host["low"], host["high"] = max(host.values()), sum(host.values())
    f32_bytes = 4 * (fp8_bytes + bf16_bytes / 2)
    gpu = {"tokens": total_flops / (H100_FP32_FLOPS * GPU_EFFICIENCY), "weights": host["weights"], "disk": disk,
           "pcie": (f32_bytes + 2 * s["n_layers"] * N * s["h"] * 4) / (PCIE_GBPS * GB)}
    gpu["low"], gpu["high"] = max(gpu.values()), sum(gpu.values())
    mm = parse_size(res["args"]["max_memory"])
    bound = memory_bound(s, N, min(N, 4096), ctx, mm, res["baseline"]["peak_rss"])
    bound_min = memory_bound(s, 0, ctx, ctx, mm, res["baseline"]["peak_rss"])  # stores mapped, one chunk a forward
    return {"bound_min": bound_min, "tokens": N, "ctx": ctx, "shapes": s, "flops_per_token": f, "total_flops": total_flops, "rates": rates,
            "parts": parts, "host64": host, "gpu": gpu, "read_bytes": read_bytes, "fp8_bytes": fp8_bytes,
            "f32_bytes": f32_bytes, "hidden_store_bytes": N * s["h"] * 4, "bound": bound, "cores_here": cores,
            "gflop_per_cpu_s": first.get("gflop_per_cpu_s_layers"), "gflops_wall": first.get("gflops_layers"),
            "reference": res["calibrate"][0]["size"],
            "pair": f"{res['calibrate'][0]['size']} / {ec['experts_large']} experts" if ec else None}


# ---------------------------------------------------------------------------------------------------
# report

def gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB"


def secs(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:,.1f} h"
    if x >= 120:
        return f"{x / 60:,.1f} min"
    return f"{x:,.1f} s"


def load(m: dict) -> str:
    return f"{m['load_start'][0]:.2f} → {m['load_end'][0]:.2f}"


def report(res: dict) -> str:
    a, m, args = res["analysis"], res["machine"], res["args"]
    L = [
        "# Scale rehearsal at DeepSeek-V3 width: calibrate → plan → convert → validate",
        "",
        f"Measured by `eval/rehearse_ds3.py` ({res['date']}; `{res['command']}`), {secs(res['total_wall'])} in all."
        + (f" The chain (plan → convert → validate) was then run again on its own from the same statistics "
           f"(`{res['chain_rerun']['command']}`, {secs(res['chain_rerun']['wall'])}); its figures are from that run."
           if res.get("chain_rerun") else "")
        + "".join(f" Sizes {', '.join(x['sizes'])} were calibrated afterwards the same way and added (`{x['command']}`, "
                  f"{secs(x['wall'])})." for x in res.get("added", [])),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory'] / GIB:.1f} GiB RAM, Linux {m['kernel']}, Python "
        f"{m['python']}; `accelerate` installed: {'yes' if res['accelerate'] else 'no'}. **Wall times are inflated by "
        "load**: this 2-core machine was running other sessions' test suites at the same time; the 1-minute load "
        "average is given at the start and end of every step (2.0 = both cores busy before this step started). "
        f"This disk read a shard sequentially at {res['disk_gbps_here']:.2f} GB/s (page cache dropped).",
        "",
        "Checkpoints: `tools/make_synthetic.py --layers L --experts E --seed 0` (default tokenizer, padded to "
        "129280): DeepSeek-V3's own per-layer shapes — hidden 7168, MLA (q_lora 1536, kv_lora 512, 128 heads, "
        "qk 128+64, v 128), YaRN rope, dense FFN 18432 in layer 0, then MoE layers of E routed experts of FFN 2048 + 1 "
        "shared, top-8, 8 groups (4 used), sigmoid routing with `e_score_correction_bias`; FP8 e4m3 with 128x128 "
        "block scales as the release. Each made, used and deleted in turn.",
        "",
        f"Calibration: `ggufmoe calibrate SRC --text tests/data/calib.txt --max-tokens {args['tokens']} --ctx "
        f"{args['ctx']} --max-memory {args['max_memory']}` (streamed, the default), the same tokens at every size, "
        "page cache of the checkpoint dropped before each run. Baseline: `python -c 'import torch, transformers'` "
        f"peaks at **{gib(res['baseline']['peak_rss'])}** (with transformers' DeepSeek-V3 modeling and "
        f"`ggufmoe.stats.stream` imported too: {gib(res['baseline_imports']['peak_rss'])}).",
        "",
        "## Every step",
        "",
        "| checkpoint | params | FP8 size | step | wall | peak RSS | RssAnon | ru_maxrss | load avg | result |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in res["calibrate"]:
        mk = r["model"]
        st = r["step"]
        L.append(f"| {r['size']} | {mk['params'] / 1e9:.2f} B | {mk['bytes'] / 1e9:.2f} GB | make (tools/make_synthetic.py) | "
                 f"{secs(mk['make_wall'])} | {gib(mk['make_peak_rss'])} | | | | |")
        L.append(f"| {r['size']} | | | calibrate | {secs(st['wall'])} | {gib(st['peak_rss'])} | {gib(st['peak_rss_anon'])} | "
                 f"{gib(st['ru_maxrss'])} | {load(st)} | {'ok' if st['rc'] == 0 else '**failed** (rc %d)' % st['rc']} |")
        c = res.get("chain") if res.get("chain", {}).get("size") == r["size"] else None
        if not c:
            continue
        for p in c["plan_attempts"]:
            ok = "ok" if p["rc"] == 0 else f"refused (rc {p['rc']}): {_err(p)}"
            L.append(f"| {r['size']} | | | plan, {p['mode']} | {secs(p['wall'])} | {gib(p['peak_rss'])} | "
                     f"{gib(p['peak_rss_anon'])} | {gib(p['ru_maxrss'])} | {load(p)} | {ok} |")
        if "convert" in c:
            cv = c["convert"]
            L.append(f"| {r['size']} | | | convert --plan | {secs(cv['wall'])} | {gib(cv['peak_rss'])} | "
                     f"{gib(cv['peak_rss_anon'])} | {gib(cv['ru_maxrss'])} | {load(cv)} | "
                     f"{'ok, %s written' % gib(c['file_bytes']) if cv['rc'] == 0 else '**failed**: ' + _err(cv)} |")
        vals = [("validate", "validate at predicted", c.get("validate"))]
        vals += [(None, f"validate at {v['factor']:g}x predicted", v) for v in c.get("validate_search", [])]
        vals += [("validate_below", f"validate at {args['below']:g}x", c.get("validate_below"))]
        for key, label, v in vals:
            if v:
                ok = ("runs" if v["rc"] == 0 else f"fails (rc {v['rc']}): {_err(v)}")
                L.append(f"| {r['size']} | | | {label} ({gib(v['limit'])}) | {secs(v['wall'])} | {gib(v['peak_rss'])} | "
                         f"{gib(v['peak_rss_anon'])} | {gib(v['ru_maxrss'])} | {load(v)} | {ok} |")
    L += ["", "Peak RSS is the largest `VmHWM` of any process in the step's tree (polled every 50 ms); `ru_maxrss` "
              "comes from `os.wait4`. validate's llama.cpp runs in a grandchild, so its peak RSS is that process's.", ""]

    # calibration stages
    L += ["## Calibration, stage by stage", "",
          "Wall and CPU seconds (all threads of the process) and peak RSS (sampled every 20 ms inside the calibrate "
          "process) per stage, each exclusive of the stages nested in it. `weights`: a layer's non-expert "
          "parameters read from the checkpoint and dequantized to float32. A MoE layer then runs in two phases: "
          "the layer over every token (attention, shared expert, router; the routed experts only record their "
          "inputs and routes), then `experts`: the routed experts one at a time from the checkpoint (read ahead in "
          "a thread) over the tokens routed to them.", "",
          "| checkpoint | T | T_b | stage | wall s | CPU s | tokens/s (wall) | peak RSS in stage |",
          "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["calibrate"]:
        t = r["step"].get("timings") or {}
        x = a["sizes"].get(r["size"])
        if not x:
            continue
        for name, p in sorted((t.get("phases") or {}).items(), key=lambda kv: kv[1]["order"]):
            tok = name.startswith("layer") and not name.endswith("weights") and p["seconds"] > 0
            tps = f"{x['rows'] / p['seconds']:,.0f}" if tok else ""
            L.append(f"| {r['size']} | {x['rows']} | {x['batch_tokens']} | {name} | {p['seconds']:.1f} | "
                     f"{p.get('cpu_seconds', 0):.1f} | {tps} | {gib(p['peak_rss'])} |")
    if not any((r["step"].get("timings") or {}).get("phases") for r in res["calibrate"]):
        L.append("| | | | (stages not visible: the streamed run's methods were not found) | | | | |")
    L.append("")

    # flatness
    L += ["## Flat as the model grows", "",
          "| from | to | peak RSS | change | MoE phase-1 peak change | routed-expert phase peak change | target < 10% |",
          "|---|---|---:|---:|---:|---:|---|"]
    for g in a.get("vs_reference") or []:
        if not g:
            continue
        p, q = a["sizes"][g["from"]], a["sizes"][g["to"]]
        (l0, e0), (l1, e1) = ((int(v) for v in t.split("x")) for t in (g["from"], g["to"]))
        what = " and ".join(x for x in (f"layers x{l1 / l0:g}" if l1 != l0 else "",
                                        f"experts x{e1 / e0:g}" if e1 != e0 else "") if x)
        f1 = f"{g['moe_phase1_peak_pct']:+.1f}%" if "moe_phase1_peak_pct" in g else ""
        f2 = f"{g['moe_experts_peak_pct']:+.1f}%" if "moe_experts_peak_pct" in g else ""
        L.append(f"| {g['from']} | {g['to']} ({what}) | {gib(p['peak_rss'])} → {gib(q['peak_rss'])} | "
                 f"{g['peak_rss_pct']:+.1f}% | {f1} | {f2} | {'met' if abs(g['peak_rss_pct']) < 10 else '**missed**'} |")
    L += ["", "The process peak is reached in layer 0, the dense one (its float32 weights are 2.2 GiB), at every "
              "size; the MoE columns compare the largest RSS seen in the MoE layers' stages.", ""]
    cr = a.get("creep")
    if cr:
        L += [f"Layer after layer ({cr['size']}, {cr['moe_layers']} MoE layers): peak RSS of each MoE stage per layer, "
              "and its least-squares slope. Over DeepSeek-V3's 58 MoE layers a steady rise of that slope would add "
              "57 x slope.", "",
              "| stage | " + " | ".join(f"layer {x}" for x in cr["stages"]["moe_phase1"]["layers"]) +
              " | slope per layer | x 57 | slope, later half | x 57 |",
              "|---|" + "---:|" * (len(cr["stages"]["moe_phase1"]["layers"]) + 4)]
        for kind in ("moe_weights", "moe_phase1", "moe_experts"):
            st = cr["stages"].get(kind)
            if st:
                L.append(f"| {kind} | " + " | ".join(gib(y) for y in st["peak_rss"]) +
                         f" | {st['slope_per_layer'] / 2**20:+,.0f} MiB | {st['over_58_moe_layers'] / GIB:+.2f} GiB | "
                         f"{st['late_slope_per_layer'] / 2**20:+,.0f} MiB | {st['late_over_58'] / GIB:+.2f} GiB |")
        p1 = cr["stages"].get("moe_phase1")
        dense_peak = a["sizes"][cr["size"]]["layer_times"]["peak"].get("dense", 0)
        if p1:
            top = p1["peak_rss"][-1]
            L += ["", f"The MoE stages' peaks rise by {gib(p1['peak_rss'][-1] - p1['peak_rss'][0])} over "
                      f"{cr['moe_layers']} layers, most of it in the first ones (later half: "
                      f"{p1['late_slope_per_layer'] / 2**20:+,.0f} MiB per layer). If the later rate went on for "
                      f"DeepSeek-V3's 58 MoE layers, MoE phase 1 would peak near "
                      f"{gib(top + p1['late_slope_per_layer'] * (58 - cr['moe_layers']))} against layer 0's "
                      f"{gib(dense_peak)}: **not shown flat at depth** — {cr['moe_layers']} MoE layers cannot tell "
                      "an allocator that settles from something kept per layer; a deeper run (or a look at what "
                      "survives a layer) would."]
        L.append("")

    # bound
    first = res["calibrate"][0]["size"]
    b0 = a["sizes"][first]["bound"]
    L += ["## Peak RSS against a bound from the shapes", "",
          "B = baseline + W + F + X + S + A + A_e, where (h hidden, H heads, E one expert in float32, T tokens, "
          "T_b tokens of one forward):",
          "",
          "- baseline: `python -c 'import torch, transformers'`, measured;",
          "- W = one layer's non-expert weights in float32, the largest layer: 4 B x max(attention + 3·h·18432 "
          "(dense), attention + shared expert + router) — layer 0, the dense one, at every size here and in "
          "DeepSeek-V3 (attention 187.1 M parameters, dense FFN 396.4 M);",
          "- F = the largest matrix as read, FP8, 1 byte per weight (dequantized in row blocks into W);",
          f"- X = experts: (n_ahead + 1) x E + 2/3 E, n_ahead = max(1, min(1 GiB, max(E, --max-memory/16)) // E) = "
          f"{b0['n_ahead']} (the read-ahead bound calibrate documents), + 1 in use, + the gate/up concatenation while "
          "one is read; E = 3·h·2048·4 B = 168 MiB;",
          "- S = hidden-state stores: T x h x 4 B x 3 (layer input, layer output, the experts' input);",
          "- A = one forward's activations: T_b x (4 B x every intermediate of an MLA attention and the dense FFN, "
          "none freed early: 2·q_lora + 3·H·(nope+rope) + (kv_lora+rope) + kv_lora + H·(nope+v) + 3·H·v + 4h + "
          "4·18432 + h) + T_b x H x ctx x 4 B (one row of attention scores per head) — "
          f"{per_token_activations(shapes(res['calibrate'][0]['config']), args['ctx']) / 1e6:.2f} MB per token at ctx {args['ctx']};",
          "- A_e = the routed experts' activations on one step of T_b tokens: T_b x (3·2048 + h) x 4 B.",
          "", "T_b is the batch calibrate chose under --max-memory (read from the run).", "",
          "| checkpoint | T | T_b | baseline | W | F | X | S | A | A_e | bound B | measured peak RSS | measured / B | under B |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["calibrate"]:
        x = a["sizes"][r["size"]]
        b = x["bound"]
        L.append(f"| {r['size']} | {x['rows']} | {x['batch_tokens']} | {gib(b['baseline'])} | {gib(b['layer_weights'])} | "
                 f"{gib(b['largest_matrix_fp8'])} | {gib(b['experts'])} | {gib(b['stores'])} | {gib(b['activations'])} | "
                 f"{gib(b['expert_activations'])} | **{gib(b['total'])}** | **{gib(x['peak_rss'])}** | "
                 f"{x['peak_rss'] / b['total']:.2f} | {'yes' if x['bound_ok'] else '**no**'} |")
    x0 = a["sizes"].get(first) or {}
    if x0.get("measured_per_token"):
        L += ["", f"The A term checked on layer 0 ({first}): its peak RSS less W, S and the baseline is "
                  f"{x0['measured_per_token'] / 1e6:.2f} MB per token of the T_b = {x0['batch_tokens']} forward, against "
                  f"{per_token_activations(shapes(res['calibrate'][0]['config']), args['ctx']) / 1e6:.2f} MB in the bound"
                  + (f" and {x0['tool_per_token'] / 1e6:.2f} MB in calibrate's own budget (24 hidden-wide float32 rows + "
                     "one row of scores per head)" if x0.get("tool_per_token") else "") + "."]
    over = {k: v["peak_rss"] - res["baseline"]["peak_rss"] for k, v in a["sizes"].items()}
    mm = parse_size(args["max_memory"])
    L += ["", f"calibrate's own promise, its working set within --max-memory ({args['max_memory']}) above the "
              "baseline: " + ", ".join(f"{k} {gib(v)} above it ({'within' if v <= mm else '**over** by ' + gib(v - mm)})"
                                       for k, v in over.items()) + ".", ""]

    # throughput
    L += ["## Throughput", "",
          "Token-layers per second = tokens x layers / seconds, over the whole process (start-up, tokenization, "
          "embedding, output pass and writing included) and over the layers alone (weights read included). "
          "GFLOP per CPU-second uses the forward FLOPs of the next section and all the CPU time of the layers "
          "(weights read and dequantized included): it is what one core delivered, load or not. Stage rates: the "
          "forward alone (dense layer, MoE phase 1), the routed-expert phase (expert reads included), a whole MoE "
          "layer.", "",
          "| checkpoint | token-layers | process | tok-layers/s (process) | layers | tok-layers/s (layers) | "
          "GFLOP/s (layers, wall) | GFLOP per CPU-s (layers) | dense forward tok/s | MoE phase 1 tok/s | "
          "routed experts tok/s | MoE layer tok/s |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["calibrate"]:
        x = a["sizes"].get(r["size"])
        if not x:
            continue
        lt = x["layer_times"]

        def g(k, fmt="{:,.1f}", x=x):
            return fmt.format(x[k]) if k in x else ""
        L.append(f"| {r['size']} | {x['token_layers']:,} | {secs(r['step']['wall'])} | {x['tl_per_s_step']:.1f} | "
                 f"{secs(lt['layers_wall'])} | {g('tl_per_s_layers')} | {g('gflops_layers')} | "
                 f"{g('gflop_per_cpu_s_layers')} | {g('dense_tok_s')} | {g('moe_p1_tok_s')} | {g('moe_exp_tok_s')} | "
                 f"{g('moe_layer_tok_s')} |")
    ec = a.get("expert_cost")
    if ec:
        w, c = ec["wall"], ec["cpu"]
        L += ["", f"Routed-expert phase of a MoE layer at the same tokens: {w['p2_small']:.1f} s wall / {c['p2_small']:.1f} "
                  f"CPU-s with {ec['experts_small']} experts, {w['p2_large']:.1f} s / {c['p2_large']:.1f} CPU-s with "
                  f"{ec['experts_large']}: one more expert costs **{w['per_expert_s']:.2f} s wall, {c['per_expert_s']:.2f} "
                  "CPU-s** (reading 44 MB of FP8, dequantizing 44 M weights to float32, the per-expert overhead of "
                  f"smaller matmuls); the tokens' own work is the rest, {w['token_part_s']:.1f} s / {c['token_part_s']:.1f} "
                  "CPU-s."]
    L.append("")

    pr = a.get("projection")
    if pr:
        L += projection_md(pr, res)

    c = res.get("chain")
    if c:
        L += chain_md(c, res)
    if res.get("failures"):
        L += ["## What failed", ""] + [f"- {f}" for f in res["failures"]] + [""]
    return "\n".join(L)


def _err(m: dict) -> str:
    lines = [ln for ln in m["log_tail"].splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.lower().startswith(("error", "traceback"))]
    text = (err or lines[-1:] or [""])[-1]
    return "`" + text.replace("|", "\\|")[:300] + "`"


def _above(log: str) -> dict | None:
    """validate's peak RSS and address space above its baseline, from its report."""
    unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    m = re.search(r"peak RSS:\s+[\d.]+ \w+ \(([\d.]+) (\w+) above", log)
    n = re.search(r"peak address:\s+([\d.]+) (\w+) above", log)
    if not m or not n or m.group(2) not in unit or n.group(2) not in unit:
        return None
    return {"rss": float(m.group(1)) * unit[m.group(2)], "vm": float(n.group(1)) * unit[n.group(2)]}


def projection_md(pr: dict, res: dict) -> list[str]:
    s, f = pr["shapes"], pr["flops_per_token"]
    n_moe = s["n_layers"] - s["n_dense"]
    N = pr["tokens"]
    host, gpu = pr["host64"], pr["gpu"]
    rw, rc = pr["rates"]["wall"], pr["rates"]["cpu"]
    pw, pc = pr["parts"]["wall"], pr["parts"]["cpu"]
    disk = res["args"]["disk_gbps"]
    L = ["## Projection: DeepSeek-V3 671B, 100k calibration tokens", "",
         f"DeepSeek-V3 (`tools/make_synthetic.py`'s `DEEPSEEK_V3`): {s['n_layers']} layers ({s['n_dense']} dense + "
         f"{n_moe} MoE of {s['n_exp']} experts; the MTP layer is skipped), {N:,} tokens at ctx {pr['ctx']}. Every "
         "layer has exactly the shapes measured above, and with top-8 routing a token's work in a MoE layer does "
         "not depend on the expert count: what grows is the number of layers and of experts to read.",
         "", "**FLOPs** of one token through one layer (2 per multiply-add):", "",
         f"- attention projections 2 x {s['attn_matmul_params'] / 1e6:.1f} M weights = {f['attn_proj'] / 1e9:.3f} GFLOP; "
         f"scores and values over a causal chunk, 2·H·(128+64+128)·(ctx+1)/2 = {f['attn_scores'] / 1e9:.3f} GFLOP;",
         f"- dense FFN 2·3·h·18432 = {f['dense_ffn'] / 1e9:.3f} GFLOP → a dense layer **{f['dense_layer'] / 1e9:.3f} GFLOP**;",
         f"- router 2·h·256 = {f['router'] / 1e9:.4f}, shared expert 2·3·h·2048 = {f['shared'] / 1e9:.3f}, 8 routed "
         f"experts {f['routed'] / 1e9:.3f} GFLOP → a MoE layer **{f['moe_layer'] / 1e9:.3f} GFLOP**;",
         f"- in all {N:,} x ({s['n_dense']} x {f['dense_layer'] / 1e9:.3f} + {n_moe} x {f['moe_layer'] / 1e9:.3f}) GFLOP "
         f"= **{pr['total_flops'] / 1e15:.2f} PFLOP**.",
         "",
         f"**Weights read**: {pr['fp8_bytes'] / 1e12:.3f} TB of FP8 matrices + the BF16 embeddings, output and routers = "
         f"**{pr['read_bytes'] / 1e12:.3f} TB**, each once, when its layer runs; at {disk:g} GB/s (one NVMe drive, "
         f"assumed) **{secs(host['disk'])}**. (This machine's disk read {res['disk_gbps_here']:.2f} GB/s.)",
         "",
         f"**Rates measured here** ({pr['reference']} run; per expert from the experts-doubling pair), wall (2 loaded "
         "cores) and CPU-seconds:", "",
         "| | wall | CPU-s |", "|---|---:|---:|",
         f"| dense layer: weights read + dequantized (2.3 GB float32) | {rw['dense_weights']:.1f} s | {rc['dense_weights']:.1f} |",
         f"| dense layer forward, per token | {rw['dense_tok'] * 1e3:.1f} ms | {rc['dense_tok'] * 1e3:.1f} ms |",
         f"| MoE layer: non-expert weights read + dequantized | {rw['moe_weights']:.1f} s | {rc['moe_weights']:.1f} |",
         f"| MoE phase 1 (attention, shared expert, router), per token | {rw['moe_p1_tok'] * 1e3:.1f} ms | {rc['moe_p1_tok'] * 1e3:.1f} ms |",
         f"| routed experts, per token (8 experts' work) | {rw['moe_p2_tok'] * 1e3:.1f} ms | {rc['moe_p2_tok'] * 1e3:.1f} ms |",
         f"| one routed expert read + dequantized | {rw['expert']:.2f} s | {rc['expert']:.2f} |",
         "",
         f"GFLOP per CPU-second over the layers: {pr['gflop_per_cpu_s'] or 0:.1f} (wall: {pr['gflops_wall'] or 0:.1f} "
         "GFLOP/s on the 2 loaded cores).", "",
         "**DeepSeek-V3 with these rates**: layer weights = 3 x dense weights + 58 x MoE weights; tokens = 100k x "
         "(3 x dense per token + 58 x (phase 1 + experts per token)); experts = 58 x 256 x one expert.", "",
         "| where | layer weights | tokens' work | expert reads | disk (0.67 TB) | total |",
         "|---|---:|---:|---:|---:|---:|",
         f"| this machine, wall rates (2 loaded cores) | {secs(pw['layer_weights'])} | {secs(pw['tokens'])} | "
         f"{secs(pw['experts'])} | (in the reads) | **{secs(pw['total'])}** |",
         f"| CPU time needed (core-seconds) | {secs(pc['layer_weights'])} | {secs(pc['tokens'])} | {secs(pc['experts'])} | | "
         f"**{secs(pc['total'])} of CPU** |",
         f"| {HOST_CORES}-core host: CPU time / {HOST_CORES} | {secs(pc['layer_weights'] / HOST_CORES)} | "
         f"{secs(host['tokens'])} | {secs(pc['experts'] / HOST_CORES)} | {secs(host['disk'])} | "
         f"**{secs(host['low'])} – {secs(host['high'])}** |",
         f"| one H100/H200 + that host (**projection, not measured**) | {secs(pc['layer_weights'] / HOST_CORES)} (host) | "
         f"{secs(gpu['tokens'])} (GPU) | {secs(pc['experts'] / HOST_CORES)} (host) | {secs(gpu['disk'])} | "
         f"**{secs(gpu['low'])} – {secs(gpu['high'])}** |",
         "",
         f"How: the {HOST_CORES}-core host gets this machine's CPU-seconds divided by {HOST_CORES}, perfect scaling "
         "(optimistic for the matmuls, which turn memory-bound, and for the one read-ahead thread; but CPU-seconds "
         "measured on a loaded machine are themselves inflated by contention), never faster than the disk. The "
         "range runs from full overlap (the slowest part alone: experts are read ahead while the layer computes) to "
         f"none (the sum). The GPU row assumes `--device cuda` runs every layer's forward on the GPU in float32 "
         f"(torch's default, no TF32) at {GPU_EFFICIENCY:.0%} of the {H100_FP32_FLOPS / 1e12:.0f} TFLOP/s FP32 peak of an "
         f"H100 SXM / H200 ({pr['total_flops'] / 1e15:.2f} PFLOP / {H100_FP32_FLOPS * GPU_EFFICIENCY / 1e12:.1f} "
         f"TFLOP/s), while the {HOST_CORES}-core host reads and dequantizes the weights as above, plus PCIe: "
         f"{pr['f32_bytes'] / 1e12:.2f} TB of float32 weights and the hidden states ({s['n_layers']} layers x 2 x "
         f"{pr['hidden_store_bytes'] / 1e9:.2f} GB) at {PCIE_GBPS:g} GB/s = {secs(gpu['pcie'])}. **No GPU was available "
         "to this session: the GPU figure is a projection, not a measurement.**", "",
         "**Memory** for that run (the bound above with DeepSeek-V3's shapes, T = 100k tokens, T_b = 4096):", "",
         f"- hidden states: 100,000 x 7168 x 4 B = **{pr['hidden_store_bytes'] / 1e9:.2f} GB per store**, 3 stores "
         f"{gib(pr['bound']['stores'])}: in memory when they fit in --max-memory, else mapped files in .OUT.partial "
         "(resident: the pages of the batch in use);",
         f"- W {gib(pr['bound']['layer_weights'])} (a dense layer; a MoE layer's non-expert part is "
         f"{gib(4 * s['moe_nonexpert_params'])}), X {gib(pr['bound']['experts'])}, A + A_e "
         f"{gib(pr['bound']['activations'] + pr['bound']['expert_activations'])}, F {gib(pr['bound']['largest_matrix_fp8'])}, "
         f"baseline {gib(pr['bound']['baseline'])};",
         f"- B = **{gib(pr['bound']['total'])}** with the stores in memory, {gib(pr['bound']['total'] - pr['bound']['stores'])} "
         "with them mapped: far below 128 GB either way;",
         f"- at the smallest (the stores mapped, one chunk of {pr['ctx']} tokens per forward, what calibrate falls back to "
         f"under a tight --max-memory): **{gib(pr['bound_min']['total'])}** (W {gib(pr['bound_min']['layer_weights'])} + "
         f"A + A_e {gib(pr['bound_min']['activations'] + pr['bound_min']['expert_activations'])} + X + F + baseline) — "
         "no term of the bound depends on the number of layers or of experts (the measured layer-to-layer rise is in "
         "the section on flatness).",
         "",
         "On a GPU only a layer's weights and one forward's activations need its memory (a few GB).", ""]
    return L


def chain_md(c: dict, res: dict) -> list[str]:
    L = [f"## The whole chain on {c['size']}", ""]
    for p in c["plan_attempts"]:
        L.append(f"- `{p['cmd'].replace(str(ROOT) + '/', '')}` → " + ("ok" if p["rc"] == 0 else f"exit {p['rc']}: {_err(p)}"))
    if "plan" not in c:
        return L + ["", "No plan: the chain stopped here.", ""]
    p = c["plan"]
    L += ["", f"Plan ({c['plan_mode']}; budget {gib(p['budget'])} at ctx {p['ctx']}, pins "
              f"{', '.join('`' + x + '`' for x in c['pins']) or 'none'}): keep {p['keep']} of {p['n_expert']} experts, "
              f"top-{p['top_k']} (source {p['top_k_source']}); file {gib(p['file_bytes'])}; predicted memory "
              + " + ".join(f"{k} {gib(v)}" for k, v in p["memory"].items() if k != "total")
              + f" = **{gib(p['memory']['total'])}**; predicted KL {p['predicted_kld'].get('total', float('nan')):.4f}.",
          ""]
    if p.get("notes"):
        L += ["Plan notes: " + "; ".join(p["notes"]) + ".", ""]
    L += ["| type | bytes | share |", "|---|---:|---:|"]
    tot = sum(p["bytes_by_type"].values()) or 1
    for t, nb in p["bytes_by_type"].items():
        L.append(f"| {t} | {nb / 2**20:,.1f} MiB | {100 * nb / tot:.1f}% |")
    L.append("")
    if "convert" in c and c["convert"]["rc"] == 0:
        diff = c["file_bytes"] - p["file_bytes"]
        L.append(f"Converted: {c['file_bytes']:,} bytes written, {p['file_bytes']:,} planned ("
                 + ("equal" if not diff else f"{diff:+,} bytes") + ")."
                 + (" The plan was made without --stats and convert was given them: the file carries llama-quantize's "
                    f"`quantize.imatrix.*` keys, which the plan did not count ({c['imatrix_key_bytes']} bytes in this "
                    "file, before the header's alignment padding)." if diff and c.get("imatrix_key_bytes") else ""))
    for v in [c.get("validate")] + c.get("validate_search", []) + [c.get("validate_below")]:
        if not v:
            continue
        body = [ln for ln in v["log_tail"].splitlines() if ln.strip()]
        if v["rc"] == 0:
            keep = [re.sub(r"\s+", " ", ln.strip()) for ln in body if re.match(r"\s*(peak RSS|peak address|load|prompt|generation|limit method)", ln)]
            L += ["", f"validate at {gib(v['limit'])} ({v['limit'] / c['plan']['memory']['total']:.2f}x the prediction): "
                      "runs — " + "; ".join(keep) + "."]
            above = _above(v["log_tail"])
            if above:
                pred = c["plan"]["memory"]["total"]
                L += ["", f"Predicted memory {gib(pred)}; measured above the baseline: peak RSS {gib(above['rss'])} "
                          f"({above['rss'] / pred:.2f}x the prediction), address space {gib(above['vm'])} "
                          f"({above['vm'] / pred:.2f}x). Without a cgroup to delegate, validate limits the address space "
                          "(RLIMIT_AS), which also counts what llama.cpp maps but never touches (thread stacks, "
                          "allocator arenas); at exactly the prediction that exceeds the limit, and the run fails when "
                          "libgomp starts its threads."]
        else:
            L += ["", f"validate at {gib(v['limit'])} ({v['limit'] / c['plan']['memory']['total']:.2f}x the prediction): exit code {v['rc']} "
                      f"after {secs(v['wall'])}, {len(v['stderr_lines'])} error line(s), "
                      f"{'a traceback' if v['traceback'] else 'no traceback'}: {_err(v)}"]
    L.append("")
    return L


# ---------------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_calibrate":
        _calibrate_child(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2x32,4x32,2x64",
                    help="LAYERSxEXPERTS to calibrate, the first the reference of the growth figures "
                         "(default 2x32,4x32,2x64; add 4x64 if disk and time allow)")
    ap.add_argument("--chain", default="2x32", help="size that goes through plan/convert/validate ('' to skip)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (--max-tokens; default 2048)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--text", type=Path, default=CALIB)
    ap.add_argument("--max-memory", default="4GiB", help="calibrate --max-memory (default 4GiB, its default)")
    ap.add_argument("--budget", default="2.7GiB", help="plan --budget for the chain (default 2.7GiB: a low-bit mix)")
    ap.add_argument("--pin", action="append", default=None,
                    help="plan --tensor-type REGEX=TYPE (default: token_embd and output at Q3_K, the fastest "
                         "K-quant here, so that convert takes minutes on 2 cores)")
    ap.add_argument("--no-plan-fallback", dest="plan_fallback", action="store_false",
                    help="do not fall back to shape defaults when plan --stats refuses")
    ap.add_argument("--validate-ctx", type=int, default=512, help="plan --ctx and validate --ctx (default 512)")
    ap.add_argument("--below", type=float, default=0.5, help="second validate at this fraction of the prediction")
    ap.add_argument("--search", type=lambda t: [float(x) for x in t.split(",")], default=[1.1, 1.25, 1.5, 2.0],
                    help="when validate fails at the prediction, retry at these multiples of it until one runs")
    ap.add_argument("--add", action="store_true",
                    help="calibrate --sizes (no chain) and add them to the JSON of an earlier run (same tokens, ctx and "
                         "--max-memory)")
    ap.add_argument("--chain-only", action="store_true",
                    help="redo only the chain (reusing WORK/SIZE.stats.gguf when there) and merge it into the JSON")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--disk-gbps", type=float, default=3.0, help="disk read bandwidth assumed for the projection")
    ap.add_argument("--work", type=Path, default=Path("/work/rehearse"), help="checkpoints and outputs (up to ~14 GB)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--render", action="store_true", help="only rewrite the report from its .json")
    args = ap.parse_args()
    if args.pin is None:
        args.pin = [r"token_embd\.weight=Q3_K", r"^output\.weight$=Q3_K"]
    if args.render:
        res = json.loads(args.out.with_suffix(".json").read_text())
        c = res.get("chain") or {}
        gguf_out = args.work / f"{c.get('size')}.gguf"
        if c.get("file_bytes") and "imatrix_key_bytes" not in c and gguf_out.is_file() \
                and gguf_out.stat().st_size == c["file_bytes"]:  # the kept output of that run
            c["imatrix_key_bytes"] = imatrix_key_bytes(gguf_out)
        analyse(res)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        args.out.write_text(report(res) + "\n")
        print(report(res))
        return

    if args.chain_only:
        chain_again(args)
        return
    if args.add:
        add_sizes(args)
        return
    t_all = time.perf_counter()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    chain_size = tuple(int(v) for v in args.chain.split("x")) if args.chain else None
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    # FP8 checkpoint size, roughly: BF16 embeddings + output, a dense layer, MoE layers of (E + 1) experts
    biggest = max(3.71e9 + 0.58e9 + (l_ - 1) * (0.19e9 + (e + 1) * 44.1e6) for l_, e in sizes)
    if free < biggest + 6e9:
        raise SystemExit(f"{work}: {free / 1e9:.0f} GB free, about {biggest / 1e9 + 6:.0f} GB needed")
    import importlib.util
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                 "command": "python eval/rehearse_ds3.py " + " ".join(sys.argv[1:]),
                 "accelerate": importlib.util.find_spec("accelerate") is not None,
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "calibrate": []}
    print("baseline ...", flush=True)
    res["baseline"] = step([PY, "-c", "import torch, transformers"], work / "baseline.log")
    res["baseline_imports"] = step([PY, "-c", "import torch, transformers; import transformers.models.deepseek_v3."
                                    "modeling_deepseek_v3; import sys; sys.path.insert(0, %r); import ggufmoe.stats.stream"
                                    % str(ROOT)], work / "baseline_imports.log")
    # chain size first, so its checkpoint is deleted before the next is made
    order = sorted(sizes, key=lambda s: s != chain_size)
    if chain_size and chain_size not in sizes:
        order = [chain_size] + order
    for L_, E_ in order:
        tag = f"{L_}x{E_}"
        d = work / f"ds3-l{L_}-e{E_}"
        info = ensure_model(d, L_, E_, args.seed, TOKENIZER)
        print(f"{tag}: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / 1e9:.2f} GB", flush=True)
        if "disk_gbps_here" not in res:
            res["disk_gbps_here"] = disk_read_gbps(max(d.glob("*.safetensors"), key=lambda p: p.stat().st_size))
        cfg = json.loads((d / "config.json").read_text())
        st = calibrate(d, work, tag, args)
        res["calibrate"].append({"size": tag, "model": info, "config": cfg, "step": st})
        if st["rc"] == 0 and (L_, E_) == chain_size:
            res["chain"] = chain(d, Path(st["stats"]), work, tag, args)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        # keep the partial JSON as we go
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    # calibrate order in the report: the reference size first, as given
    res["calibrate"].sort(key=lambda r: [f"{a}x{b}" for a, b in sizes].index(r["size"]) if r["size"] in
                          [f"{a}x{b}" for a, b in sizes] else -1)
    sys.path.insert(0, str(ROOT / "tools"))
    from make_synthetic import DEEPSEEK_V3  # heavy (torch): only now, after every measured step

    res["dsv3_config"] = DEEPSEEK_V3
    res["total_wall"] = time.perf_counter() - t_all
    analyse(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    text = report(res)
    args.out.write_text(text + "\n")
    print(text)


def add_sizes(args) -> None:
    """--add: more sizes calibrated the same way, merged into the earlier run's JSON."""
    res = json.loads(args.out.with_suffix(".json").read_text())
    for k in ("tokens", "ctx", "max_memory", "text"):
        if str(res["args"][k]) != str(getattr(args, k)):
            raise SystemExit(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the earlier run's {res['args'][k]}")
    t0 = time.perf_counter()
    tags = []
    for L_, E_ in (tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s):
        tag, d = f"{L_}x{E_}", args.work / f"ds3-l{L_}-e{E_}"
        info = ensure_model(d, L_, E_, args.seed, TOKENIZER)
        print(f"{tag}: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / 1e9:.2f} GB", flush=True)
        st = calibrate(d, args.work, tag, args)
        res["calibrate"] = [r for r in res["calibrate"] if r["size"] != tag] + [
            {"size": tag, "model": info, "config": json.loads((d / "config.json").read_text()), "step": st}]
        tags.append(tag)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    res.setdefault("added", []).append({"sizes": tags, "date": time.strftime("%Y-%m-%d"), "wall": time.perf_counter() - t0,
                                        "command": "python eval/rehearse_ds3.py " + " ".join(sys.argv[1:])})
    analyse(res)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.write_text(report(res) + "\n")
    print(report(res))


def chain_again(args) -> None:
    """--chain-only: the chain on its size again, from the statistics the full run left; merged into the JSON."""
    res = json.loads(args.out.with_suffix(".json").read_text())
    L_, E_ = (int(v) for v in args.chain.split("x"))
    tag, d = f"{L_}x{E_}", args.work / f"ds3-l{L_}-e{E_}"
    stats = args.work / f"{tag}.stats.gguf"
    if not stats.is_file():
        raise SystemExit(f"{stats}: no statistics from the full run; run without --chain-only")
    t0 = time.perf_counter()
    ensure_model(d, L_, E_, args.seed, TOKENIZER)
    res["chain"] = chain(d, stats, args.work, tag, args)
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    res["chain_rerun"] = {"date": time.strftime("%Y-%m-%d"), "wall": time.perf_counter() - t0,
                          "command": "python eval/rehearse_ds3.py " + " ".join(sys.argv[1:])}
    analyse(res)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.write_text(report(res) + "\n")
    print(report(res))


if __name__ == "__main__":
    main()

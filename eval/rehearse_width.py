"""Scale rehearsal of a 2026 family at its real width: calibrate (streamed) -> plan -> convert -> validate.

    python eval/rehearse_width.py [--family qwen3.5-122b|deepseek-v4-flash] [--sizes 4x32,8x32] [--chain 4x32]
                                  [--tokens 2048] [--ctx 512] [--max-memory 4GiB] [--budget 2.2GiB]
                                  [--validate-ctx 4096] [--calibrate-arg ARG] [--plan-arg ARG] [--work DIR]

A benchmark, not a test (issue 25, acceptance 4; issue 28, acceptance 4). Synthetic checkpoints from
``tools/make_synthetic.py --family F`` (the family's own per-layer shapes and checkpoint formats, fewer layers and
routed experts; :data:`FAMILIES` says which), ``LAYERSxEXPERTS`` at a time, through the real CLI, each step its own
measured process (``eval/rehearse_ds3.py``'s steps: peak RSS of the process tree, wall, exit code, load average):

* ``ggufmoe calibrate`` at every size (the same tokens), so peak RSS can be compared as the layers double;
* at the ``--chain`` size: ``ggufmoe plan --budget B --ctx C --stats`` (the local errors of the calibration, as
  every model above 2 GiB is planned), ``ggufmoe convert --plan``, ``ggufmoe validate --memory-limit`` at the plan's
  predicted memory (must run) and at ``--below`` of it (must fail with one line).

Writes the family's eval/results/rehearse_*.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import GIB, PY, ensure_model, machine  # noqa: E402
from rehearse_ds3 import CALIB, TOKENIZER, calibrate, chain, step  # noqa: E402

RESULTS = ROOT / "eval" / "results"


@dataclass(frozen=True)
class Family:
    """A family's rehearsal: its report, its checkpoints' folder prefix, its title and what its checkpoints are."""

    out: str
    prefix: str
    title: str
    checkpoint: str


FAMILIES = {
    "qwen3.5-122b": Family(
        "rehearse_qwen35.md", "q35", "a hybrid at Qwen3.5-122B-A10B width",
        "Qwen3.5-122B-A10B's own per-layer shapes (hidden 3072; Gated DeltaNet layers: 16 key / 64 value heads of 128, "
        "conv kernel 4; a gated full-attention layer every 4th: 32 heads, 2 KV heads of 256, partial rope 0.25; fused "
        "experts of FFN 1024 + a gated shared expert of 1024, top-8 softmax; vocabulary 248320; BF16, shipped as "
        "`Qwen3_5MoeForConditionalGeneration`), fewer layers and routed experts."),
    "deepseek-v4-flash": Family(
        "rehearse_ds4.md", "ds4", "DeepSeek-V4 at V4-Flash width",
        "DeepSeek-V4-Flash's own per-layer shapes and formats (hidden 4096, four hyper-connection streams; 64 heads of "
        "512 over one key-value head, q_lora 1024, grouped output 8 x 1024, a window of 128 on every layer, compressed "
        "caches alternating ratio 128 and ratio 4 with a lightning indexer of 64 heads of 128; experts of FFN 2048 in "
        "FP4 with UE8M0 scales, top-6 sqrt-softplus, the first layer routed by a token table; one shared expert; "
        "attention and shared expert FP8 with UE8M0 128x128 scales; vocabulary 129280; DeepSeek's own tensor names), "
        "fewer layers and routed experts."),
}


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def row(what: str, m: dict) -> str:
    return (f"| {what} | {m['rc']} | {m['wall'] / 60:.1f} min | {gib(m['peak_rss'])} | "
            f"{m['load_start'][0]:.1f} → {m['load_end'][0]:.1f} |")


def report(res: dict) -> str:
    a = res["args"]
    family = a.get("family", "qwen3.5-122b")
    f = FAMILIES[family]
    script = res["command"].split()[1]
    extra = " ".join(a.get("calibrate_arg") or [])
    L = [f"# Scale rehearsal of {f.title}: calibrate → plan → convert → validate", "",
         f"Measured by `{script}` ({res['date']}; `{res['command']}`), {res['total_wall'] / 60:.1f} min "
         f"in all, on {res['machine']['cores']} cores ({res['machine']['cpu']}), shared with other work (load "
         "averages per step below).", "",
         f"Checkpoints: `tools/make_synthetic.py --family {family} --layers L --experts E` — {f.checkpoint}", "",
         f"Calibration: `ggufmoe calibrate SRC --text tests/data/calib.txt --max-tokens {a['tokens']} --chunk {a['ctx']} "
         f"--max-memory {a['max_memory']}{' ' + extra if extra else ''}` (streamed, the default).", "",
         f"Baseline `python -c 'import torch, transformers'`: {gib(res['baseline']['peak_rss'])}.", "",
         "| step | exit | wall | peak RSS | load |", "|---|---:|---:|---:|---|"]
    for c in res["calibrate"]:
        mk = c["model"]
        rss = gib(mk["make_peak_rss"]) if mk.get("make_peak_rss") else "not measured"
        L.append(f"| make {c['size']} ({mk['params'] / 1e9:.2f} B parameters, {mk['bytes'] / 1e9:.2f} GB) | 0 | "
                 f"{mk['make_wall'] / 60:.1f} min | {rss} | |")
        L.append(row(f"calibrate {c['size']}", c["step"]))
    ch = res.get("chain")
    if ch:
        for m in ch.get("plan_attempts", []):
            L.append(row(f"plan {ch['size']} ({m['mode']})", m))
        if "convert" in ch:
            L.append(row(f"convert {ch['size']}", ch["convert"]))
        for key in ("validate", "validate_below"):
            if key in ch:
                L.append(row(f"{key.replace('_', ' ')} at {gib(ch[key]['limit'])}", ch[key]))
        for m in ch.get("validate_search", []):
            L.append(row(f"validate x{m['factor']:g} at {gib(m['limit'])}", m))
    L.append("")
    cal = {c["size"]: c["step"]["peak_rss"] for c in res["calibrate"] if c["step"]["rc"] == 0}
    sizes = [c["size"] for c in res["calibrate"]]
    if len(cal) >= 2 and sizes[0] in cal:
        ref = cal[sizes[0]]
        growth = ", ".join(f"{s} {100 * (cal[s] / ref - 1):+.1f}%" for s in sizes[1:] if s in cal)
        L.append(f"**Calibrate's peak RSS as the layers double**, against {sizes[0]} ({gib(ref)}): {growth}.")
        L.append("")
    if ch and "plan" in ch:
        p = ch["plan"]
        L.append(f"**Plan** ({ch['plan_mode']}): budget {a['budget']} at ctx {ch['ctx']}; planned file "
                 f"{p['file_bytes']:,} bytes, predicted memory {gib(p['memory']['total'])}, keep {p['keep']} of "
                 f"{p['n_expert']} experts, top-k {p['top_k']}, predicted KL {p['predicted_kld']['total']:.4f}; bytes by type: "
                 + ", ".join(f"{t} {b / 1e6:.0f} MB" for t, b in p["bytes_by_type"].items()) + ".")
        if "file_bytes" in ch:
            same = "equal" if ch["file_bytes"] == p["file_bytes"] else "NOT equal"
            L.append(f"**Written** {ch['file_bytes']:,} bytes: {same} to the planned bytes.")
        v, b = ch.get("validate"), ch.get("validate_below")
        if v:
            L.append(f"**validate** at the predicted memory ({gib(v['limit'])}): exit {v['rc']}"
                     + (f"; at {a['below']:g}x ({gib(b['limit'])}): exit {b['rc']}, "
                        f"{' / '.join(b['stderr_lines']) or 'no error line'}" if b else "") + ".")
        L.append("")
    first, rerun = res.get("chain_first"), res.get("chain_rerun")
    if first and rerun and "validate" in first:
        tries = [first["validate"], *first.get("validate_search", [])]
        L.append("The first chain (before `validate`'s RLIMIT_AS backstop allowed for llama.cpp's untouched scheduler "
                 "reserve) ran `validate` at " + ", ".join(f"{gib(m['limit'])} (exit {m['rc']})" for m in tries)
                 + f"; its peak RSS where it ran: {gib(tries[-1]['peak_rss'])}. The chain was redone with the fix "
                 f"({rerun['date']}, `{rerun['command']}`).")
        L.append("")
    for note in res.get("notes", []):
        L += [note, ""]
    if ch and ch.get("failed"):
        L.append(f"The chain failed at **{ch['failed']}**; its log tail is in the JSON.")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen3.5-122b")
    ap.add_argument("--calibrate-arg", action="append", default=[], help="one more argument for calibrate")
    ap.add_argument("--plan-arg", action="append", default=[], help="one more argument for plan")
    ap.add_argument("--sizes", default="4x32,8x32", help="LAYERSxEXPERTS to calibrate (default 4x32,8x32)")
    ap.add_argument("--chain", default="4x32", help="size through plan/convert/validate ('' to skip)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512, help="calibrate --chunk")
    ap.add_argument("--text", type=Path, default=CALIB)
    ap.add_argument("--max-memory", default="4GiB")
    ap.add_argument("--budget", default="2.2GiB", help="plan --budget (the whole process's memory)")
    ap.add_argument("--pin", action="append", default=[], help="plan --tensor-type REGEX=TYPE")
    ap.add_argument("--validate-ctx", type=int, default=4096, help="plan --ctx and validate --ctx")
    ap.add_argument("--below", type=float, default=0.5)
    ap.add_argument("--search", type=lambda t: [float(x) for x in t.split(",")], default=[1.1, 1.25, 1.5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/work/rehearse"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="the report (default: the family's)")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from its .json")
    ap.add_argument("--chain-only", action="store_true",
                    help="redo the chain from the statistics an earlier run left in WORK and merge it into the JSON")
    args = ap.parse_args()
    args.plan_fallback = False
    args.out = args.out or RESULTS / FAMILIES[args.family].out
    if args.chain_only:
        chain_again(args)
    if args.render or args.chain_only:
        res = json.loads(args.out.with_suffix(".json").read_text())
        args.out.write_text(report(res) + "\n")
        print(report(res))
        return
    t0 = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                 "command": "python eval/rehearse_width.py " + " ".join(sys.argv[1:]),
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "calibrate": []}
    res["baseline"] = step([PY, "-c", "import torch, transformers"], work / "baseline.log")
    sizes = [s for s in args.sizes.split(",") if s]
    for tag in sorted(sizes, key=lambda s: s != args.chain):  # the chain's size first, then deleted
        layers, experts = (int(v) for v in tag.split("x"))
        prefix = FAMILIES[args.family].prefix
        d = work / f"{prefix}-l{layers}-e{experts}"
        info = ensure_model(d, layers, experts, args.seed, TOKENIZER, args.family)
        print(f"{tag}: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / 1e9:.2f} GB", flush=True)
        st = calibrate(d, work, f"{prefix}-{tag}", args)
        res["calibrate"].append({"size": tag, "model": info, "step": st})
        if st["rc"] == 0 and tag == args.chain:
            res["chain"] = chain(d, Path(st["stats"]), work, tag, args)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    res["calibrate"].sort(key=lambda c: sizes.index(c["size"]))
    res["total_wall"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.write_text(report(res) + "\n")
    print(report(res))


def chain_again(args) -> None:
    """--chain-only: the chain on its size again (the checkpoint remade if deleted), merged into the earlier JSON."""
    res = json.loads(args.out.with_suffix(".json").read_text())
    layers, experts = (int(v) for v in args.chain.split("x"))
    prefix = FAMILIES[args.family].prefix
    stats = args.work / f"{prefix}-{args.chain}.stats.gguf"
    if not stats.is_file():
        raise SystemExit(f"{stats}: no statistics from the earlier run; run without --chain-only")
    t0 = time.perf_counter()
    d = args.work / f"{prefix}-l{layers}-e{experts}"
    ensure_model(d, layers, experts, args.seed, TOKENIZER, args.family)
    res["chain_first"] = res.get("chain_first") or res.get("chain")
    res["chain"] = chain(d, stats, args.work, args.chain, args)
    res["chain_rerun"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "wall": time.perf_counter() - t0,
                          "command": "python eval/rehearse_width.py " + " ".join(sys.argv[1:])}
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

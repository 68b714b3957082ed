"""Sweep memory budgets: for each, plan + convert + validate + eval; llama.cpp's own mixes as baselines.

Everything lands in one folder: ``stats.gguf`` (calibration, streamed layer by layer with its
state in ``.stats.gguf.partial`` until it is complete, and the cached sensitivities),
``base-F16.gguf`` (the reference every file is scored against, and the input of the baselines),
one GGUF (and plan) per point, ``results.json``, ``results.md`` and ``pareto.png``. A point is
done when its row is in ``results.json``: a second run redoes nothing that finished, and an
interrupted one goes on where it stopped (files are only ever complete: see :mod:`ggufmoe.gguf.writer`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ggufmoe.arch import architecture_for
from ggufmoe.pipeline.calibrate import calibrate
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.pipeline.budget import build_plan, options_from_plan
from ggufmoe.plan.budget import Budget, Plan
from ggufmoe.plan.memory import gguf_runtime_memory
from ggufmoe.plan.target import HOST, Target
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.evaluate import evaluate
from ggufmoe.runtime.llama_quantize import llama_quantize
from ggufmoe.runtime.validate import validate
from ggufmoe.source import open_source
from ggufmoe.stats.file import load_stats
from ggufmoe.stats.text import read_text
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.qtypes import DEFAULT_BASELINES
from ggufmoe.units import format_size, parse_size

BASE_TYPE = "F16"


@dataclass
class SweepOptions:
    budgets: list[str]  # sizes as given ("12M", "128GiB"): they name the points
    calib: Path
    text: Path
    out: Path
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    weights_only: bool = True  # budgets are file sizes (as the baselines are); else file + runtime memory
    ctx: int = 2048  # context validated (and planned for when not weights_only)
    kv_type: str = "f16"
    eval_ctx: int = 512
    max_tokens: int = 8192
    threads: int | None = None
    progress: bool = True
    target: Target = HOST  # the machine planned and validated for (memory.runtime_memory)


@dataclass
class Point:
    name: str
    kind: str  # "ggufmoe" or "llama.cpp"
    file: str
    file_bytes: int
    experts: str  # kept / source
    top_k: int
    predicted_memory: int  # file + llama.cpp runtime memory at the sweep's ctx (host memory on cuda)
    budget: int | None = None
    predicted_kld: float | None = None
    bpw: float = 0.0  # bits per weight of the source model (pruned experts count as removed weights)
    ppl: float = 0.0
    ppl_base: float = 0.0
    kld_mean: float = 0.0
    kld_p99: float = 0.0
    top1: float = 0.0
    fits: bool = False
    peak_rss: int | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    note: str = ""


def load_results(path: Path) -> dict[str, Point]:
    if not path.is_file():
        return {}
    try:
        return {d["name"]: Point(**d) for d in json.loads(path.read_text())}
    except (ValueError, TypeError, KeyError) as e:
        raise GgufmoeError(f"{path}: not a sweep result file ({e}); remove it to start over") from None


def save_results(points: dict[str, Point], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([asdict(p) for p in sorted(points.values(), key=lambda p: p.file_bytes)], indent=1))
    tmp.replace(path)


def sweep(src: Path, opts: SweepOptions) -> list[Point]:
    """Run every point not yet in ``results.json``; write the three result files; return the points."""
    src = Path(src)
    source = open_source(src)
    arch = architecture_for(source)
    if not source.has_weights:
        raise GgufmoeError(f"{src}: a sweep converts the model; it needs the weights, not a configuration alone")
    if not source.can_calibrate:
        raise GgufmoeError(f"{src}: a sweep calibrates the model with transformers; give the Hugging Face model, "
                           "not a GGUF")
    if not opts.budgets:
        raise GgufmoeError("no budgets given")
    todo = [("ggufmoe", f"plan-{b.replace(' ', '')}", parse_size(b)) for b in opts.budgets] + \
        [("llama.cpp", f"llama.cpp-{m}", m) for m in opts.baselines]
    calib, text = read_text(opts.calib), read_text(opts.text)
    out = opts.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GgufmoeError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    results_path = out / "results.json"
    points = load_results(results_path)
    n_params = sum(s.n_elements for s in arch.tensors())
    stats_path, base = _prepare(src, out, calib, opts)
    bar = tqdm(todo, desc="sweep", unit="point", disable=not opts.progress)
    for kind, name, what in bar:
        if name in points:
            continue
        bar.set_postfix_str(name)
        point = (_ours if kind == "ggufmoe" else _baseline)(src, arch, name, what, stats_path, base, calib, opts)
        point.bpw = 8 * point.file_bytes / n_params
        _measure(point, base, text, opts)
        points[name] = point
        save_results(points, results_path)
    rows = sorted(points.values(), key=lambda p: p.file_bytes)
    (out / "results.md").write_text(format_table(rows, src, opts))
    plot_pareto(rows, out / "pareto.png", src.name)
    return rows


def _prepare(src: Path, out: Path, calib: str, opts: SweepOptions) -> tuple[Path, Path]:
    """The statistics (calibrated once; an interrupted calibration continues after its last complete layer)
    and the base GGUF (converted once)."""
    stats_path = out / "stats.gguf"
    if not stats_path.is_file():
        calibrate(src, calib, progress=opts.progress, dataset=opts.calib.name, out=stats_path, resume=True,
                     resume_hint="run the same sweep again")
    base = out / f"base-{BASE_TYPE}.gguf"
    if not base.is_file():
        convert(src, ConvertOptions(out=base, types=TypeRules.parse(BASE_TYPE), threads=opts.threads,
                                    progress=opts.progress))
    return stats_path, base


def _ours(src, arch, name, budget, stats_path, base, calib, opts) -> Point:

    path, plan_path = opts.out / f"{name}.gguf", opts.out / f"{name}.plan.json"
    if path.is_file() and plan_path.is_file():
        plan = Plan.load(plan_path)
        if plan.target != str(opts.target):
            raise GgufmoeError(f"{plan_path}: planned for target {plan.target}, this sweep is for {opts.target}: "
                               "sweep into another folder")
    else:
        plan = build_plan(src, Budget(budget, opts.ctx, opts.kv_type, opts.weights_only, target=opts.target),
                          stats_path, calib, progress=opts.progress)
        plan.save(plan_path)
        convert(src, options_from_plan(plan, ConvertOptions(out=path, types=TypeRules.parse("Q8_0"),
                                                            threads=opts.threads, progress=False)))
    size = path.stat().st_size
    if size != plan.file_bytes:
        raise GgufmoeError(f"{path}: {size} bytes written, {plan.file_bytes} planned")
    return Point(name, "ggufmoe", path.name, size, f"{plan.keep}/{plan.n_expert}", plan.top_k, plan.memory["total"],
                 budget=budget, predicted_kld=plan.predicted_kld["total"])


def _baseline(src, arch, name, mix, stats_path, base, calib, opts) -> Point:

    path = opts.out / f"{name}.gguf"
    if not path.is_file():
        llama_quantize(base, path, mix, imatrix=load_stats(stats_path).imatrix, threads=opts.threads)
    size = path.stat().st_size
    memory = gguf_runtime_memory(arch, path, opts.ctx, opts.kv_type, opts.target).total
    return Point(name, "llama.cpp", path.name, size, f"{arch.n_expert}/{arch.n_expert}", arch.top_k, memory)


def _measure(point: Point, base: Path, text: str, opts: SweepOptions) -> None:
    """Validate under the predicted memory, then score against the base; fills ``point`` in place."""
    path = opts.out / point.file
    try:
        v = validate(path, point.predicted_memory, opts.ctx, threads=opts.threads, target=opts.target)
        point.fits, point.peak_rss, point.prompt_tps, point.gen_tps = True, v.peak_rss, v.prompt_tps, v.gen_tps
    except GgufmoeError as e:
        point.note = f"validate: {e}"
    r = evaluate(path, base, text, opts.eval_ctx, opts.max_tokens, threads=opts.threads,
                 cache_dir=opts.out / "cache", progress=False)
    point.ppl, point.ppl_base, point.kld_mean, point.kld_p99, point.top1 = (
        r.ppl, r.ppl_base, r.kld_mean, r.kld_p99, r.top1)


def pareto_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on both size and mean KL divergence, smallest first."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p.file_bytes, p.kld_mean)):
        if p.kld_mean < best:
            front.append(p)
            best = p.kld_mean
    return front


def format_table(rows: list[Point], src: Path, opts: SweepOptions) -> str:
    front = {p.name for p in pareto_front(rows)}
    lines = [
        f"# Budget sweep: {src.name}",
        "",
        f"Budgets are {'file sizes' if opts.weights_only else 'file + llama.cpp runtime memory'}; every file "
        f"is validated in llama.cpp under its predicted memory at ctx {opts.ctx} (KV {opts.kv_type}) and scored "
        f"against the {BASE_TYPE} conversion on `{opts.text.name}` (up to {opts.max_tokens} tokens in chunks of "
        f"{opts.eval_ctx}, F32 KV cache). Baselines: llama.cpp's mixes by `llama_model_quantize` from the "
        f"{BASE_TYPE} file with the same importance matrix. Bits per weight count the source's parameters. "
        f"Machine: {os.cpu_count()} cores; target `{opts.target}`. ★ = on the Pareto front (size vs KLD).",
        "",
        "| file | bytes | bits/weight | experts | top-k | PPL | KLD | predicted KLD | KLD p99 | top-1 | peak RSS | "
        "predicted memory | prompt tok/s | gen tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in rows:
        rss = format_size(p.peak_rss) if p.fits else "does not fit"
        speed = (f"{p.prompt_tps:,.0f} | {p.gen_tps:,.1f}" if p.fits else "– | –")
        predicted = "–" if p.predicted_kld is None else f"{p.predicted_kld:.4f}"
        lines.append(f"| {'★ ' if p.name in front else ''}{p.name} | {p.file_bytes:,} | {p.bpw:.2f} | {p.experts} | "
                     f"{p.top_k} | {p.ppl:.3f} | {p.kld_mean:.4f} | {predicted} | {p.kld_p99:.3f} | "
                     f"{100 * p.top1:.1f}% | {rss} | "
                     f"{format_size(p.predicted_memory)} | {speed} |")
    notes = [f"- {p.name}: {p.note}" for p in rows if p.note]
    if notes:
        lines += ["", *notes]
    lines += ["", f"Base perplexity: {rows[0].ppl_base:.3f}." if rows else "", "", "![size vs KL](pareto.png)", ""]
    return "\n".join(lines)


def plot_pareto(rows: list[Point], path: Path, title: str) -> None:
    """Size (MiB) against mean KL divergence (log), ours and the baselines, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for kind, marker, color in (("ggufmoe", "s", "tab:blue"), ("llama.cpp", "o", "tab:orange")):
        pts = [p for p in rows if p.kind == kind]
        ax.scatter([p.file_bytes / 2**20 for p in pts], [p.kld_mean for p in pts], marker=marker, color=color,
                   label=f"{kind} {'plans' if kind == 'ggufmoe' else 'mixes'}", zorder=3)
        for p in pts:
            label = p.name.removeprefix("llama.cpp-") if kind == "llama.cpp" else f"{p.experts} exp."
            ax.annotate(label, (p.file_bytes / 2**20, p.kld_mean), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    front = pareto_front(rows)
    ax.step([p.file_bytes / 2**20 for p in front], [p.kld_mean for p in front], where="post", color="gray",
            linestyle="--", linewidth=1, label="Pareto front", zorder=2)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence to the base (nats/token)")
    ax.set_title(f"{title}: size vs quality")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

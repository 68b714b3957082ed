"""Sweep memory budgets: for each, plan + convert + validate + eval; llama.cpp's own mixes as baselines.

Everything lands in one folder: ``stats.gguf`` (calibration, streamed layer by layer with its
state in ``.stats.gguf.partial`` until it is complete, and the cached sensitivities),
``base-F16.gguf`` (the reference every file is scored against, and the input of the baselines),
one GGUF (and plan) per point, ``results.json``, ``results.md``, ``pareto.png`` and ``README.md`` (a
Hugging Face model card of the files: :mod:`ggufmoe.pipeline.card`). A point is
done when its row is in ``results.json``: a second run redoes nothing that finished, and an
interrupted one goes on where it stopped (files are only ever complete: see :mod:`ggufmoe.gguf.writer`).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ggufmoe.arch import architecture_for
from ggufmoe.pipeline.calibrate import calibrate
from ggufmoe.pipeline.card import CardInputs, build_card, file_facts, write_card
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.pipeline.planning import build_plan, check_budget_possible, options_from_plan
from ggufmoe.plan.budget import Budget, Plan
from ggufmoe.plan.memory import gguf_runtime_memory
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.evaluate import TOP_P, evaluate, score_base
from ggufmoe.runtime.llama_quantize import llama_quantize
from ggufmoe.runtime.validate import validate
from ggufmoe.source import open_source
from ggufmoe.stats.file import load_stats
from ggufmoe.stats.text import read_text
from ggufmoe.errors import GgufmoeError
from ggufmoe.outputs import check_output_folder, write_output
from ggufmoe.source.fingerprint import file_identity, model_files
from ggufmoe.model.qtypes import DEFAULT_BASELINES
from ggufmoe.units import format_size, parse_size

if TYPE_CHECKING:
    from ggufmoe.pipeline.distributed import Cluster

BASE_TYPE = "F16"
SETTINGS = "sweep.json"  # what the folder's points were made from: another sweep into it must match


@dataclass
class SweepOptions:
    budgets: list[str]  # sizes as given ("12M", "128GiB"): they name the points
    calib: Path
    text: Path
    out: Path
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    # how every point is planned (its total is each point's budget); weights_only by default: budgets are file sizes,
    # as the baselines are; else file + runtime memory. Its context and KV type are what every file is validated at.
    planning: Budget = field(default_factory=lambda: Budget(0, weights_only=True))
    eval_chunk: int = 512
    max_tokens: int = 8192
    threads: int | None = None
    progress: bool = True
    base_model: str | None = None  # the model card's base_model [default: from the files' keys]
    license: str | None = None  # the model card's license [default: general.license of the files]


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
    kld_p999: float | None = None  # None in rows of sweeps from before it was measured
    top1: float = 0.0
    same_top_p: float | None = None  # share of tokens whose top-p set (p = evaluate.TOP_P) is the base's
    fits: bool = False
    peak_rss: int | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    note: str = ""
    commands: list[str] = field(default_factory=list)  # what made the file, in the sweep's folder (sweep_commands)


def load_results(path: Path) -> dict[str, Point]:
    if not path.is_file():
        return {}
    try:
        return {d["name"]: Point(**d) for d in json.loads(path.read_text())}
    except (ValueError, TypeError, KeyError) as e:
        raise GgufmoeError(f"{path}: not a sweep result file ({e}); remove it to start over") from None


def save_results(points: dict[str, Point], path: Path) -> None:
    text = json.dumps([asdict(p) for p in sorted(points.values(), key=lambda p: p.file_bytes)], indent=1)
    write_output(path, lambda tmp: tmp.write_text(text))


@dataclass
class PointTask:
    """One point of a sweep to make and measure: plan and convert (``kind`` ggufmoe, ``what`` its budget) or
    llama.cpp's mix ``what``; validate; evaluate. Plain data: a worker on another machine can be handed it."""

    src: Path
    kind: str
    name: str
    what: int | str
    stats_path: Path
    base: Path
    calib: str
    text: str
    opts: SweepOptions

    def run(self) -> Point:
        source = open_source(self.src)
        make = _ours if self.kind == "ggufmoe" else _baseline
        point = make(self.src, architecture_for(source), self.name, self.what, self.stats_path, self.base, self.calib,
                     self.opts, source.name)
        point.bpw = file_facts(self.opts.out / point.file, self.opts.planning.ctx, self.opts.planning.kv_type).bpw
        _measure(point, self.base, self.text, self.opts)
        return point


def sweep(src: Path, opts: SweepOptions, cluster: Cluster | None = None) -> list[Point]:
    """Run every point not yet in ``results.json``, each saved as it ends (``cluster``: the points, the calibration
    and the base conversion on its workers); write the three result files; return the points."""
    src = Path(src)
    source = open_source(src)
    architecture_for(source)  # an unsupported model refused before anything is made
    if not source.has_weights:
        raise GgufmoeError(f"{src}: a sweep converts the model; it needs the weights, not a configuration alone")
    if not source.can_calibrate:
        raise GgufmoeError(f"{src}: a sweep calibrates the model with transformers; give the Hugging Face model, "
                           "not a GGUF")
    if not opts.budgets:
        raise GgufmoeError("no budgets given")
    todo = [("ggufmoe", f"plan-{b.replace(' ', '')}", parse_size(b)) for b in opts.budgets] + \
        [("llama.cpp", f"llama.cpp-{m}", m) for m in opts.baselines]
    out = opts.out
    check_output_folder(out, [src, opts.calib, opts.text], (SETTINGS, "results.json"))
    calib, text = read_text(opts.calib), read_text(opts.text)
    settings = sweep_settings(src, opts)
    check_budget_possible(src, replace(opts.planning, total=min(b for _, _, b in todo[:len(opts.budgets)])))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GgufmoeError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    claim_folder(out / SETTINGS, settings)
    results_path = out / "results.json"
    points = load_results(results_path)
    stats_path, base = _prepare(src, out, calib, opts, cluster)
    here = replace(opts, out=out.resolve())  # a point may run elsewhere: every path absolute
    pending = [PointTask(src.resolve(), kind, name, what, stats_path.resolve(), base.resolve(), calib, text, here)
               for kind, name, what in todo if name not in points]
    if cluster is not None and pending:  # what every point would otherwise make at once: made once, here
        if any(t.kind == "ggufmoe" for t in pending):
            build_plan(src, replace(opts.planning, total=todo[0][2]), stats_path, calib, progress=opts.progress)
        score_base(base, text, opts.eval_chunk, opts.max_tokens, threads=opts.threads, cache_dir=here.out / "cache",
                   progress=opts.progress)
    with tqdm(total=len(todo), initial=len(todo) - len(pending), desc="sweep", unit="point",
              disable=not opts.progress) as bar:
        for point in cluster.points(pending) if cluster else (t.run() for t in pending):
            points[point.name] = point
            save_results(points, results_path)
            bar.set_postfix_str(point.name)
            bar.update()
    rows = sorted(points.values(), key=lambda p: p.file_bytes)
    table = format_table(rows, source.name, opts)
    write_output(out / "results.md", lambda tmp: tmp.write_text(table))
    plot_pareto(rows, out / "pareto.png", source.name)
    write_card(build_card([file_facts(out / p.file, opts.planning.ctx, opts.planning.kv_type) for p in rows],
                          {p.file: asdict(p) for p in rows}, card_inputs(source.name, opts)), out / "README.md")
    return rows


def sweep_settings(src: Path, opts: SweepOptions) -> dict[str, str]:
    """What decides a sweep's points besides their budgets and mixes: its inputs (path, size, modification time)
    and its settings."""
    return dict(source=file_identity(model_files(src)), calib=file_identity([opts.calib]),
                text=file_identity([opts.text]), planning=shlex.join(opts.planning.command_options()),
                eval_chunk=str(opts.eval_chunk), max_tokens=str(opts.max_tokens))


def claim_folder(path: Path, settings: dict[str, str]) -> None:
    """Record ``settings`` in ``path`` (the folder's ``sweep.json``), or refuse a folder swept with others."""
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise GgufmoeError(f"{path}: unreadable ({e}); sweep into another folder") from None
        changed = [k for k in settings if kept.get(k) != settings[k]]
        if changed:
            raise GgufmoeError(f"{path.parent} holds a sweep with another {', '.join(changed)}: its points would not "
                               "compare; sweep into another folder")
        return
    text = json.dumps(settings, indent=1)
    write_output(path, lambda tmp: tmp.write_text(text))


def card_inputs(model: str, opts: SweepOptions) -> CardInputs:
    """The model card's settings, evaluation and shared commands for a sweep of ``src``."""
    run = shlex.join(["ggufmoe", "eval", "FILE.gguf", "--base", f"base-{BASE_TYPE}.gguf", "--text", opts.text.name,
                      "--chunk", str(opts.eval_chunk), "--max-tokens", str(opts.max_tokens), "--kv-type", "f32",
                      "--json"])
    return CardInputs(
        ctx=opts.planning.ctx, kv_type=opts.planning.kv_type, base_model=opts.base_model, license=opts.license,
        evaluation=[f"KL divergence, top-1, same top-p and perplexity against the {BASE_TYPE} conversion on "
                    f"`{opts.text.name}` (up to {opts.max_tokens} tokens in chunks of {opts.eval_chunk}): `{run}`. "
                    f"Same top-p is the share of tokens whose top-{TOP_P:g} set (the fewest most probable tokens reaching "
                    f"probability {TOP_P:g}) is the base's. Memory: the file plus llama.cpp's runtime memory at ctx "
                    f"{opts.planning.ctx} (KV {opts.planning.kv_type}), every file validated under it. Bits per "
                    "weight count the source's parameters."],
        calib_text=opts.calib, plot="pareto.png",
        commands=[shlex.join(["ggufmoe", "calibrate", model, "--text", opts.calib.name, "-o", "stats.gguf"]),
                  shlex.join(["ggufmoe", "convert", model, "--type", BASE_TYPE, "-o", f"base-{BASE_TYPE}.gguf"])])


def _prepare(src: Path, out: Path, calib: str, opts: SweepOptions, cluster: Cluster | None) -> tuple[Path, Path]:
    """The statistics (calibrated once; an interrupted calibration continues after its last complete layer)
    and the base GGUF (converted once)."""
    stats_path = out / "stats.gguf"
    if not stats_path.is_file():
        calibrate(src, calib, progress=opts.progress, dataset=opts.calib.name, out=stats_path, resume=True,
                  resume_hint="run the same sweep again", cluster=cluster)
    base = out / f"base-{BASE_TYPE}.gguf"
    if not base.is_file():
        convert(src, ConvertOptions(out=base, types=TypeRules.parse(BASE_TYPE), threads=opts.threads,
                                    progress=opts.progress, cluster=cluster))
    return stats_path, base


def _ours(src, arch, name, budget, stats_path, base, calib, opts, model) -> Point:

    path, plan_path = opts.out / f"{name}.gguf", opts.out / f"{name}.plan.json"
    if path.is_file() and plan_path.is_file():
        plan = Plan.load(plan_path)
        if plan.target != str(opts.planning.target):
            raise GgufmoeError(f"{plan_path}: planned for target {plan.target}, this sweep is for "
                               f"{opts.planning.target}: "
                               "sweep into another folder")
    else:
        plan = build_plan(src, replace(opts.planning, total=budget), stats_path, calib, progress=opts.progress)
        plan.save(plan_path)
        convert(src, options_from_plan(plan, ConvertOptions(out=path, types=TypeRules.parse("Q8_0"),
                                                            threads=opts.threads, progress=False)))
    size = path.stat().st_size
    if size != plan.file_bytes:
        raise GgufmoeError(f"{path}: {size} bytes written, {plan.file_bytes} planned")
    planning = ["ggufmoe", "plan", model, "--budget", name.removeprefix("plan-"), *opts.planning.command_options(),
                "--stats", stats_path.name, "--calib", opts.calib.name, "-o", plan_path.name]
    return Point(name, "ggufmoe", path.name, size, f"{plan.keep}/{plan.n_expert}", plan.top_k, plan.memory["total"],
                 budget=budget, predicted_kld=plan.predicted_kld["total"],
                 commands=[shlex.join(planning),
                           shlex.join(["ggufmoe", "convert", model, "--plan", plan_path.name, "-o", path.name])])


def _baseline(src, arch, name, mix, stats_path, base, calib, opts, model) -> Point:

    path = opts.out / f"{name}.gguf"
    if not path.is_file():
        llama_quantize(base, path, mix, imatrix=load_stats(stats_path).imatrix, threads=opts.threads)
    size = path.stat().st_size
    memory = gguf_runtime_memory(arch, path, opts.planning.ctx, opts.planning.kv_type, opts.planning.target).total
    return Point(name, "llama.cpp", path.name, size, f"{arch.n_expert}/{arch.n_expert}", arch.top_k, memory,
                 commands=[shlex.join(["llama-quantize", "--imatrix", stats_path.name, base.name, path.name, mix])])


def _measure(point: Point, base: Path, text: str, opts: SweepOptions) -> None:
    """Validate under the predicted memory, then score against the base; fills ``point`` in place."""
    path = opts.out / point.file
    try:
        v = validate(path, point.predicted_memory, opts.planning.ctx, threads=opts.threads, target=opts.planning.target,
                     kv_type=opts.planning.kv_type)
        point.fits, point.peak_rss, point.prompt_tps, point.gen_tps = True, v.peak_rss, v.prompt_tps, v.gen_tps
    except GgufmoeError as e:
        point.note = f"validate: {e}"
    r = evaluate(path, base, text, opts.eval_chunk, opts.max_tokens, threads=opts.threads,
                 cache_dir=opts.out / "cache", progress=False)
    point.ppl, point.ppl_base, point.kld_mean, point.kld_p99, point.kld_p999, point.top1, point.same_top_p = (
        r.ppl, r.ppl_base, r.kld_mean, r.kld_p99, r.kld_p999, r.top1, r.same_top_p)


def pareto_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on both size and mean KL divergence, smallest first."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p.file_bytes, p.kld_mean)):
        if p.kld_mean < best:
            front.append(p)
            best = p.kld_mean
    return front


def format_table(rows: list[Point], model: str, opts: SweepOptions) -> str:
    front = {p.name for p in pareto_front(rows)}
    lines = [
        f"# Budget sweep: {model}",
        "",
        f"Budgets are {'file sizes' if opts.planning.weights_only else 'file + llama.cpp runtime memory'}; every file "
        f"is validated in llama.cpp under its predicted memory at ctx {opts.planning.ctx} "
        f"(KV {opts.planning.kv_type}) and scored "
        f"against the {BASE_TYPE} conversion on `{opts.text.name}` (up to {opts.max_tokens} tokens in chunks of "
        f"{opts.eval_chunk}, F32 KV cache). Baselines: llama.cpp's mixes by `llama_model_quantize` from the "
        f"{BASE_TYPE} file with the same importance matrix. Bits per weight count the source's parameters. "
        f"Same top-p: the share of tokens whose top-{TOP_P:g} set (the fewest most probable tokens reaching "
        f"probability {TOP_P:g}) is the base's. "
        f"Machine: {os.cpu_count()} cores; target `{opts.planning.target}`. ★ = on the Pareto front (size vs KLD).",
        "",
        "| file | bytes | bits/weight | experts | top-k | PPL | KLD | predicted KLD | KLD p99 | KLD p99.9 | top-1 | "
        "same top-p | peak RSS | predicted memory | prompt tok/s | gen tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in rows:
        rss = format_size(p.peak_rss) if p.fits else "does not fit"
        speed = (f"{p.prompt_tps:,.0f} | {p.gen_tps:,.1f}" if p.fits else "– | –")
        predicted = "–" if p.predicted_kld is None else f"{p.predicted_kld:.4f}"
        p999 = "–" if p.kld_p999 is None else f"{p.kld_p999:.3f}"
        same = "–" if p.same_top_p is None else f"{100 * p.same_top_p:.1f}%"
        lines.append(f"| {'★ ' if p.name in front else ''}{p.name} | {p.file_bytes:,} | {p.bpw:.2f} | {p.experts} | "
                     f"{p.top_k} | {p.ppl:.3f} | {p.kld_mean:.4f} | {predicted} | {p.kld_p99:.3f} | {p999} | "
                     f"{100 * p.top1:.1f}% | {same} | {rss} | "
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

"""Memory-budget planner: which experts to keep and one llama.cpp type per tensor, so that the
file plus llama.cpp's runtime memory fit the budget at the least predicted KL divergence.

For every candidate keep count (each multiple of the expert-group count from all experts down
to half, at most :data:`MAX_KEEP_CANDIDATES` of them): prune (as ``convert --keep`` would), start
every tensor at its cheapest allowed type, then take upgrades in order of predicted KL saved per
byte (steps along each tensor's lower convex hull of bytes vs. predicted cost) while they fit.
Bytes are the file's, plus, unless the budget counts the file only, the copies llama.cpp's CPU
backend makes of repacked types (Q4_K, IQ4_NL ... on x86). The keep count with the lowest
predicted total (pruning + quantization) wins. ``--tensor-type`` rules pin tensors.

A GGUF source caps precision: a tensor is offered its stored type (copied as it is) and the
candidates with fewer bits per weight, never more — unless a ``--tensor-type`` pin asks for
more, which the plan's notes say. Costs stay those against the original weights: the stored
type's for a copy, the new type's plus the stored type's for a requantized tensor.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from .arch import Architecture, TensorSpec
from .convert import ConvertOptions, TensorPlan, prepare_output
from .errors import GgufmoeError
from .gguf_out import GGUFOutput
from .memory import file_bytes, is_repacked, local_repack_types, runtime_memory, weight_memory
from .prune import PrunePlan, PruneRequest, apply_plan, make_plan, resolve
from .quant import bits_per_weight, effective_type, requires_imatrix
from .sensitivity import CANDIDATES, Sensitivity
from .stats import Stats
from .tensor_types import ALWAYS_F32, EMBEDDING, TypeRules
from .units import format_size

MIN_KEEP_RATIO = 0.5  # pruning more than half the experts never paid on the reference model
MAX_KEEP_CANDIDATES = 13  # keep counts tried (evenly spread between all and half when there are more)
# Poor without an importance matrix (llama.cpp warns about them): only offered with statistics.
NEED_STATS = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS)
ALIGN = 32


def padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Budget:
    total: int
    ctx: int = 8192
    kv_type: str = "f16"
    weights_only: bool = False


@dataclass
class Plan:
    """A plan as written to PLAN.json and executed by ``convert --plan``."""

    source: str
    architecture: str
    budget: int
    ctx: int
    kv_type: str
    weights_only: bool
    n_expert: int
    top_k_source: int
    keep: int
    top_k: int
    criterion: str
    kept: dict[int, list[int]]
    types: dict[str, str]
    tensor_bytes: dict[str, int]
    file_bytes: int
    memory: dict[str, int]
    predicted_kld: dict[str, float]
    stats: str | None = None
    candidates: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            d = json.loads(Path(path).read_text())
            d["kept"] = {int(k): v for k, v in d["kept"].items()}
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise GgufmoeError(f"{path}: not a ggufmoe plan ({e})") from None

    def prune_plan(self) -> PrunePlan:
        return PrunePlan(self.n_expert, self.top_k_source, self.keep, self.top_k, self.criterion, 0.5, self.kept)

    def type_rules(self) -> TypeRules:
        return TypeRules.exact({name: T[t] for name, t in self.types.items()})


@dataclass
class Option:
    qtype: T
    nbytes: int
    cost: float


def options_for(spec: TensorSpec, sens: Sensitivity, pins: TypeRules, with_stats: bool,
                repack: dict | None = None) -> list[Option]:
    """Allowed (type, bytes, predicted cost) of one tensor, cheapest first, dominated ones dropped.

    Bytes are what the tensor takes from the budget: its padded size in the file, plus the copy
    llama.cpp's CPU backend makes of it when ``repack`` (:func:`memory.local_repack_types`) holds its type.
    A tensor with a ``source_type`` (GGUF) is offered that type (copied) and the candidates with fewer
    bits, priced at their own cost plus the stored type's: requantizing keeps the error already there.
    """
    def nbytes(t: T) -> int:
        n = TensorPlan(spec, t).nbytes
        return padded(n) + (n if repack and is_repacked(spec.name, spec.shape, t, repack) else 0)

    if pins.rules and any(p.search(spec.name) for p, _ in pins.rules) or len(spec.shape) == 1 \
            or ALWAYS_F32.search(spec.name):
        t = pins.type_for(spec)
        return [Option(t, nbytes(t), 0.0)]
    costs = sens.cost.get(spec.name, {})
    cap = spec.source_type
    seen: dict[T, Option] = {}
    for t in CANDIDATES:
        if (t in NEED_STATS and not with_stats) or (spec.name == EMBEDDING and requires_imatrix(t)):
            continue
        eff = effective_type(t, spec.shape[-1])
        if eff in seen or eff.name not in costs and t.name not in costs:
            continue
        cost = costs.get(t.name, costs.get(eff.name, 0.0))
        if cap is not None and eff != cap:
            if bits_per_weight(eff) >= bits_per_weight(cap):
                continue
            cost += _cost_at(cap, costs)  # requantized: the stored type's error stays, the new one adds
        seen[eff] = Option(eff, nbytes(eff), cost)
    if cap is not None:
        seen[cap] = Option(cap, nbytes(cap), _cost_at(cap, costs))
    opts = sorted(seen.values(), key=lambda o: (o.nbytes, o.cost))
    hull: list[Option] = []
    for o in opts:  # lower convex hull of (bytes, cost), cost falling
        if hull and o.cost >= hull[-1].cost:
            continue
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], o):
            hull.pop()
        hull.append(o)
    if not hull:
        raise GgufmoeError(f"{spec.name}: no allowed type")
    return hull


def _cost_at(t: T, costs: dict[str, float]) -> float:
    """The cost of a type the sensitivities do not price (a source's own, e.g. Q5_0 or F32): that of
    the priced type with the fewest bits per weight at or above it; 0 above them all."""
    if t.name in costs:
        return costs[t.name]
    above = [(bits_per_weight(T[n]), c) for n, c in costs.items() if bits_per_weight(T[n]) >= bits_per_weight(t)]
    return min(above)[1] if above else 0.0


def source_notes(specs: list[TensorSpec], types: dict[str, T]) -> list[str]:
    """What a GGUF source's types did to the plan: tensors kept as stored, and any planned above them."""
    stored = [s for s in specs if s.source_type is not None]
    if not stored:
        return []
    kept = sum(types[s.name] == s.source_type for s in stored)
    notes = [f"precision capped at the source's types: {kept} of {len(stored)} tensors keep theirs (copied)"]
    above: dict[tuple[str, str, str], int] = {}  # only --tensor-type pins go there
    for s in stored:
        if bits_per_weight(types[s.name]) > bits_per_weight(s.source_type):
            key = (s.kind, types[s.name].name, s.source_type.name)
            above[key] = above.get(key, 0) + 1
    notes += [f"above the source: {kind} {t} over {st} ({n} tensors, --tensor-type)" for (kind, t, st), n in above.items()]
    return notes


def _slope(a: Option, b: Option) -> float:
    return (a.cost - b.cost) / max(b.nbytes - a.nbytes, 1)


def allocate(groups: dict[str, list[Option]], budget: int) -> tuple[dict[str, Option], int]:
    """Cheapest option everywhere, then the best cost-per-byte upgrades that fit. Returns choice and bytes."""
    level = {name: 0 for name in groups}
    used = sum(opts[0].nbytes for opts in groups.values())
    if used > budget:
        raise _TooSmall(used)
    heap = [(-_slope(o[0], o[1]), name) for name, o in groups.items() if len(o) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        opts, i = groups[name], level[name]
        step = opts[i + 1].nbytes - opts[i].nbytes
        if used + step > budget:
            continue
        used += step
        level[name] = i + 1
        if i + 2 < len(opts):
            heapq.heappush(heap, (-_slope(opts[i + 1], opts[i + 2]), name))
    return {name: groups[name][i] for name, i in level.items()}, used


class _TooSmall(Exception):
    def __init__(self, needed: int):
        self.needed = needed


def keep_candidates(arch: Architecture, stats: Stats | None, config_only: bool = False) -> list[int]:
    n = arch.n_expert
    if (stats is None or not stats.layers) and not config_only:
        return [n]
    groups = arch.expert_groups[0] if arch.expert_groups else 1
    steps = list(range(n, max(groups, math.ceil(MIN_KEEP_RATIO * n / groups) * groups) - 1, -groups))
    if len(steps) > MAX_KEEP_CANDIDATES:
        steps = [steps[i] for i in np.linspace(0, len(steps) - 1, MAX_KEEP_CANDIDATES).round().astype(int)]
    return [k for k in steps if arch.top_k <= k * (arch.expert_groups[1] if arch.expert_groups else groups) // groups]


def prune_cost(plan: PrunePlan, stats: Stats | None, scale: float) -> float:
    """Predicted KL of pruning: routing mass removed, averaged over layers, times a measured scale."""
    if not plan.prunes:
        return 0.0
    if stats is None:  # configuration alone: assume the removed experts carried their share of routing
        return scale * (1.0 - plan.keep / plan.n_expert)
    removed = []
    for il, kept in plan.kept.items():
        s = stats.layers[il]
        mass = s.weight_mass if stats.has_routing else s.counts
        total = float(mass.sum()) or 1.0
        removed.append(1.0 - float(mass[kept].sum()) / total)
    return scale * sum(removed) / max(len(removed), 1)


def make_budget_plan(src, arch: Architecture, stats: Stats | None, sens: Sensitivity, budget: Budget,
                     pins: TypeRules, prune_scale: float, criterion: str = "reap",
                     stats_path: str | None = None) -> Plan:
    """The best plan over the candidate keep counts; a clear error when nothing fits."""
    best: Plan | None = None
    smallest = None
    candidates = []
    crit = criterion if stats is None or stats.has_routing else "frequency"
    config_only = not src.has_weights
    local = local_repack_types()  # the memory llama.cpp here takes; the allocation prices it unless weights only
    repack = {} if budget.weights_only else local
    for keep in keep_candidates(arch, stats, config_only):
        if config_only and keep < arch.n_expert:
            # which experts is decided at conversion, from calibration; placeholders keep the shapes right
            _, top_k = resolve(arch, PruneRequest(keep=keep))
            pplan = _placeholder_kept(arch, PrunePlan(arch.n_expert, arch.top_k, keep, top_k, crit, 0.5))
        else:
            pplan = make_plan(arch, stats, PruneRequest(keep=keep, criterion=crit))
        specs = apply_plan(arch, pplan)
        groups = {s.name: options_for(s, sens, pins, stats is not None or config_only, repack) for s in specs}
        first = {name: o[0].qtype for name, o in groups.items()}
        overhead = _overhead(src, arch, specs, first, pplan, stats, stats_path)
        runtime = runtime_memory(arch, 0, budget.ctx, budget.kv_type)
        fixed = overhead + (0 if budget.weights_only else runtime.kv_cache + runtime.compute + runtime.reserve)
        limit = budget.total - fixed
        for _ in range(8):  # runtime memory is not exactly linear in the file (pages, margins): back off
            try:
                choice, used = allocate(groups, limit)
            except _TooSmall as e:
                need = e.needed + (budget.total - limit)
                smallest = need if smallest is None else min(smallest, need)
                choice = None
                break
            types = {name: o.qtype for name, o in choice.items()}
            writer = _planned_output(src, arch, specs, types, pplan, stats, stats_path).writer
            size, wm = file_bytes(writer), weight_memory(writer, local)
            mem = runtime_memory(arch, wm.mapped, budget.ctx, budget.kv_type, repacked_bytes=wm.repacked)
            over = (size if budget.weights_only else mem.total) - budget.total
            if over <= 0:
                break
            limit -= over
        else:
            choice = None
        if choice is None:
            continue
        quant = sum(o.cost for o in choice.values())
        pcost = prune_cost(pplan, stats, prune_scale)
        plan = Plan(source=str(src.path), architecture=arch.gguf_arch, budget=budget.total, ctx=budget.ctx,
                    kv_type=budget.kv_type, weights_only=budget.weights_only, n_expert=arch.n_expert,
                    top_k_source=arch.top_k, keep=keep, top_k=pplan.top_k, criterion=crit, kept=pplan.kept,
                    types={n: t.name for n, t in types.items()},
                    tensor_bytes={s.name: TensorPlan(s, types[s.name]).nbytes for s in specs}, file_bytes=size,
                    memory=dict(weights=mem.weights, kv_cache=mem.kv_cache, compute=mem.compute,
                                reserve=mem.reserve, total=mem.total),
                    predicted_kld=dict(prune=pcost, quant=quant, total=pcost + quant), stats=stats_path)
        candidates.append(dict(keep=keep, file_bytes=size, predicted_kld=plan.predicted_kld["total"]))
        if best is None or plan.predicted_kld["total"] < best.predicted_kld["total"]:
            best, best_specs = plan, specs
    if best is None:
        raise GgufmoeError(f"budget {format_size(budget.total)} is too small: the smallest feasible plan needs "
                           f"{format_size(smallest)} ({smallest} bytes)")
    best.candidates = candidates
    best.notes = source_notes(best_specs, {n: T[t] for n, t in best.types.items()})
    return best


def _placeholder_kept(arch: Architecture, pplan: PrunePlan) -> PrunePlan:
    from .prune import choose

    groups = arch.expert_groups[0] if arch.expert_groups else 1
    layers = sorted({s.layer for s in arch.tensors() if s.is_expert})
    pplan.kept = {il: choose(np.zeros(arch.n_expert), pplan.keep, groups) for il in layers}
    return pplan


def _planned_output(src, arch: Architecture, specs: list[TensorSpec], types: dict[str, T], pplan: PrunePlan,
                    stats: Stats | None, stats_path: str | None) -> GGUFOutput:
    """The output convert will prepare for these types (nothing written): its header gives exact bytes."""
    plans = [TensorPlan(s, types[s.name]) for s in specs]
    return prepare_output(src, arch, plans, pplan, TypeRules(T.Q8_0), Path("plan.gguf"),
                          imatrix=stats.imatrix if stats else None, imatrix_path=stats_path)


def _overhead(src, arch: Architecture, specs: list[TensorSpec], types: dict[str, T], pplan: PrunePlan,
              stats: Stats | None, stats_path: str | None) -> int:
    """Bytes of the file that are not (padded) tensor data: header, metadata, tensor infos."""
    out = _planned_output(src, arch, specs, types, pplan, stats, stats_path)
    return file_bytes(out.writer) - sum(padded(ti.nbytes) for t in out.writer.tensors for ti in t.values())


# Without weights (a configuration alone) the tokenizer is unknown: metadata bytes per vocabulary
# entry assumed for it (token text, type, merge). Stated in the plan as an estimate.
TOKENIZER_BYTES_PER_TOKEN = 32
# Predicted KL per unit of routing mass removed, used when it cannot be measured (no weights).
DEFAULT_PRUNE_SCALE = 1.0


def measure_prune_scale(src_dir: Path, stats_path: Path, text: str, ctx: int = 512, chunks: int = 4) -> float:
    """KL (through llama.cpp, F16 weights) of pruning a quarter of the experts, per unit of routing mass removed."""
    import tempfile

    from transformers import AutoTokenizer

    from .arch import architecture_for
    from .calibrate import token_chunks
    from .convert import ConvertOptions, convert
    from .logprobs import LlamaScorer, compare
    from .source.hf import HFSource
    from .stats import load_stats

    arch = architecture_for(HFSource(src_dir))
    stats = load_stats(stats_path, top_k=arch.top_k)
    keep = keep_candidates(arch, stats)
    keep = min(keep, key=lambda k: abs(k - 0.75 * arch.n_expert))
    req = PruneRequest(keep=keep, criterion="reap" if stats.has_routing else "frequency")
    removed = prune_cost(make_plan(arch, stats, req), stats, 1.0)
    if removed <= 0:
        return DEFAULT_PRUNE_SCALE
    tok = AutoTokenizer.from_pretrained(src_dir)
    seqs = [c for c in token_chunks(tok, text, ctx, ctx * chunks) if len(c) == ctx] or \
        token_chunks(tok, text, ctx, ctx * chunks)
    with tempfile.TemporaryDirectory() as tmp:
        base = convert(src_dir, ConvertOptions(out=Path(tmp) / "base.gguf", types=TypeRules.parse("F16"),
                                               progress=False))[0]
        pruned = convert(src_dir, ConvertOptions(out=Path(tmp) / "pruned.gguf", types=TypeRules.parse("F16"),
                                                 stats=stats_path, prune=req, progress=False))[0]
        n = max(len(s) for s in seqs)
        with LlamaScorer(base, n) as score:
            ref = [score(s) for s in seqs]
        with LlamaScorer(pruned, n) as score:
            kld = float(np.mean([compare(score(s), r, s).kld_mean for s, r in zip(seqs, ref)]))
    return kld / removed


def build_plan(source: Path, budget: Budget, stats_path: Path | None = None, calib_text: str | None = None,
               pins: TypeRules | None = None, criterion: str = "reap", progress: bool = True) -> Plan:
    """Everything ``ggufmoe plan`` does: sensitivities (measured or default), then the best plan."""
    from .arch import architecture_for
    from .sensitivity import cached_sensitivity, default_sensitivity, load_or_measure, store
    from .source.config import open_source
    from .stats import load_stats

    src = open_source(source)
    arch = architecture_for(src)
    pins = pins or TypeRules(None)
    if stats_path and not src.has_weights:
        raise GgufmoeError("--stats needs the model's weights; a configuration alone is planned with defaults")
    stats = load_stats(stats_path, top_k=arch.top_k) if stats_path else None
    if stats is not None and src.can_calibrate:
        if calib_text is not None and cached_sensitivity(src.path, stats, calib_text) is None:
            # sensitivities will be measured (minutes): say first if the budget is impossible
            rough = default_sensitivity(list(arch.tensors()), arch.n_expert, arch.top_k, imatrix=True)
            make_budget_plan(src, arch, stats, rough, budget, pins, DEFAULT_PRUNE_SCALE, criterion, None)
        sens = load_or_measure(src.path, stats_path, calib_text, progress=progress)
        prune_scale = sens.scales.get("prune")
        if prune_scale is None:
            if calib_text is None:
                raise GgufmoeError("measuring what pruning costs needs calibration text: pass --calib FILE")
            prune_scale = sens.scales["prune"] = measure_prune_scale(src.path, stats_path, calib_text)
            store(src.path, stats_path, calib_text, sens)  # cached with the sensitivities
    else:
        # From shapes. Types that need an importance matrix are allowed when there will be one: a
        # configuration alone is calibrated before converting; a GGUF uses the statistics' imatrix.
        sens = default_sensitivity(list(arch.tensors()), arch.n_expert, arch.top_k,
                                   imatrix=stats is not None or not src.has_weights)
        prune_scale = DEFAULT_PRUNE_SCALE
    plan = make_budget_plan(src, arch, stats, sens, budget, pins, prune_scale, criterion,
                            str(stats_path) if stats_path else None)
    if not sens.measured:
        plan.notes.append("sensitivities are defaults from tensor shapes (not measured)")
    if not arch.writes_tokenizer:
        plan.file_bytes += TOKENIZER_BYTES_PER_TOKEN * int(arch.cfg.vocab_size)
    return plan


def format_plan(plan: Plan) -> str:
    """A readable summary: pruning, types per tensor class and layer range, memory breakdown."""
    by_class: dict[tuple[str, str], list[int]] = {}
    class_bytes: dict[tuple[str, str], int] = {}
    for name, t in plan.types.items():
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "blk" else -1
        kind = ".".join(parts[2:-1]) if parts[0] == "blk" else ".".join(parts[:-1])
        by_class.setdefault((kind, t), []).append(layer)
        class_bytes[kind, t] = class_bytes.get((kind, t), 0) + plan.tensor_bytes.get(name, 0)
    lines = [f"source       {plan.source} ({plan.architecture})",
             f"experts      keep {plan.keep} of {plan.n_expert} per layer ({plan.criterion}), "
             f"{plan.top_k} used per token (source: {plan.top_k_source})",
             "", f"{'tensor class':<22} {'type':<8} {'bytes':>12}  layers"]
    for (kind, t), layers in sorted(by_class.items()):
        span = "-" if layers == [-1] else _ranges(sorted(layers))
        lines.append(f"{kind:<22} {t:<8} {format_size(class_bytes[kind, t]):>12}  {span}")
    m = plan.memory
    lines += ["", f"file         {format_size(plan.file_bytes)} ({plan.file_bytes} bytes)",
              f"memory       weights {format_size(m['weights'])} + KV cache {format_size(m['kv_cache'])} "
              f"(ctx {plan.ctx}, {plan.kv_type}) + compute {format_size(m['compute'])} + reserve "
              f"{format_size(m['reserve'])} = {format_size(m['total'])}",
              f"budget       {format_size(plan.budget)}" + (" (weights only)" if plan.weights_only else ""),
              f"predicted    KL {plan.predicted_kld['total']:.4f} (pruning {plan.predicted_kld['prune']:.4f}, "
              f"quantization {plan.predicted_kld['quant']:.4f})"]
    if len(plan.candidates) > 1:
        lines.append("candidates   " + ", ".join(f"keep {c['keep']}: KL {c['predicted_kld']:.4f}"
                                                 for c in plan.candidates))
    lines += [f"note         {n}" for n in plan.notes]
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def options_from_plan(plan: Plan, base: ConvertOptions) -> ConvertOptions:
    """``base`` convert options with the plan's types, pruning and statistics filled in."""
    from dataclasses import replace

    stats = base.stats or (Path(plan.stats) if plan.stats else None)
    return replace(base, types=plan.type_rules(), prune_plan=plan.prune_plan(), stats=stats, prune=None)


def convert_to_budget(src: Path, base, budget: Budget, calib_file: Path | None, pins: TypeRules,
                      criterion: str = "reap") -> tuple[Plan, list[Path]]:
    """calibrate (unless statistics are given, or kept beside the output for --resume) + plan + convert;
    the statistics and the plan are saved beside the output.

    A GGUF source cannot be calibrated here: without ``--stats`` it is planned without pruning."""
    from .convert import convert, input_files, refuse_overwriting_inputs
    from .source.config import open_source
    from .stats import check_output, collect_stats, read_text, save_stats

    outputs = [base.out, base.out.with_suffix(".plan.json")] + ([] if base.stats else [base.out.with_suffix(".stats.gguf")])
    refuse_overwriting_inputs(input_files(src, base) + ([calib_file] if calib_file else []), outputs,
                              base.split_max_size > 0)
    text = read_text(calib_file) if calib_file else None
    stats_path = base.stats
    if stats_path is None and not open_source(src, config_ok=False).can_calibrate:
        if text is not None:
            raise GgufmoeError(f"{src}: a GGUF cannot be calibrated (transformers runs the Hugging Face model); "
                               "pass --stats from `ggufmoe calibrate` on that model, or a llama.cpp imatrix")
    elif stats_path is None:
        if text is None:
            raise GgufmoeError("--budget needs --calib FILE (calibration text) or --stats")
        stats_path = base.out.with_suffix(".stats.gguf")
        check_output(stats_path)
        if not (base.resume and stats_path.is_file()):  # a resumed run plans from the same statistics
            save_stats(collect_stats(src, text, progress=base.progress, dataset=calib_file.name), stats_path)
    plan = build_plan(src, budget, stats_path, text, pins, criterion, progress=base.progress)
    plan.save(base.out.with_suffix(".plan.json"))
    return plan, convert(src, options_from_plan(plan, base))

"""Memory-budget planner: which experts to keep and one llama.cpp type per tensor, so that the
file plus llama.cpp's runtime memory fit the budget at the least predicted KL divergence.

For every candidate keep count (each multiple of the expert-group count from all experts down
to half, at most :data:`~ggufmoe.prune.criteria.MAX_KEEP_CANDIDATES` of them): prune (as ``convert --keep`` would), start
every tensor at its cheapest allowed type, then take upgrades in order of predicted KL saved per
byte (steps along each tensor's lower convex hull of bytes vs. predicted cost) while they fit.
Bytes are the file's, plus, unless the budget counts the file only, the copies llama.cpp's CPU
backend makes of repacked types on the budget's target (Q4_K, IQ4_NL ... on x86). A target that
offloads every layer to a GPU (cuda) charges each tensor to the memory that holds it: the token
embedding to the host, the rest to the GPU, and the plan must fit both. The keep count with the lowest
predicted total (pruning + quantization) wins. ``--tensor-type`` rules pin tensors.

A GGUF source caps precision: a tensor is offered its stored type (copied as it is) and the
candidates with fewer bits per weight, never more — unless a ``--tensor-type`` pin asks for
more, which the plan's notes say. Costs stay those against the original weights: the stored
type's for a copy, the new type's plus the stored type's for a requantized tensor.

The bytes come from the output ``convert`` would prepare (:mod:`ggufmoe.plan.layout`), the costs
from the sensitivities (:mod:`ggufmoe.sensitivity`), runtime memory from :mod:`ggufmoe.plan.memory`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.arch import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.gguf.header import file_bytes
from ggufmoe.model.names import EMBEDDING, OUTPUT, role
from ggufmoe.model.qtypes import CANDIDATES, POOR_WITHOUT_IMATRIX, bits_per_weight, effective_type
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.plan.budget import Budget, Plan
from ggufmoe.plan.layout import overhead_bytes, padded, planned_output
from ggufmoe.plan.memory import RuntimeMemory, gpu_tensor_bytes, is_repacked, placement, runtime_memory, weight_memory
from ggufmoe.plan.target import Target
from ggufmoe.plan.report import source_notes
from ggufmoe.prune.apply import prune_model
from ggufmoe.prune.criteria import (Criterion, Pruning, PruneRequest, choose, choose_experts, keep_counts,
                                    reachable_experts, resolve, top_k_variants)
from ggufmoe.quant.ggml import requires_imatrix
from ggufmoe.quant.rules import TypedTensor, TypeRules, always_f32, kept_type
from ggufmoe.sensitivity.cost import Sensitivity
from ggufmoe.stats.file import Stats
from ggufmoe.units import format_size


@dataclass
class Option:
    """One way to store a tensor: its type, the bytes it takes from the (host) budget and from GPU memory,
    its predicted KL."""

    qtype: T
    nbytes: int
    cost: float
    gpu_bytes: int = 0

    @property
    def size(self) -> int:
        return self.nbytes + self.gpu_bytes


def pinned(spec: TensorSpec, pins: TypeRules) -> bool:
    """A tensor whose type is not the planner's to choose (a ``--tensor-type`` rule, kept F32 or as stored)."""
    return bool(pins.rules and any(p.search(spec.name) for p, _ in pins.rules)) or always_f32(spec) or kept_type(spec)


def type_costs(spec: TensorSpec, sens: Sensitivity, with_stats: bool) -> dict[T, float]:
    """The predicted cost of each type (as written: the effective one) ``spec`` may be stored at.

    A tensor with a ``source_type`` (GGUF) is offered that type (copied) and the candidates with fewer
    bits, priced at their own cost plus the stored type's: requantizing keeps the error already there."""
    costs = sens.cost.get(spec.name, {})
    cap = spec.source_type
    out: dict[T, float] = {}
    for t in CANDIDATES:
        if (t in POOR_WITHOUT_IMATRIX and not with_stats) or (role(spec.name) == EMBEDDING and requires_imatrix(t)):
            continue
        eff = effective_type(t, spec.shape[-1])
        if eff in out or eff.name not in costs and t.name not in costs:
            continue
        cost = costs.get(t.name, costs.get(eff.name, 0.0))
        if cap is not None and eff != cap:
            if bits_per_weight(eff) >= bits_per_weight(cap):
                continue
            cost += _cost_at(cap, costs)  # requantized: the stored type's error stays, the new one adds
        out[eff] = cost
    if cap is not None:
        out[cap] = _cost_at(cap, costs)
    return out


def options_for(spec: TensorSpec, sens: Sensitivity, pins: TypeRules, with_stats: bool,
                repack: dict | None = None, where: tuple[bool, bool] = (True, False)) -> list[Option]:
    """Allowed (type, bytes, predicted cost) of one tensor (:func:`type_costs`), cheapest first, dominated ones
    dropped.

    Bytes are what the tensor takes from the budget: its padded size in the file, plus the copy
    llama.cpp's CPU backend makes of it when ``repack`` (:meth:`ggufmoe.plan.target.Target.repack_types`)
    holds its type; ``where`` says whether it is in host memory, in GPU memory (its CUDA buffer size), or
    both (:func:`ggufmoe.plan.memory.placement`).
    """
    def option(t: T, cost: float) -> Option:
        n = TypedTensor(spec, t).nbytes
        host = padded(n) + (n if repack and is_repacked(spec.name, spec.shape, t, repack) else 0) if where[0] else 0
        return Option(t, host, cost, gpu_tensor_bytes(spec.shape, t, n) if where[1] else 0)

    if pinned(spec, pins):
        return [option(pins.type_for(spec), 0.0)]
    seen = {t: option(t, cost) for t, cost in type_costs(spec, sens, with_stats).items()}
    opts = sorted(seen.values(), key=lambda o: (o.size, o.cost))
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


def _slope(a: Option, b: Option) -> float:
    return (a.cost - b.cost) / max(b.size - a.size, 1)


def allocate(groups: dict[str, list[Option]], budget: int, gpu_budget: int | None = None
             ) -> tuple[dict[str, Option], int]:
    """Cheapest option everywhere, then the best cost-per-byte upgrades that fit ``budget`` (host bytes) and
    ``gpu_budget`` (GPU bytes, when there is a GPU). Returns choice and host bytes."""
    level = {name: 0 for name in groups}
    used = sum(opts[0].nbytes for opts in groups.values())
    gpu = sum(opts[0].gpu_bytes for opts in groups.values())
    if used > budget:
        raise _TooSmall(used)
    if gpu_budget is not None and gpu > gpu_budget:
        raise _TooSmall(gpu, on_gpu=True)
    heap = [(-_slope(o[0], o[1]), name) for name, o in groups.items() if len(o) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        opts, i = groups[name], level[name]
        step, gpu_step = opts[i + 1].nbytes - opts[i].nbytes, opts[i + 1].gpu_bytes - opts[i].gpu_bytes
        if used + step > budget or gpu_budget is not None and gpu + gpu_step > gpu_budget:
            continue
        used, gpu = used + step, gpu + gpu_step
        level[name] = i + 1
        if i + 2 < len(opts):
            heapq.heappush(heap, (-_slope(opts[i + 1], opts[i + 2]), name))
    return {name: groups[name][i] for name, i in level.items()}, used


class _TooSmall(Exception):
    def __init__(self, needed: int, on_gpu: bool = False):
        self.needed, self.on_gpu = needed, on_gpu


def keep_candidates(arch: Architecture, stats: Stats | None, config_only: bool = False) -> list[int]:
    """The keep counts a plan tries: all experts only, unless there are statistics or only a configuration."""
    if (stats is None or not stats.layers) and not config_only:
        return [arch.n_expert]
    return keep_counts(arch)


def priced(specs: list[TensorSpec], types: dict[str, T], pins: TypeRules, sens: Sensitivity, with_stats: bool) -> float:
    """The quantization KL ``sens`` predicts for ``types`` (tensor -> type), priced as the allocation prices it."""
    return sens.combined(sum(0.0 if pinned(s, pins) else type_costs(s, sens, with_stats)[types[s.name]]
                             for s in specs))


def allocate_budget(src, arch: Architecture, stats: Stats | None, sens: Sensitivity, budget: Budget,
                     pins: TypeRules, prune_kl: Callable[[Pruning], float], stats_path: str | None = None,
                     by_text: Mapping[str, tuple[Sensitivity, Callable[[Pruning], float]]] | None = None) -> Plan:
    """The best plan over the candidate keep counts; a clear error when nothing fits. ``prune_kl`` is the
    predicted KL of a pruning (:mod:`ggufmoe.sensitivity.prune_cost`); ``by_text``: costs fitted on each probe
    text alone, by which the plan also predicts its KL on text like each (``Plan.predicted_by_text``)."""
    best: Plan | None = None
    smallest = smallest_gpu = slowest = None
    candidates = []
    crit = budget.criterion if stats is None or stats.has_routing else Criterion.FREQUENCY
    config_only = not src.has_weights
    with_stats = stats is not None or config_only  # the types that need an importance matrix are allowed
    target = budget.target
    if target.offload and budget.weights_only:
        raise GgufmoeError(f"target {target} fits GPU memory, which a budget of the file alone does not count: "
                           "budget memory (no --weights-only; sweep: --memory-budgets)")
    repack = {} if budget.weights_only else target.repack_types()  # the copies llama.cpp makes, unless file only
    top_ks = [arch.top_k, *top_k_variants(arch)] if budget.top_k_auto else [arch.top_k]
    keeps = [budget.keep] if budget.keep else keep_candidates(arch, stats, config_only)
    shapes = [(keep, k) for keep in keeps for k in top_ks
              if keep <= arch.n_expert and k <= reachable_experts(arch, keep)]
    if not shapes:
        raise GgufmoeError(f"cannot keep {budget.keep} of {arch.n_expert} experts with {arch.top_k} used per token")
    for keep, k in shapes:
        if config_only and keep < arch.n_expert:
            # which experts is decided at conversion, from calibration; placeholders keep the shapes right
            _, top_k = resolve(arch, PruneRequest(keep=keep, top_k=k))
            pruning = _placeholder_kept(arch, Pruning(arch.n_expert, arch.top_k, keep, top_k, crit, 0.5))
        else:
            pruning = choose_experts(arch, stats, PruneRequest(keep=keep, criterion=crit, top_k=k))
        pruned, specs = prune_model(arch, pruning)
        tied = not any(role(s.name) == OUTPUT for s in specs)
        groups = {s.name: options_for(s, sens, pins, with_stats, repack,
                                      placement(s.name, target, tied)) for s in specs}
        first = {name: o[0].qtype for name, o in groups.items()}
        overhead = overhead_bytes(src, pruned, specs, first, pruning, stats, stats_path)
        runtime = runtime_memory(pruned, 0, budget.ctx, budget.kv_type, target=target)
        fixed = (0 if target.offload else overhead) + (0 if budget.weights_only else runtime.total)
        limit = budget.total - fixed
        gpu_limit = target.gpu_memory - runtime.gpu_total if target.offload else None
        active = None
        # runtime memory is not exactly linear in the file (pages, margins), and a speed target caps the bytes a
        # token reads, which the allocation does not see: back off the file's share until both hold
        for _ in range(16):
            try:
                choice, used = allocate(groups, limit, gpu_limit)
            except _TooSmall as e:
                if active is not None and budget.max_active is not None and active > budget.max_active:
                    slowest = _least(slowest, active)  # backed off for speed
                elif e.on_gpu:
                    need = e.needed + (target.gpu_memory - gpu_limit)
                    smallest_gpu = _least(smallest_gpu, need)
                else:
                    need = e.needed + (budget.total - limit)
                    smallest = _least(smallest, need)
                choice = None
                break
            types = {name: o.qtype for name, o in choice.items()}
            writer = planned_output(src, pruned, specs, types, pruning, stats, stats_path).writer
            size, wm = file_bytes(writer), weight_memory(writer, target)
            mem = runtime_memory(pruned, wm.mapped, budget.ctx, budget.kv_type, repacked_bytes=wm.repacked,
                                 gpu_weights_bytes=wm.gpu, target=target)
            over = (size if budget.weights_only else mem.total) - budget.total
            gpu_over = mem.gpu_total - target.gpu_memory if target.offload else 0
            active = active_bytes(specs, types, pruning.top_k)
            slow = active - budget.max_active if budget.max_active is not None else 0
            if over <= 0 and slow <= 0 and gpu_over <= 0:
                break
            faster = -(-slow * size // active) if slow > 0 else 0
            # from what this pass used, not its limit: the allocation moves in whole type steps, so a limit
            # lowered by a few bytes at a time may choose the same types pass after pass
            if target.offload:  # the GPU holds all but the token embedding: a speed target backs off there
                limit = min(limit, used) - max(over, 0)
                gpu_limit -= max(gpu_over, faster, 0)
            else:
                limit = min(limit, used) - max(over, faster)
        else:  # still over after every pass: it needs at least what the last one did
            choice = None
            if over > 0:
                smallest = _least(smallest, budget.total + over)
            elif gpu_over > 0:
                smallest_gpu = _least(smallest_gpu, mem.gpu_total)
            else:
                slowest = _least(slowest, active)
        if choice is None:
            continue
        quant = sens.combined(sum(o.cost for o in choice.values()))
        pcost = prune_kl(pruning)
        on_text = {}
        for text, (s, kl) in (by_text or {}).items():
            q, p = priced(specs, types, pins, s, with_stats), kl(pruning)
            on_text[text] = dict(prune=p, quant=q, total=p + q)
        plan = Plan(source=str(src.path), architecture=arch.gguf_arch, budget=budget.total, ctx=budget.ctx,
                    kv_type=budget.kv_type, weights_only=budget.weights_only, n_expert=arch.n_expert,
                    top_k_source=arch.top_k, keep=keep, top_k=pruning.top_k, criterion=crit, kept=pruning.kept,
                    types={n: t.name for n, t in types.items()},
                    tensor_bytes={s.name: TypedTensor(s, types[s.name]).nbytes for s in specs}, file_bytes=size,
                    memory=_memory_dict(mem, target),
                    predicted_kld=dict(prune=pcost, quant=quant, total=pcost + quant), stats=stats_path,
                    active_bytes=active, target=str(target), predicted_by_text=on_text,
                    costs={s.name: [choice[s.name].cost, sens.exponents.get(s.kind, 1.0)] for s in specs
                           if choice[s.name].cost > 0},
                    joint=list(sens.joint))
        candidates.append(dict(keep=keep, top_k=pruning.top_k, file_bytes=size, active_bytes=active,
                               predicted_kld=plan.predicted_kld["total"]))
        if best is None or plan.predicted_kld["total"] < best.predicted_kld["total"]:
            best, best_specs = plan, specs
    if best is None and slowest is not None:
        raise GgufmoeError(f"no plan within the budget reads at most {format_size(budget.max_active)} per token: "
                           f"the fewest it can is {format_size(slowest)}")
    if best is None and smallest is None and smallest_gpu is not None:
        raise GgufmoeError(f"GPU memory {format_size(target.gpu_memory)} ({target}) is too small: the smallest "
                           f"feasible plan needs {format_size(smallest_gpu)} ({smallest_gpu} bytes) of it")
    if best is None:
        raise GgufmoeError(f"budget {format_size(budget.total)} is too small: the smallest feasible plan needs "
                           f"{format_size(smallest)} ({smallest} bytes)"
                           + (f" of host memory (and {format_size(smallest_gpu)} of GPU memory)" if smallest_gpu
                              else ""))
    best.candidates = candidates
    best.notes = source_notes(best_specs, {n: T[t] for n, t in best.types.items()})
    return best


def _memory_dict(mem: RuntimeMemory, target: Target) -> dict[str, int]:
    """A plan's memory breakdown: host memory, and GPU memory (``gpu_*``) when the target offloads."""
    d = dict(weights=mem.weights, kv_cache=mem.kv_cache, compute=mem.compute, reserve=mem.reserve, total=mem.total)
    if target.offload:
        d.update(gpu_weights=mem.gpu_weights, gpu_kv_cache=mem.gpu_kv_cache, gpu_compute=mem.gpu_compute,
                 gpu_reserve=mem.gpu_reserve, gpu_total=mem.gpu_total)
    return d


def _least(current: int | None, value: int) -> int:
    """The smaller of a running minimum (None: none yet) and ``value``."""
    return value if current is None else min(current, value)


def active_bytes(specs: list[TensorSpec], types: dict[str, T], top_k: int) -> int:
    """Weight bytes one token reads: every tensor, ``top_k`` parts of each routed-experts tensor and one row of
    the token embedding (a lookup)."""
    total = 0
    for s in specs:
        n = TypedTensor(s, types[s.name]).nbytes
        if s.is_expert:
            n = n * top_k // s.n_parts
        elif role(s.name) == EMBEDDING:
            n //= s.shape[0]
        total += n
    return total


def _placeholder_kept(arch: Architecture, pruning: Pruning) -> Pruning:
    groups = arch.expert_groups[0] if arch.expert_groups else 1
    layers = sorted({s.layer for s in arch.tensors() if s.is_expert})
    pruning.kept = {il: choose(np.zeros(arch.n_expert), pruning.keep, groups) for il in layers}
    return pruning

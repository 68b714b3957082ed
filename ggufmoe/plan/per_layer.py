"""Per-layer expert counts: the experts a uniform pruning keeps, spread over the layers by what removing
them costs.

From all experts down, the layer whose next measured keep count adds the least depth-weighted local
pruning error per expert removed gives up experts, until no more are kept in all than ``keep`` in
every layer would (the same bytes: experts of a layer are the same size). The errors are the
streamed calibration's (:mod:`ggufmoe.stats.prune_error`), at the keep counts it measured. On the
reference model this cuts the pruning's KL by 37-57% at 16-20 of 24 kept
(``eval/results/nonuniform_counts.md``). Stock llama.cpp takes one count for all layers: such files
need ``patches/per-layer-expert-count.patch``.
"""

from __future__ import annotations

from dataclasses import replace

from ggufmoe.arch import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.prune.criteria import Pruning, choose, expert_scores, keep_counts, reachable_experts
from ggufmoe.sensitivity.local_costs import depth
from ggufmoe.stats.file import Stats
from ggufmoe.stats.local_errors import local_errors


def spread_counts(errors: dict[int, dict[int, float]], total: int, counts: list[int], n_layers: int) -> dict[int, int]:
    """Keep counts per layer (``errors``: layer -> measured keep count -> relative error) summing to at most
    ``total``: greedy removal, cheapest depth-weighted error per expert removed first."""
    keep = {il: max(counts) for il in errors}
    while sum(keep.values()) > total:
        best = None
        for il in sorted(errors):
            lower = [c for c in counts if c < keep[il] and c in errors[il]]
            if not lower:
                continue
            nxt = max(lower)
            cost = depth(il, n_layers) * (errors[il][nxt] - errors[il].get(keep[il], 0.0)) / (keep[il] - nxt)
            if best is None or cost < best[0]:
                best = (cost, il, nxt)
        if best is None:
            raise GgufmoeError(f"cannot keep {total} experts in all: the calibration measured no lower counts")
        keep[best[1]] = best[2]
    return keep


def spread_experts(arch: Architecture, stats: Stats, plan: Pruning) -> Pruning:
    """``plan`` with its layers keeping different counts, as many experts in all (see the module docstring)."""
    if not plan.kept:
        return plan
    local = local_errors(stats)
    if local is None or not local.prune:
        raise GgufmoeError("per-layer expert counts are chosen from the local pruning errors of the streamed "
                           "`ggufmoe calibrate`; these statistics have none")
    counts = [k for k in keep_counts(arch) if plan.top_k <= reachable_experts(arch, k)]
    errors = {}
    for il in plan.kept:
        measured = local.prune.get(str(il), {}).get(plan.criterion, {})
        errors[il] = {arch.n_expert: 0.0, **{int(k): v for k, v in measured.items() if "@" not in k}}
    per = spread_counts(errors, plan.keep * len(plan.kept), counts, int(arch.n_layer))
    groups = arch.expert_groups[0] if arch.expert_groups else 1
    kept = {il: choose(expert_scores(stats.layers[il], plan.criterion, plan.alpha), per[il], groups)
            for il in plan.kept}
    return replace(plan, kept=kept)

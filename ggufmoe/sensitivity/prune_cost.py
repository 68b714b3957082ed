"""What pruning costs: the predicted KL divergence of a pruning, from the routing mass it removes or from the
local pruning errors (:mod:`ggufmoe.sensitivity.local_costs`), and the pruning probes that scale it.

Routing mass: ``cost = scale * (routing mass removed, averaged over layers)``. Local errors:
``cost = PRUNE_SCALE * (sum over MoE layers of depth(x) * r_prune) ** PRUNE_EXPONENT`` with the reference
model's scale and exponent, or those :func:`fit_pruning` fits through the probes' measured KL.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ggufmoe.prune.criteria import Criterion, Pruning, PruneRequest, keep_counts, prune_key
from ggufmoe.sensitivity.local_costs import Profile, depth
from ggufmoe.stats.file import Stats
from ggufmoe.stats.local_errors import LocalErrors

# Predicted KL per unit of routing mass removed, used when it cannot be measured (no weights).
DEFAULT_PRUNE_SCALE = 1.0
# The reference model's pruning KL per unit of local pruning error (eval/derive_defaults.py)
PRUNE_SCALE, PRUNE_EXPONENT = 0.685168, 0.937


def prune_cost(plan: Pruning, stats: Stats | None, scale: float) -> float:
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


def prune_unit(local: LocalErrors, plan: Pruning, n_layers: int, profile: Profile | None = None) -> float | None:
    """``sum over MoE layers of depth * relative pruning error`` of ``plan``; None when not measured."""
    if not plan.changes:
        return 0.0
    total = 0.0
    key = prune_key(plan.keep, plan.top_k, plan.top_k_source)
    layers = plan.kept or sorted(int(layer) for layer in local.prune)
    if not layers:
        return None
    for il in layers:
        r = local.prune.get(str(il), {}).get(plan.criterion, {}).get(key)
        if r is None:
            return None
        total += depth(il, n_layers, profile) * r
    return total


def local_prune_cost(unit: float, scale: float = PRUNE_SCALE, exponent: float = PRUNE_EXPONENT) -> float:
    """Predicted KL of a pruning whose :func:`prune_unit` is ``unit``."""
    return scale * unit ** exponent if unit > 0 else 0.0


def local_prune_kl(local: LocalErrors, n_layers: int, scale: float, stats: Stats | None,
                   exponent: float = PRUNE_EXPONENT) -> Callable[[Pruning], float]:
    """Predicted KL of a pruning from the local pruning errors (the routing-mass model where none was measured)."""
    def kl(plan: Pruning) -> float:
        unit = prune_unit(local, plan, n_layers)
        if unit is not None:
            return local_prune_cost(unit, scale, exponent)
        if plan.top_k != plan.top_k_source:
            return math.inf  # another top-k that was not measured: never chosen
        return prune_cost(plan, stats, DEFAULT_PRUNE_SCALE)

    return kl


PRUNE_FRACTIONS = (0.75, 0.5)  # experts kept by the pruning probes
# where a sensitivity keeps the fit of the local pruning errors' map to KL (scale, exponent), beside the class scales
PRUNE_LOCAL_KEY, PRUNE_FIT = "prune_local", "prune_local_exponent"


def probe_pruning(arch, has_routing: bool, fraction: float = PRUNE_FRACTIONS[0]) -> PruneRequest:
    """A pruning a probe measures: the keep count of :func:`~ggufmoe.prune.criteria.keep_counts` nearest
    ``fraction`` of the experts, by REAP (frequency without routing statistics)."""
    keep = min(keep_counts(arch), key=lambda k: abs(k - fraction * arch.n_expert))
    return PruneRequest(keep=keep, criterion=Criterion.REAP if has_routing else Criterion.FREQUENCY)


def probe_prunings(arch, has_routing: bool) -> list[PruneRequest]:
    """The pruning probes: one per distinct keep count of :data:`PRUNE_FRACTIONS` that prunes."""
    reqs = {r.keep: r for r in (probe_pruning(arch, has_routing, f) for f in PRUNE_FRACTIONS)}
    return [r for r in reqs.values() if r.keep < arch.n_expert]


def fit_pruning(units: list[float], kls: list[float]) -> tuple[float, float]:
    """(scale, exponent) of ``KL = scale * unit ** exponent`` through the measured points: a log-log line through
    two distinct ones (the exponent kept within 0.5-2), else the reference exponent through one."""
    pts = [(u, k) for u, k in zip(units, kls) if u > 0 and k > 0]
    if len(pts) >= 2 and abs(math.log(pts[-1][0] / pts[0][0])) > 1e-6:
        (u0, k0), (u1, k1) = pts[0], pts[-1]
        exponent = min(2.0, max(0.5, math.log(k1 / k0) / math.log(u1 / u0)))
        scale = math.exp(np.mean([math.log(k) - exponent * math.log(u) for u, k in pts]))
        return scale, exponent
    if pts:
        return pts[0][1] / pts[0][0] ** PRUNE_EXPONENT, PRUNE_EXPONENT
    return PRUNE_SCALE, PRUNE_EXPONENT

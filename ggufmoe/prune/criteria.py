"""Which experts to keep: score experts from calibration statistics, keep the best per layer.

Every layer keeps the same number of experts (llama.cpp has one ``expert_count``) but picks its
own. Kept experts stay in their original order. With DeepSeek-style group routing each group
keeps ``keep / groups`` experts, so groups stay equal and contiguous and group selection is
unchanged for the kept experts; a ``keep`` that is not a multiple of the group count is refused
(the error names the nearest valid counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable

import numpy as np

from ggufmoe.arch import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.stats.file import ExpertStats, Stats



class Criterion(StrEnum):
    """How experts are scored: how often routed to, ``alpha * frequency + (1 - alpha) * mean routing weight``,
    or REAP saliency (routing weight times output norm)."""

    FREQUENCY = "frequency"
    ROUTING = "routing"
    REAP = "reap"


# The default everywhere (--keep, plan, convert --budget, sweep): on the reference model routing is the best or
# tied-best criterion at every keep ratio measured (eval/results/prune.md: KL 0.287 vs 0.497 frequency and 0.565
# REAP at half the experts), and it needs only routing statistics.
DEFAULT_CRITERION = Criterion.ROUTING
MIN_KEEP_RATIO = 0.5  # pruning more than half the experts never paid on the reference model
MAX_KEEP_CANDIDATES = 13  # keep counts tried (evenly spread between all and half when there are more)


@dataclass
class PruneRequest:
    """What the user asked for; ``keep``/``keep_ratio`` None keeps all experts."""

    keep: int | None = None
    keep_ratio: float | None = None
    criterion: Criterion = DEFAULT_CRITERION
    alpha: float = 0.5
    top_k: int | None = None
    top_k_scale: float | None = None
    merge: bool = False  # fold the removed experts into the kept ones (ggufmoe.prune.merge)
    per_layer: bool = False  # the same total kept, spread over the layers by measured errors (ggufmoe.plan.per_layer)

    @property
    def asks(self) -> bool:
        """Whether it asks for any pruning, merging or top-k change."""
        return bool(self.merge or self.per_layer or self.keep or self.keep_ratio or self.top_k or self.top_k_scale)


@dataclass
class Pruning:
    """Experts kept per MoE layer (original indices, new order) and experts used per token."""

    n_expert: int
    top_k_source: int
    keep: int
    top_k: int
    criterion: str
    alpha: float
    kept: dict[int, list[int]] = field(default_factory=dict)
    # merging (ggufmoe.prune.merge): per layer, per kept expert, the (source expert, weight) pairs it averages
    folds: dict[int, list[list[tuple[int, float]]]] = field(default_factory=dict)
    # layers that route by a token -> experts table (ggufmoe.prune.redirect): per expert, every expert from the
    # most to the least similar, where a removed expert's entries go
    orders: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def prunes(self) -> bool:
        return self.keep < self.n_expert

    @property
    def per_layer(self) -> dict[int, int] | None:
        """Experts kept per layer when layers keep different counts (else None)."""
        counts = {il: len(k) for il, k in self.kept.items()}
        return counts if len(set(counts.values())) > 1 else None

    @property
    def changes(self) -> bool:
        return self.prunes or self.top_k != self.top_k_source


def normalised(x: np.ndarray) -> np.ndarray:
    total = float(np.sum(x))
    return x / total if total > 0 else np.zeros_like(x, dtype=np.float64)


def expert_scores(s: ExpertStats, criterion: Criterion, alpha: float) -> np.ndarray:
    """Higher is more useful. ``routing`` is alpha * frequency + (1 - alpha) * mean routing weight,
    each normalised over the layer's experts; ``reap`` is the REAP saliency."""
    if criterion == Criterion.FREQUENCY:
        return s.frequency
    if criterion == Criterion.ROUTING:
        return alpha * normalised(s.frequency) + (1 - alpha) * normalised(s.mean_routing)
    if criterion == Criterion.REAP:
        return s.reap
    raise GgufmoeError(f"unknown criterion {criterion!r} (choose from {', '.join(Criterion)})")


def choose(scores: np.ndarray, keep: int, groups: int = 1) -> list[int]:
    """The ``keep`` best experts in original order; with groups, ``keep / groups`` from each group."""
    n = len(scores)
    size, per_group = n // groups, keep // groups
    kept: list[int] = []
    for g in range(groups):
        members = np.arange(g * size, (g + 1) * size)
        order = np.argsort(-scores[members], kind="stable")  # ties: lower index first
        kept += sorted(members[order[:per_group]].tolist())
    return kept


def resolve(arch: Architecture, req: PruneRequest) -> tuple[int, int]:
    """(experts kept, experts used per token) for a request, checked against the model."""
    n, k = arch.n_expert, arch.top_k
    if req.keep is not None and req.keep_ratio is not None:
        raise GgufmoeError("give --keep or --keep-ratio, not both")
    keep = n if req.keep is None and req.keep_ratio is None else (
        req.keep if req.keep is not None else round(req.keep_ratio * n))
    if not 1 <= keep <= n:
        raise GgufmoeError(f"cannot keep {keep} of {n} experts")
    if req.top_k is not None and req.top_k_scale is not None:
        raise GgufmoeError("give --top-k or --top-k-scale, not both")
    top_k = req.top_k if req.top_k is not None else (math.ceil(req.top_k_scale * k - 1e-9) if req.top_k_scale else k)
    if top_k != k and arch.top_k_fixed:
        raise GgufmoeError(f"top-k {top_k}: the model's {k} experts per token cannot change: {arch.top_k_fixed}")
    groups = arch.expert_groups
    if groups and keep % groups[0]:
        n_group = groups[0]
        lo, hi = keep // n_group * n_group, (keep // n_group + 1) * n_group
        raise GgufmoeError(f"--keep {keep}: the model routes through {n_group} expert groups, so the kept "
                           f"count must be a multiple of {n_group} (e.g. {lo or hi} or {hi})")
    reachable = reachable_experts(arch, keep)
    if not 1 <= top_k <= reachable:
        raise GgufmoeError(f"top-k {top_k} is impossible with {keep} experts kept (at most {reachable} reachable)")
    return keep, top_k


def reachable_experts(arch: Architecture, keep: int) -> int:
    """Experts a token can reach with ``keep`` kept per layer: those of the groups it may use."""
    if arch.expert_groups:
        n_group, used = arch.expert_groups
        return used * keep // n_group
    return keep


def top_k_variants(arch: Architecture) -> list[int]:
    """Experts per token the planner may use besides the model's own (``--top-k auto``): one fewer, one more."""
    return [] if arch.top_k_fixed else [t for t in (arch.top_k - 1, arch.top_k + 1) if t >= 1]


def prune_key(keep: int, top_k: int, top_k_source: int) -> str:
    """How the local pruning errors name a candidate: the keep count, and ``@top_k`` when top-k changes."""
    return str(keep) if top_k == top_k_source else f"{keep}@{top_k}"


def choose_experts(arch: Architecture, stats: Stats | None, req: PruneRequest) -> Pruning:
    keep, top_k = resolve(arch, req)
    plan = Pruning(arch.n_expert, arch.top_k, keep, top_k, req.criterion, req.alpha)
    if not plan.prunes:
        return plan
    if stats is None:
        raise GgufmoeError("pruning needs calibration statistics: pass --stats (from `ggufmoe calibrate`)")
    if req.criterion != Criterion.FREQUENCY and not stats.has_routing:
        raise GgufmoeError(f"criterion {req.criterion!r} needs routing statistics from `ggufmoe calibrate`; "
                           "a llama.cpp imatrix only supports --criterion frequency")
    moe_layers = sorted({s.layer for s in arch.tensors() if s.is_expert})
    groups = arch.expert_groups[0] if arch.expert_groups else 1
    for il in moe_layers:
        layer = stats.layers.get(il)
        if layer is None or len(layer.counts) != arch.n_expert:
            raise GgufmoeError(f"the statistics do not match this model (layer {il}: "
                               f"{'missing' if layer is None else f'{len(layer.counts)} experts'})")
        plan.kept[il] = choose(expert_scores(layer, req.criterion, req.alpha), keep, groups)
    return plan


def keep_counts(arch: Architecture) -> list[int]:
    """The keep counts worth trying: each multiple of the expert-group count from all experts down to
    half, at most :data:`MAX_KEEP_CANDIDATES` of them, each leaving ``top_k`` experts reachable."""
    n = arch.n_expert
    groups = arch.expert_groups[0] if arch.expert_groups else 1
    steps = list(range(n, max(groups, math.ceil(MIN_KEEP_RATIO * n / groups) * groups) - 1, -groups))
    if len(steps) > MAX_KEEP_CANDIDATES:
        steps = [steps[i] for i in np.linspace(0, len(steps) - 1, MAX_KEEP_CANDIDATES).round().astype(int)]
    return [k for k in steps if arch.top_k <= reachable_experts(arch, k)]


def kept_sets(arch: Architecture, alpha: float = 0.5) -> Callable[[ExpertStats], dict[str, dict[str, tuple]]]:
    """For one layer's statistics: per criterion, per :func:`prune_key`, (experts kept, experts per token) of
    every candidate the planner weighs (each keep count, at the model's top-k and its :func:`top_k_variants`):
    what the streamed calibration measures pruning errors for (:mod:`ggufmoe.stats.prune_error`)."""
    n, k = arch.n_expert, arch.top_k
    groups = arch.expert_groups[0] if arch.expert_groups else 1
    candidates = [(keep, t) for keep in keep_counts(arch) for t in [k, *top_k_variants(arch)]
                  if (keep, t) != (n, k) and t <= reachable_experts(arch, keep)]

    def sets(layer: ExpertStats) -> dict[str, dict[str, tuple]]:
        return {c: {prune_key(keep, t, k): (choose(expert_scores(layer, c, alpha), keep, groups), t)
                    for keep, t in candidates} for c in Criterion}

    return sets

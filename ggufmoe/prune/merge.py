"""Expert merging: instead of dropping the experts a pruning removes, fold each into the kept expert it
most resembles.

Resemblance is measured in the streamed calibration on sampled tokens
(:meth:`ggufmoe.stats.prune_error.PruneProbe.similarity`: the mean of the cosine of two experts'
outputs and of their router logits). Each removed expert joins the most similar kept expert of its
own routing group (so DeepSeek-style groups stay intact); a kept expert becomes the average of
itself and the experts it absorbed, weighted by the pruning criterion's score (frequency, routing
score or REAP saliency; an expert that never scores adds nothing). Routers keep the kept experts'
rows as they are, so the file stays a stock GGUF that routes like the dropped one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ggufmoe.arch import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.prune.criteria import Pruning, expert_scores
from ggufmoe.stats.file import Stats
from ggufmoe.stats.local_errors import local_errors

# Per kept expert, in kept order: (source expert, weight) pairs whose weights sum to 1.
Folds = list[list[tuple[int, float]]]


def fold(kept: list[int], similarity: np.ndarray, saliency: np.ndarray, groups: int = 1) -> Folds:
    """Each expert not in ``kept`` joins the most similar kept expert of its group (ties: the lower index);
    each kept expert's weights are the members' saliencies, normalised (itself alone when they are all 0)."""
    n = len(saliency)
    size = n // groups
    members: dict[int, list[int]] = {k: [k] for k in kept}
    for r in range(n):
        if r in members:
            continue
        same = [k for k in kept if k // size == r // size]
        members[max(same, key=lambda k: (similarity[r, k], -k))].append(r)
    out: Folds = []
    for k in kept:
        w = np.clip(np.array([saliency[j] for j in members[k]], dtype=np.float64), 0.0, None)
        if w.sum() <= 0:
            out.append([(k, 1.0)])
            continue
        w /= w.sum()
        out.append([(j, float(x)) for j, x in zip(members[k], w) if x > 0])
    return out


def merge_experts(arch: Architecture, stats: Stats, plan: Pruning) -> Pruning:
    """``plan`` with every MoE layer's removed experts folded into its kept ones (:attr:`Pruning.folds`)."""
    if not plan.prunes:
        return plan
    local = local_errors(stats)
    if local is None or not local.similarity:
        raise GgufmoeError("merging needs expert similarities, which the streamed `ggufmoe calibrate` measures "
                           "with its local errors; these statistics have none (calibrate again, without --whole)")
    groups = arch.expert_groups[0] if arch.expert_groups else 1
    folds = {}
    for il, kept in plan.kept.items():
        sim = local.similarity.get(str(il))
        if sim is None:
            raise GgufmoeError(f"the statistics have no expert similarities for layer {il}")
        saliency = expert_scores(stats.layers[il], plan.criterion, plan.alpha)
        folds[il] = fold(kept, np.asarray(sim), np.asarray(saliency), groups)
    return replace(plan, folds=folds)

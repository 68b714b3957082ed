"""Where a pruned layer's token -> experts table (DeepSeek-V4's hash routing) sends the entries of removed experts
(:mod:`ggufmoe.model.expert_table`): to the most similar kept expert, by the expert similarities the streamed
calibration measures on the layer's real tokens (the mean of the cosines of two experts' outputs and of their
router logits) where the statistics have them, else by the cosine of the experts' weights.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ggufmoe.model.expert_table import ranking, weight_similarity
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.prune.criteria import Pruning
from ggufmoe.stats.file import Stats
from ggufmoe.stats.local_errors import local_errors


def table_layers(specs: list[TensorSpec]) -> dict[int, TensorSpec]:
    """Layer -> its token -> experts table, for the layers that route by one."""
    return {s.layer: s for s in specs if s.holds_expert_ids}


def with_table_orders(specs: list[TensorSpec], stats: Stats | None, plan: Pruning) -> Pruning:
    """``plan`` with the redirection order of every pruned layer that routes by a table (:attr:`Pruning.orders`):
    from the calibration's expert similarities where the statistics have them, else from the experts' weights."""
    tables = {il: s for il, s in table_layers(specs).items() if il in plan.kept and il not in plan.orders}
    if not tables or not plan.prunes:
        return plan
    local = local_errors(stats) if stats is not None else None
    orders = dict(plan.orders)
    for il in tables:
        measured = local.similarity.get(str(il)) if local is not None else None
        experts = [s for s in specs if s.layer == il and s.is_expert]
        orders[il] = ranking(np.asarray(measured) if measured is not None else weight_similarity(experts))
    return replace(plan, orders=orders)

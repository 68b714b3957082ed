"""Token -> experts tables (DeepSeek-V4's hash routing) of a pruned layer: entries of removed experts redirected.

A layer that routes by a fixed table (``tid2eid``: per vocabulary token, the experts it uses) cannot drop an
expert by cutting router rows: every token whose row names a removed expert must be sent elsewhere. Each such
entry goes to the kept expert most similar to the removed one that the token's row does not hold already, so a
token keeps as many distinct experts as before. Kept entries are renumbered to their positions among the kept
experts, as the pruned file numbers them. Which similarity: :mod:`ggufmoe.prune.redirect`.
"""

from __future__ import annotations

import numpy as np

from ggufmoe.model.tensor import TensorSpec


def ranking(similarity: np.ndarray) -> np.ndarray:
    """(experts, experts): for each expert, every expert from the most to the least similar (ties: lower index)."""
    sim = np.asarray(similarity, dtype=np.float64)
    return np.argsort(-sim, axis=1, kind="stable")


def weight_similarity(experts: list[TensorSpec]) -> np.ndarray:
    """(experts, experts) cosines of the experts' weights, all of ``experts`` (one layer's gate, up and down)
    concatenated, one expert at a time."""
    n = experts[0].n_parts
    rows = [np.concatenate([s.load(e).astype(np.float64).reshape(-1) for s in experts]) for e in range(n)]
    unit = np.stack([r / max(np.linalg.norm(r), 1e-300) for r in rows])
    return unit @ unit.T


def redirected(table: np.ndarray, kept: list[int], order: np.ndarray) -> np.ndarray:
    """``table`` (tokens, experts per token; source expert ids) for a layer keeping ``kept``: each entry of a removed
    expert replaced by the first expert in its ``order`` row (:func:`ranking`) that is kept and not in the token's row
    yet, then every entry renumbered to its expert's position in ``kept``."""
    out = np.array(table, dtype=np.int64)
    is_kept = np.zeros(order.shape[0], dtype=bool)
    is_kept[kept] = True
    for e in np.flatnonzero(~is_kept):
        rows, cols = np.nonzero(out == e)
        for c in order[e][is_kept[order[e]]]:
            if not len(rows):
                break
            free = ~(out[rows] == c).any(axis=1)
            out[rows[free], cols[free]] = c
            rows, cols = rows[~free], cols[~free]
    position = np.full(order.shape[0], -1, dtype=np.int64)
    position[kept] = np.arange(len(kept))
    return position[out]

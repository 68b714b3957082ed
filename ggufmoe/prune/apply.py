"""Pruning applied: the tensor list of the pruned model, with routers, routing biases and expert
tensors kept consistent, and the provenance keys that record it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import gguf
import numpy as np

from ggufmoe.arch import Architecture
from ggufmoe.model.names import EXPERT_TENSORS
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.prune.criteria import Pruning
from ggufmoe.prune.merge import Folds
from ggufmoe.model.expert_table import ranking, redirected, weight_similarity

# provenance keys (write_provenance)
KEY_SOURCE = "ggufmoe.source"
KEY_EXPERT_COUNT_SOURCE = "ggufmoe.prune.expert_count_source"


def prune_model(arch: Architecture, plan: Pruning) -> tuple[Architecture, list[TensorSpec]]:
    """The pruned model: an architecture that writes the new expert counts (``arch`` itself is left
    as it is) and its tensor list, with expert parts and per-expert rows (routers, routing biases)
    gathered."""
    per_layer = plan.per_layer
    pruned = arch.with_expert_counts(max(per_layer.values()) if per_layer else plan.keep, plan.top_k, per_layer)
    specs = list(pruned.tensors())
    if not plan.prunes:
        return pruned, specs
    out = []
    for s in specs:
        kept = plan.kept.get(s.layer) if s.layer is not None else None
        folds = plan.folds.get(s.layer) if s.layer is not None else None
        if kept is None:
            out.append(s)
        elif s.holds_expert_ids:
            out.append(_redirected_table(s, kept, plan.orders.get(s.layer), [t for t in specs if t.layer == s.layer]))
        elif s.is_expert and folds:
            out.append(replace(s, shape=(len(kept), *s.shape[1:]), n_parts=len(kept), load=_folded_parts(s.load, folds),
                               raw=None, source_type=None, expert_ids=tuple(kept)))
        elif s.is_expert:
            out.append(replace(s, shape=(len(kept), *s.shape[1:]), n_parts=len(kept), load=_parts(s.load, kept),
                               raw=_parts(s.raw, kept) if s.raw else None, expert_ids=tuple(kept)))
        elif arch.rows_are_experts(s.parsed) and folds and s.parsed.tensor in EXPERT_TENSORS:
            # an expert's own bias (gpt-oss) or scale (Gemma 4) is folded with its matrices; router rows stay as kept
            out.append(replace(s, shape=(len(kept), *s.shape[1:]), load=_folded_rows(s.load, folds), raw=None,
                               source_type=None))
        elif arch.rows_are_experts(s.parsed):
            out.append(replace(s, shape=(len(kept), *s.shape[1:]), load=_rows(s.load, kept),
                               raw=_raw_rows(s.raw, kept, s.shape[0]) if s.raw else None))
        else:
            out.append(s)
    return pruned, out


def _redirected_table(s: TensorSpec, kept: list[int], order: np.ndarray | None,
                      layer: list[TensorSpec]) -> TensorSpec:
    """A token -> experts table with removed experts' entries redirected and every entry renumbered
    (:mod:`ggufmoe.prune.redirect`; without an order from the statistics, by the experts' weights)."""
    experts = [t for t in layer if t.is_expert]

    def table() -> np.ndarray:
        o = order if order is not None else ranking(weight_similarity(experts))
        return redirected(s.raw(0).view("<i4").reshape(s.shape), kept, o).astype("<i4")

    return replace(s, load=lambda _: table().astype(np.float32), raw=lambda _: table().view(np.uint8).reshape(-1))


def _folded_parts(load: Callable[[int], np.ndarray], folds: Folds) -> Callable[[int], np.ndarray]:
    """Part ``i``: the weighted average of its fold's source experts."""
    def part(i: int) -> np.ndarray:
        return sum(w * load(j) for j, w in folds[i])

    return part


def _folded_rows(load: Callable[[int], np.ndarray], folds: Folds) -> Callable[[int], np.ndarray]:
    def rows(i: int) -> np.ndarray:
        t = load(i)
        return np.stack([sum(w * t[j] for j, w in fold) for fold in folds])

    return rows


def _parts(load: Callable[[int], Any], kept: list[int]) -> Callable[[int], Any]:
    return lambda i: load(kept[i])


def _rows(load: Callable[[int], np.ndarray], kept: list[int]) -> Callable[[int], np.ndarray]:
    return lambda i: load(i)[kept]


def _raw_rows(raw: Callable[[int], np.ndarray], kept: list[int], n_rows: int) -> Callable[[int], np.ndarray]:
    """Rows of stored bytes: every row is whole blocks, so a row of any type is a slice of bytes."""
    return lambda i: raw(i).reshape(n_rows, -1)[kept].reshape(-1)


def write_provenance(w: gguf.GGUFWriter, source: str, plan: Pruning) -> None:
    """``ggufmoe.*`` keys: where the file comes from and which experts it kept."""
    w.add_string(KEY_SOURCE, source)
    if not plan.changes:
        return
    w.add_uint32(KEY_EXPERT_COUNT_SOURCE, plan.n_expert)
    w.add_uint32("ggufmoe.prune.expert_used_count_source", plan.top_k_source)
    w.add_uint32("ggufmoe.prune.keep", plan.keep)
    w.add_uint32("ggufmoe.prune.expert_used_count", plan.top_k)
    if not plan.prunes:
        return
    w.add_string("ggufmoe.prune.criterion", plan.criterion)
    if plan.folds:
        w.add_bool("ggufmoe.prune.merged", True)
    w.add_float32("ggufmoe.prune.alpha", plan.alpha)
    for il, kept in sorted(plan.kept.items()):
        w.add_array(f"ggufmoe.prune.kept.{il}", kept)

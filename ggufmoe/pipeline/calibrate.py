"""``ggufmoe calibrate`` (and the calibration of ``convert --budget`` and ``sweep``): the streamed statistics
with the local errors, and the pruning errors of the candidate prunings the planner will weigh."""

from __future__ import annotations

from pathlib import Path

from ggufmoe.arch import architecture_for
from ggufmoe.prune.criteria import kept_sets
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.file import Stats
from ggufmoe.stats.stream import stream_stats


def calibrate(src: str | Path, text: str, **kw) -> Stats:
    """:func:`ggufmoe.stats.stream.stream_stats` (``kw`` its options), measuring what pruning each MoE layer to
    each of :func:`ggufmoe.prune.criteria.keep_counts` by each criterion changes."""
    arch = architecture_for(HFSource(Path(src)))
    return stream_stats(src, text, kept_sets=kept_sets(arch), **kw)

"""``ggufmoe calibrate`` (and the calibration of ``convert --budget`` and ``sweep``): the streamed statistics
with the local errors, and the pruning errors of the candidate prunings the planner will weigh.

One piece of the text in :data:`~ggufmoe.stats.text.HOLD_OUT_EVERY` is left out (:func:`~ggufmoe.stats.text.hold_out`):
``plan`` measures its probes on those pieces of the same text, which the statistics did not see."""

from __future__ import annotations

from pathlib import Path

from ggufmoe.arch import architecture_for
from ggufmoe.prune.criteria import kept_sets
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.file import Stats
from ggufmoe.stats.text import hold_out


def calibrate(src: str | Path, text: str, *, whole: bool = False, **kw) -> Stats:
    """:func:`ggufmoe.stats.stream.stream_stats` (``kw`` its options) on the text less its held-out pieces,
    measuring what pruning each MoE layer to each of :func:`ggufmoe.prune.criteria.keep_counts` by each criterion
    changes. ``whole``: :func:`ggufmoe.stats.collect.collect_stats` instead, the whole model in transformers."""
    text = hold_out(text).calibration
    if whole:
        from ggufmoe.stats.collect import collect_stats

        return collect_stats(src, text, **kw)
    from ggufmoe.stats.stream import stream_stats  # torch and transformers: only when calibrating

    arch = architecture_for(HFSource(Path(src)))
    return stream_stats(src, text, kept_sets=kept_sets(arch), **kw)

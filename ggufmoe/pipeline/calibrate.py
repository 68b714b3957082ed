"""``ggufmoe calibrate`` (and the calibration of ``convert --budget`` and ``sweep``): the streamed statistics
with the local errors, the pruning errors of the candidate prunings the planner will weigh, and the end-to-end probes
a model too big to probe through llama.cpp is planned from.

One piece of the text in :data:`~ggufmoe.stats.text.HOLD_OUT_EVERY` is left out (:func:`~ggufmoe.stats.text.hold_out`):
the probes (streamed here, or ``plan``'s through llama.cpp) run on those pieces of the same text, which the statistics
did not see, and on any other texts given."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ggufmoe.sensitivity.cost import PROBE_CHUNKS
from ggufmoe.stats.file import Stats
from ggufmoe.stats.text import hold_out

if TYPE_CHECKING:
    from ggufmoe.pipeline.distributed import Cluster


def calibrate(src: str | Path, text: str, *, whole: bool = False, probes: bool | None = None,
              probe_texts: dict[str, str] | None = None, probe_chunks: int = PROBE_CHUNKS,
              cluster: Cluster | None = None, **kw) -> Stats:
    """:func:`ggufmoe.stats.stream.stream_stats` (``kw`` its options) on the text less its held-out pieces,
    measuring what pruning each MoE layer to each of :func:`ggufmoe.prune.criteria.keep_counts` by each criterion
    changes. ``whole``: :func:`ggufmoe.stats.collect.collect_stats` instead, the whole model in transformers.

    ``probes``: carry the streamed probes (:func:`~ggufmoe.sensitivity.probe_set.probe_request`) on ``probe_chunks``
    chunks of the held-out pieces and of each of ``probe_texts`` (name -> text); None: only for a model too big to
    probe through llama.cpp (:func:`~ggufmoe.sensitivity.probe_set.too_big_to_probe`), or when texts are given.

    ``cluster``: the chunks split into shares streamed on its workers
    (:func:`~ggufmoe.pipeline.streamed_calibration.calibrate_shares`)."""
    held = hold_out(text)
    if whole:
        from ggufmoe.stats.collect import collect_stats

        return collect_stats(src, held.calibration, **kw)
    from ggufmoe.pipeline.streamed_calibration import calibrate_streamed  # torch and transformers: only now

    return calibrate_streamed(src, held, probes, probe_texts, probe_chunks, cluster, kw)

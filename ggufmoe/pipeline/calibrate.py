"""``ggufmoe calibrate`` (and the calibration of ``convert --budget`` and ``sweep``): the streamed statistics
with the local errors, the pruning errors of the candidate prunings the planner will weigh, and the end-to-end probes
a model too big to probe through llama.cpp is planned from.

One piece of the text in :data:`~ggufmoe.stats.text.HOLD_OUT_EVERY` is left out (:func:`~ggufmoe.stats.text.hold_out`):
the probes (streamed here, or ``plan``'s through llama.cpp) run on those pieces of the same text, which the statistics
did not see, and on any other texts given."""

from __future__ import annotations

import sys
from pathlib import Path

from ggufmoe.arch import architecture_for
from ggufmoe.prune.criteria import kept_sets
from ggufmoe.sensitivity.cost import PROBE_CHUNKS
from ggufmoe.sensitivity.probe_set import probe_request, too_big_to_probe
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.file import Stats
from ggufmoe.stats.text import CALIB_CTX, hold_out

HELD_OUT = "held-out calibration text"  # the name of the text the probes hold out of the calibration text


def calibrate(src: str | Path, text: str, *, whole: bool = False, probes: bool | None = None,
              probe_texts: dict[str, str] | None = None, probe_chunks: int = PROBE_CHUNKS, **kw) -> Stats:
    """:func:`ggufmoe.stats.stream.stream_stats` (``kw`` its options) on the text less its held-out pieces,
    measuring what pruning each MoE layer to each of :func:`ggufmoe.prune.criteria.keep_counts` by each criterion
    changes. ``whole``: :func:`ggufmoe.stats.collect.collect_stats` instead, the whole model in transformers.

    ``probes``: carry the streamed probes (:func:`~ggufmoe.sensitivity.probe_set.probe_request`) on ``probe_chunks``
    chunks of the held-out pieces and of each of ``probe_texts`` (name -> text); None: only for a model too big to
    probe through llama.cpp (:func:`~ggufmoe.sensitivity.probe_set.too_big_to_probe`), or when texts are given."""
    held = hold_out(text)
    if whole:
        from ggufmoe.stats.collect import collect_stats

        return collect_stats(src, held.calibration, **kw)
    from ggufmoe.stats.hf_model import load_tokenizer
    from ggufmoe.stats.stream import stream_stats  # torch and transformers: only when calibrating

    arch = architecture_for(HFSource(Path(src)))
    if probes is None:
        probes = bool(probe_texts) or too_big_to_probe(arch)
        if probes and not probe_texts and not held.probes.strip():
            print("warning: the calibration text is too short to hold pieces out of it: no streamed probes (the plan "
                  "will rest on the local errors alone); pass --probe-text FILE", file=sys.stderr)
            probes = False
    request = None
    if probes:
        texts = {HELD_OUT: held.probes, **(probe_texts or {})}
        request = probe_request(arch, load_tokenizer(Path(src)), texts, kw.get("ctx", CALIB_CTX), probe_chunks)
    return stream_stats(src, held.calibration, kept_sets=kept_sets(arch), probes=request, **kw)

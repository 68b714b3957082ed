"""The sensitivity cached in the stats file it was measured with.

The result is stored in the stats file as the JSON string key ``ggufmoe.sensitivity`` (:data:`KEY`),
with a key hashing the source (config, checkpoint file names and sizes), the statistics, the text,
the method and its parameters; a later call finds it at once (:func:`cached_sensitivity`). The file stays a valid
llama.cpp imatrix. Measuring when nothing is cached: :func:`ggufmoe.pipeline.measure.load_or_measure`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.source.fingerprint import fingerprint, model_files
from ggufmoe.model.qtypes import CANDIDATES
from ggufmoe.sensitivity.cost import METHOD_VERSION, Sensitivity
from ggufmoe.source.gguf_file import has_magic
from ggufmoe.stats.file import Stats, save_stats
from ggufmoe.stats.opened import OpenedModel

KEY = "ggufmoe.sensitivity"  # stats-file key holding the cached result (JSON)


def source_fingerprint(src_dir: str | Path) -> str:
    """The checkpoint's files (:func:`ggufmoe.source.fingerprint.fingerprint`)."""
    return fingerprint(model_files(src_dir))


def stats_fingerprint(stats: Stats) -> str:
    h = hashlib.sha256()
    for name in sorted(stats.imatrix.entries):
        e = stats.imatrix.entries[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(e.in_sum2, np.float32).tobytes())
        h.update(np.ascontiguousarray(e.counts, np.float32).tobytes())
    for il in sorted(stats.layers):
        h.update(f"{il}:{stats.layers[il].n_tokens}".encode())
        h.update(np.asarray(stats.layers[il].counts, np.float32).tobytes())
    return h.hexdigest()


def _params(kw: dict) -> dict:
    """The measuring parameters that change the result (JSON-able)."""
    def plain(v):
        return v.name if isinstance(v, T) else [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
    return {k: plain(v) for k, v in sorted(kw.items()) if k != "uniform_types"}


def _cache_key(src_dir, stats: Stats, kw: dict) -> str:
    parts = dict(source=source_fingerprint(src_dir), stats=stats_fingerprint(stats), params=_params(kw),
                 candidates=[t.name for t in CANDIDATES], method=METHOD_VERSION, llama_cpp=version("llama_cpp_python"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


def cached_sensitivity(model: OpenedModel, text: str | None, **kw) -> Sensitivity | None:
    """The sensitivity stored with ``model``'s statistics if it was measured on this source, these statistics,
    this text (any text when None) and with these parameters (``kw`` of
    :func:`ggufmoe.pipeline.measure.measure_sensitivity`)."""
    raw = model.stats.extras.get(KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        if d.get("key") != _cache_key(model.path, model.stats, kw) or \
                (text is not None and d.get("text") != _text_hash(text)):
            return None
        return Sensitivity.from_dict(d["sensitivity"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # damaged or from another version: measure again


def store(model: OpenedModel, text: str, sens: Sensitivity, **kw) -> None:
    """Cache ``sens`` (measured on ``text`` with ``kw``) with ``model``'s statistics and write them to their file
    (a ``.dat`` imatrix cannot hold it)."""
    if not has_magic(model.stats_path, "stats"):
        return
    model.stats.extras[KEY] = json.dumps(dict(key=_cache_key(model.path, model.stats, kw), text=_text_hash(text),
                                              sensitivity=asdict(sens)))
    save_stats(model.stats, model.stats_path)

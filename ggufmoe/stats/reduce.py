"""The statistics of a text from those of its shares (``calibrate --ray``: each worker streams some of the chunks):
every importance sum, count and routing sum added up, exactly what one pass over all the chunks sums; the local errors
each share measured for its own layers put together."""

from __future__ import annotations

import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.stats.file import ExpertStats, Stats
from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry
from ggufmoe.stats.local_errors import KEY as LOCAL_KEY, LocalErrors


def summed(parts: list[Stats]) -> Stats:
    """The statistics of all the tokens of ``parts`` (each of other tokens of one model). Entries and routing are
    added (float64, stored float32 as a single pass stores them); the local errors are those of every part (each
    measures some layers); the rest measured beside them (probes: :attr:`Stats.extras`) comes from the first part."""
    if not parts:
        raise GgufmoeError("no shares of statistics to add up")
    first = parts[0]
    names = first.imatrix.entries.keys()
    if any(p.imatrix.entries.keys() != names or p.layers.keys() != first.layers.keys() for p in parts):
        raise GgufmoeError("the shares of a calibration hold statistics of different tensors")

    def total(get) -> np.ndarray:
        return np.sum([np.asarray(get(p), np.float64) for p in parts], axis=0)

    entries = {n: ImatrixEntry(total(lambda p: p.imatrix.entries[n].in_sum2).astype(np.float32),
                               total(lambda p: p.imatrix.entries[n].counts).astype(np.float32)) for n in names}
    layers = {il: ExpertStats(total(lambda p: p.layers[il].counts), total(lambda p: p.layers[il].weight_mass),
                              total(lambda p: p.layers[il].reap_sum), sum(p.layers[il].n_tokens for p in parts))
              for il in first.layers}
    imatrix = Imatrix(entries, first.imatrix.datasets, sum(p.imatrix.chunk_count for p in parts),
                      first.imatrix.chunk_size)
    extras = dict(first.extras)
    measured = [e for p in parts if LOCAL_KEY in p.extras and (e := LocalErrors.from_json(p.extras[LOCAL_KEY]))]
    if measured:
        for other in measured[1:]:
            measured[0].update(other)
        extras[LOCAL_KEY] = measured[0].to_json()
    return Stats(imatrix, layers, first.source, all(p.has_routing for p in parts), extras)

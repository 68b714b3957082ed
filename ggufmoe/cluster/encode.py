"""``convert --ray``: the pieces of a conversion quantized on a Ray cluster's workers, written here in order.

Each worker opens the source at the same path (a shared filesystem) and makes the same conversion from the same
options (:func:`ggufmoe.pipeline.convert.prepare`, once per worker process); it is handed plain references to pieces
(:class:`~ggufmoe.pipeline.pieces.PieceRef`, small ones batched into one task) and sends back their bytes. This process
writes them in file order, with at most ``max_in_flight`` bytes of output asked for and not yet written. A task whose
worker dies is run again by Ray (the same bytes: quantization is deterministic); resuming is the writer's, as in a
local conversion."""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ggufmoe.cluster.session import RETRIES, RaySession
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.finite import NonFinite
from ggufmoe.pipeline.convert import ConvertOptions, prepare
from ggufmoe.pipeline.pieces import Conversion, PieceRef, encode, piece_refs, read_piece
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.rounded_store import RoundedStore
from ggufmoe.quant.rules import TypedTensor
from ggufmoe.stats.opened import OpenedModel

TASK_BYTES = 16 << 20  # float32 input a task reads at least (small pieces batched up to it)
MAX_IN_FLIGHT = 1 << 30  # output bytes asked for and not yet written


@dataclass(frozen=True)
class Job:
    """What a worker needs to make the conversion's pieces: the source's path and the options (no cluster)."""

    key: str
    source: str
    opts: ConvertOptions
    rounded: Path | None


def job_of(conv: Conversion) -> Job:
    """``conv`` as a worker makes it: every path absolute (a worker's directory is not this one)."""
    opts = conv.opts
    absolute = {k: getattr(opts, k).resolve() for k in ("imatrix", "stats", "out") if getattr(opts, k) is not None}
    here = replace(opts, cluster=None, plan=None, progress=False, **absolute)
    return Job(uuid.uuid4().hex, str(conv.source.resolve()), here, conv.rounded.path.resolve() if conv.rounded else None)


_JOBS: dict[str, Conversion] = {}  # per worker process: the conversion of the job it works on


def conversion(job: Job) -> Conversion:
    """The job's conversion, made once per worker process."""
    conv = _JOBS.get(job.key)
    if conv is None:
        if job.rounded is not None and not job.rounded.is_dir():
            raise GgufmoeError(f"{job.rounded}: this Ray worker does not see the rounded tensors (the output's folder "
                               "must be on a filesystem every node shares)")
        _JOBS.clear()
        _, _, typed, imatrix = prepare(OpenedModel.open(job.source, job.opts.stats, config_ok=False), job.opts)
        rounded = RoundedStore(job.rounded) if job.rounded else None
        conv = _JOBS[job.key] = Conversion(Path(job.source), job.opts, typed, imatrix, rounded, NonFinite(True))
    return conv


def encode_pieces(job: Job, refs: list[PieceRef]) -> tuple[list[np.ndarray], dict[str, int]]:
    """The bytes of pieces ``refs``, and the non-finite values met per tensor (set to 0; the driver refuses them)."""
    conv = conversion(job)
    nonfinite = NonFinite(True)
    with Quantizer(1) as q:
        data = [encode(read_piece(conv.typed, r, conv.imatrix, nonfinite), q, conv.rounded) for r in refs]
    return data, nonfinite.counts


def batches(typed: list[TypedTensor], refs: Iterable[PieceRef]) -> Iterator[list[PieceRef]]:
    """``refs`` in order, consecutive small ones together up to :data:`TASK_BYTES` of input."""
    batch: list[PieceRef] = []
    size = 0
    for r in refs:
        batch.append(r)
        size += int(r.share(typed[r.tensor]) * 4 * typed[r.tensor].spec.n_elements)
        if size >= TASK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class RayEncoder:
    """A conversion's pieces quantized on the cluster of ``session``, at most ``max_in_flight`` output bytes ahead."""

    def __init__(self, session: RaySession, max_in_flight: int = MAX_IN_FLIGHT):
        self.session, self.max_in_flight = session, max_in_flight

    def tensors(self, conv: Conversion, start: int, bar: tqdm) -> Iterator[tuple[str, Iterable[np.ndarray]]]:
        flat = self._pieces(conv, start)
        for t, group in itertools.groupby(flat, key=lambda item: item[0].tensor):
            yield conv.typed[t].spec.name, self._parts(conv, t, group, bar)

    def _parts(self, conv: Conversion, t: int, group: Iterable[tuple[PieceRef, np.ndarray]],
               bar: tqdm) -> Iterator[np.ndarray]:
        for _, data in group:
            bar.update(data.nbytes)
            yield data
        conv.nonfinite.check(conv.typed[t].spec.name)

    def _pieces(self, conv: Conversion, start: int) -> Iterator[tuple[PieceRef, np.ndarray]]:
        """Every piece from tensor ``start`` on with its bytes, in order; tasks asked for ahead within the bound."""
        ray, typed = self.session.ray, conv.typed
        remote = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(encode_pieces)
        job = ray.put(job_of(conv))
        todo = batches(typed, piece_refs(typed, start))
        asked: deque[tuple[list[PieceRef], object, int]] = deque()
        in_flight = 0
        for batch in itertools.chain(todo, [None]):
            if batch is not None:
                size = sum(int(r.share(typed[r.tensor]) * typed[r.tensor].nbytes) for r in batch)
                asked.append((batch, remote.remote(job, batch), size))
                in_flight += size
                if in_flight < self.max_in_flight:
                    continue
            while asked and (batch is None or in_flight >= self.max_in_flight):
                refs, future, size = asked.popleft()
                data, counts = self.session.get(future, f"{typed[refs[0].tensor].spec.name}")
                in_flight -= size
                for name, n in counts.items():
                    conv.nonfinite.counts[name] = conv.nonfinite.counts.get(name, 0) + n
                yield from zip(refs, data)

"""Where a command's parallel work runs besides this process: the interface a cluster offers the pipeline
(:class:`ggufmoe.cluster.RayCluster` is one). Each part of the work is plain data (a piece reference, a share of the
calibration, a sweep point), so another machine can be handed it; the results come back here."""

from __future__ import annotations

from typing import Iterator, Protocol

from ggufmoe.pipeline.pieces import Encoder
from ggufmoe.stats.file import Stats


class Cluster(Protocol):
    """The parts' types are the pipeline's: ``ShareTask`` (:mod:`ggufmoe.pipeline.streamed_calibration`),
    ``PointTask`` and ``Point`` (:mod:`ggufmoe.pipeline.sweep`)."""

    @property
    def workers(self) -> int:
        """How many shares a calibration is split into (one per worker that runs one at a time)."""

    def encoder(self) -> Encoder:
        """A conversion's pieces quantized on the workers."""

    def calibrate(self, tasks: list) -> Iterator[tuple[object, Stats]]:
        """Each share's statistics, in the order they end."""

    def points(self, tasks: list) -> Iterator:
        """Each sweep point made and measured, in the order they end."""

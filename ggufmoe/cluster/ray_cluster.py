"""A Ray cluster as the pipeline's :class:`~ggufmoe.pipeline.distributed.Cluster`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from ggufmoe.cluster.calibrate import run_shares
from ggufmoe.cluster.encode import MAX_IN_FLIGHT, RayEncoder
from ggufmoe.cluster.session import RaySession
from ggufmoe.stats.file import Stats

if TYPE_CHECKING:
    from ggufmoe.pipeline.streamed_calibration import ShareTask
    from ggufmoe.pipeline.sweep import Point, PointTask


class RayCluster:
    """The work of a command on the Ray cluster of ``session`` (``max_in_flight``: a conversion's bound on output bytes
    asked for and not yet written)."""

    def __init__(self, session: RaySession, max_in_flight: int = MAX_IN_FLIGHT):
        self.session, self.max_in_flight = session, max_in_flight

    @property
    def workers(self) -> int:
        return len(self.session.node_cpus())

    def encoder(self) -> RayEncoder:
        return RayEncoder(self.session, self.max_in_flight)

    def calibrate(self, tasks: list[ShareTask]) -> Iterator[tuple[ShareTask, Stats]]:
        return run_shares(self.session, tasks)

    def points(self, tasks: list[PointTask]) -> Iterator[Point]:
        from ggufmoe.cluster.sweep import run_points  # a sweep's modules import torch: a conversion's driver does not

        return run_points(self.session, tasks)

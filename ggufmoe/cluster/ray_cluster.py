"""A Ray cluster as the pipeline's :class:`~ggufmoe.pipeline.distributed.Cluster`."""

from __future__ import annotations

from typing import Iterator

from ggufmoe.cluster.calibrate import run_shares, share_cpus
from ggufmoe.cluster.encode import RayEncoder
from ggufmoe.cluster.session import RaySession
from ggufmoe.cluster.sweep import run_points
from ggufmoe.pipeline.streamed_calibration import ShareTask
from ggufmoe.pipeline.sweep import Point, PointTask
from ggufmoe.stats.file import Stats


class RayCluster:
    """The work of a command on the Ray cluster of ``session``."""

    def __init__(self, session: RaySession):
        self.session = session

    @property
    def workers(self) -> int:
        return share_cpus(self.session)[0]

    def encoder(self) -> RayEncoder:
        return RayEncoder(self.session)

    def calibrate(self, tasks: list[ShareTask]) -> Iterator[tuple[ShareTask, Stats]]:
        return run_shares(self.session, tasks)

    def points(self, tasks: list[PointTask]) -> Iterator[Point]:
        return run_points(self.session, tasks)

"""``calibrate --ray``: the shares of a calibration's chunks (:func:`ggufmoe.pipeline.streamed_calibration.calibrate_shares`),
one task per node of the cluster, spread over the nodes, each with a node's CPUs; their statistics come back here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from ggufmoe.cluster.session import RaySession
from ggufmoe.stats.file import Stats

if TYPE_CHECKING:  # its module imports torch, which a driver that converts does not need
    from ggufmoe.pipeline.streamed_calibration import ShareTask


def run_share(task: ShareTask) -> Stats:
    return task.run()


def run_shares(session: RaySession, tasks: list[ShareTask]) -> Iterator[tuple[ShareTask, Stats]]:
    """Each share streamed on a node of its own (as many CPUs as the smallest node has), in the order they end."""
    return session.as_completed(run_share, tasks, lambda t: f"calibration share {t.share[0] + 1} of {t.share[1]}",
                                num_cpus=min(session.node_cpus()), scheduling_strategy="SPREAD")

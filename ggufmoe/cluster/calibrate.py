"""``calibrate --ray``: the shares of a calibration's chunks (:func:`ggufmoe.pipeline.streamed_calibration.calibrate_shares`), one
task per node of the cluster, spread over the nodes, each with the node's CPUs; their statistics come back here."""

from __future__ import annotations

from typing import Iterator

from ggufmoe.cluster.session import RETRIES, RaySession
from ggufmoe.pipeline.streamed_calibration import ShareTask
from ggufmoe.stats.file import Stats


def run_share(task: ShareTask) -> Stats:
    return task.run()


def share_cpus(session: RaySession) -> tuple[int, int]:
    """(shares, CPUs each): one share per node that has CPUs, each asking for the fewest any of them has."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in session.ray.nodes() if n.get("Alive")]
    cpus = [c for c in cpus if c > 0] or [1]
    return len(cpus), min(cpus)


def run_shares(session: RaySession, tasks: list[ShareTask]) -> Iterator[tuple[ShareTask, Stats]]:
    """Each share streamed on a node of its own, in the order they end."""
    ray = session.ray
    _, cpus = share_cpus(session)
    remote = ray.remote(num_cpus=cpus, max_retries=RETRIES, retry_exceptions=False,
                        scheduling_strategy="SPREAD")(run_share)
    futures = {remote.remote(t): t for t in tasks}
    waiting = list(futures)
    while waiting:
        (done,), waiting = ray.wait(waiting, num_returns=1)
        task = futures[done]
        yield task, session.get(done, f"calibration share {task.share[0] + 1} of {task.share[1]}")

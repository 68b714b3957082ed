"""``sweep --ray``: every point of a sweep (plan, convert, validate, evaluate) a task on a Ray cluster, its row saved in
``results.json`` as it ends, whichever ends first. The calibration, the base conversion and the sensitivities are made
before (:func:`ggufmoe.pipeline.sweep.sweep`); the points read them from the sweep's folder (a shared filesystem)."""

from __future__ import annotations

from typing import Iterator

from ggufmoe.cluster.session import RETRIES, RaySession
from ggufmoe.pipeline.sweep import Point, PointTask

POINT_CPUS = 1  # CPUs a point asks Ray for (its llama.cpp runs use the sweep's --threads)


def run_point(task: PointTask) -> Point:
    return task.run()


def run_points(session: RaySession, tasks: list[PointTask]) -> Iterator[Point]:
    """A sweep's points as tasks on the cluster of ``session``, in the order they end."""
    ray = session.ray
    remote = ray.remote(num_cpus=POINT_CPUS, max_retries=RETRIES, retry_exceptions=False)(run_point)
    names = {remote.remote(t): t.name for t in tasks}
    waiting = list(names)
    while waiting:
        (done,), waiting = ray.wait(waiting, num_returns=1)
        yield session.get(done, f"sweep point {names[done]}")

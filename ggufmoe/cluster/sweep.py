"""``sweep --ray``: every point of a sweep (plan, convert, validate, evaluate) a task on a Ray cluster, a node's CPUs
each (a point runs llama.cpp on a whole model: two on one node would measure each other), its row saved in
``results.json`` as it ends. The calibration, the base conversion and the sensitivities are made before
(:func:`ggufmoe.pipeline.sweep.sweep`); the points read them from the sweep's folder (a shared filesystem)."""

from __future__ import annotations

from typing import Iterator

from ggufmoe.cluster.session import RaySession
from ggufmoe.pipeline.sweep import Point, PointTask


def run_point(task: PointTask) -> Point:
    return task.run()


def run_points(session: RaySession, tasks: list[PointTask]) -> Iterator[Point]:
    """A sweep's points as tasks on the cluster of ``session``, in the order they end."""
    for _, point in session.as_completed(run_point, tasks, lambda t: f"sweep point {t.name}",
                                         num_cpus=min(session.node_cpus())):
        yield point

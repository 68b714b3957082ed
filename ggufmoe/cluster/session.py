"""Connecting to a Ray cluster, or starting a local one, for one command; Ray's errors as one line."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from types import ModuleType
from typing import Callable, Iterator, TypeVar

from ggufmoe.errors import GgufmoeError, Resumable, one_line

Task = TypeVar("Task")
LOCAL = ""  # ``--ray`` without an address: a local cluster started for the command (or RAY_ADDRESS's)
RETRIES = 3  # times Ray runs a task again whose worker died
REACH_TIMEOUT = 10  # seconds to wait for a cluster's address to answer (Ray itself retries for minutes)


def ray_module() -> ModuleType:
    """Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise GgufmoeError("--ray needs Ray, which is not installed: pip install 'ggufmoe[ray]'") from None
    return ray


class RaySession:
    """Ray for the length of a ``with`` block: the cluster at ``address`` (``LOCAL``: a new local one, or the one
    ``RAY_ADDRESS`` names), or the session this process has open already (a caller's own ``ray.init``), which is left
    open."""

    def __init__(self, address: str = LOCAL):
        self.address = address
        self.ray = ray_module()
        self._opened = False

    def __enter__(self) -> "RaySession":
        ray = self.ray
        if not ray.is_initialized():
            self._check_reachable()
            try:
                with _signals_kept():
                    ray.init(address=self.address or None, logging_level=logging.ERROR, log_to_driver=False,
                             include_dashboard=False, configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"at {self.address}" if self.address else "here"
                raise GgufmoeError(f"--ray: cannot start or reach a Ray cluster {where} ({one_line(e)})") from None
            self._opened = True
        return self

    def _check_reachable(self) -> None:
        """A ``HOST:PORT`` address that does not answer, refused at once (``auto`` and ``ray://`` are Ray's to try)."""
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or "/" in self.address or not port.isdigit():
            return
        try:
            socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT).close()
        except OSError as e:
            raise GgufmoeError(f"--ray {self.address}: no Ray cluster answers there ({e.strerror or e}); "
                               "start one with `ray start --head`, or give --ray alone for one on this machine") from None

    def __exit__(self, *exc) -> None:
        if self._opened:
            self.ray.shutdown()
            self._opened = False

    def node_cpus(self) -> list[int]:
        """The CPUs of each live node that has any."""
        cpus = [int(n["Resources"].get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive")]
        return [c for c in cpus if c > 0] or [1]

    def as_completed(self, fn: Callable, tasks: list[Task], what: Callable[[Task], str],
                     **options) -> Iterator[tuple[Task, object]]:
        """``fn(task)`` for each of ``tasks`` run on the cluster (Ray's ``options``, retried when a worker dies), each
        with its result as it ends."""
        ray = self.ray
        remote = ray.remote(max_retries=RETRIES, retry_exceptions=False, **options)(fn)
        futures = {remote.remote(t): t for t in tasks}
        waiting = list(futures)
        while waiting:
            try:
                (done,), waiting = ray.wait(waiting, num_returns=1)
            except (ray.exceptions.RayError, ConnectionError) as e:
                raise Resumable(f"the Ray cluster went away ({one_line(e)})") from None
            yield futures[done], self.get(done, what(futures[done]))

    def get(self, future, what: str):
        """The result of ``future``; a task's own error raised as it is, Ray's own failures as one line (a cluster
        gone: :class:`Resumable`, the work done so far kept)."""
        ray = self.ray
        try:
            return ray.get(future)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, GgufmoeError):
                raise e.cause from None
            raise GgufmoeError(f"{what} failed on a Ray worker: {one_line(e.cause or e)}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:
            raise GgufmoeError(f"{what}: its Ray worker died {RETRIES + 1} times ({one_line(e)})") from None
        except (ray.exceptions.RayError, ConnectionError) as e:
            raise Resumable(f"{what}: the Ray cluster went away ({one_line(e)})") from None


@contextlib.contextmanager
def _signals_kept() -> Iterator[None]:
    """Ray's start installs its own SIGTERM handler (exit at once), which would drop the work a SIGTERM keeps for
    ``--resume``: the handlers before it are put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            if handler is not None:
                signal.signal(s, handler)

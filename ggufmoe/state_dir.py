"""The state directory of a resumable run beside its output: create, lock, clear, remove.

A run that writes ``OUT`` (``convert``'s GGUF files, ``calibrate``'s statistics) keeps the work it
has done so far in ``.OUT.partial`` beside it, so that an interrupted run can be taken up again
(``--resume``) and a failed one leaves no output behind. While it runs it holds the directory
locked (``flock`` on the directory itself, released when the process ends, however it ends): a
second run to the same output at the same time would destroy the first one's files, and is
refused with one clear error instead. What goes into the directory is the run's own business
(:mod:`ggufmoe.gguf.writer`, :mod:`ggufmoe.stats.calib_state`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO

from ggufmoe.errors import GgufmoeError


def partial_path(out: str | Path) -> Path:
    """``.NAME.partial`` beside the output ``out``."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


class StateDir:
    """A run's state directory; ``busy`` is the error when another process holds it."""

    def __init__(self, path: str | Path, busy: str):
        self.path, self.busy = Path(path), busy
        self._fd: int | None = None

    @classmethod
    def beside(cls, out: str | Path, busy: str) -> StateDir:
        return cls(partial_path(out), busy)

    def lock(self) -> None:
        """Create the directory if need be and hold it for this run."""
        try:
            self.path.mkdir(exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise GgufmoeError(f"{self.path.parent}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GgufmoeError(self.busy) from None
        self._fd = fd

    def unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def clear(self) -> None:
        """Empty the directory (what an earlier run left that is not worth keeping)."""
        for f in self.path.iterdir():
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()

    def write(self, path: Path, write: Callable[[BinaryIO], object], error: str) -> None:
        """``path`` (in the directory) written by ``write`` durably and atomically: into a temporary file,
        fsynced, renamed over ``path``, and the directory fsynced. An OSError is ``error`` (and why)."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            if self._fd is not None:
                os.fsync(self._fd)
        except OSError as e:
            raise GgufmoeError(f"{error} ({e.strerror or e})") from None

    def remove(self) -> None:
        """Delete the directory and all in it (still holding it while it goes), then let it go."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()

    def release(self, keep: bool) -> None:
        """The run is over: let the directory go, kept (for ``--resume``) or removed."""
        if keep:
            self.unlock()
        else:
            self.remove()

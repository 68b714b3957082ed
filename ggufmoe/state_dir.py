"""The state directory of a resumable run beside its output: create, lock, clear, remove.

A run that writes ``OUT`` (``convert``'s GGUF files, ``calibrate``'s statistics) keeps the work it
has done so far in ``.OUT.partial`` beside it, so that an interrupted run can be taken up again
(``--resume``) and a failed one leaves no output behind. While it runs it holds the directory
locked (``flock`` on the directory itself, released when the process ends, however it ends): a
second run to the same output at the same time would destroy the first one's files, and is
refused with one clear error instead. What goes into the directory is the run's own business
(:mod:`ggufmoe.gguf.writer`, :mod:`ggufmoe.stats.calib_state`).

Each directory names its owner in ``owner.json``: the kind of run (a conversion, a calibration) and the
command line that started it. A run of another kind never clears it, nor writes the output it will
finish: it is refused with one line that says whose the directory is and how to continue or remove it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from ggufmoe.errors import GgufmoeError
from ggufmoe.files import replace_atomically


OWNER = "owner.json"
# what the state files of runs from before owner.json tell of their kind
LEGACY_KINDS = {"progress.json": "conversion", "state.json": "calibration"}


def partial_path(out: str | Path) -> Path:
    """``.NAME.partial`` beside the output ``out``."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


@dataclass
class Owner:
    """Whose a state directory is: the kind of run and the command line that started it."""

    kind: str
    command: str

    def describe(self, path: Path) -> str:
        """One line: whose ``path`` is, and how to continue it or remove it."""
        how = f"`{self.command} --resume`" if self.command else "the command that started it with --resume"
        return f"{path} holds an interrupted {self.kind}: run {how} to continue it, or delete {path} to start over"


class StateDir:
    """A run's state directory, of a ``kind`` of run; ``busy`` is the error when another process holds it."""

    def __init__(self, path: str | Path, busy: str, kind: str):
        self.path, self.busy, self.kind = Path(path), busy, kind
        self._fd: int | None = None

    @classmethod
    def beside(cls, out: str | Path, busy: str, kind: str) -> StateDir:
        return cls(partial_path(out), busy, kind)

    @staticmethod
    def owner_of(path: Path) -> Owner | None:
        """The owner of the state directory ``path``; None when there is none, or it is empty."""
        try:
            names = {f.name for f in path.iterdir()}
        except OSError:
            return None
        if OWNER in names:
            try:
                d = json.loads((path / OWNER).read_text())
                return Owner(str(d["kind"]), str(d["command"]))
            except (OSError, ValueError, TypeError, KeyError):
                pass
        kinds = {LEGACY_KINDS[n] for n in names if n in LEGACY_KINDS}
        if len(kinds) == 1:
            return Owner(kinds.pop(), "")
        return Owner("run of unknown kind", "") if names - {OWNER} else None

    def lock(self) -> None:
        """Create the directory if need be and hold it for this run; refuse another kind of run's."""
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
        owner = self.owner_of(self.path)
        if owner is not None and owner.kind != self.kind:
            self.unlock()
            raise GgufmoeError(owner.describe(self.path))
        if not (self.path / OWNER).is_file():
            self._record_owner()

    def _record_owner(self) -> None:
        """``owner.json``: this kind of run, started by this process's command line."""
        args = [a for a in sys.argv[1:] if a != "--resume"]
        command = shlex.join(["ggufmoe", *args]) if Path(sys.argv[0]).name == "ggufmoe" else ""
        self.write(self.path / OWNER, lambda f: f.write(json.dumps(asdict(Owner(self.kind, command))).encode()),
                   f"{self.path}: cannot record whose it is")

    def unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def clear(self) -> None:
        """Empty the directory (what an earlier run of this kind left that is not worth keeping); this run owns it."""
        for f in self.path.iterdir():
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
        self._record_owner()

    def write(self, path: Path, write: Callable[[BinaryIO], object], error: str) -> None:
        """``path`` (in the directory) written by ``write`` durably and atomically (:func:`replace_atomically`).
        An OSError is ``error`` (and why)."""
        def into(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                write(f)

        try:
            replace_atomically(path, into, durable=True)
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

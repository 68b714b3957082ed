"""The one rule for every file a command writes (GGUF, statistics, plan, model card, Modelfile, results).

Before any work, each output is refused with one line when it

- is an input of the same command: the same file (inode), through symlinks, hard links and the shards of a
  GGUF; for a model directory every file in it counts (``plan MODEL -o MODEL/config.json`` is refused);
- is a directory, or lies in a folder that does not exist or cannot be written;
- is a GGUF file and the output is not one (a plan, a card, a Modelfile never replaces a model);
- has beside it the kept state of another kind of interrupted run (``.NAME.partial``,
  :mod:`ggufmoe.state_dir`): that run will write this name when it is resumed, and its hours of work are
  never cleared by another command.

Then it is written atomically (:func:`write_output`): readers see the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ggufmoe.errors import GgufmoeError
from ggufmoe.files import replace_atomically
from ggufmoe.source.fingerprint import model_files
from ggufmoe.source.gguf_file import is_shard_of
from ggufmoe.state_dir import StateDir, partial_path


def files_of(paths: Iterable[str | Path | None]) -> list[Path]:
    """The files behind a command's inputs: a model directory's files, a GGUF's shards, a file itself
    (missing inputs are left for the command to report)."""
    out: list[Path] = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        try:
            out += model_files(p)
        except (OSError, GgufmoeError):  # an unreadable folder or a damaged shard set: reported by the command
            if p.is_file():
                out.append(p)
    return out


def check_outputs(outputs: Iterable[Path], inputs: Iterable[str | Path | None], *, kind: str | None = None,
                  split: bool = False, gguf: bool = False) -> None:
    """Refuse ``outputs`` by the rule of the module docstring. ``kind``: the state this command itself keeps
    beside its output (``StateDir.kind``), which it handles itself; ``split``: the output is written in shards
    named after it; ``gguf``: the output is a GGUF (a text output never replaces a GGUF file, a model's hours of
    work)."""
    files = files_of(inputs)
    for out in outputs:
        out = Path(out)
        if out.is_dir():
            raise GgufmoeError(f"{out}: is a directory; give a file name")
        folder = out.parent
        if not folder.is_dir():
            raise GgufmoeError(f"{out}: folder {folder} does not exist")
        _check_writable(folder, out)
        for f in files:
            same = out.exists() and _same(out, f)
            if not same and split and is_shard_of(f.name, out.stem):
                same = _same(folder, f.parent)
            if same:
                raise GgufmoeError(f"{out}: the output would overwrite the input {f}; choose another output path")
        if not gguf and out.is_file() and is_gguf_file(out):
            raise GgufmoeError(f"{out}: is a GGUF file, and this output is not one; choose another output path")
        refuse_foreign_state(out, kind)


def check_output_folder(folder: Path, inputs: Iterable[str | Path | None], markers: tuple[str, ...]) -> None:
    """A command that fills a folder of its own (``sweep``): not a file, not an input, and, when it holds
    anything, already this command's (it holds one of ``markers``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GgufmoeError(f"{folder}: is a file; give a folder for the results")
    for f in files_of(inputs):
        if folder.exists() and (_same(folder, f) or _same(folder, f.parent)):
            raise GgufmoeError(f"{folder}: holds an input of this command ({f}); give another folder")
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / m).is_file() for m in markers):
        raise GgufmoeError(f"{folder}: not empty and not a folder this command made (no {markers[0]}); give a new "
                           f"or empty folder")
    parent = folder if folder.is_dir() else folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    _check_writable(parent, folder)


def refuse_foreign_state(out: Path, kind: str | None) -> None:
    """Fail when an interrupted run of another kind than ``kind`` keeps its state beside ``out``."""
    state = partial_path(out)
    owner = StateDir.owner_of(state)
    if owner is not None and owner.kind != kind:
        raise GgufmoeError(f"{out}: {owner.describe(state)}")


def write_output(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` the file ``path`` atomically (a temporary file beside it, renamed over it); a write error is
    one line."""
    try:
        replace_atomically(path, write)
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` opens with GGUF's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(folder: Path, out: Path) -> None:
    """Create and remove a file in ``folder``: permissions, read-only mounts and root alike."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ggufmoe-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise GgufmoeError(f"{out}: cannot write in {folder} ({e.strerror or e})") from None

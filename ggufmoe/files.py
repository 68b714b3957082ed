"""Files ggufmoe keeps for itself, and how a small file is replaced: the cache folder, atomic replacement."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def cache_folder(kind: str) -> Path:
    """``~/.cache/ggufmoe/KIND`` (under ``XDG_CACHE_HOME`` when it is set)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ggufmoe" / kind


def replace_atomically(path: Path, write: Callable[[Path], object], durable: bool = False) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: readers see the old file or the
    new one, never part of it. ``durable``: the file is fsynced before the rename and its folder after it, so
    that a crash keeps the old file or the new one. When writing fails the temporary file is removed and the
    error raised. Every file ggufmoe writes whole goes through here."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

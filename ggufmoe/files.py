"""Files ggufmoe keeps for itself, and how a small file is replaced: the cache folder, atomic replacement."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def cache_folder(kind: str) -> Path:
    """``~/.cache/ggufmoe/KIND`` (under ``XDG_CACHE_HOME`` when it is set)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ggufmoe" / kind


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: readers see the old file or the
    new one, never part of it. When writing fails the temporary file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

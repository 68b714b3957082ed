"""One fingerprint for inputs: what caches and resumable runs compare to tell whether an input changed.

A file counts by its resolved path, size and modification time (reading a 1 TB checkpoint to hash
it is not an option); a model directory by the files in it but GGUF files and hidden ones (outputs,
statistics and interrupted runs often lie beside a checkpoint); a GGUF by its shards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ggufmoe.source.gguf_file import gguf_files


def model_files(path: str | Path) -> list[Path]:
    """The files of a model (see the module docstring), or the file itself; none if missing."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix != ".gguf" and not p.name.startswith("."))
    if not path.is_file():
        return []
    return gguf_files(path) if path.suffix == ".gguf" else [path]


def file_identity(files: list[Path]) -> str:
    """Resolved path, size and modification time of each file, one line each."""
    return "\n".join(f"{p.resolve()} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)


def fingerprint(files: list[Path]) -> str:
    """SHA-256 of :func:`file_identity`."""
    return hashlib.sha256(file_identity(files).encode()).hexdigest()

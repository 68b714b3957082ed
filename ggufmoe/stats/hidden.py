"""Calibration activations between decoder layers: (tokens, width) float32 rows, in memory or in a file.

The streamed calibration (:mod:`ggufmoe.stats.stream`) passes the hidden states of every
calibration token from layer to layer. A :class:`RowStore` holds them either in memory (an
array; :meth:`RowStore.save` writes it to its file) or in the file itself, mapped (``np.memmap``:
the kernel pages it, so the process never holds more than it touches; :meth:`RowStore.drop_pages`
hands touched pages back). Either way the rows are a torch tensor (:attr:`RowStore.tensor`) that
shares the storage, and after :meth:`RowStore.save` the file holds them durably, as raw
little-endian float32, row after row.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import torch

from ggufmoe.errors import GgufmoeError
from ggufmoe.units import format_size

DTYPE = np.dtype("<f4")


class RowStore:
    """``rows`` x ``width`` float32 rows backed by the file ``path``: held in memory, or mapped from it."""

    def __init__(self, path: Path, rows: int, width: int, in_memory: bool, array: np.ndarray):
        self.path, self.rows, self.width, self.in_memory = Path(path), rows, width, in_memory
        self.array = array
        self.tensor = torch.from_numpy(array)  # shares the array's storage (the mapping for a file)

    @property
    def nbytes(self) -> int:
        return self.rows * self.width * DTYPE.itemsize

    @classmethod
    def create(cls, path: Path, rows: int, width: int, in_memory: bool) -> RowStore:
        """A new store; a mapped one gets its file allocated on disk first (a full disk fails here,
        with one clear error, not later as a fault in a mapped page)."""
        path = Path(path)
        if in_memory:
            return cls(path, rows, width, True, np.zeros((rows, width), DTYPE))
        nbytes = rows * width * DTYPE.itemsize
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, nbytes)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise GgufmoeError(f"{path}: cannot allocate {format_size(nbytes)} for calibration activations "
                               f"({e.strerror or e})") from None
        return cls(path, rows, width, False, np.memmap(path, DTYPE, "r+", shape=(rows, width)))

    @classmethod
    def open(cls, path: Path, rows: int, width: int, in_memory: bool) -> RowStore:
        """The store a previous run saved to ``path`` (its size checked)."""
        path = Path(path)
        nbytes = rows * width * DTYPE.itemsize
        try:
            size = path.stat().st_size
        except OSError as e:
            raise GgufmoeError(f"{path}: cannot read kept activations ({e.strerror or e}); "
                               f"delete {path.parent} to start over") from None
        if size != nbytes:
            raise GgufmoeError(f"{path}: kept activations hold {size} bytes, expected {nbytes}; "
                               f"delete {path.parent} to start over")
        if in_memory:
            return cls(path, rows, width, True, np.fromfile(path, DTYPE).reshape(rows, width))
        return cls(path, rows, width, False, np.memmap(path, DTYPE, "r+", shape=(rows, width)))

    def save(self) -> None:
        """Make the file hold the rows, durably (written and fsynced)."""
        try:
            if self.in_memory:
                with open(self.path, "wb") as f:
                    f.write(memoryview(self.array).cast("B"))
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self.array.flush()
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            raise GgufmoeError(f"{self.path}: cannot write calibration activations ({e.strerror or e})") from None

    def drop_pages(self) -> None:
        """A mapped store: hand the pages touched so far back to the kernel (they stay in its page cache
        and the file; the process's resident memory shrinks). Nothing for an in-memory store."""
        mm = getattr(self.array, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

"""Tensors rounded ahead of a conversion (:mod:`ggufmoe.quant.aware`), one file each, found again by what they are: the
float32 rows the conversion reads and the type it writes. Keyed by content, a conversion that prunes, renumbers or merges
experts takes the rounding of exactly the slices it writes unchanged and quantizes anything else itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.files import replace_atomically


def rows_key(rows: np.ndarray, t: T) -> str:
    digest = hashlib.blake2b(np.ascontiguousarray(rows, np.float32).data, digest_size=16)
    digest.update(str(rows.shape).encode())
    return f"{t.name}-{digest.hexdigest()}"


class RoundedStore:
    """A folder of rounded tensors (``TYPE-HASH.npy``: the bytes as written)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def put(self, rows: np.ndarray, t: T, data: np.ndarray) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, data)

        replace_atomically(self.path / f"{rows_key(rows, t)}.npy", write)

    def get(self, rows: np.ndarray, t: T) -> np.ndarray | None:
        """The bytes of ``rows`` at type ``t`` if they were rounded, else None."""
        path = self.path / f"{rows_key(rows, t)}.npy"
        if not path.exists():
            return None
        return np.load(path)

    def __len__(self) -> int:
        return sum(1 for _ in self.path.glob("*.npy")) if self.path.exists() else 0

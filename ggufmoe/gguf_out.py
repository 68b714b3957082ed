"""Streaming GGUF writer: tensor infos first, then data tensor by tensor, part by part.

Files are written into a temporary directory beside the output and renamed into place only
when complete, so an interrupted or failed run leaves no partial output behind. With
``split_max_size`` the output is sharded llama.cpp-style (``NAME-00001-of-0000N.gguf``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np

from .errors import GgufmoeError


class GGUFOutput:
    """Collects metadata and tensor infos, then streams tensor data into one or more files."""

    def __init__(self, path: str | Path, arch: str, split_max_size: int = 0):
        self.path = Path(path)
        if self.path.suffix != ".gguf":
            raise GgufmoeError(f"{self.path}: output name must end in .gguf")
        if not self.path.parent.is_dir():
            raise GgufmoeError(f"{self.path.parent}: output directory does not exist")
        self.writer = gguf.GGUFWriter(None, arch, split_max_size=split_max_size)
        self._tmpdir: Path | None = None
        self._sizes: dict[str, int] = {}

    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
                        nbytes: int) -> None:
        """Declare a tensor; ``shape`` in numpy order (outermost first)."""
        self.writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._sizes[name] = nbytes

    @property
    def final_paths(self) -> list[Path]:
        return self.writer.format_shard_names(self.path)

    def begin(self) -> None:
        """Open the files in a temporary directory and write header, metadata and tensor infos."""
        try:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        except OSError as e:
            raise GgufmoeError(f"{self.path.parent}: cannot write there ({e.strerror})") from None
        self.writer.write_header_to_file(self._tmpdir / self.path.name)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write_tensor(self, name: str, parts: Iterable[np.ndarray]) -> None:
        """Write the data of the next declared tensor, given as consecutive byte parts."""
        w = self.writer
        file_id = next(i for i, t in enumerate(w.tensors) if t)
        expected = next(iter(w.tensors[file_id]))
        if expected != name:
            raise RuntimeError(f"tensor {name} written out of order (expected {expected})")
        info = w.tensors[file_id].pop(name)
        fout = w.fout[file_id]
        w.write_padding(fout, fout.tell())
        written = 0
        for part in parts:
            part.tofile(fout)
            written += part.nbytes
        if written != info.nbytes:
            raise RuntimeError(f"tensor {name}: wrote {written} bytes, declared {info.nbytes}")
        w.write_padding(fout, written)
        w.state = gguf.gguf_writer.WriterState.WEIGHTS

    def finish(self) -> list[Path]:
        """Close and move the finished files into place; returns their paths."""
        self.writer.close()
        assert self._tmpdir is not None
        paths = []
        for final in self.final_paths:
            (self._tmpdir / final.name).replace(final)
            paths.append(final)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._tmpdir = None
        return paths

    def abort(self) -> None:
        """Drop everything written so far."""
        self.writer.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "GGUFOutput":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()

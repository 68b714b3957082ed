"""Streaming GGUF writer: tensor infos first, then data tensor by tensor, part by part.

The files grow in a state directory beside the output, ``.NAME.partial`` (held locked while a run
writes it, so that a second run to the same output is refused: :mod:`ggufmoe.state_dir`), and are
renamed into place only when complete, so a failed run leaves no output behind. After every tensor the
directory records how much of the files is complete (``progress.json``). An interrupted run
(Ctrl-C, SIGTERM, a write error such as a full disk) keeps the directory when at least one tensor
is complete, and ``begin(resume=True)`` takes it up again — after checking that the header
(metadata and tensor infos, hence source, plan and types) is the same byte for byte.
With ``split_max_size`` the output is sharded llama.cpp-style (``NAME-00001-of-0000N.gguf``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np

from ggufmoe.errors import GgufmoeError, Resumable
from ggufmoe.files import replace_atomically
from ggufmoe.state_dir import StateDir
from ggufmoe.units import format_size

PROGRESS = "progress.json"
CONVERSION = "conversion"  # the kind of run that owns the state directory
SCRATCH = "header"  # where a header is written before it is compared with a kept one


def tensor_recorded(done: int) -> None:
    """Called after each tensor is complete and recorded in progress.json, with the count done. Does nothing;
    tests replace it (tests/hooked_cli.py) to act at a known point, as Ctrl-C, SIGTERM or a full disk can."""


@dataclass
class Progress:
    """How far the files in the state directory are complete."""

    fingerprint: str  # SHA-256 of the header and the inputs
    tensors: int  # tensors complete, in writing order
    offsets: list[int]  # each file's size with those tensors in it

    def save(self, state_dir: Path) -> None:
        replace_atomically(state_dir / PROGRESS, lambda tmp: tmp.write_text(json.dumps(asdict(self))))

    @classmethod
    def load(cls, state_dir: Path) -> "Progress | None":
        try:
            p = cls(**json.loads((state_dir / PROGRESS).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return p if p.tensors > 0 else None


class GGUFOutput:
    """Collects metadata and tensor infos, then streams tensor data into one or more files."""

    def __init__(self, path: str | Path, arch: str, split_max_size: int = 0):
        self.path = Path(path)
        if self.path.suffix != ".gguf":
            raise GgufmoeError(f"{self.path}: output name must end in .gguf")
        if not self.path.parent.is_dir():
            raise GgufmoeError(f"{self.path.parent}: output directory does not exist")
        self.writer = gguf.GGUFWriter(None, arch, split_max_size=split_max_size)
        self.state = StateDir.beside(self.path, f"{self.path}: another ggufmoe is writing this output right now",
                                     CONVERSION)
        self.state_dir = self.state.path
        self.progress: Progress | None = None
        self._owns_state = False  # whether the state directory is this run's to delete

    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
                        nbytes: int) -> None:
        """Declare a tensor; ``shape`` in numpy order (outermost first)."""
        self.writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)

    @property
    def final_paths(self) -> list[Path]:
        return self.writer.format_shard_names(self.path)

    @property
    def n_tensors(self) -> int:
        return sum(len(t) for t in self.writer.tensors)

    @property
    def tensors_done(self) -> int:
        return self.progress.tensors if self.progress else 0

    def begin(self, resume: bool = False, inputs: str = "") -> int:
        """Write header, metadata and tensor infos — or, with ``resume``, take up the files an
        interrupted run with the same header and ``inputs`` (what else decides the data: source
        files, importance matrix) kept. Returns how many tensors are already written."""
        self._owns_state = not self.state_dir.exists()
        self.state.lock()
        kept = self._kept(resume)
        self._check_free_disk(kept.tensors if kept else 0)
        try:
            scratch = self.state_dir / SCRATCH
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            self._owns_state = kept is None
            sha, offsets = self._write_header(scratch, inputs)
            if kept is None:
                for f in self.writer.format_shard_names(scratch / self.path.name):
                    f.replace(self.state_dir / f.name)
                scratch.rmdir()
                self.progress = Progress(sha, 0, offsets)
                self.progress.save(self.state_dir)
            else:
                self._reopen(kept, sha)
        except OSError as e:
            raise GgufmoeError(f"{self.path.parent}: cannot write there ({e.strerror or e})") from None
        return self.tensors_done

    def _kept(self, resume: bool) -> Progress | None:
        """The progress of an interrupted run to continue; a kept one is never silently dropped."""
        kept = Progress.load(self.state_dir)
        if kept is None:  # new, or interrupted before its first tensor was complete: nothing worth keeping
            self.state.clear()
            self._owns_state = True
            return None
        if not resume:
            raise GgufmoeError(f"{self.state_dir} holds an interrupted conversion to {self.path.name} "
                               f"({kept.tensors} of {self.n_tensors} tensors): add --resume to continue it, "
                               f"or delete the directory to start over")
        return kept

    def _write_header(self, where: Path, inputs: str) -> tuple[str, list[int]]:
        """Header, metadata and tensor infos into files in ``where``; SHA-256 of them and ``inputs``, and sizes."""
        w = self.writer
        w.write_header_to_file(where / self.path.name)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.flush()
        sha = hashlib.sha256(inputs.encode())
        for f in w.format_shard_names(where / self.path.name):
            sha.update(f.read_bytes())
        return sha.hexdigest(), [fout.tell() for fout in w.fout]

    def _reopen(self, kept: Progress, sha: str) -> None:
        """Continue the kept files: same header, cut back to their last complete tensor."""
        w = self.writer
        w.close()
        shutil.rmtree(self.state_dir / SCRATCH)
        files = [self.state_dir / f.name for f in self.final_paths]
        if sha != kept.fingerprint or len(kept.offsets) != len(files):
            raise GgufmoeError(f"{self.state_dir}: the interrupted conversion kept there was made from another "
                               f"source, plan, types or importance matrix; delete the directory to start over")
        if any(not f.is_file() or f.stat().st_size < n for f, n in zip(files, kept.offsets)):
            raise GgufmoeError(f"{self.state_dir}: files are missing or shorter than its progress record; "
                               f"delete the directory to start over")
        w.fout = []
        for f, n in zip(files, kept.offsets):
            fout = open(f, "r+b")
            fout.truncate(n)
            fout.seek(n)
            w.fout.append(fout)
        for _ in range(kept.tensors):
            tensors = next(t for t in w.tensors if t)
            tensors.pop(next(iter(tensors)))
        self.progress = kept
        self._owns_state = False  # kept work: a resumed run that fails leaves it for the next --resume

    def _check_free_disk(self, skip: int) -> None:
        """Fail before writing when the tensors still to write do not fit on the output's disk."""
        sizes = [gguf.GGUFWriter.ggml_pad(ti.nbytes, self.writer.data_alignment)
                 for t in self.writer.tensors for ti in t.values()]
        need = sum(sizes[skip:])
        free = shutil.disk_usage(self.path.parent).free
        if need > free:
            raise GgufmoeError(f"{self.path.parent}: not enough free disk for {self.path.name}: "
                               f"needs {format_size(need)}, {format_size(free)} free")

    def write_tensor(self, name: str, parts: Iterable[np.ndarray]) -> None:
        """Write the data of the next declared tensor, given as consecutive byte parts."""
        w = self.writer
        file_id = next(i for i, t in enumerate(w.tensors) if t)
        expected = next(iter(w.tensors[file_id]))
        if expected != name:
            raise RuntimeError(f"tensor {name} written out of order (expected {expected})")
        info = w.tensors[file_id][name]
        fout = w.fout[file_id]
        w.write_padding(fout, fout.tell())
        written = 0
        for part in parts:
            fout.write(np.ascontiguousarray(part).data)  # a full disk raises OSError(ENOSPC)
            written += part.nbytes
        if written != info.nbytes:
            raise RuntimeError(f"tensor {name}: wrote {written} bytes, declared {info.nbytes}")
        w.write_padding(fout, written)
        del w.tensors[file_id][name]
        w.state = gguf.gguf_writer.WriterState.WEIGHTS
        self._record(file_id, fout)

    def _record(self, file_id: int, fout) -> None:
        """The tensor just written is complete: on disk first, then in the progress record."""
        fout.flush()
        os.fsync(fout.fileno())
        assert self.progress is not None
        self.progress.tensors += 1
        self.progress.offsets[file_id] = fout.tell()
        self.progress.save(self.state_dir)
        tensor_recorded(self.progress.tensors)

    def finish(self) -> list[Path]:
        """Close and move the finished files into place; returns their paths."""
        self.writer.close()
        paths = []
        for final in self.final_paths:
            (self.state_dir / final.name).replace(final)
            paths.append(final)
        self.state.remove()
        self._owns_state = False
        return paths

    def abort(self, keep: bool = False) -> None:
        """Close the files; drop them unless ``keep`` and at least one tensor is complete."""
        self.writer.close()
        self.state.release(keep=not self._owns_state or (keep and self.tensors_done > 0))
        self._owns_state = False

    @property
    def kept(self) -> bool:
        """Whether an aborted run left its files to be resumed."""
        return self.state_dir.exists() and self.tensors_done > 0

    def __enter__(self) -> "GGUFOutput":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort(keep=issubclass(exc_type, (KeyboardInterrupt, OSError, Resumable)))

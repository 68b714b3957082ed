"""An existing GGUF (one file or llama.cpp-style shards ``NAME-0000i-of-0000N.gguf``) as a model
source: metadata from its keys, tensors memory-mapped through gguf-py's ``GGUFReader``.

A tensor is available two ways: as stored (``raw``: its bytes, copied unchanged when its type
stays) and as float32 (``get``: dequantized with ``gguf.quants.dequantize``, for a new type).
3-D tensors are read one outermost slice (one expert) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType

from ggufmoe.errors import GgufmoeError
from ggufmoe.source.gguf_file import read_gguf
from ggufmoe.source.gguf_file import ShardName
from ggufmoe.source.gguf_file import gguf_files

# Keys that describe one file's layout, not the model: never carried to another file.
LAYOUT_PREFIXES = ("GGUF.", "split.")
LAYOUT_KEYS = ("general.alignment",)


@dataclass(frozen=True)
class KeyValue:
    """One metadata pair as stored: value, its GGUF type and, for arrays, the item type."""

    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None

    def add_to(self, w: gguf.GGUFWriter, value: Any = None) -> None:
        """Write the pair (with ``value`` instead, in the same types, when given)."""
        w.add_key_value(self.key, self.value if value is None else value, self.type, self.sub_type)


def is_gguf_path(path: Path) -> bool:
    """Whether ``path`` names a GGUF source (a .gguf file or shard; it need not exist yet)."""
    return path.suffix == ".gguf" and not path.is_dir()


class GGUFSource:
    """A GGUF file or a split GGUF (given by any of its shards), read lazily tensor by tensor."""

    has_weights = True
    can_calibrate = False  # transformers cannot run it: statistics come from the HF model or an imatrix
    architecture = "GGUF"

    def __init__(self, path: str | Path):
        self.files = gguf_files(path)
        self.path = self.files[0]
        readers = [read_gguf(f) for f in self.files]
        self.fields = readers[0].fields
        count = self.value("split.count", 1)
        if int(count) != len(self.files):
            raise GgufmoeError(f"{self.path}: the file says it is one of {count} shards, "
                               f"its name says {len(self.files)}")
        self._tensors: dict[str, gguf.ReaderTensor] = {}
        for f, r in zip(self.files, readers):
            for t in r.tensors:
                if t.name in self._tensors:
                    raise GgufmoeError(f"{f}: tensor {t.name} is also in another shard")
                self._tensors[t.name] = t
        if not self._tensors:
            raise GgufmoeError(f"{self.path}: a GGUF without tensors is not a model")

    @property
    def name(self) -> str:
        return str(self.value("general.name", "") or _unsplit_stem(self.path))

    def value(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return f.contents() if f is not None else default

    @cached_property
    def metadata(self) -> list[KeyValue]:
        """Every key of the model, in file order (layout keys left out; empty arrays too: gguf-py cannot write them)."""
        out = []
        for key, f in self.fields.items():
            if key.startswith(LAYOUT_PREFIXES) or key in LAYOUT_KEYS:
                continue
            if f.types[0] != GGUFValueType.ARRAY:
                out.append(KeyValue(key, f.contents(), f.types[0]))
            elif len(f.types) > 2:
                raise GgufmoeError(f"{self.path}: key {key} is an array of arrays, which cannot be carried over")
            elif f.data:
                out.append(KeyValue(key, f.contents(), GGUFValueType.ARRAY, f.types[-1]))
        return out

    # --- tensors ----------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str) -> gguf.ReaderTensor:
        t = self._tensors.get(name)
        if t is None:
            raise GgufmoeError(f"{self.path}: tensor {name} not found")
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        """Numpy order (outermost first)."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def qtype(self, name: str) -> T:
        return self._tensor(name).tensor_type

    def raw(self, name: str, part: int | None = None) -> np.ndarray:
        """The stored bytes (uint8, memory-mapped) of the tensor, or of its outermost slice ``part``."""
        t = self._tensor(name)
        data = t.data.view(np.uint8)
        if part is None:
            return data.reshape(-1)
        return data.reshape(self.shape(name)[0], -1)[part]

    def get(self, name: str, part: int | None = None) -> np.ndarray:
        """The tensor (or its outermost slice ``part``) as float32, dequantized."""
        return self._dequantize(name, self.raw(name, part), self.shape(name)[0 if part is None else 1:])

    def get_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the outermost dimension as float32, dequantized (only their bytes are read)."""
        shape = self.shape(name)
        if not 0 <= r0 <= r1 <= shape[0]:
            raise ValueError(f"rows {r0}:{r1} of {name}, which has {shape[0]}")
        return self._dequantize(name, self.raw(name).reshape(shape[0], -1)[r0:r1], (r1 - r0, *shape[1:]))

    def _dequantize(self, name: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        qtype = self.qtype(name)
        try:
            values = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise GgufmoeError(f"{self.path}: tensor {name}: gguf-py cannot read type {qtype.name}") from None
        return np.array(values, dtype=np.float32).reshape(shape)

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...], T]]:
        """(name, numpy-order shape, type) of every tensor, in file order."""
        for name in self._tensors:
            yield name, self.shape(name), self.qtype(name)


def _unsplit_stem(path: Path) -> str:
    shard = ShardName.parse(path.name)
    return shard.base if shard else path.stem

"""Importance matrices (imatrix) in llama.cpp's formats: GGUF (current) and legacy ``.dat``.

Per weight tensor (by GGUF name) an imatrix holds the sum over calibration tokens of the
squared inputs of its matmul, per input column, and the token count — one row per expert
for 3-D expert tensors. Quantizers weight their rounding error by ``in_sum2 / counts``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.files import replace_atomically
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.source.gguf_file import read_gguf
from ggufmoe.model.names import EXPERT_TENSORS, GATE_UP_EXPERTS, ROUTER, TensorName, tensor_name
from ggufmoe.source.gguf_file import has_magic

SUM2_SUFFIX, COUNTS_SUFFIX = ".in_sum2", ".counts"

# Keys llama-quantize writes into a model quantized with an imatrix (strings at most 127 bytes there).
KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_ENTRIES = "quantize.imatrix.entries_count"
KV_CHUNKS = "quantize.imatrix.chunks_count"
KV_STR_MAX = 127

QuantizeKeys = list[tuple[str, str | int]]


@dataclass
class ImatrixEntry:
    """Statistics of one tensor: ``in_sum2`` (n_expert, ne0) float32, ``counts`` (n_expert,) float32."""

    in_sum2: np.ndarray
    counts: np.ndarray

    def importance(self) -> np.ndarray:
        """Mean squared input per column, (n_expert, ne0); ones for an expert that saw no tokens."""
        out = np.ones_like(self.in_sum2, dtype=np.float32)
        seen = self.counts > 0
        out[seen] = self.in_sum2[seen] / self.counts[seen, None]
        return out

    def importance_row(self, expert: int) -> np.ndarray:
        count = self.counts[expert]
        if count > 0:
            return (self.in_sum2[expert] / count).astype(np.float32)
        return np.ones(self.in_sum2.shape[1], dtype=np.float32)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str]
    chunk_count: int
    chunk_size: int

    def row(self, name: str, expert: int | None) -> np.ndarray | None:
        """The importance row of tensor ``name`` (of its expert ``expert``); None when it has no entry."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        n_expert = entry.in_sum2.shape[0]
        if expert is None:
            if n_expert != 1:
                raise GgufmoeError(f"imatrix entry {name} has {n_expert} expert rows, but the tensor has no experts")
            return entry.importance_row(0)
        if not 0 <= expert < n_expert:
            raise GgufmoeError(f"imatrix entry {name} has {n_expert} expert rows, expert {expert} asked for")
        return entry.importance_row(expert)

    def slice_rows(self, name: str, n_slices: int) -> np.ndarray | None:
        """Importance of tensor ``name`` without experts whose outermost dimension has ``n_slices`` slices
        (ne2 of a 3-D tensor, else 1): (1, ne0), one row for all of it, or (n_slices, ne0), one row per
        slice, as llama.cpp's imatrix stores MLA's 3-D ``attn_k_b``/``attn_v_b`` (per head). None when
        it has no entry."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        n_rows = entry.in_sum2.shape[0]
        if n_rows not in (1, n_slices):
            need = "1" if n_slices == 1 else f"1 or {n_slices} (one per slice)"
            raise GgufmoeError(f"imatrix entry {name} has {n_rows} rows, but its tensor has no experts: needs {need}")
        return entry.importance()


def quantize_keys(imatrix: Imatrix, file: str | None = None) -> QuantizeKeys:
    """The ``quantize.imatrix.*`` keys llama-quantize writes for ``imatrix`` (read from ``file``), in its order."""
    def cut(text: str) -> str:
        return text.encode()[:KV_STR_MAX].decode(errors="ignore")

    kv: QuantizeKeys = []
    if file:
        kv.append((KV_FILE, cut(file)))
    if imatrix.datasets:
        kv.append((KV_DATASET, cut(imatrix.datasets[0])))
    kv.append((KV_ENTRIES, len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        kv.append((KV_CHUNKS, int(imatrix.chunk_count)))
    return kv


def write_quantize_keys(w: gguf.GGUFWriter, kv: QuantizeKeys) -> None:
    """Write :func:`quantize_keys` as llama-quantize does: strings, and integers as uint32."""
    for key, value in kv:
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a llama.cpp imatrix, GGUF or legacy ``.dat`` (told apart by the GGUF magic)."""
    path = Path(path)
    return _load_gguf(path) if has_magic(path, "imatrix") else _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    return read_imatrix_gguf(path)[0]


def read_imatrix_gguf(path: str | Path) -> tuple[Imatrix, gguf.GGUFReader]:
    """Read a GGUF imatrix; also returns the reader, for keys and tensors other than the entries.

    Like llama.cpp's loader, only tensors named ``<tensor>.in_sum2`` / ``<tensor>.counts`` are
    entries; any other tensor is left to the caller.
    """
    path = Path(path)
    reader = read_gguf(path, "GGUF imatrix")
    sums: dict[str, gguf.ReaderTensor] = {}
    counts: dict[str, gguf.ReaderTensor] = {}
    for t in reader.tensors:
        if t.name.endswith(SUM2_SUFFIX):
            sums[t.name[: -len(SUM2_SUFFIX)]] = t
        elif t.name.endswith(COUNTS_SUFFIX):
            counts[t.name[: -len(COUNTS_SUFFIX)]] = t
    if not sums:
        raise GgufmoeError(f"{path}: no imatrix entries (no *.in_sum2 tensors; not an imatrix file?)")
    if sums.keys() != counts.keys():
        name = sorted(sums.keys() ^ counts.keys())[0]
        raise GgufmoeError(f"{path}: imatrix entry {name} lacks its in_sum2 or counts tensor")
    entries = {}
    for name in sorted(sums):
        s, c = sums[name], counts[name]
        if s.tensor_type != gguf.GGMLQuantizationType.F32 or c.tensor_type != gguf.GGMLQuantizationType.F32:
            raise GgufmoeError(f"{path}: imatrix entry {name} is not F32")
        cnt = np.array(c.data, dtype=np.float32).reshape(-1)
        if cnt.size == 0 or s.n_elements % cnt.size:
            raise GgufmoeError(f"{path}: imatrix entry {name} has {s.n_elements} sums for {cnt.size} counts")
        entries[name] = ImatrixEntry(np.array(s.data, dtype=np.float32).reshape(cnt.size, -1), cnt)
    imatrix = Imatrix(entries, _datasets(reader), _u32(reader, gguf.Keys.IMatrix.CHUNK_COUNT),
                      _u32(reader, gguf.Keys.IMatrix.CHUNK_SIZE))
    return imatrix, reader


def _datasets(reader: gguf.GGUFReader) -> list[str]:
    field = reader.get_field(gguf.Keys.IMatrix.DATASETS)
    if field is None or field.types[:1] != [gguf.GGUFValueType.ARRAY] or field.types[-1] != gguf.GGUFValueType.STRING:
        return []
    return list(field.contents())


def _u32(reader: gguf.GGUFReader, key: str) -> int:
    field = reader.get_field(key)
    return int(field.contents()) if field is not None and field.types == [gguf.GGUFValueType.UINT32] else 0


class _Bytes:
    """A cursor over a legacy file's bytes that fails with one clear line on truncation."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise GgufmoeError(f"{self.path}: truncated or corrupt imatrix (.dat) at byte {self.pos}")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def i32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _load_legacy(path: Path) -> Imatrix:
    """The legacy format stores ``(sum / count) * ncall`` per column, so importance = values / ncall."""
    try:
        buf = _Bytes(path.read_bytes(), path)
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot read imatrix ({e.strerror or e})") from None
    n_entries = buf.i32()
    if n_entries < 1:
        raise GgufmoeError(f"{path}: not an imatrix file (neither GGUF nor a legacy .dat with entries)")
    flat: dict[str, tuple[np.ndarray, int]] = {}
    for _ in range(n_entries):
        name_len = buf.i32()
        if name_len < 1 or name_len > 4096:
            raise GgufmoeError(f"{path}: corrupt imatrix (.dat): bad tensor name length {name_len}")
        try:
            name = buf.take(name_len).decode("utf-8")
        except UnicodeDecodeError:
            raise GgufmoeError(f"{path}: corrupt imatrix (.dat): tensor name is not UTF-8") from None
        ncall, nval = buf.i32(), buf.i32()
        if nval < 1:
            raise GgufmoeError(f"{path}: corrupt imatrix (.dat): entry {name} has {nval} values")
        flat[name] = (np.frombuffer(buf.take(4 * nval), dtype="<f4").astype(np.float32), ncall)
    chunk_count, datasets = 0, []
    if buf.left >= 4:  # optional trailer: chunk count, then the dataset name
        chunk_count = buf.i32()
        if buf.left >= 4:
            n = buf.i32()
            if n > 0:
                datasets.append(buf.take(n).decode("utf-8", errors="replace"))
    entries = {name: _legacy_entry(path, name, values, ncall, flat) for name, (values, ncall) in flat.items()}
    return Imatrix(entries, datasets, chunk_count, 0)


def _legacy_entry(path: Path, name: str, values: np.ndarray, ncall: int,
                  flat: dict[str, tuple[np.ndarray, int]]) -> ImatrixEntry:
    """Split an expert tensor's concatenated rows; the legacy format does not say how many experts.

    The router ``blk.N.ffn_gate_inp.weight`` reads the same input as the gate/up experts, so
    its length is their row length; that gives the expert count of layer N.
    """
    n_expert = 1
    parsed = TensorName.parse(name)
    if parsed.tensor in EXPERT_TENSORS:
        il = parsed.layer
        router = flat.get(tensor_name(ROUTER, il))
        gate_up = next((flat[n] for n in (tensor_name(t, il) for t in GATE_UP_EXPERTS) if n in flat), None)
        if router is None or gate_up is None or gate_up[0].size % router[0].size:
            raise GgufmoeError(f"{path}: legacy imatrix: cannot tell the expert count of {name} "
                               f"(needs {tensor_name(ROUTER, il)}; convert the file to GGUF with llama.cpp)")
        n_expert = gate_up[0].size // router[0].size
        if values.size % n_expert:
            raise GgufmoeError(f"{path}: legacy imatrix entry {name} has {values.size} values for {n_expert} experts")
    # counts = ncall makes importance = values / ncall; with no calls llama.cpp uses the values as they are
    counts = np.full(n_expert, ncall if ncall > 0 else 1, dtype=np.float32)
    return ImatrixEntry(values.reshape(n_expert, -1), counts)


def save_imatrix(imatrix: Imatrix, path: str | Path) -> None:
    """Write ``imatrix`` in llama.cpp's GGUF imatrix format, atomically (temporary file, then rename)."""
    write_imatrix_gguf(imatrix, path)


def write_imatrix_gguf(imatrix: Imatrix, path: str | Path, extra_tensors: dict[str, np.ndarray] | None = None,
                       extra_kv: Callable[[gguf.GGUFWriter], None] | None = None, what: str = "imatrix") -> None:
    """Write ``imatrix`` as llama-imatrix does, plus ``extra_tensors`` and the keys ``extra_kv`` adds.

    Extra tensor names must not end in ``.in_sum2`` / ``.counts``: llama.cpp reads those (and
    only those) as entries. Atomic: written under a temporary name, renamed when complete.
    """
    path = Path(path)
    extra_tensors = extra_tensors or {}
    for name in extra_tensors:
        if name.endswith((SUM2_SUFFIX, COUNTS_SUFFIX)) or name.rsplit(".", 1)[0] in imatrix.entries:
            raise ValueError(f"extra tensor {name} would be read as an imatrix entry")
    w = gguf.GGUFWriter(None, arch="imatrix")
    del w.kv_data[0][gguf.Keys.General.ARCHITECTURE]  # llama-imatrix writes no architecture
    w.add_type(gguf.GGUFType.IMATRIX)
    # llama.cpp needs the datasets key; gguf-py cannot write an empty array
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(imatrix.datasets) or ["unknown"])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(imatrix.chunk_count))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(imatrix.chunk_size))
    if extra_kv is not None:
        extra_kv(w)
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        sums = np.ascontiguousarray(e.in_sum2, dtype=np.float32)
        counts = np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1)
        if sums.ndim != 2 or sums.shape[0] != counts.shape[0]:
            raise GgufmoeError(f"imatrix entry {name}: sums {sums.shape} do not match {counts.shape[0]} counts")
        w.add_tensor(name + SUM2_SUFFIX, sums)
        w.add_tensor(name + COUNTS_SUFFIX, counts)
    for name, data in extra_tensors.items():
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    def write(tmp: Path) -> None:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

    try:
        replace_atomically(path, write)
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot write {what} ({e.strerror or e})") from None


def importance(spec: TensorSpec, part: int, imatrix: Imatrix | None) -> np.ndarray | None:
    """Importance rows of part ``part``: (1, ne0) — one row for all of it — or, for a 3-D tensor without
    experts whose entry has one row per slice (llama.cpp's per-head rows of MLA's ``attn_k_b``/``attn_v_b``),
    (ne2, ne0); None without an entry."""
    if imatrix is None:
        return None
    if spec.is_expert:
        row = imatrix.row(spec.name, spec.source_expert(part))
        rows = None if row is None else row[None]
    else:
        rows = imatrix.slice_rows(spec.name, spec.shape[0] if len(spec.shape) == 3 else 1)
    if rows is not None and rows.shape[1] != spec.shape[-1]:
        raise GgufmoeError(f"imatrix entry {spec.name} has rows of {rows.shape[1]} values, "
                           f"the tensor's rows have {spec.shape[-1]}")
    return rows

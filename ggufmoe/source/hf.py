"""Lazy reader for Hugging Face checkpoints: config.json plus single or sharded safetensors.

Every shard's header is parsed and validated when the source is opened (a truncated or corrupt
shard fails before anything is written). Tensor data is read with ``pread`` at the header's
offsets, whole or a range of rows, and returned as float32 numpy arrays: nothing is memory-mapped, so
pages read do not stay in the process's RSS. FP8 e4m3 weights with block scales (128x128, float32
``weight_scale_inv`` as DeepSeek-V3 ships them, or UE8M0 exponents ``.scale`` as DeepSeek-V4 does) are
dequantized one row-block at a time; FP4 weights packed two to a byte (int8) with one UE8M0 ``.scale``
per 32 values (DeepSeek-V4's experts, OCP MXFP4) are dequantized, or read as their codes and scales to be
copied. The float32 values are bit for bit torch's conversions of the same dtypes (NaNs included), without
torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from ggufmoe.errors import GgufmoeError, one_line
from ggufmoe.source import mxfp4
from ggufmoe.source.hf_config import read_config
from ggufmoe.source.hub import repository_name

SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3's float32 block scales: ``NAME_scale_inv`` beside ``NAME``
SCALE_TENSOR = ".scale"  # DeepSeek-V4's UE8M0 scales: ``X.scale`` beside ``X.weight``
FP8_BLOCK_SCALED = "F8_E4M3"  # the dtype that comes with block scales
FP4_PACKED = frozenset({"I8", "U8"})  # the dtypes of FP4 codes packed two to a byte (with a UE8M0 scale per 32)
UE8M0 = "F8_E8M0"
MAX_HEADER = 100_000_000  # safetensors' own limit on the header's length
QUIET_NAN = np.uint32(0x0040_0000)  # float32's quiet bit


def f16_to_f32(a: np.ndarray) -> np.ndarray:
    """float16 as float32, signalling NaNs quieted (as torch's conversion does)."""
    out = a.astype(np.float32)
    out.view(np.uint32)[np.isnan(out)] |= QUIET_NAN
    return out


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) as float32: they are its upper half."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def e5m2_to_f32(a: np.ndarray) -> np.ndarray:
    """FP8 e5m2 codes (uint8) as float32: each is the upper byte of a float16."""
    return f16_to_f32((a.astype(np.uint16) << 8).view(np.float16))


def e8m0_to_f32(a: np.ndarray) -> np.ndarray:
    """UE8M0 exponents (uint8) as float32: ``2^(a - 127)``; 255 is NaN (as torch's float8_e8m0fnu)."""
    out = np.ldexp(np.float32(1.0), a.astype(np.int32) - 127).astype(np.float32)
    out[a == 255] = np.nan
    return out


def _e4m3_values() -> np.ndarray:
    """The float32 value of each FP8 e4m3fn code: sign, 4 exponent bits (bias 7, 0 for subnormals), 3 mantissa
    bits; no infinities, S.1111.111 is NaN, with the sign and mantissa bits in float32's (as torch converts)."""
    code = np.arange(256, dtype=np.uint32)
    exp, man = (code >> 3) & 0xF, code & 0x7
    mag = np.where(exp > 0, np.ldexp(1.0 + man / 8, exp.astype(np.int32) - 7), np.ldexp(man / 8.0, -6))
    out = np.where(code & 0x80, -mag, mag).astype(np.float32)
    nan = (code & 0x7F) == 0x7F
    out.view(np.uint32)[nan] = (code[nan] & 0x80) << 24 | 0x7F80_0000 | man[nan] << 20
    return out


E4M3_VALUES = _e4m3_values()


def e4m3_to_f32(a: np.ndarray) -> np.ndarray:
    """FP8 e4m3fn codes (uint8) as float32."""
    return E4M3_VALUES[a]


@dataclass(frozen=True)
class Dtype:
    """How a safetensors dtype is read: its elements as stored (bfloat16 and FP8 as their bits), and their
    float32 values (``decode``; None: numpy's cast, which is torch's)."""

    stored: np.dtype
    decode: Callable[[np.ndarray], np.ndarray] | None = None

    def float32(self, a: np.ndarray) -> np.ndarray:
        return self.decode(a) if self.decode else a.astype(np.float32, copy=False)


# safetensors dtype -> how it is read (little-endian, as safetensors stores it)
DTYPES: dict[str, Dtype] = {name: Dtype(np.dtype(stored), decode) for name, (stored, decode) in {
    "BOOL": ("?", None), "U8": ("u1", None), "I8": ("i1", None),
    "F8_E4M3": ("u1", e4m3_to_f32), "F8_E5M2": ("u1", e5m2_to_f32), UE8M0: ("u1", e8m0_to_f32),
    "I16": ("<i2", None), "U16": ("<u2", None), "F16": ("<f2", f16_to_f32), "BF16": ("<u2", bf16_to_f32),
    "I32": ("<i4", None), "U32": ("<u4", None), "F32": ("<f4", None),
    "I64": ("<i8", None), "U64": ("<u8", None), "F64": ("<f8", None),
}.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``file`` from byte ``start`` (absolute), ``nbytes`` long."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Extent of the outermost dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, its header validated strictly against the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _truncated(path, f"{size} bytes, no header")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER:
                raise _corrupt(path, f"header length {n} is implausible")
            if 8 + n > size:
                raise _truncated(path, f"header of {n} bytes, file of {size}")
            text = f.read(n)
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _corrupt(path, f"header is not JSON: {one_line(e)}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, "__metadata__ is not an object of strings")
    entries = {name: _entry(path, name, info, 8 + n) for name, info in header.items()}
    _check_layout(path, entries, 8 + n, size)
    return entries


def _entry(path: Path, name: str, info: object, base: int) -> TensorEntry:
    """One header entry, checked: known dtype, shape of non-negative ints, offsets matching the shape."""
    if not isinstance(info, dict):
        raise _corrupt(path, f"entry {_short(name)} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"tensor {_short(name)} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {_short(name)} has an invalid shape {_short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) \
            or not 0 <= offsets[0] <= offsets[1]:
        raise _corrupt(path, f"tensor {_short(name)} has invalid data_offsets {_short(offsets)}")
    nbytes = math.prod(shape) * DTYPES[dtype].stored.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(path, f"tensor {_short(name)}: data_offsets {_short(offsets)} hold {offsets[1] - offsets[0]} "
                             f"bytes, shape {_short(shape)} in {dtype} needs {nbytes}")
    return TensorEntry(path, dtype, tuple(shape), base + offsets[0], nbytes)


def _check_layout(path: Path, entries: dict[str, TensorEntry], base: int, size: int) -> None:
    """Tensors must tile the data section (from ``base``) without gaps or overlaps, up to the file's end."""
    end = base
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        if e.start != end:
            why = "past the end of the file" if e.start + e.nbytes > size else "a gap or an overlap"
            raise _corrupt(path, f"tensor {_short(name)} starts at data byte {e.start - base}, "
                                 f"expected {end - base}: {why}")
        end += e.nbytes
    if end > size:
        raise _truncated(path, f"tensor data runs to byte {end}, file has {size}")
    if end < size:
        raise _corrupt(path, f"{size - end} bytes after the last tensor")


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _short(v: object, limit: int = 60) -> str:
    """``repr(v)``, cut to ``limit`` characters (a corrupt header can hold anything)."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _corrupt(path: Path, what: str) -> GgufmoeError:
    return GgufmoeError(f"{path}: corrupt safetensors file ({what})")


def _truncated(path: Path, what: str) -> GgufmoeError:
    return GgufmoeError(f"{path}: truncated safetensors file ({what})")


def read_at(path: Path, buf: np.ndarray, offset: int) -> None:
    """Fill ``buf`` with the bytes of ``path`` from ``offset`` on, by ``pread`` (no mapping)."""
    view = memoryview(buf).cast("B")
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise _truncated(path, f"ends before byte {offset + len(view)} (changed while reading?)")
                done += n
        finally:
            os.close(fd)
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot read ({e.strerror or e})") from None


class HFSource:
    """A Hugging Face model directory, read lazily tensor by tensor."""

    has_weights = True
    can_calibrate = True  # transformers runs it (calibrate, measured sensitivities)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise GgufmoeError(f"{self.path}: not a directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise GgufmoeError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        self.config: dict = read_config(cfg)
        self._tensors = self._index()

    def _index(self) -> dict[str, TensorEntry]:
        """Every tensor's entry: the index's weight map, each shard's header read and checked."""
        index = self.path / "model.safetensors.index.json"
        if not index.is_file():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise GgufmoeError(f"{self.path}: no .safetensors files")
            return {name: e for f in files for name, e in read_header(f).items()}
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise GgufmoeError(f"{index}: not a valid safetensors index ({one_line(e)})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise GgufmoeError(f"{index}: not a valid safetensors index (weight_map is not names to files)")
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise GgufmoeError(f"{self.path}: shard {shard} named in the index is missing")
        headers = {shard: read_header(self.path / shard) for shard in sorted(set(weight_map.values()))}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise GgufmoeError(f"{index}: tensor {name} is not in {shard}, where the index puts it")
        return {name: headers[shard][name] for name, shard in weight_map.items()}

    @cached_property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise GgufmoeError(f"{self.path}/config.json: no 'architectures' entry")
        return archs[0]

    @property
    def name(self) -> str:
        return repository_name(self.path)  # a Hub snapshot's repository, not its commit

    @cached_property
    def fp8_block(self) -> tuple[int, int]:
        block = (self.config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
        return int(block[0]), int(block[1])

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _entry(self, name: str) -> TensorEntry:
        entry = self._tensors.get(name)
        if entry is None:
            raise GgufmoeError(f"{self.path}: tensor {name} not found in the checkpoint")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape as float values (an FP4 matrix: twice the stored bytes per row)."""
        shape = self._entry(name).shape
        return (*shape[:-1], 2 * shape[-1]) if self.is_fp4(name) else shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32, FP8 block scales applied, FP4 decoded."""
        return self.get_rows(name, 0, self._entry(name).rows).reshape(self.shape(name))

    def raw_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the outermost dimension as stored (:attr:`Dtype.stored`)."""
        e = self._entry(name)
        if not 0 <= r0 <= r1 <= e.rows:
            raise ValueError(f"rows {r0}:{r1} of {name}, which has {e.rows}")
        buf = np.empty((r1 - r0) * e.row_nbytes, dtype=np.uint8)
        read_at(e.file, buf, e.start + r0 * e.row_nbytes)
        return buf.view(DTYPES[e.dtype].stored).reshape(r1 - r0, *e.shape[1:])

    def get_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the outermost dimension as float32, FP8 block scales applied, FP4 decoded."""
        e = self._entry(name)
        if e.dtype == FP8_BLOCK_SCALED:
            return dequant_fp8_blocks(self.raw_rows(name, r0, r1), self._fp8_scale(name, e), self.fp8_block, r0)
        if self.is_fp4(name):
            return mxfp4.dequantize(*self.fp4_rows(name, r0, r1))
        return DTYPES[e.dtype].float32(self.raw_rows(name, r0, r1))

    def scale_of(self, name: str) -> str | None:
        """The name of the scales that come with tensor ``name`` (``NAME_scale_inv`` or ``X.scale`` for ``X.weight``),
        None when it has none."""
        for scale in (name + SCALE_SUFFIX, name.removesuffix(".weight") + SCALE_TENSOR):
            if scale != name and scale in self._tensors:
                return scale
        return None

    def is_fp4(self, name: str) -> bool:
        """Whether ``name`` holds FP4 codes packed two to a byte, with UE8M0 scales, one per 32 values."""
        scale = self.scale_of(name)
        return (self._entry(name).dtype in FP4_PACKED and scale is not None
                and self._entry(scale).dtype == UE8M0)

    def fp4_rows(self, name: str, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``r0:r1`` of FP4 matrix ``name`` as MXFP4 blocks (rows, G, 16) and exponents (rows, G), uint8, as
        :mod:`ggufmoe.source.mxfp4` reads them."""
        e, scale = self._entry(name), self.scale_of(name)
        s = self._entry(scale)
        if len(e.shape) != 2 or s.shape != (e.shape[0], e.shape[1] * 2 // mxfp4.BLOCK) or e.shape[1] % 16:
            raise GgufmoeError(f"{e.file}: FP4 tensor {name} {e.shape} with scales {scale} {s.shape}: "
                               f"expected (rows, columns / 32) for {e.shape[1] * 2} columns")
        codes = self.raw_rows(name, r0, r1).view(np.uint8)
        return codes.reshape(r1 - r0, -1, mxfp4.BLOCK // 2), self.raw_rows(scale, r0, r1).view(np.uint8)

    def _fp8_scale(self, name: str, e: TensorEntry) -> np.ndarray:
        """The block scales of FP8 matrix ``name``, their shape checked against it."""
        scale_name = self.scale_of(name)
        if scale_name is None:
            raise GgufmoeError(f"{e.file}: FP8 tensor {name} has no {name + SCALE_SUFFIX} (or .scale)")
        if len(e.shape) != 2:
            raise GgufmoeError(f"{e.file}: FP8 tensor {name} has shape {e.shape}, block scales need a matrix")
        scale = self.get(scale_name)
        want = tuple(-(-d // b) for d, b in zip(e.shape, self.fp8_block))
        if tuple(scale.shape) != want:
            raise GgufmoeError(f"{e.file}: {scale_name} has shape {tuple(scale.shape)}, "
                               f"{e.shape} in blocks of {self.fp8_block} needs {want}")
        return scale


def dequant_fp8_blocks(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                       row0: int = 0) -> np.ndarray:
    """Dequantize rows ``row0:row0 + len(w)`` of an FP8 matrix (``w`` holds their e4m3fn codes, uint8;
    ``scale_inv`` has one float32 scale per block of the whole matrix), one row-block at a time."""
    rows, cols = w.shape
    bs_r, bs_c = block
    srows, scols = scale_inv.shape
    if srows < -(-(row0 + rows) // bs_r) or scols != -(-cols // bs_c):
        raise GgufmoeError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight rows "
                           f"{row0}:{row0 + rows} of {cols} columns")
    out = np.empty((rows, cols), dtype=np.float32)
    for i in range(row0 // bs_r, -(-(row0 + rows) // bs_r)):
        a, b = max(i * bs_r, row0) - row0, min((i + 1) * bs_r, row0 + rows) - row0
        s = np.repeat(scale_inv[i].astype(np.float32, copy=False), bs_c)[:cols]
        out[a:b] = e4m3_to_f32(w[a:b]) * s
    return out

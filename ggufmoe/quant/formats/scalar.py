"""The scalar block types: every value is ``a * LEVELS[code] - b`` with ``a`` and ``b`` fixed per sub-block by the block's
scales. K-types (Q2_K ... Q6_K), the legacy types (Q4_0 ... Q8_0) and the non-uniform IQ4_NL/IQ4_XS.

A format keeps the bytes llama.cpp wrote; unpacking reads each value's code and its ``a``, ``b``; choosing changes codes
only, and packing writes the code bits back into those bytes (the scales stay byte for byte). ``values`` computes
``a * LEVELS[code] - b`` in float32 in the order gguf-py's dequantization does, so both agree bit for bit.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ4_NL as _GGUF_IQ4_NL

from ggufmoe.quant.formats.base import BlockFormat, blocks

F32 = np.float32
NIBBLES = np.array([0, 4], np.uint8)
CRUMBS = np.array([0, 2, 4, 6], np.uint8)
BITS = np.arange(8, dtype=np.uint8)


def f16(b: np.ndarray) -> np.ndarray:
    """rows x blocks x 2 uint8 -> rows x blocks x 1 float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def spread(per_sub: np.ndarray, n: int) -> np.ndarray:
    """rows x blocks x subs -> rows x (blocks * subs * n): each sub-block's value over its ``n`` columns."""
    return np.repeat(per_sub, n, axis=-1).reshape(per_sub.shape[0], -1)


def nibbles(qs: np.ndarray, split: int) -> np.ndarray:
    """Bytes holding two 4-bit codes each: rows x blocks x (groups * split) -> codes rows x blocks x (groups * 2 * split),
    the low nibbles of a group's ``split`` bytes first, then their high nibbles."""
    r, b, n = qs.shape
    return ((qs.reshape(r, b, n // split, 1, split) >> NIBBLES[:, None]) & 0xF).reshape(r, b, -1)


def pack_nibbles(codes: np.ndarray, split: int) -> np.ndarray:
    r, b, n = codes.shape
    c = codes.reshape(r, b, n // (2 * split), 2, split)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(r, b, -1)


def bit_planes(bits: np.ndarray, planes: np.ndarray, mask: int) -> np.ndarray:
    """rows x blocks x (groups * width) bytes, each holding ``len(planes)`` fields at shifts ``planes`` ->
    rows x blocks x (groups * planes * width) fields: a group's field at the first shift for all its bytes, then the next."""
    r, b, n = bits.shape
    width = 32
    return ((bits.reshape(r, b, n // width, 1, width) >> planes[:, None]) & mask).reshape(r, b, -1)


def pack_bit_planes(fields: np.ndarray, planes: np.ndarray) -> np.ndarray:
    r, b, n = fields.shape
    f = fields.reshape(r, b, -1, len(planes), 32).astype(np.uint8)
    return np.bitwise_or.reduce(f << planes[:, None], axis=-2).reshape(r, b, -1)


def k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> 8 six-bit scales and 8 six-bit mins (rows x blocks x 8 each)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes -> 16 six-bit scales (rows x blocks x 16), minus 32."""
    r, b, _ = s.shape
    low = ((s[..., :8].reshape(r, b, 1, 8) >> NIBBLES[:, None]) & 0xF).reshape(r, b, 16)
    high = ((s[..., 8:].reshape(r, b, 1, 4) >> CRUMBS[:, None]) & 0x3).reshape(r, b, 16)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


class ScalarFormat(BlockFormat):
    """Codes, ``a`` and ``b`` per value; subclasses say where a block keeps them."""

    BLOCK: ClassVar[int]  # values per block
    BYTES: ClassVar[int]  # bytes per block
    LEVELS: ClassVar[np.ndarray]  # float32 value of each code
    UNIFORM: ClassVar[bool] = True  # LEVELS are consecutive integers

    def __init__(self, raw: np.ndarray):
        self.raw = blocks(np.array(raw, np.uint8), self.BYTES)
        self.codes = self.read_codes(self.raw).reshape(len(raw), -1)
        self.a, self.b = self.scales(self.raw)

    @classmethod
    def unpack(cls, raw: np.ndarray) -> "ScalarFormat":
        return cls(raw)

    def pack(self) -> np.ndarray:
        out = self.raw.copy()
        self.write_codes(out, self.codes.reshape(out.shape[0], out.shape[1], self.BLOCK).astype(np.uint8))
        return out.reshape(out.shape[0], -1)

    def values(self) -> np.ndarray:
        return self.a * self.LEVELS[self.codes] - self.b

    def choose(self, col: int, target: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        a, b = self.a[:, col:col + 1], self.b[:, col:col + 1]
        t = np.asarray(target, F32).reshape(-1, 1)
        now = self.codes[:, col:col + 1].astype(np.int64)  # first: kept on a tie (a zero scale: every code ties)
        if self.UNIFORM:
            lo = self.LEVELS[0]
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.floor((t + b) / a) - lo
            x = np.clip(np.where(np.isfinite(x), x, 0), -1, len(self.LEVELS))
            near = np.clip(np.concatenate([x, x + 1], axis=1), 0, len(self.LEVELS) - 1).astype(np.int64)
        else:
            near = np.broadcast_to(np.arange(len(self.LEVELS)), (len(t), len(self.LEVELS)))
        cand = np.concatenate([now, near], axis=1)
        vals = a * self.LEVELS[cand] - b
        pick = np.argmin(np.abs(vals - t), axis=1)
        code = cand[np.arange(len(t)), pick]
        self.codes[:, col] = code
        return vals[np.arange(len(t)), pick][:, None]

    @classmethod
    def read_codes(cls, raw: np.ndarray) -> np.ndarray:
        """rows x blocks x BLOCK codes."""
        raise NotImplementedError

    @classmethod
    def write_codes(cls, raw: np.ndarray, codes: np.ndarray) -> None:
        """Write rows x blocks x BLOCK codes into ``raw`` (its other bits kept)."""
        raise NotImplementedError

    @classmethod
    def scales(cls, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``a`` and ``b`` per value (rows x ne0 float32)."""
        raise NotImplementedError


def levels(lo: int, n: int) -> np.ndarray:
    return np.arange(lo, lo + n, dtype=F32)


class Q2K(ScalarFormat):
    TYPE, BLOCK, BYTES, LEVELS = T.Q2_K, 256, 84, levels(0, 4)

    @classmethod
    def read_codes(cls, raw):
        return bit_planes(raw[..., 16:80], CRUMBS, 3)

    @classmethod
    def write_codes(cls, raw, codes):
        raw[..., 16:80] = pack_bit_planes(codes, CRUMBS)

    @classmethod
    def scales(cls, raw):
        sc = raw[..., :16]
        d, dmin = f16(raw[..., 80:82]), f16(raw[..., 82:84])
        return spread(d * (sc & 0xF).astype(F32), 16), spread(dmin * (sc >> 4).astype(F32), 16)


class Q3K(ScalarFormat):
    TYPE, BLOCK, BYTES, LEVELS = T.Q3_K, 256, 110, levels(-4, 8)

    @classmethod
    def read_codes(cls, raw):
        r, b, _ = raw.shape
        high = ((raw[..., :32].reshape(r, b, 1, 32) >> BITS[:, None]) & 1).reshape(r, b, -1)
        return bit_planes(raw[..., 32:96], CRUMBS, 3) | (high << 2)

    @classmethod
    def write_codes(cls, raw, codes):
        r, b, _ = raw.shape
        raw[..., 32:96] = pack_bit_planes(codes & 3, CRUMBS)
        high = (codes >> 2).reshape(r, b, 8, 32)
        raw[..., :32] = np.bitwise_or.reduce(high << BITS[:, None], axis=-2)

    @classmethod
    def scales(cls, raw):
        d = f16(raw[..., 108:110])
        a = spread(d * q3_scales(raw[..., 96:108]).astype(F32), 16)
        return a, np.zeros_like(a)


class Q4K(ScalarFormat):
    TYPE, BLOCK, BYTES, LEVELS = T.Q4_K, 256, 144, levels(0, 16)
    CODES: ClassVar[slice] = slice(16, 144)

    @classmethod
    def read_codes(cls, raw):
        return nibbles(raw[..., cls.CODES], 32)

    @classmethod
    def write_codes(cls, raw, codes):
        raw[..., cls.CODES] = pack_nibbles(codes & 0xF, 32)

    @classmethod
    def scales(cls, raw):
        d, dmin = f16(raw[..., 0:2]), f16(raw[..., 2:4])
        sc, mn = k_scales(raw[..., 4:16])
        return spread(d * sc.astype(F32), 32), spread(dmin * mn.astype(F32), 32)


class Q5K(Q4K):
    TYPE, BLOCK, BYTES, LEVELS = T.Q5_K, 256, 176, levels(0, 32)
    CODES = slice(48, 176)

    @classmethod
    def read_codes(cls, raw):
        r, b, _ = raw.shape
        high = ((raw[..., 16:48].reshape(r, b, 1, 32) >> BITS[:, None]) & 1).reshape(r, b, -1)
        return super().read_codes(raw) | (high << 4)

    @classmethod
    def write_codes(cls, raw, codes):
        r, b, _ = raw.shape
        super().write_codes(raw, codes)
        raw[..., 16:48] = np.bitwise_or.reduce((codes >> 4).reshape(r, b, 8, 32) << BITS[:, None], axis=-2)


class Q6K(ScalarFormat):
    TYPE, BLOCK, BYTES, LEVELS = T.Q6_K, 256, 210, levels(-32, 64)

    @classmethod
    def read_codes(cls, raw):
        return nibbles(raw[..., :128], 64) | (bit_planes(raw[..., 128:192], CRUMBS, 3) << 4)

    @classmethod
    def write_codes(cls, raw, codes):
        raw[..., :128] = pack_nibbles(codes & 0xF, 64)
        raw[..., 128:192] = pack_bit_planes(codes >> 4, CRUMBS)

    @classmethod
    def scales(cls, raw):
        d = f16(raw[..., 208:210])
        a = spread(d * raw[..., 192:208].view(np.int8).astype(F32), 16)
        return a, np.zeros_like(a)


class Legacy(ScalarFormat):
    """32 values per block: an f16 scale ``d``, perhaps an f16 minimum ``m``, perhaps 32 high bits, 16 bytes of
    nibbles (values 0-15 in the low nibbles, 16-31 in the high)."""

    BLOCK = 32
    MIN: ClassVar[bool] = False  # an f16 minimum after d
    HIGH: ClassVar[bool] = False  # 32 high bits (one u32) before the nibbles

    @classmethod
    def _nibble_at(cls) -> int:
        return 2 + 2 * cls.MIN + 4 * cls.HIGH

    @classmethod
    def read_codes(cls, raw):
        codes = nibbles(raw[..., cls._nibble_at():], 16)
        if cls.HIGH:
            at = 2 + 2 * cls.MIN
            high = np.ascontiguousarray(raw[..., at:at + 4]).view("<u4") >> np.arange(32, dtype=np.uint32)
            codes = codes | ((high & 1).astype(np.uint8) << 4)
        return codes

    @classmethod
    def write_codes(cls, raw, codes):
        raw[..., cls._nibble_at():] = pack_nibbles(codes & 0xF, 16)
        if cls.HIGH:
            at = 2 + 2 * cls.MIN
            bits = ((codes >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
            raw[..., at:at + 4] = bits[..., None].view(np.uint8)

    @classmethod
    def scales(cls, raw):
        a = spread(f16(raw[..., 0:2]), 32)
        b = -spread(f16(raw[..., 2:4]), 32) if cls.MIN else np.zeros_like(a)
        return a, b


class Q40(Legacy):
    TYPE, BYTES, LEVELS = T.Q4_0, 18, levels(-8, 16)


class Q41(Legacy):
    TYPE, BYTES, LEVELS, MIN = T.Q4_1, 20, levels(0, 16), True


class Q50(Legacy):
    TYPE, BYTES, LEVELS, HIGH = T.Q5_0, 22, levels(-16, 32), True


class Q51(Legacy):
    TYPE, BYTES, LEVELS, MIN, HIGH = T.Q5_1, 24, levels(0, 32), True, True


class Q80(Legacy):
    TYPE, BYTES, LEVELS = T.Q8_0, 34, levels(-128, 256)

    @classmethod
    def read_codes(cls, raw):
        return (raw[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)

    @classmethod
    def write_codes(cls, raw, codes):
        raw[..., 2:34] = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)


KVALUES = np.array(_GGUF_IQ4_NL.kvalues, F32)


class IQ4NL(Q40):
    TYPE, LEVELS, UNIFORM = T.IQ4_NL, KVALUES, False


class IQ4XS(ScalarFormat):
    TYPE, BLOCK, BYTES, LEVELS, UNIFORM = T.IQ4_XS, 256, 136, KVALUES, False

    @classmethod
    def read_codes(cls, raw):
        return nibbles(raw[..., 8:], 16)

    @classmethod
    def write_codes(cls, raw, codes):
        raw[..., 8:] = pack_nibbles(codes & 0xF, 16)

    @classmethod
    def scales(cls, raw):
        r, b, _ = raw.shape
        d = f16(raw[..., 0:2])
        high = np.ascontiguousarray(raw[..., 2:4]).view("<u2") >> (2 * np.arange(8, dtype=np.uint16))
        low = ((raw[..., 4:8].reshape(r, b, 4, 1) >> NIBBLES) & 0xF).reshape(r, b, 8)
        ls = (low | ((high & 3).astype(np.uint8) << 4)).astype(np.int8) - np.int8(32)
        a = spread(d * ls.astype(F32), 32)
        return a, np.zeros_like(a)


SCALAR: tuple[type[ScalarFormat], ...] = (Q2K, Q3K, Q4K, Q5K, Q6K, Q40, Q41, Q50, Q51, Q80, IQ4NL, IQ4XS)

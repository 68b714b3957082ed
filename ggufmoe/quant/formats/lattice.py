"""ggml's lattice types (IQ1, IQ2, IQ3) as arrays: the block scales kept, each group of 8 values a grid point.

Each 8 values of a block are one entry of a fixed grid (or two entries of 4, for IQ3), times the step of their
sub-block, with a sign per value (IQ2, IQ3) or shifted by +-``DELTA`` (IQ1: no signs). In IQ2_XXS, IQ2_XS and
IQ3_XXS only 7 signs of 8 are stored; the 8th makes the number of minus signs even. The grids, and the order of
operations of the values, are gguf-py's (:mod:`gguf.quants`), so :meth:`Lattice.values` is its dequantization bit for
bit.

:meth:`Lattice.choose` searches the whole grid exactly: the squared error of each value at each grid level with each
sign, summed over an entry's values (a product with the entries one-hot), each value's better sign taken; where the
signs must be even and an entry's best are odd, its cheapest sign to flip is flipped.
"""

from __future__ import annotations

from abc import abstractmethod
from functools import cache
from itertools import product
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ggufmoe.quant.formats.base import BlockFormat, blocks

GROUPS = 32  # groups of 8 values in a block of 256
KSIGNS = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)  # 7 stored sign bits -> the 8 signs (even)
DELTA = gq.IQ1_S.delta  # IQ1's shift of the grid
EVEN, FREE, NONE = "even", "free", "none"  # the signs of a type: parity bound, 8 stored, none


def bits(words: np.ndarray, width: int, count: int) -> np.ndarray:
    """The ``count`` fields of ``width`` bits at the low end of each of ``words``, in order along the last axis."""
    shifts = (np.arange(count) * width).astype(words.dtype)
    fields = (words[..., None] >> shifts) & words.dtype.type((1 << width) - 1)
    return fields.reshape(*words.shape[:-1], -1)


def join(fields: np.ndarray, width: int, count: int, dtype: type) -> np.ndarray:
    """Inverse of :func:`bits`: each ``count`` fields along the last axis as one word of ``dtype``."""
    shifts = (np.arange(count) * width).astype(dtype)
    grouped = fields.astype(dtype).reshape(*fields.shape[:-1], -1, count)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1)


def section(b: np.ndarray, start: int, stop: int, dtype: type) -> np.ndarray:
    """Bytes ``start:stop`` of every block (rows x blocks x bytes) read as ``dtype``."""
    return np.ascontiguousarray(b[..., start:stop]).view(dtype)


def wide(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Grid indices from their low bytes and high bits."""
    return low.astype(np.uint16) | high.astype(np.uint16) << 8


def low(index: np.ndarray) -> np.ndarray:
    """The low bytes of grid indices."""
    return (index & 0xFF).astype(np.uint8)


def sign_words(aux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4-bit scales, sign bytes) of u32 words holding 4 x 7 sign bits and a scale in the top 4 bits."""
    return aux >> 28, KSIGNS[bits(aux, 7, 4)]


def sign_word(scales: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`sign_words`."""
    return join(signs & 0x7F, 7, 4, np.uint32) | scales.astype(np.uint32) << 28


@cache
def lattice(quant: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gguf-py's grid of ``quant``: its levels (float32), each entry as level indices (entries x width), and these
    one-hot (width * levels x entries float64: per-value costs times this sum over each entry)."""
    quant.init_grid()
    levels, inverse = np.unique(quant.grid.reshape(quant.grid_shape), return_inverse=True)
    entries = inverse.reshape(quant.grid_shape)
    n, width = entries.shape
    onehot = np.zeros((width, len(levels), n))
    onehot[np.arange(width)[:, None], entries.T, np.arange(n)] = 1
    return levels, entries, onehot.reshape(-1, n)


def over_entries(a: np.ndarray, entries: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """``a`` (rows x width x levels) taken at each entry's levels, reduced over its values by ``ufunc``."""
    out = np.take(a[:, 0], entries[:, 0], axis=1)
    for i in range(1, entries.shape[1]):
        out = ufunc(out, np.take(a[:, i], entries[:, i], axis=1))
    return out


def best_entries(cost: np.ndarray, negative: np.ndarray, flip: np.ndarray, entries: np.ndarray,
                 onehot: np.ndarray, even: bool) -> tuple[np.ndarray, np.ndarray]:
    """For one entry's worth of values (rows x width x levels: best cost, whether it is the minus sign, the cost of
    the other sign): the cost and the entry of the nearest entry, per parity of its minus signs when ``even`` (rows x
    2), else regardless (rows x 1)."""
    rows = cost.shape[0]
    total = cost.reshape(rows, -1) @ onehot
    if even:
        odd = (negative.reshape(rows, -1).astype(np.float64) @ onehot) % 2 == 1
        cheapest = over_entries(flip, entries, np.minimum)
        costs = np.stack([total + np.where(odd != p, cheapest, 0) for p in (0, 1)], axis=1)
    else:
        costs = total[:, None]
    chosen = np.argmin(costs, axis=-1)
    return np.take_along_axis(costs, chosen[..., None], axis=-1)[..., 0], chosen


def entry_signs(negative: np.ndarray, flip: np.ndarray, codes: np.ndarray, parity: np.ndarray,
                even: bool) -> np.ndarray:
    """The minus signs (rows x width) of entries with level indices ``codes`` (rows x width): each value's better,
    and where ``even`` and their parity is not ``parity``, the cheapest one flipped."""
    signs = np.take_along_axis(negative, codes[..., None], axis=-1)[..., 0]
    if even:
        wrong = signs.sum(axis=1) % 2 != parity
        cheapest = np.argmin(np.take_along_axis(flip, codes[..., None], axis=-1)[..., 0], axis=1)
        signs[wrong, cheapest[wrong]] ^= True
    return signs


def nearest(plus: np.ndarray, minus: np.ndarray, entries: np.ndarray, onehot: np.ndarray,
            even: bool) -> tuple[np.ndarray, np.ndarray]:
    """The grid entries and signs nearest a target, exactly: ``plus``, ``minus`` (rows x 8 x levels) the squared
    error of each value at each level with sign + and -, ``entries`` and ``onehot`` the grid (:func:`lattice`),
    ``even``: an even number of minus signs over the 8. Returns the entries (rows x 8 / width) and the minus signs
    (rows x 8 bool)."""
    width = entries.shape[1]
    cost, negative, flip = np.minimum(plus, minus), minus < plus, np.abs(plus - minus)
    parts = [slice(h, h + width) for h in range(0, 8, width)]
    best = [best_entries(cost[:, p], negative[:, p], flip[:, p], entries, onehot, even) for p in parts]
    options = np.array([o for o in product(range(best[0][0].shape[1]), repeat=len(parts)) if sum(o) % 2 == 0])
    costs = sum(c[:, options[:, h]] for h, (c, _) in enumerate(best))
    parity = options[np.argmin(costs, axis=1)]  # rows x parts
    index = np.stack([np.take_along_axis(e, parity[:, h, None], axis=1)[:, 0] for h, (_, e) in enumerate(best)], 1)
    signs = [entry_signs(negative[:, p], flip[:, p], entries[index[:, h]], parity[:, h], even)
             for h, p in enumerate(parts)]
    return index, np.concatenate(signs, axis=1)


class Lattice(BlockFormat):
    """The fields of a lattice type; a subclass says where they lie in a block and how a sub-block's step reads."""

    GROUP = 8
    QUANT: ClassVar[type]  # gguf-py's class of the type: the grid
    BLOCK: ClassVar[int]  # bytes per block of 256 values
    SIGNS: ClassVar[str]  # EVEN, FREE or NONE
    HALF_STEP: ClassVar[float | None] = None  # a sub-block's step: d (s + 1/2) HALF_STEP, or d (2 s + 1) if None

    def __init__(self, d: np.ndarray, scales: np.ndarray, index: np.ndarray, signs: np.ndarray | None = None,
                 delta: np.ndarray | None = None) -> None:
        self.d = d  # rows x blocks x 1 float16
        self.scales = scales.astype(np.uint8)  # rows x blocks x sub-blocks: the sub-block scale codes
        self.index = index.astype(np.uint16)  # rows x blocks x entries: grid indices, one or two per group
        self.signs = None if signs is None else signs.astype(np.uint8)  # rows x blocks x 32: bit i set: value i < 0
        self.delta = None if delta is None else delta.astype(np.uint8)  # rows x blocks x 8 or 32: 1 = shift -DELTA

    @classmethod
    @abstractmethod
    def _read(cls, b: np.ndarray) -> "Lattice":
        """The fields of blocks ``b`` (rows x blocks x BLOCK uint8)."""

    @abstractmethod
    def _write(self) -> list[np.ndarray]:
        """The fields in the order of a block, each rows x blocks x anything."""

    @classmethod
    def unpack(cls, raw: np.ndarray) -> "Lattice":
        return cls._read(blocks(raw, cls.BLOCK))

    def pack(self) -> np.ndarray:
        rows, n = self.d.shape[:2]
        parts = [np.ascontiguousarray(p).view(np.uint8).reshape(rows, n, -1) for p in self._write()]
        return np.concatenate(parts, axis=-1).reshape(rows, -1)

    def values(self) -> np.ndarray:
        return self._block_values(slice(None)).reshape(self.d.shape[0], -1)

    def choose(self, col: int, target: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        b, j = divmod(col // 8, GROUPS)
        blk = slice(b, b + 1)
        _, entries, onehot = lattice(self.QUANT)
        points = self._points(blk)[:, 0, j, None].astype(np.float64)  # rows x 1 x levels
        t = np.asarray(target, dtype=np.float64)[:, :8, None]
        w = 1.0 if weight is None else np.asarray(weight, np.float64).reshape(1, 8, 1)
        plus = w * (t - points) ** 2
        minus = np.full_like(plus, np.inf) if self.SIGNS == NONE else w * (t + points) ** 2
        index, negative = nearest(plus, minus, entries, onehot, self.SIGNS == EVEN)
        n = index.shape[1]
        self.index[:, b, j * n:(j + 1) * n] = index
        if self.signs is not None:
            self.signs[:, b, j] = join(negative, 1, 8, np.uint8)[:, 0]
        return self._block_values(blk)[:, 0, j]

    def _steps(self, blk: slice) -> np.ndarray:
        """rows x blocks x 32 float32: each group's step, from d and its sub-block scale as gguf-py computes it."""
        d = self.d[:, blk].astype(np.float32)
        s = self.scales[:, blk].astype(np.float32)
        step = d * (np.float32(0.5) + s) * np.float32(self.HALF_STEP) if self.HALF_STEP else d * (2 * s + 1)
        return np.repeat(step, GROUPS // s.shape[-1], axis=-1)

    def _points(self, blk: slice) -> np.ndarray:
        """rows x blocks x 32 x levels float32: the values each grid level stands for in each group, before a sign."""
        levels = lattice(self.QUANT)[0]
        steps = self._steps(blk)[..., None]
        if self.SIGNS != NONE:
            return steps * levels
        shifts = np.where(self.delta[:, blk] == 0, DELTA, -DELTA)
        return steps * (levels + np.repeat(shifts, GROUPS // shifts.shape[-1], axis=-1)[..., None])

    def _block_values(self, blk: slice) -> np.ndarray:
        """rows x blocks x 32 x 8 float32: the values of blocks ``blk``."""
        points = self._points(blk)
        codes = lattice(self.QUANT)[1][self.index[:, blk]].reshape(*points.shape[:3], 8)
        values = np.take_along_axis(points, codes, axis=-1)
        if self.SIGNS == NONE:
            return values
        return values * np.where(bits(self.signs[:, blk, :, None], 1, 8) == 0, np.float32(1), np.float32(-1))


class IQ2_XXS(Lattice):
    """d; per 32 values two u32: four 8-bit grid indices; 4 x 7 sign bits and a 4-bit scale."""

    TYPE = T.IQ2_XXS
    QUANT = gq.IQ2_XXS
    BLOCK = 66
    SIGNS = EVEN
    HALF_STEP = 0.25

    @classmethod
    def _read(cls, b: np.ndarray) -> Lattice:
        words = section(b, 2, 66, np.uint32).reshape(*b.shape[:2], 8, 2)
        scales, signs = sign_words(words[..., 1])
        return cls(section(b, 0, 2, np.float16), scales, bits(words[..., 0], 8, 4), signs)

    def _write(self) -> list[np.ndarray]:
        words = np.stack([join(self.index, 8, 4, np.uint32), sign_word(self.scales, self.signs)], axis=-1)
        return [self.d, words]


class IQ2_XS(Lattice):
    """d; u16 per 8 values: a 9-bit grid index and 7 sign bits; a 4-bit scale per 16 values."""

    TYPE = T.IQ2_XS
    QUANT = gq.IQ2_XS
    BLOCK = 74
    SIGNS = EVEN
    HALF_STEP = 0.25

    @classmethod
    def _read(cls, b: np.ndarray) -> Lattice:
        q = section(b, 2, 66, np.uint16)
        return cls(section(b, 0, 2, np.float16), bits(b[..., 66:], 4, 2), q & 0x1FF, KSIGNS[q >> 9])

    def _write(self) -> list[np.ndarray]:
        return [self.d, self.index | (self.signs & 0x7F).astype(np.uint16) << 9, join(self.scales, 4, 2, np.uint8)]


class IQ2_S(Lattice):
    """d; low bytes of the 10-bit grid indices; a sign byte per 8 values; their high 2 bits; a 4-bit scale per 16."""

    TYPE = T.IQ2_S
    QUANT = gq.IQ2_S
    BLOCK = 82
    SIGNS = FREE
    HALF_STEP = 0.25

    @classmethod
    def _read(cls, b: np.ndarray) -> Lattice:
        index = wide(b[..., 2:34], bits(b[..., 66:74], 2, 4))
        return cls(section(b, 0, 2, np.float16), bits(b[..., 74:], 4, 2), index, b[..., 34:66])

    def _write(self) -> list[np.ndarray]:
        return [self.d, low(self.index), self.signs, join(self.index >> 8, 2, 4, np.uint8),
                join(self.scales, 4, 2, np.uint8)]


class IQ3_XXS(Lattice):
    """d; an 8-bit grid index per 4 values; per 32 values a u32: 4 x 7 sign bits and a 4-bit scale."""

    TYPE = T.IQ3_XXS
    QUANT = gq.IQ3_XXS
    BLOCK = 98
    SIGNS = EVEN
    HALF_STEP = 0.5

    @classmethod
    def _read(cls, b: np.ndarray) -> Lattice:
        scales, signs = sign_words(section(b, 66, 98, np.uint32))
        return cls(section(b, 0, 2, np.float16), scales, b[..., 2:66], signs)

    def _write(self) -> list[np.ndarray]:
        return [self.d, low(self.index), sign_word(self.scales, self.signs)]


class IQ3_S(Lattice):
    """d; low bytes of the 9-bit grid indices (one per 4 values); their high bits; a sign byte per 8 values; a
    4-bit scale per 32 values, step d (2 s + 1)."""

    TYPE = T.IQ3_S
    QUANT = gq.IQ3_S
    BLOCK = 110
    SIGNS = FREE

    @classmethod
    def _read(cls, b: np.ndarray) -> Lattice:
        index = wide(b[..., 2:66], bits(b[..., 66:74], 1, 8))
        return cls(section(b, 0, 2, np.float16), bits(b[..., 106:], 4, 2), index, b[..., 74:106])

    def _write(self) -> list[np.ndarray]:
        return [self.d, low(self.index), join(self.index >> 8, 1, 8, np.uint8), self.signs,
                join(self.scales, 4, 2, np.uint8)]


class IQ1_S(Lattice):
    """d; low bytes of the 11-bit grid indices; per 32 values a u16: 4 x 3 high index bits, a 3-bit scale (step
    d (2 s + 1)) and the sign of the shift."""

    TYPE = T.IQ1_S
    QUANT = gq.IQ1_S
    BLOCK = 50
    SIGNS = NONE

    @classmethod
    def _read(cls, b: np.ndarray) -> Lattice:
        qh = section(b, 34, 50, np.uint16)
        return cls(section(b, 0, 2, np.float16), qh >> 12 & 7, wide(b[..., 2:34], bits(qh, 3, 4)), delta=qh >> 15)

    def _write(self) -> list[np.ndarray]:
        qh = join(self.index >> 8, 3, 4, np.uint16) | self.scales.astype(np.uint16) << 12
        return [self.d, low(self.index), qh | self.delta.astype(np.uint16) << 15]


class IQ1_M(Lattice):
    """Low bytes of the 11-bit grid indices; a nibble per 8 values: 3 high index bits and the sign of the shift;
    four u16 of 4 x 3-bit scales (one per 16 values, step d (2 s + 1)), their top nibbles d's float16 bits."""

    TYPE = T.IQ1_M
    QUANT = gq.IQ1_M
    BLOCK = 56
    SIGNS = NONE

    @classmethod
    def _read(cls, b: np.ndarray) -> Lattice:
        nibbles = bits(b[..., 32:48], 4, 2)
        sc = section(b, 48, 56, np.uint16)
        d = join(sc >> 12, 4, 4, np.uint16).view(np.float16)
        return cls(d, bits(sc, 3, 4), wide(b[..., :32], nibbles & 7), delta=nibbles >> 3)

    def _write(self) -> list[np.ndarray]:
        nibbles = self.index >> 8 | self.delta.astype(np.uint16) << 3
        sc = join(self.scales, 3, 4, np.uint16) | bits(self.d.view(np.uint16), 4, 4) << 12
        return [low(self.index), join(nibbles, 4, 2, np.uint8), sc]


LATTICE: tuple[type[BlockFormat], ...] = (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M)

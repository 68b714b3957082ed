"""A ggml block type as arrays: the bytes llama.cpp writes unpacked into scales and codes, codes changed, packed again.

The output-aware rounding (:mod:`ggufmoe.quant.aware`) starts from llama.cpp's own quantization of a tensor (its
scales), keeps the scales, and chooses the codes column group by column group (``GROUP`` columns at a time: one value
for the scalar types, a lattice vector for the IQ types) with second-order error feedback. A format therefore needs to
unpack bytes, say the values its codes stand for, choose the codes of a column group nearest a target, and pack.
``pack(unpack(raw))`` is ``raw`` byte for byte, and :meth:`BlockFormat.values` is exactly what gguf-py's
dequantization gives for the packed bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T


class BlockFormat(ABC):
    """The blocks of ``rows`` rows of one tensor at one type."""

    TYPE: ClassVar[T]
    GROUP: ClassVar[int] = 1  # columns whose codes are chosen together

    @classmethod
    @abstractmethod
    def unpack(cls, raw: np.ndarray) -> "BlockFormat":
        """From ``raw``: rows x row-bytes uint8, as ggml writes the type."""

    @abstractmethod
    def pack(self) -> np.ndarray:
        """The rows as ggml stores them: rows x row-bytes uint8."""

    @abstractmethod
    def values(self) -> np.ndarray:
        """rows x ne0 float32: what the codes stand for, exactly gguf-py's dequantization of :meth:`pack`."""

    @abstractmethod
    def choose(self, col: int, target: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """Set the codes of columns ``col .. col + GROUP - 1`` (``col`` a multiple of ``GROUP``) to those whose values
        are nearest ``target`` (rows x GROUP float32), the scales kept; returns those values (rows x GROUP). Nearest in
        squared distance, each column's term times its ``weight`` (GROUP values; None: all 1)."""


def halves(raw: np.ndarray, n: int) -> np.ndarray:
    """``n`` float16 values from the front of each row of uint8 ``raw``, as float32 (rows x n)."""
    return np.ascontiguousarray(raw[:, : 2 * n]).view(np.float16).astype(np.float32)


def blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """rows x row-bytes uint8 as rows x blocks x block-bytes."""
    return raw.reshape(raw.shape[0], -1, block_bytes)

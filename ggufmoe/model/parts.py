"""A tensor's parts as a conversion reads them: each expert slice whole, a big tensor in row chunks, so that memory holds
one chunk (:data:`CHUNK_BYTES` of float32) at a time, never the whole tensor."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.tensor import RowLoader, TensorSpec

CHUNK_BYTES = 64 << 20  # float32 bytes of one row chunk of a big tensor (token_embd, output, dense FFN)
CHUNK_ALIGN = 256  # rows per chunk are a multiple of this: whole 128-row FP8 scale blocks


Span = tuple[int, int] | None  # rows r0:r1 of a part, or None: the part whole


def part_spans(spec: TensorSpec) -> list[Span]:
    """How each part of ``spec`` is read: whole, or in row chunks when the tensor is big and its loader reads rows
    (see :func:`chunk_rows`)."""
    step = chunk_rows(spec)
    if step is None:
        return [None]
    n = spec.shape[0]
    return [(r0, min(r0 + step, n)) for r0 in range(0, n, step)]


def load_span(spec: TensorSpec, i: int, span: Span) -> np.ndarray:
    """Rows ``span`` of part ``i`` as float32 (the part whole for None)."""
    if span is None:
        return checked_shape(spec, spec.load(i), spec.shape[1:] if spec.is_expert else spec.shape)
    r0, r1 = span
    return checked_shape(spec, spec.load.rows(r0, r1), (r1 - r0, *spec.shape[1:]))


def part_chunks(spec: TensorSpec, i: int) -> Iterator[tuple[int, np.ndarray]]:
    """Part ``i`` as float32, with the index of its first row: whole, or in row chunks (:func:`part_spans`)."""
    for span in part_spans(spec):
        yield 0 if span is None else span[0], load_span(spec, i, span)


def chunk_rows(spec: TensorSpec) -> int | None:
    """Rows per chunk for a tensor over ``CHUNK_BYTES`` in float32 whose loader reads rows, else None.
    Chunks are whole multiples of ``CHUNK_ALIGN`` rows (whole FP8 scale blocks) unless the tensor ends."""
    if not isinstance(spec.load, RowLoader) or 4 * spec.n_elements <= CHUNK_BYTES:
        return None
    row_bytes = 4 * spec.n_elements // spec.shape[0]
    return max(CHUNK_ALIGN, CHUNK_BYTES // row_bytes // CHUNK_ALIGN * CHUNK_ALIGN)


def checked_shape(spec: TensorSpec, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(data.shape) != tuple(shape):
        raise GgufmoeError(f"{spec.name}: source has shape {tuple(data.shape)}, expected {tuple(shape)}")
    return data

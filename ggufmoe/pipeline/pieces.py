"""A conversion's data, piece by piece in write order: which parts of which tensors (:class:`PieceRef`, plain data a
worker on another machine can be handed), reading one (:func:`read_piece`) and its bytes as written (:func:`encode`).
:class:`LocalEncoder` makes them in this process, reading ahead; ``ggufmoe.cluster.encode`` on a Ray cluster."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
from tqdm import tqdm

from ggufmoe.model.finite import NonFinite
from ggufmoe.model.parts import Span, load_span, part_spans
from ggufmoe.pipeline.read_ahead import read_ahead
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.rounded_store import RoundedStore
from ggufmoe.quant.rules import TypedTensor
from ggufmoe.stats.imatrix import Imatrix, importance


@dataclass(frozen=True)
class PieceRef:
    """One piece of a conversion: rows ``span`` of part ``part`` of its ``tensor``-th tensor (in write order)."""

    tensor: int
    part: int
    span: Span = None

    def share(self, p: TypedTensor) -> float:
        """The fraction of tensor ``p`` this piece is."""
        rows = 1.0 if self.span is None else (self.span[1] - self.span[0]) / p.spec.shape[0]
        return rows / p.spec.n_parts


@dataclass
class Piece:
    """One piece as read from the source: the stored bytes to copy, or float32 rows to quantize with their
    importance rows (one row, or one per outermost slice)."""

    tensor: TypedTensor
    data: np.ndarray
    importance: np.ndarray | None = None


def piece_refs(typed: list[TypedTensor], start: int = 0) -> Iterator[PieceRef]:
    """The pieces of tensors ``start:`` in write order: each expert slice, a big tensor's row chunks; a copied
    part whole."""
    for t in range(start, len(typed)):
        p = typed[t]
        spans = [None] if p.copies else part_spans(p.spec)
        for i in range(p.spec.n_parts):
            for span in spans:
                yield PieceRef(t, i, span)


def read_piece(typed: list[TypedTensor], ref: PieceRef, imatrix: Imatrix | None, nonfinite: NonFinite) -> Piece:
    """Piece ``ref`` read, its non-finite values set to 0 and counted by ``nonfinite``."""
    p = typed[ref.tensor]
    spec = p.spec
    if p.copies:
        return Piece(p, nonfinite.clean(spec.name, spec.raw(ref.part), spec.source_type))
    rows = importance(spec, ref.part, imatrix)
    if rows is not None and len(rows) > 1 and ref.span is not None:
        rows = rows[ref.span[0]:]
    return Piece(p, nonfinite.clean(spec.name, load_span(spec, ref.part, ref.span)), rows)


def encode(piece: Piece, q: Quantizer, rounded: RoundedStore | None = None) -> np.ndarray:
    """The bytes written for ``piece``: rounded ahead when ``rounded`` holds them, else quantized here. Quantized rows
    are contiguous in GGUF, so parts are written in order."""
    p, rows = piece.tensor, piece.importance
    if p.copies:
        return piece.data
    if rounded is not None and (data := rounded.get(piece.data, p.qtype)) is not None:
        return data
    if rows is not None and len(rows) > 1:
        return np.concatenate([q.quantize(s, p.qtype, r) for s, r in zip(piece.data, rows)])
    return q.quantize(piece.data, p.qtype, None if rows is None else rows[0])


@dataclass
class Conversion:
    """What a conversion writes, as every process that encodes a piece of it sees it: its source and options (a
    ``ConvertOptions``), the tensors and their types in write order, the importance matrix, the tensors rounded ahead
    and the non-finite weights met."""

    source: Path
    opts: object
    typed: list[TypedTensor]
    imatrix: Imatrix | None
    rounded: RoundedStore | None
    nonfinite: NonFinite


class Encoder(Protocol):
    """Makes a conversion's bytes: per tensor from ``start`` on, in write order, its name and its parts' bytes."""

    def tensors(self, conv: Conversion, start: int, bar: tqdm) -> Iterator[tuple[str, Iterable[np.ndarray]]]: ...


class LocalEncoder:
    """This process's quantizer (``threads`` threads), the next piece read ahead in a background thread while one is
    quantized."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def tensors(self, conv: Conversion, start: int, bar: tqdm) -> Iterator[tuple[str, Iterable[np.ndarray]]]:
        def pieces() -> Iterator[Piece]:
            for t, refs in itertools.groupby(piece_refs(conv.typed, start), key=lambda r: r.tensor):
                for ref in refs:
                    yield read_piece(conv.typed, ref, conv.imatrix, conv.nonfinite)
                conv.nonfinite.check(conv.typed[t].spec.name)

        def encoded(group: Iterable[Piece], q: Quantizer) -> Iterator[np.ndarray]:
            for piece in group:
                data = encode(piece, q, conv.rounded)
                bar.update(data.nbytes)
                yield data

        with Quantizer(self.threads) as q, read_ahead(pieces()) as read:
            for name, group in itertools.groupby(read, key=lambda piece: piece.tensor.spec.name):
                yield name, encoded(group, q)

"""A GGUF tensor to be written, loaded lazily one part (expert slice) at a time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

import gguf
import numpy as np

from ggufmoe.model.names import TensorName

Loader = Callable[[int], np.ndarray]  # part -> float32
RawLoader = Callable[[int], np.ndarray]


class RowSource(Protocol):
    """A source that reads a range of a tensor's rows (outermost dimension) as float32."""

    def get(self, name: str) -> np.ndarray: ...

    def get_rows(self, name: str, r0: int, r1: int) -> np.ndarray: ...


@dataclass(frozen=True)
class RowLoader:
    """The loader of a tensor read straight from one source tensor: whole (``load(0)``), or a range
    of its rows (``rows(r0, r1)``), so a big tensor can be converted in row chunks. Wrapping it
    (pruning's row selection, a transform) gives a plain callable, which loads whole tensors only."""

    src: RowSource
    tensor: str

    def __call__(self, _: int) -> np.ndarray:
        return self.src.get(self.tensor)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` (outermost dimension) as float32."""
        return self.src.get_rows(self.tensor, r0, r1)


@dataclass
class TensorSpec:
    """One GGUF tensor. ``shape`` is in numpy order (outermost first; experts first for 3-D).

    ``load(i)`` returns part ``i`` as a float32 array: the whole tensor when ``n_parts == 1``,
    else the 2-D slice of expert ``i``; a :class:`RowLoader` also loads a range of rows. A source
    that stores quantized tensors (a GGUF) also gives ``source_type`` and ``raw(i)``: part ``i``'s
    bytes as stored, copied when the type stays. Several specs may come from one checkpoint tensor: cut
    into rows (``rows_of_source``: each multiplies the same input) or otherwise (MLA's ``kv_b``: no one input).
    """

    name: str
    shape: tuple[int, ...]
    load: Loader
    n_parts: int = 1
    hf_name: str = ""  # source tensor in the checkpoint; ``{e}`` marks the expert index
    expert_ids: tuple[int, ...] | None = None  # source expert of each part, when pruned
    source_type: gguf.GGMLQuantizationType | None = None  # type as stored in the source (GGUF)
    raw: RawLoader | None = None  # part ``i`` as stored (uint8), for sources with ``source_type``
    rows_of_source: bool = False  # some rows of ``hf_name``, shared with other specs: its matmul reads that input
    # column j multiplies element input_order[j] of the checkpoint matmul's input (columns reordered on conversion)
    input_order: tuple[int, ...] | None = None
    # written at this type whatever the mix or plan (a table of integers, a weight llama.cpp's graph reads in F32)
    fixed_type: gguf.GGMLQuantizationType | None = None
    holds_expert_ids: bool = False  # its values are routed-expert ids (a token -> experts table): pruning renumbers

    def source_expert(self, part: int) -> int:
        return self.expert_ids[part] if self.expert_ids is not None else part

    @cached_property
    def parsed(self) -> TensorName:
        return TensorName.parse(self.name)

    @property
    def kind(self) -> str:
        """The tensor's class: its GGUF name without block number and suffix (``ffn_down_exps``)."""
        return self.parsed.base

    @property
    def layer(self) -> int | None:
        return self.parsed.layer

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_expert(self) -> bool:
        return self.n_parts > 1

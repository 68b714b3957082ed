"""ggml's block types as arrays (:mod:`ggufmoe.quant.formats.base`): the scalar types in
:mod:`~ggufmoe.quant.formats.scalar`, the lattice (IQ1-IQ3) types in :mod:`~ggufmoe.quant.formats.lattice`."""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

from ggufmoe.quant.formats.base import BlockFormat
from ggufmoe.quant.formats.lattice import LATTICE
from ggufmoe.quant.formats.scalar import SCALAR

FORMATS: dict[T, type[BlockFormat]] = {f.TYPE: f for f in SCALAR + LATTICE}

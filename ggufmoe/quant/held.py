"""What a tensor holds once written at a type: its rows quantized by our quantizer (llama.cpp's own, as ``convert``
writes them, with the same importance row) and read back by gguf-py's dequantization."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.quant.ggml import Quantizer

EXACT = frozenset({T.F32})  # types that hold the float32 values as they are


def held_values(rows: np.ndarray, t: T, imatrix: np.ndarray | None, q: Quantizer) -> np.ndarray:
    """``rows`` (any leading shape, rows of ne0 values) as the file stores them at type ``t`` (already the type
    written: :func:`~ggufmoe.model.qtypes.effective_type`), float32."""
    if t in EXACT:
        return np.ascontiguousarray(rows, np.float32)
    ne0 = rows.shape[-1]
    flat = np.ascontiguousarray(rows, np.float32).reshape(-1, ne0)
    data = q.quantize(flat, t, imatrix).reshape(len(flat), -1)
    return gguf.quants.dequantize(data, t).astype(np.float32, copy=False).reshape(rows.shape)

"""Quantization engine: llama.cpp's own quantizers from llama-cpp-python's ``libggml-base``.

``ggml_quantize_chunk`` is called through ctypes (which releases the GIL), rows split across
a thread pool. Expert tensors are quantized one expert slice at a time with that expert's
importance row. Types, their blocks and fallbacks: :mod:`ggufmoe.model.qtypes`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.qtypes import block_size, row_bytes

# Rows per work item handed to one thread: large enough to amortise the call.
ROWS_PER_TASK = 64


@lru_cache(maxsize=1)
def ggml() -> ctypes.CDLL:
    """llama-cpp-python's bundled libggml-base, with the signatures we use."""
    spec = importlib.util.find_spec("llama_cpp")  # its folder, without importing it (and loading libllama)
    libdir = Path(spec.origin).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.*"))
    if not candidates:
        raise GgufmoeError(f"libggml-base not found in {libdir}; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


def requires_imatrix(t: T) -> bool:
    return bool(ggml().ggml_quantize_requires_imatrix(int(t)))


class Quantizer:
    """Quantizes float32 row blocks with a shared thread pool."""

    def __init__(self, threads: int | None = None):
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._initialised: set[T] = set()

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()

    def __enter__(self) -> "Quantizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def quantize(self, data: np.ndarray, t: T, imatrix: np.ndarray | None = None) -> np.ndarray:
        """Quantize ``data`` (rows x ne0 float32, any leading shape) to type ``t``; returns uint8 bytes.

        ``imatrix`` is one importance value per column (mean squared input), or None.
        """
        ne0 = data.shape[-1]
        src = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, ne0)
        if t == T.F32:
            return src.view(np.uint8).reshape(-1)
        if ne0 % block_size(t):
            raise GgufmoeError(f"rows of {ne0} values cannot be stored as {t.name}")
        if imatrix is None and requires_imatrix(t):
            raise GgufmoeError(f"{t.name} needs an importance matrix: pass --imatrix (or choose another type)")
        lib = ggml()
        if t not in self._initialised:
            lib.ggml_quantize_init(int(t))  # build lookup tables once, before threads race for them
            self._initialised.add(t)
        nrows = src.shape[0]
        rb = row_bytes(t, ne0)
        dst = np.empty(nrows * rb, dtype=np.uint8)
        imat = None
        if imatrix is not None:
            imat = np.ascontiguousarray(imatrix, dtype=np.float32)
            if imat.shape != (ne0,):
                raise GgufmoeError(f"importance row has {imat.size} values, tensor rows have {ne0}")
        src_p, dst_p = src.ctypes.data, dst.ctypes.data
        imat_p = imat.ctypes.data if imat is not None else None

        def run(r0: int) -> int:
            n = min(ROWS_PER_TASK, nrows - r0)
            return lib.ggml_quantize_chunk(int(t), src_p, dst_p, r0 * ne0, n, ne0, imat_p)

        starts = range(0, nrows, ROWS_PER_TASK)
        written = sum(self.pool.map(run, starts) if self.pool and nrows > ROWS_PER_TASK else map(run, starts))
        if written != dst.size:
            raise GgufmoeError(f"ggml quantized {written} bytes, expected {dst.size}")
        return dst

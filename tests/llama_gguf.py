"""Read a GGUF file with llama.cpp's own parser (libggml-base of llama-cpp-python, through ctypes).

``read_gguf`` opens the file as ``common_imatrix_load`` does (``gguf_init_from_file`` with the
data loaded into a ggml context) and returns its keys and tensors; ``imatrix_entries`` then
picks the entries exactly as that loader does: tensors named ``<name>.in_sum2`` /
``<name>.counts``, everything else ignored.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

GGUF_UINT32, GGUF_INT32, GGUF_BOOL, GGUF_STRING, GGUF_ARRAY, GGUF_UINT64 = 4, 5, 7, 8, 9, 10
GGML_F32 = 0
_ARRAY_DTYPES = {GGUF_UINT32: np.uint32, GGUF_INT32: np.int32, GGUF_UINT64: np.uint64, GGUF_BOOL: np.bool_}


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class _TensorHead(ctypes.Structure):  # leading fields of struct ggml_tensor
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


@cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))[0]))
    vp, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    for fn, res, args in [
        ("gguf_init_from_file", vp, [ctypes.c_char_p, _InitParams]), ("gguf_free", None, [vp]),
        ("gguf_get_n_kv", i64, [vp]), ("gguf_get_key", ctypes.c_char_p, [vp, i64]),
        ("gguf_get_kv_type", ctypes.c_int, [vp, i64]), ("gguf_get_arr_type", ctypes.c_int, [vp, i64]),
        ("gguf_get_arr_n", sz, [vp, i64]), ("gguf_get_arr_str", ctypes.c_char_p, [vp, i64, sz]),
        ("gguf_get_arr_data", vp, [vp, i64]),
        ("gguf_get_val_u32", ctypes.c_uint32, [vp, i64]), ("gguf_get_val_i32", ctypes.c_int32, [vp, i64]),
        ("gguf_get_val_u64", ctypes.c_uint64, [vp, i64]), ("gguf_get_val_bool", ctypes.c_bool, [vp, i64]),
        ("gguf_get_val_str", ctypes.c_char_p, [vp, i64]),
        ("gguf_get_n_tensors", i64, [vp]), ("gguf_get_tensor_name", ctypes.c_char_p, [vp, i64]),
        ("ggml_get_first_tensor", vp, [vp]), ("ggml_get_next_tensor", vp, [vp, vp]),
        ("ggml_get_name", ctypes.c_char_p, [vp]), ("ggml_nelements", i64, [vp]),
        ("ggml_get_data_f32", ctypes.POINTER(ctypes.c_float), [vp]), ("ggml_free", None, [vp]),
    ]:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


@dataclass
class LlamaGGUF:
    kv: dict[str, tuple[int, int | None, object]]  # key -> (type, array element type, value)
    tensors: dict[str, tuple[int, tuple[int, int], np.ndarray | None]]  # name -> (ggml type, (ne0, ne1), F32 data)


def _value(lib, g, k: int):
    t = lib.gguf_get_kv_type(g, k)
    if t == GGUF_ARRAY:
        at, n = lib.gguf_get_arr_type(g, k), lib.gguf_get_arr_n(g, k)
        if at == GGUF_STRING:
            return t, at, [lib.gguf_get_arr_str(g, k, i).decode() for i in range(n)]
        dtype = _ARRAY_DTYPES.get(at)
        if dtype is None:
            return t, at, None
        data = (ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(lib.gguf_get_arr_data(g, k))
        return t, at, np.frombuffer(bytes(data), dtype=dtype).tolist()
    getter = {GGUF_UINT32: lib.gguf_get_val_u32, GGUF_INT32: lib.gguf_get_val_i32, GGUF_UINT64: lib.gguf_get_val_u64,
              GGUF_BOOL: lib.gguf_get_val_bool, GGUF_STRING: lambda g, k: lib.gguf_get_val_str(g, k).decode()}.get(t)
    return t, None, getter(g, k) if getter else None


def read_gguf(path: str | Path) -> LlamaGGUF | None:
    """Keys and tensors as llama.cpp's parser reads them; None when it rejects the file."""
    lib = _lib()
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(str(path).encode(), _InitParams(False, ctypes.pointer(ctx)))
    if not g:
        return None
    try:
        kv = {lib.gguf_get_key(g, k).decode(): _value(lib, g, k) for k in range(lib.gguf_get_n_kv(g))}
        names = {lib.gguf_get_tensor_name(g, i).decode() for i in range(lib.gguf_get_n_tensors(g))}
        tensors = {}
        t = lib.ggml_get_first_tensor(ctx)
        while t:  # the context also holds the raw data blob, which is no tensor of the file
            name = lib.ggml_get_name(t).decode()
            if name in names:
                head, n = _TensorHead.from_address(t), lib.ggml_nelements(t)
                data = np.ctypeslib.as_array(lib.ggml_get_data_f32(t), (n,)).copy() if head.type == GGML_F32 else None
                tensors[name] = (head.type, tuple(head.ne[:2]), data)
            t = lib.ggml_get_next_tensor(ctx, t)
    finally:
        lib.gguf_free(g)
        lib.ggml_free(ctx)
    return LlamaGGUF(kv, tensors)


def imatrix_entries(f: LlamaGGUF) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (sums, counts) as common_imatrix_load builds them; asserts what it checks."""
    pairs: dict[str, dict[str, tuple]] = {}
    for name, t in f.tensors.items():
        for suffix in (".in_sum2", ".counts"):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[suffix] = t
    out = {}
    for name, p in pairs.items():
        assert p.keys() == {".in_sum2", ".counts"}, f"mismatched sums and counts for {name}"
        assert p[".in_sum2"][0] == GGML_F32 and p[".counts"][0] == GGML_F32, f"{name} not F32"
        out[name] = (p[".in_sum2"][2], np.round(p[".counts"][2]))
    return out

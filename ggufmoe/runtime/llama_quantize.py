"""llama.cpp's own quantizer (``llama_model_quantize``) on a GGUF, with our importance matrix.

This makes llama.cpp's standard mixes (Q4_K_M, Q3_K_M, Q2_K, IQ2_M, IQ2_XXS, IQ1_M, ...) —
the baselines a budgeted plan is measured against — from an F32/F16/BF16 GGUF, without
building llama.cpp's tools: llama-cpp-python binds the library call and its plain-C
``llama_model_quantize_params``.

How the parameters are filled (llama.cpp's ``include/llama.h``, ``src/llama-quant.cpp``):

- ``imatrix`` is an array of ``llama_model_imatrix_data {name, data, size}`` ended by an
  entry whose ``name`` is NULL. ``name`` is the GGUF tensor name, ``data`` the importance
  values flattened expert by expert (``n_expert * ne0`` floats; llama.cpp refuses any
  other size) — ``ImatrixEntry.importance()``, the same sum/count (ones for an expert that
  saw no tokens) that llama-quantize computes from a GGUF imatrix file.
- ``kv_overrides`` gets the ``quantize.imatrix.*`` keys llama-quantize writes (dataset,
  entry count, chunk count); an array ended by an entry with an empty key.
- ``tt_overrides`` is an array of ``llama_model_tensor_override {pattern, type}`` ended by
  a NULL pattern: llama.cpp ``std::regex_search``-es each quantizable tensor name
  (ECMAScript syntax) and the first match wins, as ``llama-quantize --tensor-type``.
  llama.cpp applies them only when the mix is a quantized one (ignored for F16/BF16/F32,
  so those are refused here), never to tensors it keeps unquantized (norms, 1-D tensors,
  routers ``ffn_gate_inp``), and still applies its shape fallback (e.g. IQ4_NL or Q4_0
  for rows that are not a multiple of 256).

llama.cpp aborts the whole process on some errors (GGML_ASSERT), so the call runs in a
child process (``python -m ggufmoe.runtime.llama_quantize JOB``); its stderr is kept in a log and
a failure becomes one :class:`GgufmoeError` line quoting llama.cpp's reason. The output is
written in a temporary directory beside ``dst`` and moved into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.files import replace_atomically
from ggufmoe.model.qtypes import MIXES, TABLE, UNQUANTIZED_MIXES
from ggufmoe.stats.imatrix import Imatrix, quantize_keys

# Tensor types an override may name -> enum ggml_type (gguf-py's numbering is ggml's).
OVERRIDE_TYPES: dict[str, int] = {q.type.name: int(q.type) for q in TABLE}

JOB_FILE, IMATRIX_FILE, LOG_FILE = "job.json", "imatrix.f32", "llama.log"


def parse_ftype(name: str) -> tuple[str, int]:
    key = name.upper()
    if key not in MIXES:
        raise GgufmoeError(f"unknown llama.cpp mix {name!r} (choose from {', '.join(MIXES)})")
    return key, MIXES[key]


def parse_overrides(tensor_types: list[tuple[str, str]], ftype: str) -> list[tuple[str, int]]:
    """(regex, type name) pairs -> (regex, ggml_type), checked before any work starts."""
    if tensor_types and ftype in UNQUANTIZED_MIXES:
        raise GgufmoeError(f"tensor type overrides apply only to quantized mixes; llama.cpp ignores them for {ftype}")
    out = []
    for pattern, tname in tensor_types:
        if not pattern:
            raise GgufmoeError("tensor type override with an empty pattern")
        try:
            re.compile(pattern)  # llama.cpp uses ECMAScript regexes; this catches the usual mistakes early
        except re.error as e:
            raise GgufmoeError(f"tensor type override {pattern!r}: bad regular expression ({e})") from None
        t = OVERRIDE_TYPES.get(tname.upper())
        if t is None:
            raise GgufmoeError(f"tensor type override {pattern!r}: unknown type {tname!r} "
                               f"(choose from {', '.join(OVERRIDE_TYPES)})")
        out.append((pattern, t))
    return out


def write_imatrix(imatrix: Imatrix, path: Path) -> list[tuple[str, int, int]]:
    """All importance values in one float32 file; returns (name, offset, count) per entry."""
    index = []
    offset = 0
    with open(path, "wb") as f:
        for name in sorted(imatrix.entries):
            values = np.ascontiguousarray(imatrix.entries[name].importance(), dtype=np.float32).reshape(-1)
            if not np.isfinite(values).all():
                raise GgufmoeError(f"imatrix entry {name} has non-finite values")
            f.write(values.tobytes())
            index.append((name, offset, int(values.size)))
            offset += values.size
    return index


def failure_reason(log: str, rc: int = 1) -> str:
    """One line saying why the child failed: llama.cpp's reason, an assertion, or how it died."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not set(ln.strip()) <= set("=.")]
    reason = None
    for ln in reversed(lines):
        m = re.search(r"failed to quantize: (.*)", ln)
        if m:
            reason = m.group(1).strip()
            detail = [re.sub(r"^-\s*", "", d) for d in lines if re.match(r"-\s*(offending tensor|target type):", d)]
            if detail:
                reason += " (" + ", ".join(detail) + ")"
            break
    if reason is None:
        for ln in reversed(lines):
            if "GGML_ASSERT" in ln or "GGML_ABORT" in ln or "fatal error" in ln:
                reason = re.sub(r"^\S*/", "", ln)  # without the build's directories
                break
    if rc < 0:
        try:
            died = f"process killed by {signal.Signals(-rc).name}"
        except ValueError:
            died = f"process killed by signal {-rc}"
        if reason:
            return f"{reason} ({died})"
        return f"{died}; its last output: {lines[-1][:200]}" if lines else died
    if reason:
        return reason
    if rc == 0:
        return "it reported success but wrote no file"
    return lines[-1][:300] if lines else f"exit status {rc}, no message"


def llama_quantize(src: str | Path, dst: str | Path, ftype: str, imatrix: Imatrix | None = None,
                   tensor_types: list[tuple[str, str]] | None = None, threads: int | None = None) -> Path:
    """Quantize the GGUF ``src`` to llama.cpp's mix ``ftype`` as ``dst``, with llama.cpp itself.

    ``imatrix``: importance matrix (required by IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M, Q2_K_S ... as in
    llama-quantize). ``tensor_types``: (regex, type) overrides, first match wins.
    ``threads``: llama.cpp's thread count (default: all cores). Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    ftype, ftype_id = parse_ftype(ftype)
    overrides = parse_overrides(list(tensor_types or []), ftype)
    if not src.is_file():
        raise GgufmoeError(f"{src}: no such GGUF file")
    if not dst.parent.is_dir():
        raise GgufmoeError(f"{dst.parent}: no such directory")
    if imatrix is not None and not imatrix.entries:
        raise GgufmoeError("the importance matrix has no entries")
    if threads is not None and threads < 1:
        raise GgufmoeError(f"threads must be at least 1, not {threads}")

    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    except OSError as e:
        raise GgufmoeError(f"{dst.parent}: cannot write ({e.strerror or e})") from None

    def quantize(out: Path) -> None:
        job: dict = {"src": str(src.resolve()), "out": str(out), "ftype": ftype_id, "threads": threads or 0,
                     "overrides": overrides, "imatrix": None, "kv": []}
        if imatrix is not None:
            job["imatrix"] = {"path": str(work / IMATRIX_FILE), "index": write_imatrix(imatrix, work / IMATRIX_FILE)}
            job["kv"] = [[key, "str" if isinstance(value, str) else "int", value]
                         for key, value in quantize_keys(imatrix)]
        (work / JOB_FILE).write_text(json.dumps(job))

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the ggufmoe package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(work / LOG_FILE, "wb") as log:
            rc = subprocess.run([sys.executable, "-m", "ggufmoe.runtime.llama_quantize", str(work / JOB_FILE)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not out.is_file():
            reason = failure_reason((work / LOG_FILE).read_text(errors="replace"), rc)
            raise GgufmoeError(f"llama.cpp could not quantize {src.name} to {ftype}: {reason}")

    try:
        replace_atomically(dst, quantize)
    except OSError as e:  # temporary files, the child's start, the final rename
        raise GgufmoeError(f"cannot make {dst} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


def _child(job_path: str) -> int:
    """Runs in the child process: fill llama_model_quantize_params and call llama.cpp."""
    import ctypes

    import llama_cpp.llama_cpp as lc

    job = json.loads(Path(job_path).read_text())
    lc.llama_log_set(lc.llama_log_callback(), ctypes.c_void_p(0))  # NULL: llama.cpp logs straight to stderr
    lc.llama_backend_init()
    params = lc.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = job["threads"]
    keep: list = []  # everything params points into stays alive until the call returns

    if job["imatrix"] is not None:
        values = np.fromfile(job["imatrix"]["path"], dtype=np.float32)
        index = job["imatrix"]["index"]
        arr = (lc.llama_model_imatrix_data * (len(index) + 1))()  # zeroed: the last entry ends the array
        base = values.ctypes.data
        names = [name.encode() for name, _, _ in index]
        for i, (_, offset, size) in enumerate(index):
            arr[i].name = names[i]
            arr[i].data = ctypes.cast(base + 4 * offset, ctypes.POINTER(ctypes.c_float))
            arr[i].size = size
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_imatrix_data))
        keep += [values, arr, names]

    if job["kv"]:
        kvs = (lc.llama_model_kv_override * (len(job["kv"]) + 1))()  # zeroed: empty key ends the array
        for i, (key, kind, value) in enumerate(job["kv"]):
            kvs[i].key = key.encode()
            if kind == "int":
                kvs[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
                kvs[i].value.val_i64 = value
            else:
                kvs[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_STR
                kvs[i].value.val_str = value.encode()  # char[128]; quantize_keys() cut it to 127 bytes
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(lc.llama_model_kv_override))
        keep.append(kvs)

    if job["overrides"]:
        tts = (lc.llama_model_tensor_override * (len(job["overrides"]) + 1))()  # NULL pattern ends the array
        patterns = [pattern.encode() for pattern, _ in job["overrides"]]
        for i, (_, t) in enumerate(job["overrides"]):
            tts[i].pattern = patterns[i]
            tts[i].type = t
        tts[len(job["overrides"])].type = lc.GGML_TYPE_COUNT
        params.tt_overrides = ctypes.cast(tts, ctypes.POINTER(lc.llama_model_tensor_override))
        keep += [tts, patterns]

    rc = lc.llama_model_quantize(job["src"].encode(), job["out"].encode(), ctypes.byref(params))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ggufmoe.runtime.llama_quantize JOB.json (internal; use llama_quantize())")
    sys.exit(_child(sys.argv[1]))

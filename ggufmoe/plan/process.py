"""The process llama.cpp runs in, before it loads a model: a fresh interpreter that has imported llama_cpp.

Its resident memory depends on the machine (Python, libc, how llama.cpp was built: 41.5 MiB on one host,
47 MiB on another), so it is measured here in a child that imports what ``ggufmoe validate``'s child imports
(the standard library and llama_cpp), once per interpreter and llama_cpp install: the measurement is kept in
the cache folder, so that plans made on one machine do not move with the page cache.

    python -m ggufmoe.plan.process      prints that process's resident bytes

This module imports the standard library only (and :mod:`ggufmoe.files`, which does too): the child's baseline
is llama_cpp's, not ours.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import subprocess
import sys

from ggufmoe.files import cache_folder, replace_atomically

MiB = 1 << 20
# Code pages of libllama / libggml-cpu that loading and the first evaluation touch on top of the import
# (RssFile, measured by eval/bench_memory.py).
LLAMA_CODE_BYTES = 3 * MiB
# The interpreter's resident memory moves with the state of the machine (the page cache, whether transparent huge
# pages back its heap, the threads its BLAS starts): the same import held 40.4 to 47.3 MiB on one machine within
# a day, and a measurement may fall anywhere in that range. The process is counted with this spread on top.
BASELINE_SPREAD_BYTES = 7 * MiB
# Where no child can measure it (no /proc, no llama_cpp): the largest baseline measured so far.
FALLBACK_BASELINE_BYTES = 48 * MiB


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmSize, VmPeak, VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@functools.cache
def interpreter_baseline() -> int:
    """Resident bytes of a fresh interpreter that has imported llama_cpp and loaded nothing: measured once per
    interpreter and llama_cpp install, then read from the cache folder."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin or not os.path.exists("/proc/self/status"):
        return FALLBACK_BASELINE_BYTES
    key = f"{os.path.realpath(sys.executable)}|{spec.origin}|{os.stat(spec.origin).st_mtime_ns}"
    entry = cache_folder("process") / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.txt"
    try:
        return int(entry.read_text())
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run([sys.executable, "-m", __name__], capture_output=True, text=True, timeout=120,
                             check=True, stdin=subprocess.DEVNULL, env=dict(os.environ, MALLOC_ARENA_MAX="1"))
        measured = int(out.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return FALLBACK_BASELINE_BYTES
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(entry, lambda tmp: tmp.write_text(str(measured)))
    except OSError:
        pass  # a read-only cache: measured again next time
    return measured


def process_bytes() -> int:
    """Memory of the llama.cpp process that is not the model's: the interpreter with llama_cpp imported and the
    code pages that loading touches, and the spread of the measurement. A plan's memory counts the whole process:
    what ``validate`` measures."""
    return interpreter_baseline() + BASELINE_SPREAD_BYTES + LLAMA_CODE_BYTES


if __name__ == "__main__":
    import llama_cpp  # noqa: F401  (what the validate child imports before it loads a model)

    print(status("VmRSS"))

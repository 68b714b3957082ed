"""Build llama.cpp's library with the patches in patches/, for the llama-cpp-python installed here.

    python tools/build_patched_llama.py        # prints the directory holding the patched libllama.so

llama.cpp's source comes from the llama-cpp-python source archive of the installed version (``pip
download`` from the package registry; pip's cache keeps it). Every ``patches/*.patch`` is applied
(``patch -p1``), and ``src/`` is compiled into ``libllama.so`` against the installed package's ggml
libraries (the patches change llama.cpp, not ggml), in all cores. The result is cached under
``~/.cache/ggufmoe`` by version and patch contents, so only the first build takes minutes. Run a
program on it with ``LLAMA_CPP_LIB_PATH=<that directory>`` and ``LD_LIBRARY_PATH=<llama_cpp/lib>``
of the environment it runs in, so that llama.cpp and llama-cpp-python share one ggml.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("*.patch"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ggufmoe"


def installed_lib() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def build_dir() -> Path:
    version = importlib.metadata.version("llama-cpp-python")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in PATCHES)).hexdigest()[:12]
    return CACHE / f"llama-{version}-{digest}"


def source(version: str, tmp: Path) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist of ``version``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"llama-cpp-python=={version}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(tmp)], check=True)
    archive = next(tmp.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(tmp, members=members, filter="data")
    return next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))


def compile_library(tree: Path, lib: Path, out: Path) -> None:
    sources = sorted((tree / "src").glob("*.cpp")) + sorted((tree / "src" / "models").glob("*.cpp"))
    objects = tree / "obj"
    objects.mkdir(exist_ok=True)
    flags = ["-std=c++17", "-O1", "-fPIC", "-DLLAMA_BUILD", "-DLLAMA_SHARED", "-DGGML_SHARED",
             f"-I{tree / 'src'}", f"-I{tree / 'include'}", f"-I{tree / 'ggml' / 'include'}"]

    def one(src: Path) -> Path:
        obj = objects / (src.relative_to(tree).as_posix().replace("/", "_") + ".o")
        subprocess.run(["g++", *flags, "-c", str(src), "-o", str(obj)], check=True)
        return obj

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objs = list(pool.map(one, sources))
    partial = out.with_name(out.name + ".partial")
    # RUNPATH (not RPATH): LD_LIBRARY_PATH, when set, picks the ggml libraries of the llama-cpp-python in use
    subprocess.run(["g++", "-shared", "-o", str(partial), *map(str, objs), f"-L{lib}", "-lggml", "-lggml-base",
                    f"-Wl,--enable-new-dtags,-rpath,{lib}"], check=True)
    partial.rename(out)


def build() -> Path:
    """The directory of the patched libllama.so (built now unless cached)."""
    out_dir = build_dir()
    target = out_dir / "libllama.so"
    if target.exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = source(importlib.metadata.version("llama-cpp-python"), Path(tmp))
        for patch in PATCHES:
            subprocess.run(["patch", "-p1", "-s", "-i", str(patch)], cwd=tree, check=True)
        version = importlib.metadata.version("llama-cpp-python")  # what CMake's configure_file would write
        (tree / "src" / "llama-version.h").write_text(
            f'#pragma once\n#define LLAMA_VERSION "{version}-ggufmoe-patched"\n#define LLAMA_COMMIT "ggufmoe"\n')
        compile_library(tree, installed_lib(), target)
    return out_dir


if __name__ == "__main__":
    print(build())

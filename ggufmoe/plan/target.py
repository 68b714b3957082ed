"""The machine a plan is for (``--target``): which weights llama.cpp's CPU backend repacks, and whether
every layer is offloaded to a GPU.

    host        the llama.cpp build installed here: the repacks its CPU features enable (the default)
    cpu         no repacked copies: llama.cpp with repacking off (``use_extra_bufts=false``, ``--no-repack``)
    cpu-repack  the x86 repacks of an AVX2/AVX512 CPU, whatever this host has
    cuda:SIZE   every layer offloaded (``n_gpu_layers`` all) to a GPU of SIZE memory

The repack facts are ggml-cpu/repack.cpp's ``ggml_repack_get_optimal_repack_type``; what a full
offload leaves in host memory is in :mod:`ggufmoe.plan.memory`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

import gguf

from ggufmoe.errors import GgufmoeError
from ggufmoe.units import parse_size

T = gguf.GGMLQuantizationType

# Types the CPU backend repacks at load into an interleaved layout, with the row multiple (ggml ne[1])
# each needs: AVX2 repacks Q4_0, Q4_K, IQ4_NL and MXFP4 (8 rows), AVX512 Q2_K as well; ARM NEON with
# dot products (or int8 matmul) repacks its own set.
REPACK_X86_AVX2 = {T.Q4_0: 8, T.Q4_K: 8, T.IQ4_NL: 8, T.MXFP4: 8}
REPACK_X86_AVX512 = {**REPACK_X86_AVX2, T.Q2_K: 8}
REPACK_ARM_DOTPROD = {T.Q4_0: 4, T.Q4_K: 8, T.Q5_K: 8, T.Q6_K: 8, T.IQ4_NL: 4, T.MXFP4: 4, T.Q8_0: 4}


class TargetPreset(StrEnum):
    """The kinds of ``--target`` (``cuda`` takes the GPU's memory: ``cuda:SIZE``)."""

    HOST = "host"
    CPU = "cpu"
    CPU_REPACK = "cpu-repack"
    CUDA = "cuda"


PRESETS = (*(p.value for p in TargetPreset if p != TargetPreset.CUDA), "cuda:SIZE")  # as a user types them


@functools.cache
def local_repack_types() -> dict[gguf.GGMLQuantizationType, int]:
    """The repacked types of the llama.cpp build installed here, from its system info (asked once per
    process: callers get copies from :meth:`Target.repack_types`)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    parts = (p.partition("=") for p in info.replace("CPU :", "|").split("|"))
    flags = {k.strip(): v.strip() == "1" for k, _, v in parts}
    if not flags.get("REPACK", False):
        return {}
    if flags.get("AVX512"):
        return dict(REPACK_X86_AVX512)
    if flags.get("AVX2"):
        return dict(REPACK_X86_AVX2)
    if flags.get("DOTPROD") or flags.get("MATMUL_INT8"):
        return dict(REPACK_ARM_DOTPROD)
    return {}


@dataclass(frozen=True)
class Target:
    """A ``--target``: ``preset`` one of host, cpu, cpu-repack, cuda; ``gpu_memory`` the GPU's bytes (cuda)."""

    preset: TargetPreset = TargetPreset.HOST
    gpu_memory: int = 0

    @property
    def offload(self) -> bool:
        """Every layer in GPU memory (the input layer, token embeddings, stays in host memory)."""
        return self.preset == TargetPreset.CUDA

    def repack_types(self) -> dict[gguf.GGMLQuantizationType, int]:
        """The types llama.cpp's CPU backend repacks on this target. ``cpu-repack`` counts the AVX512 set
        (Q2_K too): an AVX2-only CPU leaves Q2_K mapped, so the plan overstates it there, never understates.
        With every layer offloaded the CPU keeps only the token embedding, which is never repacked."""
        if self.preset == TargetPreset.HOST:
            return dict(local_repack_types())
        return dict(REPACK_X86_AVX512) if self.preset == TargetPreset.CPU_REPACK else {}

    def __str__(self) -> str:
        return f"cuda:{_exact_size(self.gpu_memory)}" if self.offload else self.preset


HOST = Target()
CPU = Target(TargetPreset.CPU)


def parse_target(text: str) -> Target:
    """``host``, ``cpu``, ``cpu-repack`` or ``cuda:SIZE`` (e.g. ``cuda:24GiB``)."""
    spec = text.strip().lower()
    if spec in tuple(TargetPreset) and spec != TargetPreset.CUDA:
        return Target(TargetPreset(spec))
    if spec.startswith(TargetPreset.CUDA):
        _, colon, size = spec.partition(":")
        if not colon or not size.strip():
            raise GgufmoeError(f"target {text!r}: give the GPU's memory, e.g. cuda:24GiB")
        gpu = parse_size(size)
        if gpu <= 0:
            raise GgufmoeError(f"target {text!r}: the GPU memory must be positive")
        return Target(TargetPreset.CUDA, gpu)
    raise GgufmoeError(f"unknown target {text!r} (one of {', '.join(PRESETS)})")


def _exact_size(n: int) -> str:
    """``n`` bytes in the largest unit that divides it exactly (``24GiB``), so that it parses back the same."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("G", 1000**3), ("M", 1000**2)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)

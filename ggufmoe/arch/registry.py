"""The registry of architecture modules: each family registers itself with :func:`register`."""

from __future__ import annotations

from typing import TypeVar

from ggufmoe.arch.base import Architecture
from ggufmoe.arch.shape import ModelShape
from ggufmoe.source.gguf_file import read_gguf

ARCHITECTURES: dict[str, type[Architecture]] = {}  # Hugging Face ``architectures`` name -> module class
A = TypeVar("A", bound=type[Architecture])


def register(cls: A) -> A:
    """Class decorator: ``cls`` converts every Hugging Face architecture in its ``hf_architectures``."""
    for name in cls.hf_architectures:
        ARCHITECTURES[name] = cls
    return cls


def family_for_gguf(gguf_arch: str) -> type[Architecture] | None:
    """The registered module that writes llama.cpp architecture ``gguf_arch``, if any."""
    return next((cls for cls in ARCHITECTURES.values() if cls.gguf_arch == gguf_arch), None)


def gguf_architectures() -> list[str]:
    return sorted({cls.gguf_arch for cls in ARCHITECTURES.values()})


def gguf_shape(path) -> ModelShape:
    """The shape as llama.cpp reads it from a GGUF file (one file: its metadata and tensor count), with the defaults
    of the registered family of its architecture (:meth:`ModelShape.from_fields`)."""
    r = read_gguf(path)
    family = family_for_gguf(r.fields["general.architecture"].contents())
    return ModelShape.from_fields(r.fields, len(r.tensors), family.swa_pattern if family else 0,
                                  family.graph_nodes_per_token if family else 0)

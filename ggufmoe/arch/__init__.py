"""The architecture modules: one per family, each registered (:mod:`ggufmoe.arch.registry`) when
imported here; :func:`architecture_for` finds a source's module."""

from __future__ import annotations

# Importing a family module registers it.
from ggufmoe.arch import (  # noqa: F401
    deepseek2, deepseek4, dots1, ernie4_5_moe, gemma4, glm4moe, glm_dsa, gpt_oss, llama4, minimax_m2, mixtral, olmoe, qwen2moe,
    qwen3moe, qwen3next, qwen35moe)
from ggufmoe.arch.base import Architecture
from ggufmoe.arch.gguf_model import GGUFModel
from ggufmoe.arch.registry import ARCHITECTURES, gguf_architectures
from ggufmoe.errors import GgufmoeError
from ggufmoe.source.gguf_in import GGUFSource
from ggufmoe.source.hf_config import config_view


def architecture_for(src) -> Architecture:
    """The module for a source: by its HF ``architectures`` name (reading the configuration as transformers
    computes it, :func:`~ggufmoe.source.hf_config.config_view`), or the GGUF's own (:class:`GGUFModel`)."""
    if isinstance(src, GGUFSource):
        model = GGUFModel(src)
        known = gguf_architectures()
        if model.gguf_arch not in known:
            raise GgufmoeError(f"{src.path}: unsupported llama.cpp architecture {model.gguf_arch} "
                               f"(supported: {', '.join(known)})")
        return _checked(model, src.path)
    cls = ARCHITECTURES.get(src.architecture)
    if cls is None:
        raise GgufmoeError(
            f"{src.path}: unsupported architecture {src.architecture} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return _checked(cls(src, config_view(src.path)), src.path)


def _checked(arch: Architecture, path) -> Architecture:
    """``arch``, when its expert counts make sense."""
    if not 1 <= arch.top_k <= arch.n_expert:
        raise GgufmoeError(f"{path}: {arch.top_k} experts used per token of {arch.n_expert} routed experts: "
                           "a broken configuration")
    return arch


__all__ = ["ARCHITECTURES", "Architecture", "GGUFModel", "architecture_for"]

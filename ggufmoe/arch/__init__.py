"""Architecture registry: Hugging Face ``architectures`` name -> module class."""

from __future__ import annotations

from ..errors import GgufmoeError
from ..source.gguf_in import GGUFSource
from ..source.hf import HFSource
from .base import Architecture, TensorSpec
from .deepseek2 import Deepseek2
from .gguf_model import GGUFModel
from .mixtral import Mixtral
from .olmoe import Olmoe
from .qwen2moe import Qwen2Moe
from .qwen3moe import Qwen3Moe

ARCHITECTURES: dict[str, type[Architecture]] = {
    name: cls for cls in (Deepseek2, Qwen3Moe, Qwen2Moe, Mixtral, Olmoe) for name in cls.hf_architectures
}


def load_config(src: HFSource):
    """The checkpoint's configuration as transformers computes it (defaults and key aliases applied)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(src.path))
    except Exception as e:  # transformers raises many types for bad configs
        raise GgufmoeError(f"{src.path}/config.json: transformers cannot read it ({e})") from None


def architecture_for(src) -> Architecture:
    """The module for a source: by its HF ``architectures`` name, or the GGUF's own (:class:`GGUFModel`)."""
    if isinstance(src, GGUFSource):
        model = GGUFModel(src)
        known = sorted({cls.gguf_arch for cls in ARCHITECTURES.values()})
        if model.gguf_arch not in known:
            raise GgufmoeError(f"{src.path}: unsupported llama.cpp architecture {model.gguf_arch} "
                               f"(supported: {', '.join(known)})")
        return model
    cls = ARCHITECTURES.get(src.architecture)
    if cls is None:
        raise GgufmoeError(
            f"{src.path}: unsupported architecture {src.architecture} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return cls(src, load_config(src))


__all__ = ["ARCHITECTURES", "Architecture", "GGUFModel", "TensorSpec", "architecture_for", "load_config"]

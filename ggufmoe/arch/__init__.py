"""Architecture registry: Hugging Face ``architectures`` name -> module class."""

from __future__ import annotations

from ..errors import GgufmoeError
from ..source.hf import HFSource
from .base import Architecture, TensorSpec
from .deepseek2 import Deepseek2
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


def architecture_for(src: HFSource) -> Architecture:
    cls = ARCHITECTURES.get(src.architecture)
    if cls is None:
        raise GgufmoeError(
            f"{src.path}: unsupported architecture {src.architecture} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return cls(src, load_config(src))


__all__ = ["ARCHITECTURES", "Architecture", "TensorSpec", "architecture_for", "load_config"]

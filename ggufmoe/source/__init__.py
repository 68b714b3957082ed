"""Model sources: a Hugging Face checkpoint (:mod:`.hf`), a GGUF (:mod:`.gguf_in`) or a configuration
alone (:mod:`.config`); :func:`open_source` tells them apart."""

from __future__ import annotations

from pathlib import Path

from ggufmoe.errors import GgufmoeError
from ggufmoe.source.config import ConfigSource
from ggufmoe.source.gguf_in import GGUFSource, is_gguf_path
from ggufmoe.source.hf import HFSource


def open_source(path: str | Path, config_ok: bool = True):
    """The one place that tells source kinds apart: a GGUF file (or any shard of a split one), a
    checkpoint directory with weights, or — when ``config_ok`` — a configuration alone (config.json
    or a directory without weights)."""
    p = Path(path)
    if is_gguf_path(p):
        return GGUFSource(p)
    if not config_ok or p.is_dir() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()):
        return HFSource(p)
    if p.is_file() and p.name.endswith(".json") or p.is_dir():
        return ConfigSource(p)
    raise GgufmoeError(f"{p}: not a model directory, GGUF file or config.json")

"""A model known only by its config.json: tensor names and shapes from transformers on the meta
device (cached: :mod:`ggufmoe.source.hf_config`), no weights. Enough to plan (``ggufmoe plan``) before
downloading a checkpoint."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.source.hf_config import read_config, tensor_shapes


class ConfigSource:
    """Same interface as :class:`~ggufmoe.source.hf.HFSource`, but ``get`` has nothing to read."""

    has_weights = False
    can_calibrate = False

    def __init__(self, path: str | Path):
        path = Path(path)
        cfg = path if path.is_file() else path / "config.json"
        if not cfg.is_file():
            raise GgufmoeError(f"{path}: no config.json")
        self.path = cfg.parent
        self.config: dict = read_config(cfg)

    @cached_property
    def architecture(self) -> str:
        """``architectures[0]``, or the causal-LM class transformers maps the ``model_type`` to."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = self.config.get("architectures") or []
        arch = archs[0] if archs else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(self.config.get("model_type", ""))
        if not arch:
            raise GgufmoeError(f"{self.path}/config.json: neither 'architectures' nor a known 'model_type'")
        return arch

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor names (as transformers saves them) and shapes, from a meta-device model."""
        return tensor_shapes(self.path)

    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise GgufmoeError(f"{self.path}: the configuration defines no tensor {name}")
        return self.shapes[name]

    def is_fp4(self, name: str) -> bool:
        """Nothing is stored, FP4 or otherwise."""
        return False

    def get(self, name: str) -> np.ndarray:
        raise GgufmoeError(f"{self.path}: a configuration alone has no weights (tensor {name})")


def check_shapes(src) -> None:
    """Fail, before anything is written, when a checkpoint tensor's shape is not the one its
    config.json defines (transformers builds the model on the meta device to tell, once per config.json)."""
    if not src.has_weights or not (src.path / "config.json").is_file():
        return  # a GGUF: its shapes are its own metadata
    expected = ConfigSource(src.path).shapes
    for name in src.tensor_names():
        want, got = expected.get(name), tuple(src.shape(name))
        if want is not None and got != want:
            raise GgufmoeError(f"{src.path}: tensor {name} has shape {list(got)}, but config.json defines "
                               f"{list(want)}")

"""What transformers computes from a checkpoint's config.json, kept in the user's cache.

The configuration as transformers reads it (defaults and key aliases applied) and the checkpoint tensor
shapes its model defines (built on the meta device) are the truth a conversion checks against, but
importing transformers and its modelling code costs seconds, paid before a conversion of any size
starts. Both depend on config.json's bytes and the transformers version alone, so each is made once and
kept as JSON in ``~/.cache/ggufmoe/configs`` (``XDG_CACHE_HOME``), keyed by both; a cache that cannot
be read or written only costs that time again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from ggufmoe.errors import GgufmoeError
from ggufmoe.files import cache_folder, replace_atomically

FORMAT = 2  # of the cached files: a change makes every earlier entry a miss (2: the text model of a nested config)


def read_config(cfg: Path) -> dict:
    """A config.json's object, or one clear error: unreadable, not JSON, not an object, no usable architectures."""
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GgufmoeError(f"{cfg}: not valid JSON ({e})") from None
    except OSError as e:
        raise GgufmoeError(f"{cfg}: cannot read ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise GgufmoeError(f"{cfg}: not a model configuration (a JSON object), but {type(config).__name__}")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise GgufmoeError(f"{cfg}: 'architectures' is not a list of class names")
    return config


def transformers_config(path: Path):
    """The configuration of the checkpoint in folder ``path`` as transformers computes it (a
    ``PretrainedConfig``; what its causal LM is built from): for a vision-language checkpoint (Qwen3.5) the
    text model's, nested under ``text_config`` (``AutoModelForCausalLM`` builds the text model alone)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)).get_text_config()
    except Exception as e:  # transformers raises many types for bad configs
        raise GgufmoeError(f"{path}/config.json: transformers cannot read it ({e})") from None


def config_view(path: Path) -> SimpleNamespace:
    """Every public value of :func:`transformers_config` (aliases and properties included) as attributes,
    read as transformers computes them: from the cache, or made and cached."""
    return SimpleNamespace(**cached(path, "config", lambda: attributes(transformers_config(path))))


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names (as transformers saves them) and shapes that the configuration in folder
    ``path`` defines: from the cache, or from a model transformers builds on the meta device."""
    return {k: tuple(v) for k, v in cached(path, "shapes", lambda: meta_shapes(path)).items()}


def attributes(cfg) -> dict:
    """``cfg.to_dict()``, the aliases (``attribute_map``) and the properties: each public value JSON holds."""
    from transformers.utils import logging

    saved = cfg.to_dict()
    properties = [n for n, v in inspect.getmembers(type(cfg)) if isinstance(v, property)]
    out = {}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # reading a deprecated alias (torch_dtype) warns
    try:
        for name in dict.fromkeys([*saved, *cfg.attribute_map, *properties]):
            if name.startswith("_") or name == "name_or_path":  # the folder it was read from: not config.json's
                continue
            try:
                value = saved[name] if name in saved else getattr(cfg, name)
                json.dumps(value)
            except Exception:  # a property that fails on this config, or a value JSON cannot hold (a torch dtype)
                continue
            out[name] = value
    finally:
        logging.set_verbosity(verbosity)
    return out


def meta_shapes(path: Path) -> dict[str, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    try:
        cfg = transformers_config(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        state = revert_weight_conversion(model, model.state_dict())
    except GgufmoeError:
        raise
    except Exception as e:  # transformers raises many types for configs it cannot build
        raise GgufmoeError(f"{path}/config.json: transformers cannot build the model ({e})") from None
    return {k: list(v.shape) for k, v in state.items()}


def cached(path: Path, kind: str, make: Callable[[], dict]) -> dict:
    """``make()``'s JSON, kept under the key of ``path``/config.json's bytes, the transformers version and
    ``kind``. What is returned has been through JSON either way (cache hit or miss read the same)."""
    try:
        key = hashlib.sha256(b"\0".join([(path / "config.json").read_bytes(), version("transformers").encode(),
                                         f"{kind}:{FORMAT}".encode()])).hexdigest()
    except OSError as e:
        raise GgufmoeError(f"{path}/config.json: cannot read ({e.strerror or e})") from None
    entry = cache_folder("configs") / f"{key}.{kind}.json"
    try:
        return json.loads(entry.read_text())
    except (OSError, ValueError):  # not cached yet, or a damaged entry: make it again
        pass
    text = json.dumps(make())
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(entry, lambda tmp: tmp.write_text(text))
    except OSError:  # an unwritable cache: the next run makes it again
        pass
    return json.loads(text)

"""The cached configuration and tensor shapes (ggufmoe.source.hf_config) read as transformers computes them."""

import json

import gguf
import pytest

import tiny_models
from ggufmoe.arch import ARCHITECTURES
from ggufmoe.source.config import ConfigSource
from ggufmoe.files import cache_folder
from ggufmoe.source.hf_config import config_view, meta_shapes, tensor_shapes, transformers_config

MISSING = object()


class Recorder:
    """A transformers configuration that notes every attribute read from it."""

    def __init__(self, cfg):
        self._cfg, self._read = cfg, set()

    def __getattr__(self, name):
        self._read.add(name)
        return getattr(self._cfg, name)


def as_json(value):
    return json.loads(json.dumps(value)) if value is not MISSING else value


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_every_value_an_architecture_reads_is_the_one_transformers_computes(tmp_path, family):
    """The module's metadata, tensors and memory shape read from transformers' own configuration: each
    attribute read has the same value (or is missing from both) in the cached view."""
    folder = tmp_path / family
    tiny_models.configs()[family].save_pretrained(folder)
    src = ConfigSource(folder)
    real = Recorder(transformers_config(folder))
    arch = ARCHITECTURES[src.architecture](src, real)
    arch.write_metadata(gguf.GGUFWriter(None, arch.gguf_arch))
    [(s.name, s.shape) for s in arch.tensors()]
    arch.model_shape(), arch.caveats()
    assert real._read
    view = config_view(folder)
    for name in sorted(real._read):
        assert getattr(view, name, MISSING) == as_json(getattr(real._cfg, name, MISSING)), name


def test_shapes_are_cached_and_a_damaged_entry_is_made_again(tmp_path):
    folder = tmp_path / "m"
    tiny_models.configs()["qwen3moe"].save_pretrained(folder)
    want = {k: tuple(v) for k, v in meta_shapes(folder).items()}
    assert tensor_shapes(folder) == want
    [entry] = cache_folder("configs").glob("*.shapes.json")
    entry.write_text("{not json")
    assert tensor_shapes(folder) == want
    assert json.loads(entry.read_text()) == {k: list(v) for k, v in want.items()}
    cfg = json.loads((folder / "config.json").read_text())
    cfg["moe_intermediate_size"] *= 2  # another config.json: another entry, with its own shapes
    (folder / "config.json").write_text(json.dumps(cfg))
    assert tensor_shapes(folder) != want
    assert len(list(cache_folder("configs").glob("*.shapes.json"))) == 2


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # no folder can be made under a file
    folder = tmp_path / "m"
    tiny_models.configs()["mixtral"].save_pretrained(folder)
    assert config_view(folder).num_local_experts == 8
    assert ConfigSource(folder).shapes == {k: tuple(v) for k, v in meta_shapes(folder).items()}

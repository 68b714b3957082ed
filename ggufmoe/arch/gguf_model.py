"""A model read from an existing GGUF: hyper-parameters from its keys, tensors as stored.

Whatever llama.cpp architecture the file has, its metadata is carried over as it is — every key
but those the new file rewrites: the expert counts (written in place, same types, when pruning
or changing top-k), ``general.name`` / ``file_type`` / ``quantization_version``, ``ggufmoe.*``
provenance and the file's layout (``split.*``, ``general.alignment``, gguf-py's ``GGUF.*``).
Routed-expert tensors are the 3-D ``*_exps`` tensors, experts outermost (numpy order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import gguf

from ggufmoe.arch.registry import family_for_gguf
from ggufmoe.arch.shape import ModelShape
from ggufmoe.model.names import EXPERT_TENSORS, TensorName, role
from ggufmoe.errors import GgufmoeError
from ggufmoe.source.gguf_in import GGUFSource
from ggufmoe.arch.base import Architecture
from ggufmoe.model.tensor import RowLoader, TensorSpec

REWRITTEN = ("general.architecture", "general.name", "general.file_type", "general.quantization_version")
OURS = "ggufmoe."


@dataclass
class GGUFModel(Architecture):
    src: GGUFSource
    cfg: object = None

    def __post_init__(self) -> None:
        if self.src.value("general.architecture") is None:
            raise GgufmoeError(f"{self.src.path}: no general.architecture key")
        for key in (self.key("expert_count"), self.key("expert_used_count")):
            if self.src.value(key) is None:
                raise GgufmoeError(f"{self.src.path}: no {key} (not a Mixture-of-Experts model)")
        experts = [(name, shape) for name, shape, _ in self.src.tensors() if _is_expert(name, shape)]
        if not experts:
            raise GgufmoeError(f"{self.src.path}: no 3-D expert tensors (ffn_*_exps); "
                               "files with one tensor per expert are not supported")
        for name, shape in experts:
            if shape[0] != self.n_expert:
                raise GgufmoeError(f"{self.src.path}: {name} has {shape[0]} experts, "
                                   f"{self.key('expert_count')} says {self.n_expert}")

    @property
    def gguf_arch(self) -> str:  # type: ignore[override]
        return str(self.src.value("general.architecture"))

    @property
    def family(self) -> type[Architecture]:
        """The module that writes this llama.cpp architecture (its tensor facts hold for the file)."""
        return family_for_gguf(self.gguf_arch) or Architecture

    @property
    def per_expert_rows(self) -> frozenset:  # type: ignore[override]
        return self.family.per_expert_rows

    @property
    def sensitivity_aliases(self) -> dict[str, str]:  # type: ignore[override]
        return self.family.sensitivity_aliases

    def key(self, name: str) -> str:
        return f"{self.gguf_arch}.{name}"

    def _int(self, name: str, default: int | None = None) -> int | None:
        value = self.src.value(self.key(name), default)
        if isinstance(value, list):  # a per-layer array: llama.cpp's MoE graphs use one value
            if len(set(value)) != 1:
                raise GgufmoeError(f"{self.src.path}: {self.key(name)} differs between layers; not supported")
            value = value[0]
        return None if value is None else int(value)

    @property
    def n_expert(self) -> int:
        return self._int("expert_count")

    @property
    def top_k(self) -> int:
        return self._int("expert_used_count")

    @property
    def expert_groups(self) -> tuple[int, int] | None:
        """As for the Hugging Face modules: only when group routing can exclude experts."""
        n_group = self._int("expert_group_count", 1)
        used = self._int("expert_group_used_count", n_group)
        return (n_group, used) if n_group > 1 and used < n_group else None

    @property
    def source_file_type(self) -> int | None:  # type: ignore[override]
        value = self.src.value("general.file_type")
        return None if value is None else int(value)

    # --- memory model ------------------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        return self._int("block_count")

    def model_shape(self) -> ModelShape:
        shape = ModelShape.from_fields(self.src.fields, len(self.src.tensor_names()), self.family.swa_pattern,
                                       self.family.graph_nodes_per_token)
        shape.n_expert = self.n_expert_kept or self.n_expert
        shape.n_expert_used = self.n_expert_used or self.top_k
        return shape

    def kv_head_dims(self) -> tuple[int, int]:
        shape = self.model_shape()
        return shape.head_k, shape.head_v

    def kv_elements_per_token(self) -> int:
        return self.model_shape().kv_elements_per_token

    # --- metadata ----------------------------------------------------------------------------
    @property
    def writes_tokenizer(self) -> bool:
        return True

    def _carried(self, tokenizer: bool) -> Iterator:
        for kv in self.src.metadata:
            if kv.key in REWRITTEN or kv.key.startswith(OURS) or kv.key.startswith("tokenizer.") != tokenizer:
                continue
            yield kv

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        """The source's keys in their order, the expert counts replaced in place."""
        counts = {self.key("expert_count"): self.n_expert_kept or self.n_expert,
                  self.key("expert_used_count"): self.n_expert_used or self.top_k}
        for kv in self._carried(tokenizer=False):
            new = counts.get(kv.key)
            kv.add_to(w, None if new is None else [new] * len(kv.value) if isinstance(kv.value, list) else new)

    def write_tokenizer(self, w: gguf.GGUFWriter) -> None:
        """The source's ``tokenizer.*`` keys (after the provenance keys, where a conversion puts them)."""
        for kv in self._carried(tokenizer=True):
            kv.add_to(w)

    # --- tensors -----------------------------------------------------------------------------
    def tensors(self) -> Iterator[TensorSpec]:
        src = self.src
        for name, shape, qtype in src.tensors():
            if _is_expert(name, shape):
                yield TensorSpec(name, shape, lambda e, n=name: src.get(n, e), n_parts=shape[0], source_type=qtype,
                                 raw=lambda e, n=name: src.raw(n, e))
            else:
                yield TensorSpec(name, shape, RowLoader(src, name), source_type=qtype, raw=lambda _, n=name: src.raw(n),
                                 holds_expert_ids=TensorName.parse(name).base in self.family.expert_id_tables)

    @property
    def top_k_fixed(self) -> str | None:
        tables = [s.name for s in self.tensors() if s.holds_expert_ids]
        return f"{', '.join(tables)} route(s) each token to {self.top_k} fixed experts" if tables else None


def _is_expert(name: str, shape: tuple[int, ...]) -> bool:
    """A routed-experts tensor: 3-D ``*_exps``, experts outermost."""
    return role(name) in EXPERT_TENSORS and len(shape) == 3

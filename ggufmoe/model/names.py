"""GGUF tensor names, parsed and built through gguf-py's own table (``MODEL_TENSOR`` / ``TENSOR_NAMES``), and the
metadata keys gguf-py 0.19 lacks (:class:`NewKeys`).

``blk.3.ffn_gate_exps.weight`` is ``TensorName(MODEL_TENSOR.FFN_GATE_EXP, 3, "weight")``. Code asks
for a tensor's role (:attr:`TensorName.tensor`) instead of matching substrings of its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


@lru_cache(maxsize=1)
def _by_base() -> dict[tuple[bool, str], MODEL_TENSOR]:
    """(in a block, name without block prefix) -> role; gguf-py lists a few roles under two names."""
    table: dict[tuple[bool, str], MODEL_TENSOR] = {}
    for t, pattern in TENSOR_NAMES.items():
        block = pattern.startswith("blk.{bid}.")
        table.setdefault((block, pattern.removeprefix("blk.{bid}.")), t)
    return table


@dataclass(frozen=True)
class TensorName:
    """A parsed GGUF tensor name: role (None when gguf-py has no name for it), block, suffix."""

    base: str  # the name without block prefix and suffix: the tensor's class (``ffn_down_exps``)
    layer: int | None = None
    suffix: str = "weight"
    tensor: MODEL_TENSOR | None = None

    @classmethod
    def parse(cls, name: str) -> "TensorName":
        m = _BLOCK.fullmatch(name)
        layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
        base, _, suffix = rest.rpartition(".")
        if not base:
            base, suffix = rest, ""
        return cls(base, layer, suffix, _by_base().get((layer is not None, base)))

    def __str__(self) -> str:
        head = self.base if self.layer is None else f"blk.{self.layer}.{self.base}"
        return f"{head}.{self.suffix}" if self.suffix else head


def tensor_name(tensor: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of ``tensor`` (in block ``layer``), e.g. ``blk.3.ffn_gate_inp.weight``."""
    pattern = TENSOR_NAMES[tensor]
    base = pattern.format(bid=layer) if "{bid}" in pattern else pattern
    return f"{base}.{suffix}" if suffix else base


def role(name: str) -> MODEL_TENSOR | None:
    return TensorName.parse(name).tensor


# Roles by what they do: the routed experts (3-D, experts outermost) and the routers.
EXPERT_TENSORS = frozenset({MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP, MODEL_TENSOR.FFN_DOWN_EXP})
GATE_UP_EXPERTS = (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP)  # read the layer's MoE input
EXPERT_ORDER = (*GATE_UP_EXPERTS, MODEL_TENSOR.FFN_DOWN_EXP)
ROUTER = MODEL_TENSOR.FFN_GATE_INP
EMBEDDING = MODEL_TENSOR.TOKEN_EMBD
# Weights llama.cpp's op reads in F32 only (ggml's CPU ssm_conv takes an F32 kernel)
F32_ONLY = frozenset({MODEL_TENSOR.SSM_CONV1D})
# The suffix of a tensor that scales another's outputs or inputs (``ffn_down_exps.scale``: per expert,
# ``ffn_gate_inp.scale``: per input channel of the router)
SCALE = "scale"
# Small weights kept F32 for precision as llama.cpp's converter writes them: the DSA indexer's per-head weights
# (transformers keeps them F32 too; they weigh the scores whose top-k sparse attention keeps)
KEPT_F32 = frozenset({MODEL_TENSOR.INDEXER_PROJ})
OUTPUT = MODEL_TENSOR.OUTPUT  # the output projection (absent when tied to the embedding)


class NewKeys:
    """Metadata keys llama.cpp reads that gguf-py 0.19 has no name for (llama.cpp's ``src/llama-arch.cpp``), in
    gguf-py's form: ``NewKeys.RECURRENT_LAYERS.format(arch="qwen3next")``."""

    RECURRENT_LAYERS = "{arch}.attention.recurrent_layers"  # bool per block: a recurrent (linear-attention) layer
    INDEXER_TYPES = "{arch}.attention.indexer.types"  # bool per block: the layer runs its own DSA indexer ("full")


def arch_key(key: str, arch: str) -> str:
    """``key`` (a ``{arch}.…`` template) without its architecture prefix, as :meth:`ModelShape.from_fields` asks."""
    return key.format(arch=arch).removeprefix(f"{arch}.")

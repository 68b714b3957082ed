"""Which GGUF type each tensor gets: a default type, ``REGEX=TYPE`` rules, fixed F32 tensors.

Without a default type each tensor keeps the type its source stores (a GGUF source: copied
as it is); a source without types of its own (a Hugging Face checkpoint) gets :data:`DEFAULT_TYPE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as T, LlamaFileType

from ggufmoe.model.names import EMBEDDING, F32_ONLY, KEPT_F32, ROUTER, role
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.qtypes import FILE_TYPE, INTEGER_TYPES, effective_type, parse_type, row_bytes
from ggufmoe.quant.ggml import requires_imatrix


def kept_type(spec: TensorSpec) -> T | None:
    """The type a tensor is written at whatever the mix or plan (its :attr:`TensorSpec.fixed_type`, or the integer
    type a table of ids is stored at), else None."""
    if spec.fixed_type is not None:
        return spec.fixed_type
    return spec.source_type if spec.source_type in INTEGER_TYPES else None


def always_f32(spec: TensorSpec) -> bool:
    """Tensors llama.cpp keeps in full precision whatever the mix: vectors (shared-expert gates among
    them), norms, biases, routers, the weights of ops that take F32 only (:data:`F32_ONLY`) and a few small ones
    llama.cpp's converter keeps F32 (:data:`KEPT_F32`)."""
    n = spec.parsed
    return (spec.fixed_type == T.F32 or len(spec.shape) == 1 or n.suffix == "bias" or n.base.endswith("_norm") or n.tensor == ROUTER
            or n.tensor in F32_ONLY | KEPT_F32)


# The token embedding is a row lookup, so no importance matrix ever covers it: when the default
# type needs one, the embedding gets this type instead (as llama-quantize does for IQ1/IQ2 mixes).
EMBEDDING_SUBSTITUTE = T.Q2_K

DEFAULT_TYPE = T.Q8_0  # --type when none is given and the source has no types of its own

@dataclass
class TypeRules:
    """A default type (None: the source's) plus ordered ``(regex, type)`` overrides; the first match wins."""

    default: T | None
    rules: list[tuple[re.Pattern, T]] = field(default_factory=list)
    names: dict[str, T] = field(default_factory=dict)  # a plan's: every tensor by its name, nothing else applies

    @classmethod
    def exact(cls, names: dict[str, T], default: T = T.Q8_0) -> "TypeRules":
        """A type for every tensor by name (a plan); ``default`` only names the file's mix (``file_type``)."""
        return cls(default, names=dict(names))

    @classmethod
    def parse(cls, default: str | None, rules: list[str] | tuple[str, ...] = ()) -> "TypeRules":
        parsed = []
        for rule in rules:
            pattern, sep, tname = rule.rpartition("=")
            if not sep or not pattern:
                raise GgufmoeError(f"--tensor-type {rule!r}: expected REGEX=TYPE")
            try:
                parsed.append((re.compile(pattern), parse_type(tname)))
            except re.error as e:
                raise GgufmoeError(f"--tensor-type {rule!r}: bad regex ({e})") from None
        return cls(parse_type(default) if default else None, parsed)

    def requested(self, spec: TensorSpec) -> T:
        if (kept := kept_type(spec)) is not None and kept != T.F32:  # a table of integers: never converted
            return kept
        if self.names:  # a plan's: every tensor is named, none falls back to the default
            if spec.name not in self.names:
                raise GgufmoeError(f"{spec.name}: the plan has no type for it (a plan for another model?)")
            return self.names[spec.name]
        fixed = always_f32(spec)
        if not fixed:
            for pattern, t in self.rules:
                if pattern.search(spec.name):
                    return t
        if self.default is None and spec.source_type is not None:
            return spec.source_type
        if fixed:
            return T.F32
        if self.default is None:
            return DEFAULT_TYPE
        if role(spec.name) == EMBEDDING and requires_imatrix(self.default):
            return EMBEDDING_SUBSTITUTE
        return self.default

    def type_for(self, spec: TensorSpec) -> T:
        """The type written: the requested one, or its block-size fallback."""
        return effective_type(self.requested(spec), spec.shape[-1])

    @property
    def file_type(self) -> LlamaFileType | None:
        """The llama.cpp mix named after the default type; None when tensors keep the source's types."""
        return FILE_TYPE[self.default] if self.default is not None else None


@dataclass
class TypedTensor:
    """A tensor and the type it is written at."""

    spec: TensorSpec
    qtype: T

    @property
    def nbytes(self) -> int:
        ne0 = self.spec.shape[-1]
        return row_bytes(self.qtype, ne0) * (self.spec.n_elements // ne0)

    @property
    def copies(self) -> bool:
        """Whether the source's bytes are written as they are (the type stays)."""
        return self.spec.raw is not None and self.spec.source_type == self.qtype


def quantizable(spec: TensorSpec) -> bool:
    """Whether ``convert`` quantizes the tensor (not 1-D, norm, bias or router: those stay F32; not a table of
    integers)."""
    return kept_type(spec) is None and TypeRules(T.F16).requested(spec) != T.F32

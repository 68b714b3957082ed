"""Which GGUF type each tensor gets: a default type, ``REGEX=TYPE`` rules, fixed F32 tensors.

Without a default type each tensor keeps the type its source stores (a GGUF source: copied
as it is); a source without types of its own (a Hugging Face checkpoint) gets :data:`DEFAULT_TYPE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as T, LlamaFileType

from .arch.base import TensorSpec
from .errors import GgufmoeError
from .quant import effective_type, parse_type, requires_imatrix

# Tensors llama.cpp keeps in full precision whatever the mix: norms, biases, routers.
ALWAYS_F32 = re.compile(r"(_norm\.weight|\.bias|ffn_gate_inp\.weight|ffn_gate_inp_shexp\.weight)$")

# The token embedding is a row lookup, so no importance matrix ever covers it: when the default
# type needs one, the embedding gets this type instead (as llama-quantize does for IQ1/IQ2 mixes).
EMBEDDING = "token_embd.weight"
EMBEDDING_SUBSTITUTE = T.Q2_K

DEFAULT_TYPE = T.Q8_0  # --type when none is given and the source has no types of its own

# general.file_type written for a default type (the closest llama.cpp "mostly" mix).
FILE_TYPE: dict[T, LlamaFileType] = {
    T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q6_K: LlamaFileType.MOSTLY_Q6_K, T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M, T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, T.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    T.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS, T.IQ3_S: LlamaFileType.MOSTLY_IQ3_S,
    T.IQ3_XXS: LlamaFileType.MOSTLY_IQ3_XXS, T.IQ2_S: LlamaFileType.MOSTLY_IQ2_S,
    T.IQ2_XS: LlamaFileType.MOSTLY_IQ2_XS, T.IQ2_XXS: LlamaFileType.MOSTLY_IQ2_XXS,
    T.IQ1_M: LlamaFileType.MOSTLY_IQ1_M, T.IQ1_S: LlamaFileType.MOSTLY_IQ1_S,
}


@dataclass
class TypeRules:
    """A default type (None: the source's) plus ordered ``(regex, type)`` overrides; the first match wins."""

    default: T | None
    rules: list[tuple[re.Pattern, T]] = field(default_factory=list)
    names: dict[str, T] = field(default_factory=dict)  # exact tensor names, checked first (plans)

    @classmethod
    def exact(cls, names: dict[str, T], default: T = T.Q8_0) -> "TypeRules":
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
        if spec.name in self.names:
            return self.names[spec.name]
        fixed = len(spec.shape) == 1 or ALWAYS_F32.search(spec.name)
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
        if spec.name == EMBEDDING and requires_imatrix(self.default):
            return EMBEDDING_SUBSTITUTE
        return self.default

    def type_for(self, spec: TensorSpec) -> T:
        """The type written: the requested one, or its block-size fallback."""
        return effective_type(self.requested(spec), spec.shape[-1])

    @property
    def file_type(self) -> LlamaFileType | None:
        """The llama.cpp mix named after the default type; None when tensors keep the source's types."""
        return FILE_TYPE[self.default] if self.default is not None else None

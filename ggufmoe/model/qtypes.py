"""The one table of ggml tensor types ggufmoe knows, and the facts derived from it.

One row per type: its fallback for rows that are not a multiple of its block (K- and IQ-types work
on blocks of 256 values), whether a user may ask for it (``--type``), whether the budget planner
offers it, whether it is poor without an importance matrix, and the llama.cpp "mostly" file type
named after it. Block sizes and bytes come from gguf-py's ``GGML_QUANT_SIZES``; llama.cpp's mixes
(``Q4_K_M`` ...) from gguf-py's ``LlamaFileType``.

Fallbacks follow llama-quantize except for Q2_K/Q3_K, where it uses Q4_0: IQ4_NL has the same size
and a lower error. Where a row is not even a multiple of the fallback's block, F16 is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

from ggufmoe.errors import GgufmoeError


@dataclass(frozen=True)
class QuantType:
    type: T
    fallback: T | None = None  # written instead when rows do not fit the block
    user: bool = False  # a user may ask for it (--type, --tensor-type)
    candidate: bool = False  # the budget planner offers it
    poor_without_imatrix: bool = False  # planned only with statistics (some strictly need them)
    file_type: F | None = None  # general.file_type of a file with this as its default type


# Planner candidates in the order they are offered (cheapest first); then the others.
TABLE: tuple[QuantType, ...] = (
    QuantType(T.IQ1_S, T.IQ4_NL, True, True, True, F.MOSTLY_IQ1_S),
    QuantType(T.IQ1_M, T.IQ4_NL, True, True, True, F.MOSTLY_IQ1_M),
    QuantType(T.IQ2_XXS, T.IQ4_NL, True, True, True, F.MOSTLY_IQ2_XXS),
    QuantType(T.IQ2_XS, T.IQ4_NL, True, True, True, F.MOSTLY_IQ2_XS),
    QuantType(T.IQ2_S, T.IQ4_NL, True, True, True, F.MOSTLY_IQ2_S),
    QuantType(T.Q2_K, T.IQ4_NL, True, True, False, F.MOSTLY_Q2_K),
    QuantType(T.IQ3_XXS, T.IQ4_NL, True, True, True, F.MOSTLY_IQ3_XXS),
    QuantType(T.IQ3_S, T.IQ4_NL, True, True, False, F.MOSTLY_IQ3_S),
    QuantType(T.Q3_K, T.IQ4_NL, True, True, False, F.MOSTLY_Q3_K_M),
    QuantType(T.IQ4_XS, T.IQ4_NL, True, True, False, F.MOSTLY_IQ4_XS),
    QuantType(T.MXFP4, None, True, True, False, F.MOSTLY_MXFP4_MOE),
    QuantType(T.Q4_K, T.Q5_0, True, True, False, F.MOSTLY_Q4_K_M),
    QuantType(T.Q5_K, T.Q5_1, True, True, False, F.MOSTLY_Q5_K_M),
    QuantType(T.Q6_K, T.Q8_0, True, True, False, F.MOSTLY_Q6_K),
    QuantType(T.Q8_0, None, True, True, False, F.MOSTLY_Q8_0),
    QuantType(T.F16, None, True, True, False, F.MOSTLY_F16),
    QuantType(T.BF16, None, True, False, False, F.MOSTLY_BF16),
    QuantType(T.F32, None, True, False, False, F.ALL_F32),
    # fallbacks and types only llama.cpp's own quantizer is asked for (tensor type overrides)
    QuantType(T.IQ4_NL), QuantType(T.Q5_0), QuantType(T.Q5_1), QuantType(T.Q4_0), QuantType(T.Q4_1),
    QuantType(T.TQ1_0), QuantType(T.TQ2_0),
)
BY_TYPE: dict[T, QuantType] = {q.type: q for q in TABLE}

FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
INTEGER_TYPES = frozenset({T.I8, T.I16, T.I32, T.I64})  # tables of ids: written as they are, never converted
# Types a user may ask for, by their llama.cpp names, most bits first.
USER_TYPES: dict[str, T] = {q.type.name: q.type for q in sorted(
    (q for q in TABLE if q.user), key=lambda q: -GGML_QUANT_SIZES[q.type][1] / GGML_QUANT_SIZES[q.type][0])}
CANDIDATES: tuple[T, ...] = tuple(q.type for q in TABLE if q.candidate)
POOR_WITHOUT_IMATRIX = frozenset(q.type for q in TABLE if q.poor_without_imatrix)
FILE_TYPE: dict[T, F] = {q.type: q.file_type for q in TABLE if q.file_type is not None}

# llama.cpp's mixes (llama_ftype) by name: Q4_K_M, IQ2_XXS, F32 ...
MIXES: dict[str, int] = {("F32" if f is F.ALL_F32 else f.name.removeprefix("MOSTLY_")): int(f)
                         for f in F if f is not F.GUESSED}
UNQUANTIZED_MIXES = frozenset({"F32", "F16", "BF16"})
# The mixes a budget sweep compares against by default.
DEFAULT_BASELINES = ("IQ1_M", "IQ2_XXS", "IQ2_M", "Q2_K", "Q3_K_M", "Q4_K_M")


def parse_type(name: str) -> T:
    t = USER_TYPES.get(name.upper())
    if t is None:
        raise GgufmoeError(f"unknown quant type {name!r} (choose from {', '.join(USER_TYPES)}, or a llama.cpp mix "
                           f"such as Q4_K_M)")
    return t


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def effective_type(t: T, ne0: int) -> T:
    """The type actually written for rows of ``ne0`` values (see the module docstring)."""
    if ne0 % block_size(t) == 0:
        return t
    fb = BY_TYPE[t].fallback if t in BY_TYPE else None
    fb = fb or T.F16
    return fb if ne0 % block_size(fb) == 0 else T.F16


def row_bytes(t: T, ne0: int) -> int:
    bs, ts = GGML_QUANT_SIZES[t]
    return ne0 // bs * ts


def bits_per_weight(t: T) -> float:
    bs, ts = GGML_QUANT_SIZES[t]
    return 8 * ts / bs

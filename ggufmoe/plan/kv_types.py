"""The KV cache types llama.cpp takes (``type_k``/``type_v``), shared by the memory model and the commands."""

from __future__ import annotations

from enum import StrEnum

import gguf

T = gguf.GGMLQuantizationType


class KvType(StrEnum):
    """The KV cache types llama.cpp takes for K and V (``type_k``/``type_v``; quantized ones need flash attention)."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


KV_TYPES = {KvType.F32: T.F32, KvType.F16: T.F16, KvType.BF16: T.BF16, KvType.Q8_0: T.Q8_0, KvType.Q4_0: T.Q4_0}
DEFAULT_KV_TYPE = KvType.F16  # llama.cpp's own default


def kv_qtype(kv_type: str) -> gguf.GGMLQuantizationType:
    """The ggml type of KV cache type ``kv_type``, or a ValueError naming the ones there are."""
    try:
        return KV_TYPES[kv_type.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r} (one of {', '.join(KV_TYPES)})") from None

"""MXFP4 (OCP microscaling FP4) as checkpoints store it, and its lossless repacking into ggml's.

A checkpoint (gpt-oss) stores a matrix as ``blocks`` (rows, G, 16) uint8 and ``scales`` (rows, G)
uint8: each row is G blocks of 32 values; value ``2i`` of a block is the low nibble of byte ``i``,
value ``2i + 1`` the high nibble, each an E2M1 code; the block's scale is the E8M0 exponent
``2^(scale - 127)``. ggml's ``MXFP4`` block is 17 bytes: the same exponent byte, then 16 bytes whose
byte ``j`` holds value ``j`` (low nibble) and value ``j + 16`` (high nibble). Repacking moves codes,
never changes one, so the file holds exactly the checkpoint's values.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # values per block
E2M1 = np.array((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
                dtype=np.float32)


def codes(blocks: np.ndarray) -> np.ndarray:
    """The 4-bit codes of ``blocks`` (..., G, 16) uint8 in value order: (..., G, 32) uint8."""
    b = blocks.astype(np.uint8, copy=False)
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], BLOCK)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values (..., G * 32) of a checkpoint's MXFP4 ``blocks`` (..., G, 16) and ``scales`` (..., G)."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    exp = scales.astype(np.int32) - 127
    return np.ldexp(E2M1[codes(blocks)], exp[..., None]).reshape(*blocks.shape[:-2], -1)


def to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ggml ``MXFP4`` bytes (..., G * 17) of the same values, the codes and exponents unchanged."""
    c = codes(blocks)
    qs = c[..., : BLOCK // 2] | (c[..., BLOCK // 2:] << 4)
    packed = np.concatenate([scales.astype(np.uint8, copy=False)[..., None], qs], axis=-1)  # (..., G, 17)
    return packed.reshape(*blocks.shape[:-2], -1)

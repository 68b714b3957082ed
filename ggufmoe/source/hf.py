"""Lazy reader for Hugging Face checkpoints: config.json plus single or sharded safetensors.

Tensors are opened one at a time and returned as float32; FP8 e4m3 weights with a
``weight_scale_inv`` companion (128x128 block scales, as DeepSeek-V3 ships) are
dequantized one row-block at a time.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import GgufmoeError

SCALE_SUFFIX = "_scale_inv"
FP8_TYPES = (torch.float8_e4m3fn,)


class HFSource:
    """A Hugging Face model directory, read lazily tensor by tensor."""

    has_weights = True
    can_calibrate = True  # transformers runs it (calibrate, measured sensitivities)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise GgufmoeError(f"{self.path}: not a directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise GgufmoeError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GgufmoeError(f"{cfg}: not valid JSON ({e})") from None
        self._handles: dict[str, object] = {}
        self._where = self._index()

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise GgufmoeError(f"{index}: not a valid safetensors index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise GgufmoeError(f"{self.path}: shard {shard} named in the index is missing")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise GgufmoeError(f"{self.path}: no .safetensors files")
        where: dict[str, str] = {}
        for f in files:
            for name in self._open(f.name).keys():
                where[name] = f.name
        return where

    def _open(self, shard: str):
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(self.path / shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise GgufmoeError(f"{self.path / shard}: unreadable safetensors file ({e})") from None
            self._handles[shard] = handle
        return handle

    @cached_property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise GgufmoeError(f"{self.path}/config.json: no 'architectures' entry")
        return archs[0]

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @cached_property
    def fp8_block(self) -> tuple[int, int]:
        block = (self.config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
        return int(block[0]), int(block[1])

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise GgufmoeError(f"{self.path}: tensor {name} not found in the checkpoint")
        return self._open(self._where[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32, FP8 block scales applied."""
        if name not in self._where:
            raise GgufmoeError(f"{self.path}: tensor {name} not found in the checkpoint")
        try:
            raw = self._open(self._where[name]).get_tensor(name)
        except Exception as e:
            raise GgufmoeError(f"{self.path}: cannot read tensor {name} ({e})") from None
        if raw.dtype in FP8_TYPES:
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self._where:
                raise GgufmoeError(f"{self.path}: FP8 tensor {name} has no {scale_name}")
            return dequant_fp8_blocks(raw, self.get(scale_name), self.fp8_block)
        return raw.float()


def dequant_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Dequantize an FP8 matrix with one scale per block, one row-block at a time."""
    rows, cols = w.shape
    bs_r, bs_c = block
    srows, scols = scale_inv.shape
    if srows != -(-rows // bs_r) or scols != -(-cols // bs_c):
        raise GgufmoeError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)}")
    out = torch.empty((rows, cols), dtype=torch.float32)
    for i in range(srows):
        r0, r1 = i * bs_r, min((i + 1) * bs_r, rows)
        s = scale_inv[i].float().repeat_interleave(bs_c)[:cols]
        out[r0:r1] = w[r0:r1].float() * s
    return out

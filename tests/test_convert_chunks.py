"""Big plain tensors are converted in row chunks (bounded memory) with the very bytes of a whole-tensor pass."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models

import ggufmoe.model.parts as parts_mod
from ggufmoe.arch import architecture_for
from ggufmoe.model.parts import chunk_rows
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.source.gguf_in import GGUFSource
from ggufmoe.source.hf import HFSource
from ggufmoe.quant.rules import TypeRules


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    """A tiny FP8 DeepSeek-V3 whose dense FFN has 640 rows: chunks of 256 rows cut FP8 scale blocks' rows."""
    d = tmp_path_factory.mktemp("chunks")
    cfg = tiny_models.deepseek3_config(num_hidden_layers=2, hidden_size=256, intermediate_size=640,
                                       moe_intermediate_size=128)
    tiny_models.build("deepseek3", d / "hf", config=cfg)
    tiny_models.save_fp8(d / "hf", d / "fp8")
    return d / "fp8"


@pytest.mark.parametrize("qtype", ["Q4_K", "F32"])
def test_row_chunks_write_the_same_bytes(fp8_model, tmp_path, monkeypatch, qtype):
    types = TypeRules.parse(qtype)
    whole = convert(fp8_model, ConvertOptions(out=tmp_path / "whole.gguf", types=types, progress=False))[0]
    monkeypatch.setattr(parts_mod, "CHUNK_BYTES", 64 << 10)
    specs = list(architecture_for(HFSource(fp8_model)).tensors())
    chunked = {s.name for s in specs if chunk_rows(s) is not None}
    assert {"token_embd.weight", "output.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"} <= chunked
    assert not any(s.is_expert or s.kind in ("attn_k_b", "attn_v_b") for s in specs if s.name in chunked)
    parts = convert(fp8_model, ConvertOptions(out=tmp_path / "parts.gguf", types=types, progress=False))[0]
    assert np.array_equal(np.fromfile(whole, np.uint8), np.fromfile(parts, np.uint8))


def test_gguf_source_row_chunks_write_the_same_bytes(fp8_model, tmp_path, monkeypatch):
    """Re-quantizing a GGUF: big tensors are dequantized a row chunk at a time, with the same result."""
    src = convert(fp8_model, ConvertOptions(out=tmp_path / "q8.gguf", types=TypeRules.parse("Q8_0"), progress=False))[0]
    types = TypeRules.parse("Q4_K")
    whole = convert(src, ConvertOptions(out=tmp_path / "whole.gguf", types=types, progress=False))[0]
    monkeypatch.setattr(parts_mod, "CHUNK_BYTES", 64 << 10)
    chunked = {s.name for s in architecture_for(GGUFSource(src)).tensors() if chunk_rows(s) is not None}
    assert {"token_embd.weight", "output.weight", "blk.0.ffn_gate.weight"} <= chunked
    parts = convert(src, ConvertOptions(out=tmp_path / "parts.gguf", types=types, progress=False))[0]
    assert np.array_equal(np.fromfile(whole, np.uint8), np.fromfile(parts, np.uint8))

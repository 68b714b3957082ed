"""NaN and Inf in a source's weights: refused with one line naming the tensor and the count, or
(``convert --allow-nonfinite zero``) replaced with 0 and counted; calibration refuses them too."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import ggufmoe.model.parts as parts_mod
import tiny_models
from cli_run import assert_one_line_error, run
from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.parts import chunk_rows
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.quant.rules import TypeRules
from ggufmoe.source.hf import HFSource

REF = tiny_models.REF_MODEL
UP = "blk.0.ffn_up_exps.weight"
# three non-finite values in three expert slices of one BF16 tensor: GGUF [expert, row, column]
BAD_UP = {f"model.layers.0.mlp.experts.{e}.up_proj.weight": [((r, c), v)]
          for e, r, c, v in ((0, 0, 0, np.nan), (5, 3, 4, np.inf), (23, 255, 255, -np.inf))}
BAD_AT = [(0, 0, 0), (5, 3, 4), (23, 255, 255)]


def broken_copy(where: Path, bad: dict[str, list[tuple[tuple[int, ...], float]]]) -> Path:
    """A copy of the reference model with the values ``bad`` gives (checkpoint name -> [(index, value)])."""
    shutil.copytree(REF, where)
    weight_map = json.loads((where / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in {weight_map[name] for name in bad}:
        tensors = load_file(where / shard)
        for name, values in bad.items():
            if weight_map[name] == shard:
                for index, v in values:
                    tensors[name][index] = v
        save_file(tensors, where / shard, metadata={"format": "pt"})
    return where


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def values(path: Path, name: str) -> np.ndarray:
    """Tensor ``name`` of a GGUF, dequantized, in numpy order."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


@pytest.fixture(scope="module")
def bad_up(tmp_path_factory) -> Path:
    return broken_copy(tmp_path_factory.mktemp("nonfinite") / "m", BAD_UP)


def test_nonfinite_weights_are_refused(bad_up, tmp_path):
    before = digests(bad_up)
    proc = run("convert", bad_up, "-o", tmp_path / "o.gguf", "--type", "Q4_K", "-q")
    assert_one_line_error(proc, f"{UP}: 3 non-finite values (NaN/Inf) in the source",
                          "pass --allow-nonfinite zero to replace them with 0")
    assert list(tmp_path.iterdir()) == []  # no output, no .o.gguf.partial
    assert digests(bad_up) == before


@pytest.mark.parametrize("qtype", ["Q4_K", "F16"])
def test_allow_nonfinite_zero_replaces_them(bad_up, tmp_path, qtype):
    out = tmp_path / "o.gguf"
    proc = run("convert", bad_up, "-o", out, "--type", qtype, "--allow-nonfinite", "zero", "-q")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "non-finite" in line]
    assert notes == [f"note: replaced 3 non-finite values (NaN/Inf) with 0 in 1 tensor ({UP})"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]
    for t in gguf.GGUFReader(out).tensors:
        assert np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all(), t.name
    up = values(out, UP)
    if qtype == "F16":
        assert all(up[at] == 0 for at in BAD_AT)
    else:  # the rest of the block that held one is kept, not spoilt
        assert np.count_nonzero(up[0, 0]) > 200


def test_counted_across_row_chunks(tmp_path, monkeypatch, capsys):
    """A big tensor read in row chunks: its non-finite values are counted over all of them."""
    src = broken_copy(tmp_path / "m", {"model.embed_tokens.weight": [((0, 0), np.nan), ((3000, 7), np.inf),
                                                                      ((6143, 255), np.nan)]})
    monkeypatch.setattr(parts_mod, "CHUNK_BYTES", 64 << 10)
    embd = next(s for s in architecture_for(HFSource(src)).tensors() if s.name == "token_embd.weight")
    assert chunk_rows(embd) == 256  # 24 chunks; the three values in three of them
    types = TypeRules.parse("Q8_0")
    with pytest.raises(GgufmoeError, match="^token_embd.weight: 3 non-finite values"):
        convert(src, ConvertOptions(out=tmp_path / "o.gguf", types=types, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    convert(src, ConvertOptions(out=tmp_path / "o.gguf", types=types, progress=False, zero_nonfinite=True))
    assert "replaced 3 non-finite values (NaN/Inf) with 0 in 1 tensor (token_embd.weight)" in capsys.readouterr().err
    assert np.isfinite(values(tmp_path / "o.gguf", "token_embd.weight")).all()


@pytest.mark.parametrize("stored", ["F32", "BF16"])
def test_gguf_source_copied_as_stored(tmp_path, stored):
    """A GGUF source's F32/BF16 tensors are copied byte for byte, and checked on the way."""
    src = convert(REF, ConvertOptions(out=tmp_path / "src.gguf", types=TypeRules.parse(stored), progress=False))[0]
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == UP)
    ne0, ne1 = int(t.shape[0]), int(t.shape[1])  # columns, rows of each expert
    bad = {"F32": np.array([np.nan, np.inf, -np.inf], np.float32),
           "BF16": np.array([0x7FC0, 0x7F80, 0xFF80], np.uint16)}[stored]  # NaN, Inf, -Inf
    with open(src, "r+b") as f:
        for (e, r, c), v in zip(BAD_AT, bad):
            f.seek(t.data_offset + ((e * ne1 + r) * ne0 + c) * v.itemsize)
            f.write(v.tobytes())
    assert np.count_nonzero(~np.isfinite(values(src, UP))) == 3
    proc = run("convert", src, "-o", tmp_path / "o.gguf", "-q")
    assert_one_line_error(proc, f"{UP}: 3 non-finite values")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]
    proc = run("convert", src, "-o", tmp_path / "o.gguf", "--allow-nonfinite", "zero", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "replaced 3 non-finite values" in proc.stderr
    up = values(tmp_path / "o.gguf", UP)
    assert np.isfinite(up).all() and all(up[at] == 0 for at in BAD_AT)
    assert np.count_nonzero(up != values(src, UP)) == 3


def test_calibrate_refuses_them(bad_up, tmp_path):
    before = digests(bad_up)
    stats = tmp_path / "s.gguf"
    proc = run("calibrate", bad_up, "--text", tiny_models.TEST_DATA / "calib.txt", "--max-tokens", "256", "-o", stats,
               "--whole", "-q")  # the streamed path, which checks as it reads, below: the same error
    assert_one_line_error(proc, "3 non-finite values (NaN/Inf) in the source; calibration cannot use them")
    assert list(tmp_path.iterdir()) == []
    assert digests(bad_up) == before


def test_rounding_aware_refuses_them_even_when_zeroed(bad_up, tmp_path):
    """The rounding pass runs the model: the values the conversion would replace with 0 are refused, with a hint."""
    text = tmp_path / "calib.txt"
    text.write_text((tiny_models.TEST_DATA / "calib.txt").read_text()[:8000])
    proc = run("convert", bad_up, "-o", tmp_path / "o.gguf", "--type", "Q4_K", "--rounding", "aware", "--calib", text,
               "--allow-nonfinite", "zero", "-q")
    assert_one_line_error(proc, "non-finite", "--rounding aware runs the model", "without it, --allow-nonfinite zero")
    assert [f.name for f in tmp_path.iterdir()] == ["calib.txt"]


@pytest.mark.parametrize("bad, error", [
    ({f"model.layers.0.mlp.experts.{e}.up_proj.weight": [((3, 4), np.inf)] for e in range(24)},
     rf"^{UP} \(expert \d+\): 1 non-finite value \(NaN/Inf\) in the source; calibration cannot use them$"),
    ({"model.layers.0.self_attn.q_proj.weight": [((1, 2), np.nan), ((3, 4), -np.inf)]},
     r"^model.layers.0.self_attn.q_proj.weight: 2 non-finite values"),
    ({"model.embed_tokens.weight": [((slice(None), 0), np.nan)]}, r"^token_embd.weight: \d+ non-finite values"),
], ids=["expert", "attention", "embedding"])
def test_streamed_calibration_refuses_them(tmp_path, bad, error):
    """As each layer's weights, each routed expert and the embedding rows used are read (local errors off:
    their set-up is slow and checks nothing here)."""
    from ggufmoe.stats.stream import stream_stats

    src = broken_copy(tmp_path / "m", bad)
    stats = tmp_path / "s.gguf"
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:20000]
    with pytest.raises(GgufmoeError, match=error):
        stream_stats(src, text, max_tokens=256, progress=False, out=stats, measure_local=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

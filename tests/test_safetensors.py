"""The safetensors reader: values as safetensors reads them, row ranges, FP8 blocks, and damaged files
(truncated, corrupt headers, fuzzed) giving one clear error and no output."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
import tiny_models
from cli_run import assert_one_line_error, run

from ggufmoe.errors import GgufmoeError
from ggufmoe.source import mxfp4
from ggufmoe.source.hf import DTYPES, HFSource


def sample_tensors() -> dict[str, torch.Tensor]:
    """A few tensors of every dtype the converter meets, FP8 with block scales over a partial block."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(150, 140, generator=g)
    fp8, scale = tiny_models.to_fp8_blocks(w)
    return {"a": torch.randn(7, 5, generator=g), "b": torch.randn(6, generator=g).bfloat16(),
            "c": torch.randn(3, 2, 4, generator=g).half(), "w": fp8, "w_scale_inv": scale,
            "n": torch.arange(4, dtype=torch.int64)}


def write_model(d: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d / "model.safetensors"


def test_values_and_rows_as_safetensors_reads_them(tmp_path):
    tensors = sample_tensors()
    write_model(tmp_path, tensors)
    src = HFSource(tmp_path)
    assert sorted(src.tensor_names()) == sorted(tensors)
    for name, t in tensors.items():
        assert src.shape(name) == tuple(t.shape)
        if name != "w":
            assert same_bits(src.get(name), t.float())
            assert same_bits(src.get_rows(name, 1, 2), t[1:2].float())
    whole = tiny_models.from_fp8_blocks(tensors["w"], tensors["w_scale_inv"])
    assert same_bits(src.get("w"), whole)
    for r0, r1 in [(0, 128), (100, 150), (128, 150), (5, 5)]:  # across, inside and at the end of scale blocks
        assert same_bits(src.get_rows("w", r0, r1), whole[r0:r1])


def same_bits(ours: np.ndarray, ref: torch.Tensor) -> bool:
    """float32 arrays of the same shape and bits (NaN payloads included)."""
    return ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.numpy().view(np.uint32))


@pytest.mark.parametrize("dtype,torch_dtype", [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2),
                                               ("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_every_code_reads_as_torch_converts_it(dtype, torch_dtype):
    """float32 from every code of the 8- and 16-bit float dtypes, NaNs and signalling NaNs included: torch's bits."""
    bits = torch.finfo(torch_dtype).bits
    codes = np.arange(2 ** bits, dtype=np.uint32).astype(np.uint8 if bits == 8 else np.uint16)
    ref = torch.from_numpy(codes).view(torch_dtype).float()
    assert same_bits(DTYPES[dtype].float32(codes.view(DTYPES[dtype].stored)), ref)


def test_mxfp4_values_are_torchs():
    """Every byte of MXFP4 blocks under every E8M0 scale (255, E8M0's NaN, included) as torch.ldexp gives it."""
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 16, 16))  # scale, group, byte
    scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 16))
    b = torch.from_numpy(blocks.copy())
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(256, 16, 32)
    ref = torch.ldexp(torch.tensor(mxfp4.E2M1.tolist())[codes.long()],
                      torch.from_numpy(scales.astype(np.int32) - 127).unsqueeze(-1)).reshape(256, -1)
    with np.errstate(over="ignore"):
        assert same_bits(mxfp4.dequantize(blocks, scales), ref)


def test_sharded_index(tmp_path):
    tensors = sample_tensors()
    src_dir = tmp_path / "m"
    write_model(src_dir, {k: tensors[k] for k in ("a", "b")})
    (src_dir / "model.safetensors").rename(src_dir / "s1.safetensors")
    save_file({"c": tensors["c"]}, src_dir / "s2.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}
    (src_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert same_bits(HFSource(src_dir).get("c"), tensors["c"].float())
    index["weight_map"]["c"] = "s1.safetensors"
    (src_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GgufmoeError, match="tensor c is not in s1.safetensors"):
        HFSource(src_dir)


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed header of ``path`` and write it back (new length, same data)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def shift_last_tensor(header: dict) -> None:
    """Move the last tensor's data far past the end of the file (its size still matches its shape)."""
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"] = [o + 10**6 for o in header[last]["data_offsets"]]


def mismatch_shape(header: dict) -> None:
    header["model.norm.weight"]["shape"] = [3]


DAMAGE = {  # name: (damage, a word of the error)
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "truncated"),
    "bad_json": (lambda p: p.write_bytes(p.read_bytes()[:8] + b"{not json" + p.read_bytes()[17:]), "not JSON"),
    "offsets_past_end": (lambda p: rewrite_header(p, shift_last_tensor), "past the end"),
    "shape_offsets_mismatch": (lambda p: rewrite_header(p, mismatch_shape), "needs 6"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_shard_one_error_no_output(tmp_path, damage):
    """A damaged last shard fails when the source is opened: one line naming the file, no output."""
    src = tmp_path / "m"
    shutil.copytree(tiny_models.REF_MODEL, src)
    shard = src / "model-00005-of-00005.safetensors"
    shard.chmod(0o644)
    spoil, word = DAMAGE[damage]
    spoil(shard)
    assert_one_line_error(run("convert", src, "-o", tmp_path / "o.gguf", "--type", "Q8_0"),
                          "model-00005-of-00005.safetensors", word)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- fuzzing: a damaged file reads as safetensors reads it, or raises GgufmoeError --------------------

def nested(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**65) | st.floats() | st.text(max_size=6)
    | st.sampled_from(sorted(DTYPES)) | st.lists(st.integers(-2, 3000), max_size=3), nested, max_leaves=6)
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", "other"])
DELETE = object()


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> Path:
    """A model directory whose one file the fuzzer overwrites; the valid bytes are kept in ``valid.bin``."""
    d = tmp_path_factory.mktemp("fuzz")
    path = write_model(d, sample_tensors())
    (d / "valid.bin").write_bytes(path.read_bytes())
    return path


def mutations(data: bytes):
    n = 8 + struct.unpack("<Q", data[:8])[0]
    names = sorted(k for k in json.loads(data[8:n]) if k != "__metadata__") + ["__metadata__"]
    flips = st.lists(st.tuples(st.integers(0, n + 16), st.integers(1, 255)), min_size=1, max_size=4)
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), st.integers(0, len(data) - 1)),
        st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
        st.tuples(st.just("field"), st.tuples(st.sampled_from(names), FIELDS, JSON_VALUES | st.just(DELETE))),
    )


def mutate(data: bytes, how: str, arg) -> bytes:
    if how == "flip":
        out = bytearray(data)
        for pos, x in arg:
            out[pos] ^= x
        return bytes(out)
    if how == "truncate":
        return data[:arg]
    if how == "length":
        return struct.pack("<Q", arg) + data[8:]
    n = 8 + struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:n])
    name, field, value = arg
    entry = header[name]
    if value is DELETE:
        entry.pop(field, None)
    else:
        entry[field] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[n:]


def reference(path: Path) -> dict[str, torch.Tensor] | None:
    """What safetensors itself reads (FP8 dequantized the same way), or None when it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # safetensors raises its own error types
        return None
    out = {}
    for k, t in raw.items():
        if t.dtype == torch.float8_e4m3fn and t.ndim == 2 and tuple(raw.get(k + "_scale_inv", t).shape) == (
                -(-t.shape[0] // 128), -(-t.shape[1] // 128)):
            out[k] = tiny_models.from_fp8_blocks(t, raw[k + "_scale_inv"])
        elif t.dtype != torch.float8_e4m3fn:
            out[k] = t.float()
    return out


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_file_reads_correctly_or_raises_ggufmoe_error(valid_file, data):
    path, good = valid_file, valid_file.with_name("valid.bin").read_bytes()
    how, arg = data.draw(mutations(good))
    path.write_bytes(mutate(good, how, arg))
    try:
        src = HFSource(path.parent)
        ours = {k: src.get(k) for k in src.tensor_names()}
    except GgufmoeError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    ref = reference(path)
    assert ref is not None, "read a file safetensors refuses"
    assert ref.keys() <= ours.keys()
    for k, t in ref.items():
        assert same_bits(ours[k], t), k

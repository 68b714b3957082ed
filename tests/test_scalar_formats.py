"""The scalar block formats (K-types, legacy types, IQ4) against llama.cpp's quantizer and gguf-py's dequantization."""

import numpy as np
import pytest
from gguf.quants import dequantize

from ggufmoe.quant.formats.scalar import SCALAR
from ggufmoe.quant.ggml import Quantizer

ROWS, NE0 = 8, 512


@pytest.fixture(scope="module")
def quantized() -> dict:
    """Per format: rows of very different scales (signs of the block scales both ways) and llama.cpp's bytes."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((ROWS, NE0)) * np.geomspace(1e-3, 10, ROWS)[:, None]).astype(np.float32)
    x[0, :64] = 0  # an all-zero block
    imatrix = rng.uniform(0.2, 2.0, NE0).astype(np.float32)
    with Quantizer(1) as q:
        return {f: (x, q.quantize(x, f.TYPE, imatrix).reshape(ROWS, -1)) for f in SCALAR}


@pytest.mark.parametrize("fmt", SCALAR, ids=lambda f: f.TYPE.name)
def test_unpack_pack_is_identity(fmt, quantized):
    _, raw = quantized[fmt]
    assert np.array_equal(fmt.unpack(raw).pack(), raw)


@pytest.mark.parametrize("fmt", SCALAR, ids=lambda f: f.TYPE.name)
def test_values_are_gguf_py_dequantization(fmt, quantized):
    _, raw = quantized[fmt]
    assert np.array_equal(fmt.unpack(raw).values(), dequantize(raw, fmt.TYPE))


@pytest.mark.parametrize("fmt", SCALAR, ids=lambda f: f.TYPE.name)
def test_choose_is_the_nearest_code(fmt, quantized):
    x, raw = quantized[fmt]
    f = fmt.unpack(raw)
    before = f.values()
    chosen = np.concatenate([f.choose(c, x[:, c]) for c in range(NE0)], axis=1)
    after = f.values()
    assert np.array_equal(chosen, after)
    assert np.array_equal(dequantize(f.pack(), fmt.TYPE), after)
    assert np.all(np.abs(after - x) <= np.abs(before - x))
    every = f.a[..., None] * fmt.LEVELS - f.b[..., None]  # every value a code can take, with the scales kept
    assert np.allclose(np.abs(after - x), np.abs(every - x[..., None]).min(axis=-1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt", SCALAR, ids=lambda f: f.TYPE.name)
def test_choose_of_its_own_values_gives_them_back(fmt, quantized):
    _, raw = quantized[fmt]
    f = fmt.unpack(raw)
    values = f.values()
    for c in range(0, NE0, 7):
        f.choose(c, values[:, c])
    assert np.array_equal(f.pack(), raw)

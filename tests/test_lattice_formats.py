"""The lattice (IQ) block formats against llama.cpp's quantizer and gguf-py's dequantization."""

from itertools import product

import numpy as np
import pytest
from gguf.quants import dequantize

from ggufmoe.quant.formats.lattice import LATTICE
from ggufmoe.quant.ggml import Quantizer

ROWS, NE0 = 8, 512


@pytest.fixture(scope="module")
def quantized() -> dict:
    """Per format: the float rows and llama.cpp's bytes of them (random importance)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, NE0)).astype(np.float32)
    imatrix = rng.uniform(0.2, 2.0, NE0).astype(np.float32)
    with Quantizer(1) as q:
        return {f: (x, q.quantize(x, f.TYPE, imatrix).reshape(ROWS, -1)) for f in LATTICE}


def errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared error per row and group of 8 (rows x groups, float64)."""
    return ((a.astype(np.float64) - b) ** 2).reshape(a.shape[0], -1, 8).sum(axis=-1)


def brute_force(fmt, col: int, target: np.ndarray) -> np.ndarray:
    """Per row, the least squared error of the group at ``col`` to ``target`` over every grid entry and sign pattern
    the type allows, each candidate's values from :meth:`values` (``fmt`` is changed)."""
    n_entries, width = fmt.QUANT.grid_shape
    b, j = divmod(col // 8, 32)
    parts = 8 // width
    points = np.empty((n_entries, ROWS, 8))
    for e in range(n_entries):
        fmt.index[:, b, j * parts:(j + 1) * parts] = e
        if fmt.signs is not None:
            fmt.signs[:, b, j] = 0
        points[e] = fmt.values()[:, col:col + 8]
    patterns = np.array(list(product((1, -1), repeat=width)) if fmt.SIGNS != "none" else [(1,) * width])
    best = []  # per part, per parity of its minus signs: the least error
    for h in range(parts):
        p, t = points[:, :, h * width:(h + 1) * width], target[:, h * width:(h + 1) * width]
        cost = np.stack([((t - p * s) ** 2).sum(axis=-1).min(axis=0) for s in patterns])
        odd = (patterns < 0).sum(axis=1) % 2
        best.append([cost[odd == k].min(axis=0) if (odd == k).any() else np.full(ROWS, np.inf) for k in (0, 1)])
    if fmt.SIGNS != "even":
        return sum(np.minimum(*part) for part in best)
    return np.min([sum(part[k] for part, k in zip(best, ks)) for ks in product((0, 1), repeat=parts)
                   if sum(ks) % 2 == 0], axis=0)


@pytest.mark.parametrize("fmt", LATTICE, ids=lambda f: f.__name__)
def test_unpack_pack_is_identity(fmt, quantized):
    _, raw = quantized[fmt]
    assert np.array_equal(fmt.unpack(raw).pack(), raw)


@pytest.mark.parametrize("fmt", LATTICE, ids=lambda f: f.__name__)
def test_values_are_gguf_py_dequantization(fmt, quantized):
    _, raw = quantized[fmt]
    assert np.array_equal(fmt.unpack(raw).values(), dequantize(raw, fmt.TYPE))


@pytest.mark.parametrize("fmt", LATTICE, ids=lambda f: f.__name__)
def test_choose_is_no_worse_than_llama_cpp(fmt, quantized):
    x, raw = quantized[fmt]
    f = fmt.unpack(raw)
    before = f.values()
    chosen = np.concatenate([f.choose(c, x[:, c:c + 8]) for c in range(0, NE0, 8)], axis=1)
    after = f.values()
    assert np.array_equal(chosen, after)
    assert np.array_equal(dequantize(f.pack(), fmt.TYPE), after)
    old, new = errors(before, x), errors(after, x)
    assert np.all(new <= old + 1e-9 * (1 + old))
    assert new.sum() < old.sum()


@pytest.mark.parametrize("fmt", LATTICE, ids=lambda f: f.__name__)
def test_choose_is_the_exact_nearest(fmt, quantized):
    x, raw = quantized[fmt]
    for col in (0, 264):
        got = fmt.unpack(raw).choose(col, x[:, col:col + 8])
        best = brute_force(fmt.unpack(raw), col, x[:, col:col + 8].astype(np.float64))
        assert np.allclose(errors(got, x[:, col:col + 8])[:, 0], best, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fmt", LATTICE, ids=lambda f: f.__name__)
def test_choose_of_its_own_values_gives_them_back(fmt, quantized):
    _, raw = quantized[fmt]
    f = fmt.unpack(raw)
    values = f.values()
    for col in range(0, NE0, 40):
        assert np.array_equal(f.choose(col, values[:, col:col + 8]), values[:, col:col + 8])
    assert np.array_equal(f.values(), values)


@pytest.mark.parametrize("fmt", LATTICE, ids=lambda f: f.__name__)
def test_every_grid_entry_is_encodable(fmt, quantized):
    _, raw = quantized[fmt]
    n_entries = fmt.QUANT.grid_shape[0]
    f = fmt.unpack(np.tile(raw, (-(-n_entries // fmt.unpack(raw[:1]).index.size), 1)))
    f.index[:] = np.arange(f.index.size).reshape(f.index.shape) % n_entries
    g = fmt.unpack(f.pack())
    assert np.array_equal(g.index, f.index)
    assert np.array_equal(dequantize(f.pack(), fmt.TYPE), f.values())

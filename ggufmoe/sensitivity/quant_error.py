"""Step 1 of a measured sensitivity: each tensor's importance-weighted quantization error at each type.

Each tensor's rows are quantized with our quantizer (llama.cpp's own,
:class:`ggufmoe.quant.ggml.Quantizer`, with the tensor's — for experts the expert's — importance
row, exactly as ``convert`` does) and read back with ``gguf.quants.dequantize``. The error is
``sum_rows r_w * sum_j imp_j * (w - w_hat)^2`` with ``imp`` the importance row (mean squared
input): the expected squared output error per token the tensor adds (diagonal approximation).
Expert tensors sum their experts' errors weighted by routing frequency (``counts / n_tokens``
of the layer; experts never routed cost nothing). The token embedding has no importance
matrix (a row lookup): its rows are weighted by token frequency in the text instead (add-one
smoothed, :func:`token_frequency`) and its columns equally. A type a row does not fit is measured
as its fallback (:func:`ggufmoe.model.qtypes.effective_type`), as ``convert`` writes it.

Sampling: at most ``max_rows`` rows per tensor (default 256), the same rows for every type.
Plain tensors: a uniform sample without replacement, scaled by rows/sampled. Expert tensors:
``max_rows // experts`` rows (at least 1) from each routed expert, scaled per expert; with more
than ``max_experts`` routed experts, that many are taken evenly over the frequency ranking and
the sum is scaled by the routing mass of all over the mass of those taken. The embedding: the
``max_rows / 2`` most frequent tokens exactly plus a uniform sample of the rest. The sample is
seeded by the tensor name (deterministic).

The errors are turned into costs by :mod:`ggufmoe.sensitivity.fit`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from ggufmoe.model.qtypes import effective_type
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.held import held_values
from ggufmoe.model.names import EMBEDDING, role
from ggufmoe.sensitivity.cost import candidates_for
from ggufmoe.stats.file import Stats
from ggufmoe.stats.imatrix import importance
from ggufmoe.stats.local_errors import sample_rows, seeded_rng


@dataclass
class _Sample:
    rows: np.ndarray  # (n, ne0) float32
    imatrix: np.ndarray | None  # importance row given to the quantizer
    col_w: np.ndarray  # (ne0,) float64 error weight per column
    row_w: np.ndarray  # (n,) float64 weight per sampled row (frequency x rows/sampled)


def _expert_weights(spec: TensorSpec, stats: Stats, n_expert: int, top_k: int) -> np.ndarray:
    """Routing frequency of each part of an expert tensor."""
    layer = stats.layers.get(spec.layer)
    if layer is None or layer.n_tokens <= 0:
        return np.full(spec.n_parts, top_k / n_expert)
    return np.array([layer.counts[spec.source_expert(i)] / layer.n_tokens for i in range(spec.n_parts)])


def _samples(spec: TensorSpec, stats: Stats, token_freq: np.ndarray | None, n_expert: int, top_k: int,
             max_rows: int, max_experts: int) -> list[_Sample]:
    rng = seeded_rng(spec.name)
    ne0 = spec.shape[-1]
    imx = stats.imatrix
    out = []
    if spec.is_expert:
        freq = _expert_weights(spec, stats, n_expert, top_k)
        used = [i for i in np.argsort(-freq, kind="stable") if freq[i] > 0]
        if not used:
            return []
        take = used if len(used) <= max_experts else \
            [used[j] for j in sorted(set(np.linspace(0, len(used) - 1, max_experts).round().astype(int)))]
        mass_ratio = float(freq[used].sum() / freq[take].sum())
        per = max(1, max_rows // len(take))
        for i in sorted(take):
            data = spec.load(int(i)).reshape(-1, ne0)
            idx = sample_rows(len(data), per, rng)
            imp = imx.row(spec.name, spec.source_expert(int(i)))
            out.append(_Sample(np.ascontiguousarray(data[idx], np.float32), imp,
                               np.ones(ne0) if imp is None else imp.astype(np.float64),
                               np.full(len(idx), freq[i] * len(data) / len(idx) * mass_ratio)))
        return out
    data = spec.load(0).reshape(-1, ne0)
    rows = importance(spec, 0, imx)
    imp = None if rows is None else rows.mean(axis=0)  # per-head rows (MLA's attn_k_b/attn_v_b): their mean
    col_w = np.ones(ne0) if imp is None else imp.astype(np.float64)
    n = len(data)
    if role(spec.name) == EMBEDDING and token_freq is not None and len(token_freq) == n:
        p = token_freq
        if n <= max_rows:
            idx, w = np.arange(n), p
        else:
            order = np.argsort(-p, kind="stable")
            top, rest = order[: max_rows // 2], order[max_rows // 2:]
            pick = rest[sample_rows(len(rest), max_rows - len(top), rng)]
            idx = np.concatenate([top, pick])
            w = np.concatenate([p[top], p[pick] * len(rest) / len(pick)])
        order = np.argsort(idx)
        idx, w = idx[order], w[order]
    else:
        idx = sample_rows(n, max_rows, rng)
        w = np.full(len(idx), n / len(idx))
    out.append(_Sample(np.ascontiguousarray(data[idx], np.float32), imp, col_w, w))
    return out


def _error(q: Quantizer, samples: list[_Sample], t: T) -> float:
    total = 0.0
    for s in samples:
        d = held_values(s.rows, t, s.imatrix, q)
        diff2 = (d.astype(np.float64) - s.rows) ** 2
        total += float(s.row_w @ (diff2 @ s.col_w))
    return total


def measure_errors(specs: list[TensorSpec], stats: Stats, token_freq: np.ndarray | None, n_expert: int, top_k: int,
                   threads: int | None = None, max_rows: int = 256, max_experts: int = 64,
                   progress: bool = True) -> dict[str, dict[str, float]]:
    """Importance-weighted squared error of every tensor at every candidate type (see the module docstring)."""
    threads = max(1, threads or os.cpu_count() or 1)
    q = Quantizer(1)
    tasks = []
    for s in specs:
        has_row = s.name in stats.imatrix.entries and role(s.name) != EMBEDDING
        for t in candidates_for(s, has_row):
            tasks.append((s, t, effective_type(t, s.shape[-1])))
    for eff in sorted({e for _, _, e in tasks}, key=lambda e: e.value):  # lookup tables, before the threads
        if eff != T.F16:
            q.quantize(np.zeros((1, 256), np.float32), eff, np.ones(256, np.float32))
    out: dict[str, dict[str, float]] = {s.name: {} for s in specs}

    def finish(name: str, jobs: list) -> None:
        for t, f in jobs:
            out[name][t.name] = f.result() if f is not None else 0.0
        bar.update(len(jobs))

    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(tasks), desc="quant error", unit="type",
                                                    disable=not progress) as bar:
        pending = None  # one tensor computes while the next one loads
        for s in specs:
            samples = _samples(s, stats, token_freq, n_expert, top_k, max_rows, max_experts)
            effs: dict[T, object] = {}
            jobs = []
            for _, t, eff in (x for x in tasks if x[0] is s):
                if eff not in effs:
                    effs[eff] = pool.submit(_error, q, samples, eff) if samples else None
                jobs.append((t, effs[eff]))
            if pending:
                finish(*pending)
            pending = (s.name, jobs)
        if pending:
            finish(*pending)
    return out


def token_frequency(ids: np.ndarray, n_vocab: int) -> np.ndarray:
    """Add-one smoothed frequency of each token id."""
    counts = np.bincount(ids[(ids >= 0) & (ids < n_vocab)], minlength=n_vocab).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + n_vocab)


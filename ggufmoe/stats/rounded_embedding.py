"""The token embedding's output-aware rounding, at the start of the rounding pass (:mod:`ggufmoe.stats.rounding`).

The embedding has no matmul of its own: a table row is what its token feeds the first layer. The first matmuls that
read it (those of the first input the model's own run of layer 0 sampled: q, k and v in most families) see it through
the layer's norm, which scales each column by its gain, so a change ``e`` in a row reaches their outputs as ``W diag(a)
e`` (over the row's own scale, the same for every code of the row). The table is therefore rounded for ``H = diag(a)
(sum W^T W) diag(a)`` (:func:`~ggufmoe.quant.aware.round_table`), ``a`` fitted per column to the model's own inputs of
those matmuls against the layer's input. ``H`` comes from the weights, not from the calibration tokens: every row gets
it, seen or not, and the held-out tokens only judge the result. On the reference model at uniform Q4_K the table's
share of the file's KL (eval_doc.txt / README + sources) is 0.0014 / 0.0017 so rounded, against 0.0041 / 0.0065 with
llama.cpp's rounding (``eval/results/rounding_parts.md``); swapped alone into llama.cpp's file, a third less. Counting
the expert inputs of layer 0 as well did not do better on both texts.
A table that is also the output matmul (tied embeddings) keeps llama.cpp's rounding: its rows have a second reader.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from ggufmoe.model.parts import part_chunks
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.aware import Feedback, can_round, group_of, round_table
from ggufmoe.stats.rounding import Rounder, TensorReport

ROWS = 1 << 16  # calibration rows per step of the gain's sums
MIN_EXPLAINED = 0.5  # of the first input's energy the gain must explain


def norm_gain(x: torch.Tensor, r: torch.Tensor) -> tuple[np.ndarray, float]:
    """Per column, the gain ``a`` that best maps the layer's input ``r`` to the matmuls' input ``x`` (rows x width,
    the same tokens), ``sum x r / sum r^2``, and the share of ``x``'s energy it explains (near 1 for a norm)."""
    xr = torch.zeros(r.shape[1], dtype=torch.float64)
    rr, xx = torch.zeros_like(xr), torch.zeros_like(xr)
    for i in range(0, len(r), ROWS):
        a, b = x[i:i + ROWS].double(), r[i:i + ROWS].double()
        xr += (a * b).sum(0)
        rr += (b * b).sum(0)
        xx += (a * a).sum(0)
    gain = torch.where(rr > 0, xr / rr.clamp_min(1e-30), 0.0)
    explained = float((gain * xr).sum() / xx.sum().clamp_min(1e-30))
    return gain.numpy(), explained


def reader_moments(weights: list[np.ndarray], gain: np.ndarray) -> np.ndarray:
    """``diag(a) (sum W^T W) diag(a)`` for the matmuls ``weights`` (rows x width) reading through gain ``a``."""
    m = sum(np.asarray(w, np.float64).T @ np.asarray(w, np.float64) for w in weights)
    return gain[:, None] * m * gain[None, :]


def round_embedding(rounder: Rounder, spec: TensorSpec, layer0: list[TensorSpec], own_in: torch.Tensor,
                    ids: torch.Tensor, out: torch.Tensor) -> bool:
    """Round the embedding table ``spec`` into the rounder's store for the first input of ``layer0`` (its tensors)
    that the model's own run sampled (``own_in``: the layer's input; ``ids``: the token of each calibration row), and
    put each calibration token's rounded row in ``out``. False (nothing done) where its type is not one the pass
    rounds or that first input is not the layer's input through a per-column gain (a norm)."""
    typed = rounder.table_type(spec)
    if typed is None or not can_round(typed[0]) or len(spec.shape) != 2 or not rounder.inputs:
        return False
    t, imp = typed
    first = next(iter(rounder.inputs.values()))
    names = {n for n, store in rounder.inputs.items() if store is first}
    readers = [s for s in layer0 if s.name in names]
    if not readers or first.tensor.shape[1] != spec.shape[1] or own_in.shape[1] != spec.shape[1]:
        return False
    gain, explained = norm_gain(first.tensor, own_in)
    if explained < MIN_EXPLAINED:  # not the layer's input through a norm (its matmuls are not rounded: not sampled)
        return False
    h = reader_moments([np.concatenate([c for _, c in part_chunks(s, 0)]) for s in readers], gain)
    feedback = Feedback.of(h, group_of(t), rounder.device)  # once for every row chunk
    held = torch.bincount(ids[rounder.held(torch.arange(len(ids)))], minlength=spec.shape[0]).double().numpy()
    report = rounder.report[spec.name] = TensorReport()  # (a pass started over: anew)
    for r0, rows in part_chunks(spec, 0):
        scale = (np.asarray(rows, np.float64) ** 2).mean(axis=1)
        weight = np.where(scale > 0, held[r0:r0 + len(rows)] / np.maximum(scale, 1e-30), 0.0)
        r = round_table(rows, t, imp, h, weight, rounder.q, feedback)
        rounder.request.store.put(rows, t, r.data)
        report.add(r, 0.0)
        mine = (ids >= r0) & (ids < r0 + len(rows))
        values = torch.from_numpy(gguf.quants.dequantize(r.data.reshape(len(rows), -1), t).astype(np.float32))
        out[mine] = values[ids[mine] - r0]
    return True

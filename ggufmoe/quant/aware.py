"""Output-aware rounding: the codes of a tensor's blocks chosen to make ``||(W - Q) X||`` small for the layer's real
inputs ``X``, not ``||W - Q||`` weighted by a diagonal importance.

What it does, and why. llama.cpp's quantizers choose each block's scales and codes from the weights and the diagonal
of ``X^T X`` (the importance matrix); the error of one weight cannot compensate another's. GPTQ's second-order error
feedback (Frantar et al., 2022) does: columns are rounded one group at a time, and the error each leaves, divided by the
inverse Hessian's Cholesky diagonal, is pushed onto the columns not rounded yet, where later codes can absorb it. We keep
llama.cpp's own block scales (its quantization of the tensor with the same importance row is the start: the scales
are searched well there and the file format is untouched) and choose only the codes, with the format's exact code set
(:mod:`ggufmoe.quant.formats`): one value at a time for the scalar types, the nearest lattice vector (eight values) for
the IQ types, whose codes cannot be chosen value by value, its values weighed by what an error in each costs once the
later columns compensate (:func:`group_weight`). Columns go in order of decreasing ``diag(H)`` (GPTQ's act order;
groups of a lattice vector together), a damping of 30% of the mean diagonal keeps ``H`` invertible and the fit from
overfitting few tokens (a rare expert's), and the updates are batched over ``BLOCK`` columns so the work is matrix
products; rows are independent, and are split among the quantizer's threads (one per core).

Tried and not kept: scales refitted to the new codes (0.5-1.5% lower held-out errors at twice the time); and, in
``eval/rounding_inputs.py``'s lab (uniform Q4_K, 100,000 characters, KL against llama.cpp's rounding on eval_doc.txt /
the README: 0.649 / 0.780 as done here), coordinate descent on the codes after the feedback, one level at a time
(lower fitted errors, but 0.656 / 0.783 after one pass over the columns, 0.686 / 0.788 after two), damping each
column by 30% of its own diagonal as well (0.671 / 0.749: a trade between the texts), and each expert's moments pulled
toward the layer's pooled ones by 256 tokens' worth (0.687 / 0.794; from 10,000 characters 0.813 / 0.957 against
0.849 / 0.951); in the same lab (0.649 / 0.777 when rerun), the attention's matmuls, fitted to every token, damped less
than the experts' (3%: 0.663 / 0.789; 10%: 0.661 / 0.792), each row keeping whichever rounding has its lower held-out
error (0.653 / 0.785), and an expert's gate and up fitted with its tokens weighted by how much an error in each reaches
the expert's output (the mean over rows of ``act(g)^2`` for up, ``(act'(g) u)^2`` for gate: 0.652 / 0.803). For the
output matmul (the logits), rows weighted by their tokens' probabilities, rows in 16 or 64 clusters by direction each
with its own ``sum p x x^T`` (every other tensor float32; KL 0.83x / 0.95x and 0.79x / 0.95x llama.cpp's against 0.87x
/ 0.94x for the rows unweighted): better on text like the calibration text, not on the README. In the lab again
(base 0.649 / 0.777): llama.cpp's scales chosen anew on the values the feedback rounded (the weights as moved by the
columns before them), importance ``diag(H)`` or each column's cost after compensation (``1 / u_jj^2``), and the
feedback run again with them (0.681 / 0.803 and 0.667 / 0.814); the experts damped by 100% of the mean diagonal
(0.651 / 0.801); the shift damped by 10% or 100% (0.685 / 0.822, 0.668 / 0.786); every 8th, 3rd or 2nd chunk held
out instead of every 4th (0.733 / 0.800, 0.694 / 0.800, 0.705 / 0.790: which tokens judge the rounding moves the
figures by several percent); ours kept only when 5% or 15% below llama.cpp's held-out error (0.644 / 0.778, 0.680 /
0.774).

The token embedding (a table, no matmul of its own) is rounded for what its readers make of a row's change
(:func:`round_table`; ``H`` from layer 0's weights, :mod:`ggufmoe.stats.rounded_embedding`).

Fed the rounded model (:mod:`ggufmoe.stats.rounding`): a matmul deep in the model gets inputs ``X'`` that the rounding
of the layers before it has changed from the model's own ``X``. Fitting ``X'`` alone (GPTQ's sequential inputs) gained
nothing on the reference model; fitting the codes so that ``Q X'`` comes near the model's own output ``W X`` does: that
is GPTQ for the weight ``W + W (X - X') X'^T (X' X'^T)^-1`` (:func:`shift_of`, damped as the feedback is) with
``X' X'^T`` as its Hessian, so each layer corrects part of what was lost before it (``eval/rounding_inputs.py``).

Never worse: :func:`round_tensor` measures both roundings on held-out inputs (tokens the rounding did not see) and
keeps the one with the lower output error.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ggufmoe.quant.formats import FORMATS
from ggufmoe.quant.ggml import Quantizer

DAMP = 0.3  # of the mean of diag(H), added to its diagonal: a third of the mean diagonal beat 0.1%-100% on
# the reference model's held-out errors at every type (less overfits the experts with few routed tokens)
BLOCK = 128  # columns per lazy batch of updates
ROWS_PER_THREAD = 512  # the fewest rows a thread of the error feedback takes (256: the IQ types ran slower split)


def can_round(t: T) -> bool:
    return t in FORMATS


def damped(h: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """``H`` (float64, on ``device``) with :data:`DAMP` of its mean diagonal added to the diagonal (dead inputs: 1)."""
    h = torch.tensor(np.asarray(h, np.float64), device=device)
    diag = torch.diagonal(h)
    dead = diag <= 0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    h[dead, dead] = 1.0
    diag += DAMP * max(mean, 1e-30)
    return h


def inverse_cholesky(h: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """Upper Cholesky factor of ``H^-1`` (float64), ``H`` damped (torch on ``device``: Cholesky, its inverse,
    Cholesky)."""
    low = torch.linalg.cholesky(damped(h, device))
    return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True).cpu().numpy()


@dataclass
class Feedback:
    """What the error feedback needs of one input's second moments for one column group size: the column order and
    the upper Cholesky factor of the damped inverse in that order. Tensors that read the same input at types of the
    same group size (an expert's gate and up) share it."""

    order: np.ndarray
    factor: np.ndarray

    @classmethod
    def of(cls, h: np.ndarray, group: int, device: torch.device | None = None) -> "Feedback":
        """For inputs whose second moment is ``h``, the factor computed on ``device`` (a GPU's: the n^3 work)."""
        order = column_order(h, group)
        return cls(order, inverse_cholesky(h[np.ix_(order, order)], device))


def column_order(h: np.ndarray, group: int) -> np.ndarray:
    """Columns by decreasing importance, a group's columns kept together and in order."""
    weight = np.diag(h).reshape(-1, group).sum(axis=1)
    groups = np.argsort(-weight, kind="stable")
    return (groups[:, None] * group + np.arange(group)).reshape(-1)


def group_weight(u: np.ndarray) -> np.ndarray:
    """What an error in each column of a group chosen together costs once the columns after it compensate: the diagonal
    of ``(U^T U)^-1`` for the group's block ``u`` of the inverse Hessian's Cholesky factor (a lattice vector's
    search weighs its values by it; the off-diagonal terms are left out, which keeps the search exact per value)."""
    return np.diag(np.linalg.inv(u.T @ u))


def gptq_codes(w: np.ndarray, raw: np.ndarray, t: T, h: np.ndarray, feedback: Feedback | None = None,
               q: Quantizer | None = None) -> np.ndarray:
    """The bytes of ``w`` (rows x n float32) at type ``t`` with llama.cpp's scales from ``raw`` (its quantization of
    ``w``) and codes chosen by error feedback for inputs whose second moment is ``h`` (n x n; ``feedback``: made from
    it already, for the type's group size). Rows are independent: with a quantizer ``q`` of several threads they are
    split among its threads (at least :data:`ROWS_PER_THREAD` each), the result the same."""
    feedback = feedback or Feedback.of(h, group_of(t))
    raw = raw.reshape(len(w), -1)
    parts = 1 if q is None or q.pool is None else min(q.threads, len(w) // ROWS_PER_THREAD)
    if parts <= 1:
        return _row_codes(w, raw, t, feedback)
    cuts = np.linspace(0, len(w), parts + 1).astype(int)
    done = q.pool.map(lambda a, b: _row_codes(w[a:b], raw[a:b], t, feedback), cuts[:-1], cuts[1:])
    return np.concatenate(list(done))


def _row_codes(w: np.ndarray, raw: np.ndarray, t: T, feedback: Feedback) -> np.ndarray:
    """:func:`gptq_codes` of rows ``w``, their bytes ``raw`` (rows x row-bytes)."""
    fmt = FORMATS[t].unpack(raw)
    g = fmt.GROUP
    perm, u = feedback.order, feedback.factor
    work = np.array(w[:, perm], np.float64)
    n = work.shape[1]
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        block = work[:, i1:i2]
        err = np.zeros_like(block)
        ub = u[i1:i2, i1:i2]
        for j0 in range(0, i2 - i1, g):
            weight = None if g == 1 else group_weight(ub[j0:j0 + g, j0:j0 + g])
            q = fmt.choose(int(perm[i1 + j0]), block[:, j0:j0 + g].astype(np.float32), weight).astype(np.float64)
            for j in range(j0, j0 + g):
                e = (block[:, j] - q[:, j - j0]) / ub[j, j]
                block[:, j:] -= e[:, None] * ub[j, j:][None, :]
                err[:, j] = e
        work[:, i2:] -= err @ u[i1:i2, i2:]
    return fmt.pack().reshape(-1)


def row_errors(d: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row of a weight's change ``d``, ``sum over tokens (d_r . x)^2`` for inputs whose second moment (sum of
    ``x x^T``) is ``h``."""
    d = np.asarray(d, np.float64)
    return ((d @ h) * d).sum(axis=1)


def output_error(d: np.ndarray, h: np.ndarray) -> float:
    """``sum over tokens ||D x||^2`` for a weight's change ``d`` and inputs whose second moment is ``h``."""
    return float(row_errors(d, h).sum())


def change(w: np.ndarray, raw: np.ndarray, t: T) -> np.ndarray:
    """What rounding ``w`` (rows x n) to the bytes ``raw`` at type ``t`` changes (float64)."""
    return w - gguf.quants.dequantize(raw.reshape(len(w), -1), t).astype(np.float64)


@dataclass
class Rounded:
    """One tensor (or expert slice) rounded: the bytes kept and what decided it."""

    data: np.ndarray  # uint8, as written
    aware: bool  # whether the output-aware codes were kept (else llama.cpp's)
    error_llama: float  # output error of llama.cpp's rounding on the held-out inputs
    error_aware: float  # the same for the output-aware codes, less what they correct of the error upstream (>= 0)


def group_of(t: T) -> int:
    """Columns whose codes type ``t`` chooses together."""
    return FORMATS[t].GROUP


def shift_of(h: np.ndarray, cross: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """``S`` such that ``W + W S`` is the weight whose outputs on the rounded model's inputs come nearest the model's
    own outputs: ``cross`` (``sum (x - x') x'^T`` over the fitted tokens, ``x'`` what the rounded model feeds the
    matmul, ``x`` what the model itself does) times the inverse of ``h`` (``sum x' x'^T``), damped as the feedback is;
    solved on ``device``."""
    low = torch.linalg.cholesky(damped(h, device))
    return torch.cholesky_solve(torch.as_tensor(np.asarray(cross, np.float64), device=device).T, low).T.cpu().numpy()


def round_tensor(w: np.ndarray, t: T, importance: np.ndarray | None, h_fit: np.ndarray, h_held: np.ndarray,
                 q: Quantizer, feedback: Feedback | None = None, shift: np.ndarray | None = None,
                 cross_held: np.ndarray | None = None) -> Rounded:
    """``w`` (rows x n float32) at type ``t``: llama.cpp's rounding with ``importance`` and the output-aware codes
    for inputs ``h_fit`` (``feedback``: made from it already); whichever has the lower output error on ``h_held`` is
    kept.

    Fed the rounded model's inputs (:func:`shift_of`): the codes are chosen for ``W + W shift``, starting from
    llama.cpp's scales for that weight, so that the outputs on those inputs come near the model's own, correcting what
    the rounding upstream changed; the held-out error counts that too (``cross_held``: the held-out tokens' ``sum (x -
    x') x'^T``). Measured against ``||(W x - Q x')||^2``, ours gains ``e(llama) - e(ours)`` over llama.cpp's rounding,
    whose own error (its ``||(W - Q) x'||^2``) is ``error_llama``; ``error_aware`` is that less the gain."""
    llama = q.quantize(w, t, importance)
    target = w if shift is None else (w + np.asarray(w, np.float64) @ shift).astype(np.float32)
    start = llama if shift is None else q.quantize(target, t, importance)
    ours = gptq_codes(target, start, t, h_fit, feedback, q)
    d_llama, d_ours = change(w, llama, t), change(w, ours, t)
    e_llama, e_ours = output_error(d_llama, h_held), output_error(d_ours, h_held)
    if cross_held is not None:  # ||D x' + W (x - x')||^2 = e(D) + 2 <D cross^T, W> + what both share
        upstream = np.asarray(w, np.float64) @ np.asarray(cross_held, np.float64)
        e_ours = max(0.0, e_ours + 2 * float((d_ours * upstream).sum()) - 2 * float((d_llama * upstream).sum()))
    keep = e_ours < e_llama
    return Rounded(ours if keep else llama, bool(keep), e_llama, e_ours)


def round_table(w: np.ndarray, t: T, importance: np.ndarray | None, h: np.ndarray, row_weight: np.ndarray,
                q: Quantizer, feedback: Feedback | None = None) -> Rounded:
    """Rows ``w`` of a lookup table (the token embedding) at type ``t``: llama.cpp's rounding with ``importance``, and
    codes chosen by the error feedback for ``h`` (``feedback``: made from it already), what the matmuls reading a row
    make of a change in it, started from llama.cpp's scales for the importance ``diag(h)``. Whichever has the lower
    error on the held-out tokens (each row's error weighted by ``row_weight``: how often they read it, over its scale)
    is kept."""
    llama = q.quantize(w, t, importance)
    diag = np.diag(h)
    start = q.quantize(w, t, (diag + 1e-6 * max(float(diag.mean()), 1e-30)).astype(np.float32))
    ours = gptq_codes(w, start, t, h, feedback, q)
    e_llama, e_ours = (float(row_weight @ row_errors(change(w, raw, t), h)) for raw in (llama, ours))
    keep = e_ours < e_llama
    return Rounded(ours if keep else llama, bool(keep), e_llama, e_ours)

"""Local errors, measured in the streamed calibration: what storing each tensor at each candidate type
adds to its output on the layer's real inputs.

For a tensor ``W`` (rows x ne0, as the GGUF stores it) whose matmul reads inputs ``x`` during the
calibration, the error at type ``t`` is ``E_x ||(W - Q_t(W)) x||^2`` per calibration token, with
``Q_t`` our quantizer (llama.cpp's own, :class:`ggufmoe.quant.ggml.Quantizer`, with the tensor's
importance row from this very calibration, exactly as ``convert`` quantizes) and gguf-py's
dequantization. Nothing diagonal: the cross terms between columns are in. A type a row does not
fit is measured as its fallback (:func:`ggufmoe.model.qtypes.effective_type`), as ``convert`` writes it.

- **Plain tensors** (attention, dense and shared FFN, the output matrix): their inputs are sampled
  at fixed token positions (every ``stride``-th token of the run, at most ``max_tokens``), the rows
  of ``W`` uniformly (at most ``max_rows``, scaled by rows / sampled).
- **Routed experts**: per expert, up to ``expert_tokens`` of the routing slots that chose it,
  evenly spread, each weighted by its routing weight squared (the expert's output is added to the
  residual scaled by it), scaled to all of the expert's slots; ``max(2, max_rows // experts used)``
  rows of each of its matrices. The tensor's error is the sum over its experts.
- **The token embedding** (a row lookup): the rows of the tokens of the text, weighted by token
  frequency (the ``max_rows / 2`` most frequent exactly, a uniform sample of the others).

Relative errors are what is stored: a block's tensors divide by the mean squared norm of the
layer's input hidden state (the residual stream the block writes into, sampled at the same
positions), so a block whose output is small next to the residual costs less; the embedding and
the output matrix divide by their own output's mean squared norm. Tensors whose matmul input no
hook sees (MLA's ``attn_k_b``/``attn_v_b``, cut from one checkpoint tensor) get none; the cost model
prices them from shapes (:mod:`ggufmoe.sensitivity.local_costs`).

The result (:class:`LocalErrors`) is stored in the statistics file as the JSON key
:data:`KEY` (llama.cpp ignores it). The calibration measures them with
:class:`ggufmoe.stats.error_meter.LocalMeter`; reading them (planning, merging) needs no torch.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.model.qtypes import CANDIDATES, effective_type
from ggufmoe.quant.ggml import Quantizer, requires_imatrix
from ggufmoe.quant.held import held_values

KEY = "ggufmoe.local_errors"
VERSION = 1


@dataclass
class LocalOptions:
    """How much the local errors sample."""

    max_tokens: int = 512  # token positions whose inputs a plain tensor's error is measured on
    max_rows: int = 256  # rows of a tensor (split over the experts used, at least 2 each)
    expert_tokens: int = 64  # routing slots of one expert
    prune_tokens: int = 256  # tokens of a MoE layer the pruning errors are measured on


@dataclass
class LocalErrors:
    """Relative output error of every measured tensor at every candidate type (see the module docstring)."""

    quant: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> type name -> relative error
    energy: dict[str, float] = field(default_factory=dict)  # tensor -> what its errors are relative to
    prune: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # layer -> criterion -> keep -> rel.
    # layer -> experts x experts: how alike two experts are on the sampled tokens (stats/prune_error.py)
    similarity: dict[str, list[list[float]]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def update(self, other: "LocalErrors") -> None:
        self.quant.update(other.quant)
        self.energy.update(other.energy)
        self.prune.update(other.prune)
        self.similarity.update(other.similarity)

    def to_json(self) -> str:
        return json.dumps(dict(version=VERSION, **asdict(self)))

    @classmethod
    def from_json(cls, text: str) -> "LocalErrors | None":
        """None for another version (measured again)."""
        d = json.loads(text)
        if d.pop("version", None) != VERSION:
            return None
        return cls(**d)


def seeded_rng(name: str) -> np.random.Generator:
    """A generator seeded by a tensor's name: the same rows are sampled in every run."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def sample_rows(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``n`` row indices, sorted (all of them when ``k >= n``)."""
    return np.arange(n) if k >= n else np.sort(rng.choice(n, k, replace=False))


def _types(ne0: int, has_imatrix: bool) -> dict[str, T]:
    """Candidate type name -> the type written for rows of ``ne0`` (its fallback where it does not fit)."""
    return {t.name: effective_type(t, ne0) for t in CANDIDATES if has_imatrix or not requires_imatrix(t)}


def _by_type(q: Quantizer, rows: np.ndarray, imatrix: np.ndarray | None, error) -> dict[str, float]:
    """``error(rows - dequantized rows)`` at every candidate type, computed once per type written."""
    by_type: dict[T, float] = {}
    out = {}
    for name, t in _types(rows.shape[1], imatrix is not None).items():
        if t not in by_type:
            by_type[t] = error(rows - held_values(rows, t, imatrix, q))
        out[name] = by_type[t]
    return out


def output_errors(q: Quantizer, rows: np.ndarray, x: np.ndarray, tw: np.ndarray, row_scale: float,
                  imatrix: np.ndarray | None) -> tuple[dict[str, float], float]:
    """({type: sum over tokens of tw * ||(W - Q(W)) x||^2}, sum over tokens of tw * ||W x||^2), both times
    ``row_scale``, for the sampled rows ``rows`` (n, ne0) of ``W``, inputs ``x`` (m, ne0), token weights ``tw``."""
    rows = np.ascontiguousarray(rows, np.float32)
    xt = np.ascontiguousarray(x, np.float32).T
    tw = np.asarray(tw, np.float64)

    def error(diff: np.ndarray) -> float:
        return row_scale * float(((diff @ xt).astype(np.float64) ** 2).sum(0) @ tw)

    return _by_type(q, rows, imatrix, error), error(rows)


def lookup_errors(q: Quantizer, rows: np.ndarray, w: np.ndarray) -> tuple[dict[str, float], float]:
    """A row lookup's: ({type: sum_i w_i ||row_i - Q(row_i)||^2}, sum_i w_i ||row_i||^2)."""
    rows = np.ascontiguousarray(rows, np.float32)
    w = np.asarray(w, np.float64)

    def error(diff: np.ndarray) -> float:
        return float((diff.astype(np.float64) ** 2).sum(1) @ w)

    return _by_type(q, rows, None, error), error(rows)


def local_errors(stats) -> LocalErrors | None:
    """The local errors stored with statistics (:class:`ggufmoe.stats.file.Stats`), None without them."""
    text = stats.extras.get(KEY)
    return LocalErrors.from_json(text) if text else None

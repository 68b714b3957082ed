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
prices them from shapes (:mod:`ggufmoe.sensitivity.local`).

The result (:class:`LocalErrors`) is stored in the statistics file as the JSON key
:data:`KEY` (llama.cpp ignores it).
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ggufmoe.model.qtypes import CANDIDATES, effective_type
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import Quantizer, requires_imatrix
from ggufmoe.stats.skeleton import embedding_rows

KEY = "ggufmoe.local_errors"
VERSION = 1
MAX_PENDING = 32  # error computations queued at most (each holds its sampled rows and inputs)


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


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _pick(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
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
            d = gguf.quants.dequantize(q.quantize(rows, t, imatrix).reshape(len(rows), -1), t)
            by_type[t] = error(rows - d.astype(np.float32))
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


class LocalMeter:
    """Collects a streamed calibration's inputs and computes the local errors of every layer.

    The run sets :attr:`offset` (the first global token row of the forward running) so that the
    samples of every tensor come from the same token positions; :meth:`sample` is the hook every
    plain matmul's input goes through; :meth:`expert` takes one routed expert at a time;
    :meth:`finish_layer` turns what was gathered into relative errors.
    """

    def __init__(self, rows: int, options: LocalOptions | None = None, threads: int | None = None):
        self.options = options or LocalOptions()
        self.stride = max(1, -(-rows // self.options.max_tokens))
        self.offset = 0
        self.wanted: set[str] = set()  # the tensors whose inputs :meth:`sample` keeps
        self.inputs: dict[str, list[np.ndarray]] = {}
        self.pool = ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1), thread_name_prefix="ggufmoe-local")
        self.q = Quantizer(1)
        self.jobs: dict[str, list[Future]] = {}
        self.pending: list[Future] = []
        self.info = dict(asdict(self.options), stride=self.stride)
        for t in {effective_type(t, 256) for t in CANDIDATES}:  # lookup tables, before the threads race for them
            self.q.quantize(np.zeros((1, 256), np.float32), t, np.ones(256, np.float32))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # --- gathering ------------------------------------------------------------------------------------

    def positions(self, n: int) -> np.ndarray:
        """Which of the ``n`` rows of the forward running are sampled positions."""
        first = (-self.offset) % self.stride
        return np.arange(first, n, self.stride)

    def sample(self, name: str, x: torch.Tensor) -> None:
        """A plain matmul's input (any leading shape, one row per token of the forward), kept when wanted."""
        if name not in self.wanted:
            return
        flat = x.detach().reshape(-1, x.shape[-1])
        idx = torch.from_numpy(self.positions(flat.shape[0])).to(flat.device)
        self.inputs.setdefault(name, []).append(flat[idx].to("cpu", torch.float32).numpy())

    def residual_energy(self, h: torch.Tensor) -> float:
        """Mean squared norm of the hidden states ``h`` (all tokens of the run) at the sampled positions."""
        rows = h[torch.from_numpy(np.arange(0, h.shape[0], self.stride))].double()
        return float((rows * rows).sum(1).mean()) if len(rows) else 0.0

    # --- measuring ------------------------------------------------------------------------------------

    def submit(self, name: str, fn, *args) -> None:
        """Queue ``fn(quantizer, *args)`` for tensor ``name``; at most :data:`MAX_PENDING` wait (their samples
        are held until they run), so the caller waits when the pool falls behind."""
        self.pending = [f for f in self.pending if not f.done()]
        while len(self.pending) >= MAX_PENDING:
            self.pending.pop(0).result()
        f = self.pool.submit(fn, self.q, *args)
        self.pending.append(f)
        self.jobs.setdefault(name, []).append(f)

    def plain(self, spec: TensorSpec, imatrix: np.ndarray | None) -> None:
        """Queue the error of a plain tensor over its sampled inputs (nothing when no input was seen)."""
        chunks = self.inputs.pop(spec.name, None)
        if not chunks:
            return
        x = np.concatenate(chunks)
        n = spec.shape[0] if len(spec.shape) == 2 else 0
        if not n:
            return
        idx = _pick(n, self.options.max_rows, _rng(spec.name))
        rows = embedding_rows(spec, torch.from_numpy(idx)).numpy()
        tw = np.full(len(x), 1.0 / len(x))  # per token: the mean over the sampled positions
        self.submit(spec.name, output_errors, rows, x, tw, n / len(idx), imatrix)

    def expert(self, matrices: dict[str, torch.Tensor], e: int, inputs: dict[str, torch.Tensor],
               slot_weights: torch.Tensor, n_slots: int, n_tokens: int, imatrix: dict[str, np.ndarray],
               n_used: int) -> None:
        """Queue expert ``e``'s errors: ``matrices`` maps each of its tensors (by name) to the expert's matrix
        (GGUF layout), ``inputs`` to the sampled slots' inputs; ``slot_weights`` are their routing weights,
        standing for ``n_slots`` slots of the run's ``n_tokens`` tokens; ``n_used`` experts of the layer got any."""
        m = len(slot_weights)
        if not m:
            return
        w = slot_weights.double().cpu().numpy()
        tw = w * w * (n_slots / m) / n_tokens
        per = max(2, self.options.max_rows // max(1, n_used))
        for name, matrix in matrices.items():
            mat = matrix.detach().to("cpu", torch.float32).numpy()
            idx = _pick(len(mat), per, _rng(f"{name}:{e}"))
            x = inputs[name].detach().to("cpu", torch.float32).numpy()
            self.submit(name, output_errors, mat[idx], x, tw, len(mat) / len(idx), imatrix[name])

    def embedding(self, spec: TensorSpec, ids: torch.Tensor) -> None:
        """The embedding's errors over the rows of the text's tokens, weighted by their frequency."""
        counts = np.bincount(ids.reshape(-1).numpy().astype(np.int64), minlength=spec.shape[0])[: spec.shape[0]]
        used = np.flatnonzero(counts)
        if not len(used):
            return
        k = self.options.max_rows
        order = used[np.argsort(-counts[used], kind="stable")]
        top, rest = order[: k // 2], order[k // 2:]
        pick = rest[_pick(len(rest), k - len(top), _rng(spec.name))]
        idx = np.sort(np.concatenate([top, pick]))
        w = counts[idx].astype(np.float64)
        if len(rest) > len(pick):
            scale = counts[rest].sum() / max(counts[pick].sum(), 1)
            w[np.isin(idx, pick)] *= scale
        rows = embedding_rows(spec, torch.from_numpy(idx)).numpy()
        self.submit(spec.name, lookup_errors, rows, w / w.sum())

    def finish(self, names: list[str], residual: float | None) -> LocalErrors:
        """The errors of ``names`` (once computed) relative to ``residual`` (the layer input's mean squared
        norm), or, with None, to their own output's."""
        out = LocalErrors()
        for name in names:
            jobs = self.jobs.pop(name, [])
            if not jobs:
                continue
            total: dict[str, float] = {}
            energy = 0.0
            for f in jobs:
                err, en = f.result()
                energy += en
                for t, v in err.items():
                    total[t] = total.get(t, 0.0) + v
            ref = residual if residual is not None else energy
            if ref and ref > 0:
                out.quant[name] = {t: v / ref for t, v in total.items()}
                out.energy[name] = ref
        self.inputs.clear()
        return out


def local_errors(stats) -> LocalErrors | None:
    """The local errors stored with statistics (:class:`ggufmoe.stats.file.Stats`), None without them."""
    text = stats.extras.get(KEY)
    return LocalErrors.from_json(text) if text else None

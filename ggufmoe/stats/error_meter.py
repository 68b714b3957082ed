"""The local errors (:mod:`ggufmoe.stats.local_errors`) measured while a streamed calibration runs: its
inputs sampled from torch tensors, the errors computed in numpy on a thread pool."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch

from ggufmoe.model.qtypes import CANDIDATES, effective_type
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.stats.local_errors import (LocalErrors, LocalOptions, lookup_errors, output_errors, sample_rows,
                                  seeded_rng)
from ggufmoe.stats.skeleton import embedding_rows

MAX_PENDING = 32  # error computations queued at most (each holds its sampled rows and inputs)


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
        idx = sample_rows(n, self.options.max_rows, seeded_rng(spec.name))
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
            idx = sample_rows(len(mat), per, seeded_rng(f"{name}:{e}"))
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
        pick = rest[sample_rows(len(rest), k - len(top), seeded_rng(spec.name))]
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

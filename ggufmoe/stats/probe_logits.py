"""The probe streams' KL divergence from the exact model at the logits (:mod:`ggufmoe.stats.probe_streams`)."""

from __future__ import annotations

import numpy as np
import torch

from ggufmoe.model.tensor import RowLoader, TensorSpec
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.held import held_values
from ggufmoe.stats.probe_results import Variant

REF = ""  # the exact model's stream
LOGIT_BYTES = 256 * 1024**2  # a vocabulary chunk's logits for all tokens, and its rows at every type


def stream_kl(spec: TensorSpec, x: dict[str, torch.Tensor], variants: list[Variant], imatrix_row: np.ndarray | None,
              cap: float | None, q: Quantizer) -> dict[str, torch.Tensor]:
    """Per token, KL(exact || stream) of every variant's logits (``x``: the final norm's output of each stream by
    variant name, the exact model's under :data:`REF`), the output matrix ``spec`` read and quantized in row chunks
    (``cap``: the logits' soft cap): running log-sum-exps and the exact distribution's running expectation of the
    difference, never a whole row of logits per stream."""
    n_vocab = spec.shape[0]
    rows_x = len(x[REF])
    n_types = len({v.types.get(spec.name) for v in variants} | {None})
    # vocabulary rows per chunk: their logits (float64, two at a time) and the rows at each type within LOGIT_BYTES
    step = max(1, min(LOGIT_BYTES // (8 * rows_x * 2), LOGIT_BYTES // (4 * spec.shape[-1] * n_types)))
    loader = spec.load
    whole = None if isinstance(loader, RowLoader) else loader(0)
    neg = torch.full((rows_x,), -torch.inf, dtype=torch.float64)
    m_ref, s_ref = neg.clone(), torch.zeros(rows_x, dtype=torch.float64)
    lse = {v.name: (neg.clone(), torch.zeros(rows_x, dtype=torch.float64)) for v in variants}
    acc = {v.name: torch.zeros(rows_x, dtype=torch.float64) for v in variants}

    def logits(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z = (xs @ w.T).double()
        return cap * torch.tanh(z / cap) if cap else z

    for r0 in range(0, n_vocab, step):
        r1 = min(n_vocab, r0 + step)
        rows = whole[r0:r1] if whole is not None else loader.rows(r0, r1)
        mats = {None: torch.from_numpy(np.ascontiguousarray(rows, np.float32))}
        for v in variants:
            t = v.types.get(spec.name)
            if t not in mats:
                mats[t] = torch.from_numpy(held_values(rows, t, imatrix_row, q))
        z_ref = logits(x[REF], mats[None])
        m_new = torch.maximum(m_ref, z_ref.max(1).values)
        decay = torch.exp(m_ref - m_new)
        p = torch.exp(z_ref - m_new[:, None])
        s_ref = s_ref * decay + p.sum(1)
        for v in variants:
            z = logits(x[v.name], mats[v.types.get(spec.name)])
            acc[v.name] = acc[v.name] * decay + (p * (z_ref - z)).sum(1)
            m, s = lse[v.name]
            m2 = torch.maximum(m, z.max(1).values)
            lse[v.name] = (m2, s * torch.exp(m - m2) + torch.exp(z - m2[:, None]).sum(1))
        m_ref = m_new
    log_z_ref = m_ref + torch.log(s_ref)
    return {name: (acc[name] / s_ref - log_z_ref + m + torch.log(s)).clamp(min=0)
            for name, (m, s) in lse.items()}

"""Per-token log-probabilities from llama.cpp (a GGUF) and from transformers (the reference)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from ggufmoe.errors import GgufmoeError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class LlamaScorer:
    """A GGUF loaded once in llama.cpp, scoring token sequences of up to ``n_ctx`` tokens.

    ``kv_f32`` keeps the KV cache in F32 (llama.cpp's default is F16), so that only the
    weights differ from the reference.
    """

    def __init__(self, gguf_path: str | Path, n_ctx: int, threads: int | None = None, kv_f32: bool = True):
        from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

        kv = GGML_TYPE_F32 if kv_f32 else GGML_TYPE_F16
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         verbose=False, n_threads=threads, type_k=kv, type_v=kv)

    def __call__(self, tokens: list[int]) -> np.ndarray:
        """Log-probabilities (n_tokens x vocab) of every position, in a fresh context."""
        self.llm.reset()
        self.llm.eval(tokens)
        return log_softmax(np.array(self.llm.scores[:len(tokens)], dtype=np.float32))

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "LlamaScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def llama_logprobs(gguf_path: str | Path, tokens: list[int], threads: int | None = None) -> np.ndarray:
    """Log-probabilities (n_tokens x vocab) of one sequence, evaluated by llama.cpp."""
    with LlamaScorer(gguf_path, len(tokens), threads) as score:
        return score(tokens)


def hf_logprobs(model, tokens: list[int]) -> np.ndarray:
    """Log-probabilities (n_tokens x vocab) from a transformers causal LM."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    return log_softmax(logits.float().numpy())


def token_nll(logprobs: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood of each next token (n_tokens - 1 values)."""
    nxt = np.asarray(tokens[1:])
    return -logprobs[np.arange(len(nxt)), nxt]


def token_kld(logp: np.ndarray, base: np.ndarray) -> np.ndarray:
    """KL(base || logp) at each position (rows of log-probabilities)."""
    return (np.exp(base) * (base - logp)).sum(axis=-1)


def top_p_sets(logp: np.ndarray, p: float, first: int = 64, block: int = 64) -> np.ndarray:
    """The top-p set of each row of log-probabilities: the smallest set of most probable tokens whose
    probabilities sum to at least ``p`` (the tokens taken in order of probability). Returned as an
    (n_rows, m) array of token ids in ascending order, padded with the vocabulary size, m the largest set.

    Only the most probable ``first`` tokens of a row are sorted (``argpartition``), eight times as many for
    the rows they do not cover, and so on: a flat row costs a sort of the whole vocabulary, a peaked one
    almost nothing. Rows go ``block`` at a time, so the index arrays stay small next to a 150k vocabulary."""
    if not 0 < p <= 1:
        raise ValueError(f"top-p {p} is not in (0, 1]")
    n, v = logp.shape
    found: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, their sets: ascending ids, padded with v)
    for b0 in range(0, n, block):
        pending, m = np.arange(b0, min(b0 + block, n)), min(first, v)
        while pending.size:
            lp = logp[pending]
            idx = np.argpartition(lp, v - m, axis=-1)[:, v - m:] if m < v else np.broadcast_to(np.arange(v), lp.shape)
            vals = np.take_along_axis(lp, idx, -1)
            order = np.argsort(-vals, axis=-1, kind="stable")
            idx = np.take_along_axis(idx, order, -1)
            cum = np.cumsum(np.exp(np.take_along_axis(vals, order, -1)), axis=-1)
            done = (cum[:, -1] >= p) | (m == v)  # the whole vocabulary short of p (rounding): all of it
            k = np.minimum((cum < p).sum(axis=-1) + 1, m)[done]
            if k.size:
                ids = np.where(np.arange(m) < k[:, None], idx[done], v)[:, :k.max()]
                found.append((pending[done], np.sort(ids, axis=-1)))
            pending, m = pending[~done], min(8 * m, v)
    out = np.full((n, max((ids.shape[1] for _, ids in found), default=0)), v, dtype=np.int64)
    for rows, ids in found:
        out[rows, :ids.shape[1]] = ids
    return out


def same_top_p(logp: np.ndarray, base: np.ndarray, p: float = 0.9) -> np.ndarray:
    """Per row: whether the top-p set (:func:`top_p_sets`) of ``logp`` is the very set of ``base``'s."""
    a, b = top_p_sets(logp, p), top_p_sets(base, p)
    width = max(a.shape[1], b.shape[1])
    pad = logp.shape[-1]
    a = np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=pad)
    b = np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=pad)
    return (a == b).all(axis=-1)


@dataclass
class Comparison:
    """Means over the positions that predict a next token, and the per-position values they average
    (for callers that pool positions over several sequences)."""

    mean_abs_dnll: float
    kld_mean: float
    ppl: float
    ppl_base: float
    top1: float
    kld: np.ndarray | None = field(default=None, repr=False, compare=False)  # KL(base || logp) per position
    nll: np.ndarray | None = field(default=None, repr=False, compare=False)  # next-token NLL per position
    nll_base: np.ndarray | None = field(default=None, repr=False, compare=False)  # the same under the base
    agree: np.ndarray | None = field(default=None, repr=False, compare=False)  # top-1 equal (bool) per position
    same_top_p: np.ndarray | None = field(default=None, repr=False, compare=False)  # top-p set equal (bool), if asked


def compare(logp: np.ndarray, base: np.ndarray, tokens: list[int], top_p: float | None = None) -> Comparison:
    """How ``logp`` differs from ``base`` over the positions that predict a next token; with ``top_p``
    also whether each position's top-p set is unchanged (:func:`same_top_p`)."""
    logp, base = logp[:-1], base[:-1]
    nll, nll_base = token_nll(logp, tokens), token_nll(base, tokens)
    kld = token_kld(logp, base)
    agree = logp.argmax(-1) == base.argmax(-1)
    return Comparison(
        mean_abs_dnll=float(np.abs(nll - nll_base).mean()), kld_mean=float(kld.mean()),
        ppl=float(np.exp(nll.mean())), ppl_base=float(np.exp(nll_base.mean())),
        top1=float(agree.mean()), kld=kld, nll=nll, nll_base=nll_base, agree=agree,
        same_top_p=None if top_p is None else same_top_p(logp, base, top_p))


# --- the scoring loop: the base once, then each candidate against it --------------------------------

def iter_logprobs(gguf_path: str | Path, seqs: Sequence[list[int]], threads: int | None = None,
                  kv_f32: bool = True, progress: bool = False, desc: str | None = None) -> Iterator[np.ndarray]:
    """Log-probabilities (n_tokens x vocab, float64) of each sequence in order, the GGUF loaded once
    with a context of the longest sequence."""
    with LlamaScorer(gguf_path, max(len(s) for s in seqs), threads, kv_f32) as score:
        for s in tqdm(seqs, desc=desc, unit="chunk", disable=not progress):
            yield score(s)


def base_logprobs(gguf_path: str | Path, seqs: Sequence[list[int]], threads: int | None = None,
                  kv_f32: bool = True) -> list[np.ndarray]:
    """The reference a candidate is scored against (:func:`score_against`): each sequence's log-probabilities."""
    return list(iter_logprobs(gguf_path, seqs, threads, kv_f32))


def score_against(gguf_path: str | Path, seqs: Sequence[list[int]], base: Iterable[np.ndarray],
                  threads: int | None = None, kv_f32: bool = True, progress: bool = False,
                  desc: str | None = None, top_p: float | None = None) -> list[Comparison]:
    """Score each sequence with ``gguf_path`` (loaded once) and compare it with the base's
    log-probabilities of the same sequence (:func:`base_logprobs`, or any rows: taken as float64);
    one :class:`Comparison` per sequence (with ``top_p``: same-top-p too), in order. Averaging over
    sequences is the caller's."""
    out = []
    with LlamaScorer(gguf_path, max(len(s) for s in seqs), threads, kv_f32) as score:
        for s, b in zip(tqdm(seqs, desc=desc, unit="chunk", disable=not progress), base):
            lp = score(s)
            if lp.shape[-1] != b.shape[-1]:
                raise GgufmoeError(f"{gguf_path}: vocabulary of {lp.shape[-1]} tokens, the base has {b.shape[-1]}")
            out.append(compare(lp, np.asarray(b, dtype=np.float64), s, top_p))
    return out

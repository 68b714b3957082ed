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


def compare(logp: np.ndarray, base: np.ndarray, tokens: list[int]) -> Comparison:
    """How ``logp`` differs from ``base`` over the positions that predict a next token."""
    logp, base = logp[:-1], base[:-1]
    nll, nll_base = token_nll(logp, tokens), token_nll(base, tokens)
    kld = token_kld(logp, base)
    agree = logp.argmax(-1) == base.argmax(-1)
    return Comparison(
        mean_abs_dnll=float(np.abs(nll - nll_base).mean()), kld_mean=float(kld.mean()),
        ppl=float(np.exp(nll.mean())), ppl_base=float(np.exp(nll_base.mean())),
        top1=float(agree.mean()), kld=kld, nll=nll, nll_base=nll_base, agree=agree)


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
                  desc: str | None = None) -> list[Comparison]:
    """Score each sequence with ``gguf_path`` (loaded once) and compare it with the base's
    log-probabilities of the same sequence (:func:`base_logprobs`, or any rows: taken as float64);
    one :class:`Comparison` per sequence, in order. Averaging over sequences is the caller's."""
    out = []
    with LlamaScorer(gguf_path, max(len(s) for s in seqs), threads, kv_f32) as score:
        for s, b in zip(tqdm(seqs, desc=desc, unit="chunk", disable=not progress), base):
            lp = score(s)
            if lp.shape[-1] != b.shape[-1]:
                raise GgufmoeError(f"{gguf_path}: vocabulary of {lp.shape[-1]} tokens, the base has {b.shape[-1]}")
            out.append(compare(lp, np.asarray(b, dtype=np.float64), s))
    return out

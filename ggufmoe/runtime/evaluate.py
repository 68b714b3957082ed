"""Quality of a GGUF against a base model through llama.cpp's logits: perplexity, KL divergence
(mean, 99th and 99.9th percentile over tokens), top-1 agreement and same-top-p: the share of tokens
whose top-p set — the smallest set of most probable tokens whose probabilities sum to at least p
(default 0.9) — is the very set the base has (:func:`ggufmoe.runtime.logprobs.same_top_p`).

The base is a GGUF (scored by llama.cpp) or a Hugging Face directory (scored by transformers).
Both see the same tokens: the text tokenized by llama.cpp with the candidate's vocabulary, cut
into chunks of ``ctx`` tokens that each open with the vocabulary's BOS (when it adds one); a base
whose vocabulary is another (:func:`check_same_vocabulary`) is refused before anything is scored. The
base's log-probabilities are cached on disk (float32, keyed by the base's identity and the
tokens), so comparing many candidates against one base scores the base once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from ggufmoe.source.fingerprint import fingerprint, model_files
from ggufmoe.errors import GgufmoeError
from ggufmoe.files import cache_folder, replace_atomically
from ggufmoe.runtime.logprobs import hf_logprobs, iter_logprobs, score_against
from ggufmoe.source.gguf_file import read_gguf
from ggufmoe.source.hf_config import config_view
from ggufmoe.source.tokenizer import token_texts
from ggufmoe.stats.hf_model import load_model

CHARS_PER_TOKEN = 16  # text looked at per token wanted: far more than any tokenizer needs
TOP_P = 0.9  # the p of same-top-p


@dataclass
class EvalResult:
    path: str
    base: str
    ctx: int
    chunks: int
    tokens: int  # predicted tokens scored
    ppl: float
    ppl_base: float
    kld_mean: float
    kld_p99: float
    kld_p999: float
    top1: float
    same_top_p: float  # share of tokens whose top-p set is the base's
    top_p: float  # its p
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def default_cache_dir() -> Path:
    return cache_folder("logprobs")


def existing_file(path: Path) -> Path:
    """``path`` (a GGUF, or the first shard of a split one: llama.cpp opens the others) if it is a file."""
    path = Path(path)
    if not path.is_file():
        raise GgufmoeError(f"{path}: no such file")
    return path


def vocabulary(path: Path) -> list[str]:
    """The token texts by id of a GGUF (``tokenizer.ggml.tokens``), or of the GGUF a Hugging Face directory
    converts to (its tokenizer.json, padded to the configuration's vocab_size)."""
    if path.is_dir():
        return token_texts(path, int(config_view(path).vocab_size))
    tokens = read_gguf(path).fields.get(gguf.Keys.Tokenizer.LIST)
    return tokens.contents() if tokens is not None else []


def check_same_vocabulary(path: Path, base: Path) -> None:
    """Refuse a base whose tokens are not the candidate's, in order: the scores would compare another model's
    predictions of other tokens (a vocabulary of the same size would not show it)."""
    ours, theirs = vocabulary(path), vocabulary(base)
    if ours == theirs:
        return
    if len(ours) != len(theirs):
        detail = f"{len(ours)} tokens, the base {len(theirs)}"
    else:
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        detail = (f"{len(differ)} of {len(ours)} tokens differ, first at id {differ[0]}: "
                  f"{ours[differ[0]]!r} vs {theirs[differ[0]]!r}")
    raise GgufmoeError(f"{path} and {base} have different vocabularies ({detail}): compare files of the same model")


def tokenize(gguf_path: Path, text: str, ctx: int, max_tokens: int) -> list[list[int]]:
    """Chunks of ``ctx`` tokens (BOS first when the vocabulary adds one) covering at most ``max_tokens``
    tokens of ``text``: whole chunks only, or one shorter chunk when the text is shorter than ``ctx``."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel  # the vocabulary alone: no context to create

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        vocab = LlamaModel(path_model=str(gguf_path), params=params, verbose=False)
    except ValueError as e:
        raise GgufmoeError(f"{gguf_path}: llama.cpp cannot read it ({e})") from None
    try:
        prefix = vocab.tokenize(b"", add_bos=True, special=False)
        ids = vocab.tokenize(text[: max_tokens * CHARS_PER_TOKEN].encode("utf-8", errors="replace"),
                             add_bos=False, special=False)[:max_tokens]
    finally:
        vocab.close()
    body = ctx - len(prefix)
    if body < 1:
        raise GgufmoeError(f"context {ctx} is too small")
    if len(ids) < 2:
        raise GgufmoeError("evaluation text is too short (fewer than 2 tokens)")
    if len(ids) < body:
        return [prefix + ids]
    return [prefix + ids[i: i + body] for i in range(0, len(ids) - body + 1, body)]


def cached_base_logprobs(base: Path, chunks: list[list[int]], kv_f32: bool = True, threads: int | None = None,
                         cache_dir: Path | None = None, progress: bool = True) -> np.ndarray:
    """(chunks, ctx, vocab) float32 log-probabilities of the base (a GGUF, or a Hugging Face directory
    scored by transformers), from the on-disk cache when present."""
    h = hashlib.sha256(f"{fingerprint(model_files(base))}\0{kv_f32}\0".encode())
    h.update(np.asarray(chunks, dtype=np.int64).tobytes())
    cache = Path(cache_dir or default_cache_dir()) / f"{h.hexdigest()[:32]}.npy"
    if cache.is_file():
        try:
            return np.load(cache, mmap_mode="r")
        except (OSError, ValueError):
            cache.unlink(missing_ok=True)  # damaged: score again
    desc = f"base {base.name}"
    if base.is_dir():
        bar = tqdm(chunks, desc=desc, unit="chunk", disable=not progress)
        _, model = load_model(base, progress)
        out = np.stack([hf_logprobs(model, c).astype(np.float32) for c in bar])
    else:
        out = np.stack([lp.astype(np.float32) for lp in iter_logprobs(base, chunks, threads, kv_f32, progress, desc)])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, out)

        replace_atomically(cache, save)
    except OSError:
        pass  # a cache that cannot be written only costs time
    return out


def score_base(base: Path, text: str, ctx: int = 512, max_tokens: int = 8192, kv_f32: bool = True,
                threads: int | None = None, cache_dir: Path | None = None, progress: bool = True) -> None:
    """The base's log-probabilities on ``text`` into the cache ahead of the files :func:`evaluate` scores against it
    (files scored at once elsewhere then find them instead of each scoring the base)."""
    cached_base_logprobs(base, tokenize(base, text, ctx, max_tokens), kv_f32, threads, cache_dir, progress)


def evaluate(path: Path, base: Path, text: str, ctx: int = 512, max_tokens: int = 8192, kv_f32: bool = True,
             threads: int | None = None, cache_dir: Path | None = None, progress: bool = True,
             top_p: float = TOP_P) -> EvalResult:
    """Score ``path`` against ``base`` (GGUF or Hugging Face directory) on ``text``; same-top-p at ``top_p``."""
    if not 0 < top_p <= 1:
        raise GgufmoeError(f"top-p {top_p} is not in (0, 1]")
    t0 = time.perf_counter()
    path, base = existing_file(path), Path(base)
    if not base.exists():
        raise GgufmoeError(f"{base}: no such file or directory")
    if base.is_dir() and not (base / "config.json").is_file():
        raise GgufmoeError(f"{base}: not a Hugging Face model directory (no config.json)")
    check_same_vocabulary(path, base)
    chunks = tokenize(path, text, ctx, max_tokens)
    ref = cached_base_logprobs(base, chunks, kv_f32, threads, cache_dir, progress)
    if ref.shape[-1] < 1:
        raise GgufmoeError(f"{base}: no logits")
    # every position of every chunk counts once (pooled, not a mean of chunk means)
    cmp = score_against(path, chunks, ref, threads, kv_f32, progress, desc=f"eval {path.name}", top_p=top_p)
    kld_all = np.concatenate([c.kld for c in cmp])
    return EvalResult(path=str(path), base=str(base), ctx=len(chunks[0]), chunks=len(chunks), tokens=int(kld_all.size),
                      ppl=float(np.exp(np.concatenate([c.nll for c in cmp]).mean())),
                      ppl_base=float(np.exp(np.concatenate([c.nll_base for c in cmp]).mean())),
                      kld_mean=float(kld_all.mean()), kld_p99=float(np.percentile(kld_all, 99)),
                      kld_p999=float(np.percentile(kld_all, 99.9)),
                      top1=float(np.concatenate([c.agree for c in cmp]).mean()),
                      same_top_p=float(np.concatenate([c.same_top_p for c in cmp]).mean()), top_p=top_p,
                      seconds=time.perf_counter() - t0)


def format_result(r: EvalResult) -> str:
    return "\n".join([
        f"model        {r.path}",
        f"base         {r.base}",
        f"tokens       {r.tokens} scored in {r.chunks} chunks of {r.ctx}",
        f"perplexity   {r.ppl:.4f} (base {r.ppl_base:.4f})",
        f"KL div.      mean {r.kld_mean:.6f}, 99th percentile {r.kld_p99:.6f}, 99.9th {r.kld_p999:.6f} nats/token",
        f"top-1        {100 * r.top1:.2f}% agreement with the base",
        f"same top-p   {100 * r.same_top_p:.2f}% of tokens keep the base's top-{r.top_p:g} set",
    ])


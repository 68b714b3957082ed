"""Text to token chunks: reading a text file, tokenizing it lazily in pieces, chunks and batches."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ggufmoe.errors import GgufmoeError

if TYPE_CHECKING:
    import torch

MAX_TEXT_TOKENS = 1_000_000  # tokens of a text the probes look at (token frequencies, KL chunks)
CALIB_CTX = 512  # tokens per calibration chunk by default (llama-imatrix's)
BATCH_TOKENS = 4096  # tokens per forward: whole chunks of ctx tokens batched together
PIECE_CHARS = 1 << 16  # characters of text tokenized at a time
CHECK_CHARS = 1 << 14  # opening of the text on which tokenizing in pieces is checked
_CUT = re.compile(r"\n(?=\S)")
HOLD_OUT_CHARS = 1 << 14  # characters per piece of a calibration text, cut after a newline
HOLD_OUT_EVERY = 8  # one piece in this many is held out of calibration for the planner's probes
# Calibration tokens routed to each expert on average (tokens x top-k / experts) below which statistics are
# warned about: many experts then see a handful of tokens or none.
MIN_ROUTED_PER_EXPERT = 64


def read_text(path: str | Path) -> str:
    """A calibration text file (UTF-8; undecodable bytes replaced), or one clear error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except IsADirectoryError:
        raise GgufmoeError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot read calibration text ({e.strerror or e})") from None
    if not text.strip():
        raise GgufmoeError(f"{path}: calibration text is empty")
    if "\x00" in text or text.count("\ufffd") > len(text) // 10:
        raise GgufmoeError(f"{path}: not a text file (it holds NUL bytes or is mostly not UTF-8)")
    return text


def _cuts(text: str, every: int) -> list[int]:
    """Positions about ``every`` characters apart, each just after a newline followed by a non-space."""
    out, pos = [], 0
    while True:
        m = _CUT.search(text, pos + every)
        if m is None:
            return out
        pos = m.end()
        out.append(pos)


def _pieces(text: str, cuts: list[int]) -> Iterator[str]:
    bounds = [0, *cuts, len(text)]
    return (text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)


@dataclass
class HeldOut:
    """A calibration text split in two: the part the statistics are collected on, and the pieces held out of
    them (empty when the text is too short to spare one), on which the planner measures what pruning and
    quantizing cost, on text the choice of experts and the importance matrix did not see."""

    calibration: str
    probes: str


def hold_out(text: str) -> HeldOut:
    """Pieces of about :data:`HOLD_OUT_CHARS` characters, cut after newlines; of every :data:`HOLD_OUT_EVERY`, the
    middle one is held out, so the held-out text is spread over the whole text as its topics are."""
    pieces = list(_pieces(text, _cuts(text, HOLD_OUT_CHARS)))
    held = set(range(HOLD_OUT_EVERY // 2, len(pieces), HOLD_OUT_EVERY))
    return HeldOut("".join(p for i, p in enumerate(pieces) if i not in held),
                   "".join(p for i, p in enumerate(pieces) if i in held))


def spread_chunks(chunks: list[list[int]], n: int) -> list[list[int]]:
    """``n`` chunks evenly spaced over ``chunks`` (whole chunks only, unless there are none)."""
    full = [c for c in chunks if len(c) == len(chunks[0])] or chunks[:1]
    if len(full) <= n:
        return full
    return [full[i] for i in np.linspace(0, len(full) - 1, n).round().astype(int)]


def _cut_safe(tokenizer, text: str) -> bool:
    """Whether tokenizing the text in pieces cut after newlines gives the ids the whole text gives.

    True for byte-level BPE with GPT-2/Qwen2-style split rules (a newline followed by a
    non-space always ends a pre-token); false, for instance, for SentencePiece-style
    tokenizers that mark the start of the text. Checked on the opening of the text itself.
    """
    sample = text[:CHECK_CHARS]
    cuts = _cuts(sample, CHECK_CHARS // 16)
    if not cuts:
        return False

    def ids(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]

    return [i for piece in _pieces(sample, cuts) for i in ids(piece)] == ids(sample)


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> np.ndarray:
    """The token ids (int32) of ``text`` without special tokens, at most ``max_tokens`` of them.

    Tokenized lazily, in pieces of about ``PIECE_CHARS`` characters cut after newlines, when
    that gives the ids of the whole text (see :func:`_cut_safe`): memory holds the ids and one
    piece's encoding, never the encoding of the whole text, and tokenizing stops once
    ``max_tokens`` ids are known. Otherwise the whole text is tokenized at once.
    """
    if max_tokens is not None and max_tokens < 1:
        raise GgufmoeError(f"max_tokens must be positive, not {max_tokens}")
    pieces = _pieces(text, _cuts(text, PIECE_CHARS)) if _cut_safe(tokenizer, text) else iter([text])
    out, n = [], 0
    for piece in pieces:
        ids = np.asarray(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int32)
        out.append(ids)
        n += ids.size
        if max_tokens is not None and n >= max_tokens:
            break
    ids = np.concatenate(out) if out else np.zeros(0, np.int32)
    return ids[:max_tokens] if max_tokens is not None else ids


def special_prefix(tokenizer, ctx: int) -> list[int]:
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    if ctx - len(prefix) < 1:
        raise GgufmoeError(f"context {ctx} is too small")
    return prefix


def calibration_tokens(tokenizer, text: str, ctx: int, max_tokens: int | None) -> tuple[np.ndarray, list[int]]:
    """The token ids of ``text`` (at most ``max_tokens``; none is an error) and the special prefix that
    every chunk of ``ctx`` tokens opens with."""
    prefix = special_prefix(tokenizer, ctx)
    ids = token_ids(tokenizer, text, max_tokens)
    if not len(ids):
        raise GgufmoeError("calibration text is empty")
    return ids, prefix


def calibration_rows(n_ids: int, prefix: int, ctx: int) -> tuple[int, int]:
    """The chunks of ``ctx`` tokens that ``n_ids`` token ids make, each opening with ``prefix`` special tokens, and
    the rows (tokens) they fill."""
    n_chunks = -(-n_ids // (ctx - prefix))
    return n_chunks, n_ids + n_chunks * prefix


Share = tuple[int, int]  # share i of n of a calibration's chunks


def share_of(ids: np.ndarray, body: int, share: Share) -> np.ndarray:
    """Share ``(i, n)`` of the chunks of ``body`` tokens that ``ids`` is cut into: whole chunks, contiguous, as the
    chunks would be laid out for all of ``ids`` (the shares of ``0..n-1`` are ``ids`` in order)."""
    i, n = share
    n_chunks = -(-len(ids) // body)
    return ids[i * n_chunks // n * body:(i + 1) * n_chunks // n * body]


def warn_if_few_tokens(n_tokens: int, n_expert: int, top_k: int) -> None:
    """One ``warning:`` line on stderr when ``n_tokens`` of calibration text route fewer than
    :data:`MIN_ROUTED_PER_EXPERT` tokens to each of ``n_expert`` experts on average."""
    per_expert = n_tokens * top_k / n_expert
    if per_expert < MIN_ROUTED_PER_EXPERT:
        print(f"warning: statistics from only {n_tokens} tokens of text: {per_expert:.1f} routed to each of the "
              f"{n_expert} experts on average (fewer than {MIN_ROUTED_PER_EXPERT}), so many experts' statistics and "
              "the plans made from them are unreliable", file=sys.stderr)


def token_chunks(tokenizer, text: str, ctx: int, max_tokens: int | None) -> list[list[int]]:
    """Chunks of at most ``ctx`` tokens, each opening with the tokenizer's special prefix (BOS) if any."""
    ids, prefix = calibration_tokens(tokenizer, text, ctx, max_tokens)
    ids = ids.tolist()
    body = ctx - len(prefix)
    return [prefix + ids[i: i + body] for i in range(0, len(ids), body)]


def batches(ids: torch.Tensor, prefix: list[int], ctx: int, batch_tokens: int = BATCH_TOKENS) -> Iterator[torch.Tensor]:
    """(batch, ctx) tensors of whole chunks (each opening with ``prefix``); the shorter last chunk alone."""
    import torch  # a calibration's: torch is imported by then

    body = ctx - len(prefix)
    per_batch = max(1, batch_tokens // ctx)
    n_full = len(ids) // body
    head = torch.tensor(prefix, dtype=torch.long)
    for i in range(0, n_full, per_batch):
        n = min(per_batch, n_full - i)
        chunk = ids[i * body: (i + n) * body].view(n, body).long()
        yield torch.cat([head.expand(n, -1), chunk], 1) if prefix else chunk
    if len(ids) % body:
        yield torch.cat([head, ids[n_full * body:].long()])[None]

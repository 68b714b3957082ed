"""Hugging Face ``tokenizer.json`` -> GGUF ``tokenizer.ggml.*`` keys.

Two BPE families are supported:

* byte-level BPE (GPT-2, Qwen2, Llama-3, DeepSeek-V3, ...) -> llama.cpp model ``gpt2``. The
  pre-tokenizer name is recognised from the tokenizer's own ``pre_tokenizer`` definition (its
  split regexes) through :data:`PRE_TOKENIZERS`, not from a hash of tokenized text.
* SentencePiece-style BPE (Llama-2, Mixtral: ``byte_fallback``, spaces written as ``▁``, ``<0xNN>``
  byte tokens) -> llama.cpp model ``llama``. llama.cpp's SPM tokenizer merges the adjacent pair
  whose concatenation is the vocabulary token with the highest score, so the token made by merge
  rank ``r`` gets score ``-r`` and every other token a score below all of them. A family whose llama.cpp
  graph has its own tokenizer for them (Gemma 4: :data:`GEMMA4`, BPE merges by rank over the ``▁``-spaced
  text split at newlines, ``<0xNN>`` byte fallback) gets that model and the merges instead: HF's own algorithm.

What llama.cpp does not reproduce:

* SPM: llama.cpp merges *any* adjacent pair whose concatenation is a token, while HF merges only
  pairs listed in ``merges``. When a later merge ``(ab, c)`` makes ``abc`` but the text was split
  ``a | bc`` first, llama.cpp still builds ``abc`` and HF does not. No score assignment can fix
  this; it did not occur on vocabularies trained with ``tokenizers`` (tests pin the case).
* SPM: a ``Metaspace`` pre-tokenizer adds no ``▁`` to text that already starts with a space (nor,
  with ``prepend_scheme="first"``, after a special token); llama.cpp always adds one. The Llama-2
  layout (``Prepend`` + ``Replace`` normalizers) has no such difference.
* Normalizers are not applied by llama.cpp's BPE: the NFC normalizer of Qwen2-style tokenizers
  is accepted (as llama.cpp's own converter does), so un-normalized input can tokenize differently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
from gguf import TokenType

from ggufmoe.errors import GgufmoeError

Json = dict[str, Any]

#: The split regex of ``ByteLevel(use_regex=true)`` (GPT-2's).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_GPT4O_WORD = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_GPT4O_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O_SUFFIX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
#: OpenAI's o200k split (gpt-oss; Llama-4 and MiniMax-M2 use it too).
GPT4O_REGEX = (rf"[^\r\n\p{{L}}\p{{N}}]?{_GPT4O_WORD}*{_GPT4O_LOWER}+{_GPT4O_SUFFIX}"
               rf"|[^\r\n\p{{L}}\p{{N}}]?{_GPT4O_WORD}+{_GPT4O_LOWER}*{_GPT4O_SUFFIX}"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK3_REGEXES = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!" '"' r"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass(frozen=True)
class PreTokenizer:
    """A llama.cpp pre-tokenizer, by what it does: the regexes it splits with, in order (as written
    in tokenizer.json), and whether a word that is already a token skips the merges."""

    name: str  # tokenizer.ggml.pre
    regexes: tuple[str, ...]
    ignore_merges: bool = False


PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("gpt-2", (GPT2_REGEX,)),  # also GPT-NeoX / OLMo
    PreTokenizer("starcoder", (r"\p{N}", GPT2_REGEX)),
    PreTokenizer("qwen2", (QWEN2_REGEX,)),
    PreTokenizer("llama-bpe", (LLAMA3_REGEX,), ignore_merges=True),
    PreTokenizer("smaug-bpe", (LLAMA3_REGEX,)),
    PreTokenizer("deepseek-v3", DEEPSEEK3_REGEXES),
    PreTokenizer("gpt-4o", (GPT4O_REGEX,)),
)

SPACE = "\u2581"  # SentencePiece's visible space
SPM, GEMMA4 = "llama", "gemma4"  # llama.cpp's tokenizer models for SentencePiece-style BPE (Architecture.spm_tokenizer)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL_TOKEN_KEYS: dict[str, Callable[[gguf.GGUFWriter, int], None]] = {  # tokenizer_config name -> writer
    "bos": gguf.GGUFWriter.add_bos_token_id,
    "eos": gguf.GGUFWriter.add_eos_token_id,
    "unk": gguf.GGUFWriter.add_unk_token_id,
    "pad": gguf.GGUFWriter.add_pad_token_id,
}


def write_tokenizer(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Add the ``tokenizer.ggml.*`` keys for ``model_dir``'s tokenizer, padded to ``vocab_size`` tokens."""
    tokenizer_keys(model_dir, vocab_size).write(w)


@dataclass(frozen=True)
class TokenizerKeys:
    """A tokenizer as llama.cpp's ``tokenizer.ggml.*`` keys, read once and written into any number of headers."""

    byte_level: bool
    spm_model: str  # SentencePiece-style: SPM (scores) or GEMMA4 (merges)
    pre: str
    tokens: list[str]
    types: list[TokenType]
    merges: list[str]  # byte-level BPE: "a b" pairs
    scores: list[float]  # SentencePiece-style: a score per token
    space_prefix: bool
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2" if self.byte_level else self.spm_model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.byte_level or self.spm_model == GEMMA4:
            w.add_token_merges(self.merges)
        else:
            w.add_token_scores(self.scores)
            w.add_add_space_prefix(self.space_prefix)
        for name, token_id in self.special_ids.items():
            _SPECIAL_TOKEN_KEYS[name](w, token_id)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def tokenizer_keys(model_dir: Path, vocab_size: int, spm_model: str = SPM) -> TokenizerKeys:
    """``model_dir``'s tokenizer read and checked, padded to ``vocab_size`` tokens (everything that can fail fails
    here, before a header is written); a SentencePiece-style one written as llama.cpp's ``spm_model``."""
    path, tok = _read_tokenizer(model_dir)
    cfg = _read_json(model_dir / "tokenizer_config.json")
    model = tok["model"]
    byte_level = any(s.get("type") == "ByteLevel" for s in _steps(tok.get("pre_tokenizer"), "pretokenizers"))
    # everything that can fail is checked before the first key is written
    pre = detect_pre_tokenizer(path, tok) if byte_level else GEMMA4 if spm_model == GEMMA4 else "default"
    space_prefix = not byte_level and _spm_space_prefix(path, tok)
    if space_prefix and spm_model == GEMMA4:
        raise GgufmoeError(f"{path}: the tokenizer prepends '{SPACE}' to the text, which llama.cpp's {GEMMA4} "
                           "tokenizer does not")
    tokens, types = _tokens(path, tok, vocab_size, spm=not byte_level)
    merges = _merges(path, model)
    special_ids = _special_token_ids(model_dir, tok, cfg, {t: i for i, t in enumerate(tokens)})
    add_bos, add_eos = _template_adds(tok.get("post_processor"))
    template = model_dir / "chat_template.jinja"
    ranked = byte_level or spm_model == GEMMA4  # merges written; else SPM scores made from them
    return TokenizerKeys(byte_level, spm_model, pre, tokens, types, [f"{a} {b}" for a, b in merges] if ranked else [],
                         [] if ranked else _spm_scores(tokens, merges), space_prefix, special_ids,
                         bool(cfg.get("add_bos_token", add_bos)), bool(cfg.get("add_eos_token", add_eos)),
                         template.read_text(encoding="utf-8") if template.is_file() else cfg.get("chat_template"))


def token_texts(model_dir: Path, vocab_size: int) -> list[str]:
    """The token texts by id :func:`write_tokenizer` writes (``tokenizer.ggml.tokens``)."""
    path, tok = _read_tokenizer(model_dir)
    return _tokens(path, tok, vocab_size, spm=False)[0]  # ``spm`` decides token types only


def _read_tokenizer(model_dir: Path) -> tuple[Path, Json]:
    """``model_dir``'s tokenizer.json and its contents, a BPE tokenizer."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GgufmoeError(f"{model_dir}: no tokenizer.json (only Hugging Face fast tokenizers are supported)")
    tok = _read_json(path)
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        found = model.get("type") if isinstance(model, dict) else model
        raise GgufmoeError(f"{path}: tokenizer model {found!r} is not supported (only BPE)")
    return path, tok


def detect_pre_tokenizer(path: Path, tok: Json) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level BPE tokenizer, from its ``pre_tokenizer``."""
    regexes: list[str] = []
    for step in _steps(tok.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise GgufmoeError(f"{path}: pre-tokenizer Split with behavior {step.get('behavior')!r}, "
                                   f"invert={step.get('invert')} is not one llama.cpp implements")
            pattern = step.get("pattern", {})
            regexes.append(pattern["Regex"] if "Regex" in pattern else re.escape(pattern.get("String", "")))
        elif kind == "Digits":
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise GgufmoeError(f"{path}: ByteLevel pre-tokenizer with add_prefix_space=true "
                                   "is not one llama.cpp implements")
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
        else:
            raise GgufmoeError(f"{path}: pre-tokenizer step {kind!r} is not one llama.cpp implements")
    # JSON may hold CR/LF/TAB as raw characters or as regex escapes: compare the escaped form
    signature = tuple(r.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t") for r in regexes)
    ignore_merges = bool(tok["model"].get("ignore_merges", False))
    for pre in PRE_TOKENIZERS:
        if pre.regexes == signature and pre.ignore_merges == ignore_merges:
            return pre.name
    splits = " then ".join(f"/{r}/" for r in signature) or "nothing"
    raise GgufmoeError(f"{path}: pre-tokenizer splitting on {splits} (ignore_merges={ignore_merges}) "
                       "is not one llama.cpp implements")


def _read_json(path: Path) -> Json:
    """``path`` parsed as a JSON object; ``{}`` when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GgufmoeError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise GgufmoeError(f"{path}: expected a JSON object")
    return data


def _steps(obj: Json | None, key: str) -> list[Json]:
    """A normalizer / pre-tokenizer as a flat list of steps (``Sequence`` unrolled)."""
    if not obj:
        return []
    if obj.get("type") == "Sequence":
        return [s for sub in obj.get(key, []) for s in _steps(sub, key)]
    return [obj]


def _tokens(path: Path, tok: Json, vocab_size: int, spm: bool) -> tuple[list[str], list[TokenType]]:
    """Token texts and types by id, padded to ``vocab_size`` with UNUSED ``[PADi]`` tokens."""
    model = tok["model"]
    by_id: dict[int, tuple[str, TokenType]] = {}
    for text, i in model.get("vocab", {}).items():
        if spm and _BYTE_TOKEN.fullmatch(text):
            kind = TokenType.BYTE
        elif spm and text == model.get("unk_token"):
            kind = TokenType.UNKNOWN
        else:
            kind = TokenType.NORMAL
        by_id[i] = (text, kind)
    for added in tok.get("added_tokens", []):
        i = added["id"]
        if i in by_id and by_id[i][1] == TokenType.UNKNOWN:
            continue  # the unk token stays UNKNOWN even when listed as special
        by_id[i] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)

    too_big = sorted(i for i in by_id if i >= vocab_size)
    if too_big:
        raise GgufmoeError(f"{path}: token {by_id[too_big[0]][0]!r} has id {too_big[0]}, "
                           f"beyond the model's vocab_size {vocab_size}")
    entries = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    tokens = [t for t, _ in entries]
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise GgufmoeError(f"{path}: token {dup!r} appears under two ids")
    return tokens, [k for _, k in entries]


def _merges(path: Path, model: Json) -> list[tuple[str, str]]:
    """BPE merges in rank order; tokenizer.json stores them as ``"a b"`` or ``["a", "b"]``."""
    pairs: list[tuple[str, str]] = []
    for m in model.get("merges", []):
        pair = m.split(" ", 1) if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise GgufmoeError(f"{path}: merge {m!r} cannot be written as 'a b'")
        pairs.append((pair[0], pair[1]))
    return pairs


def _spm_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """Score ``-r`` for the token made by merge rank ``r`` (first rank wins); ``-len(merges)`` otherwise."""
    scores = {}
    for rank, (a, b) in enumerate(merges):
        scores.setdefault(a + b, -float(rank))
    return [scores.get(t, -float(len(merges))) for t in tokens]


def _spm_space_prefix(path: Path, tok: Json) -> bool:
    """Check the tokenizer writes spaces as ``▁``; return whether it prepends one to the text."""
    replaces = prepends = False
    for step in _steps(tok.get("normalizer"), "normalizers"):
        if step.get("type") == "Replace" and step.get("pattern", {}).get("String") == " " \
                and step.get("content") == SPACE:
            replaces = True
        elif step.get("type") == "Prepend" and step.get("prepend") == SPACE:
            prepends = True
        else:
            raise GgufmoeError(f"{path}: normalizer {step.get('type')!r} is not supported for SentencePiece-style BPE")
    for step in _steps(tok.get("pre_tokenizer"), "pretokenizers"):
        if replaces and step.get("type") == "Split" and step.get("pattern") == {"String": " "}:
            continue  # a split at spaces the normalizer has already replaced (Gemma's): nothing to split
        if step.get("type") != "Metaspace" or step.get("replacement", SPACE) != SPACE:
            raise GgufmoeError(f"{path}: BPE tokenizer with pre-tokenizer {step.get('type')!r} is neither "
                               "byte-level nor SentencePiece-style")
        replaces = True
        if "prepend_scheme" in step:  # tokenizers >= 0.14; older files say add_prefix_space
            prepends = prepends or step["prepend_scheme"] != "never"
        else:
            prepends = prepends or bool(step.get("add_prefix_space", True))
    if not replaces:
        raise GgufmoeError(f"{path}: BPE tokenizer is neither byte-level (ByteLevel pre-tokenizer) "
                           "nor SentencePiece-style (spaces replaced by '\u2581')")
    return prepends


def _special_token_ids(model_dir: Path, tok: Json, cfg: Json, token_ids: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json's tokens, else the model's unk token / config.json's ids."""
    model_cfg = _read_json(model_dir / "config.json")
    ids = {}
    for name in _SPECIAL_TOKEN_KEYS:
        text = cfg.get(f"{name}_token") or (tok["model"].get("unk_token") if name == "unk" else None)
        if isinstance(text, dict):
            text = text.get("content")
        if text:
            if text not in token_ids:
                raise GgufmoeError(f"{model_dir}: {name}_token {text!r} is not in the vocabulary")
            ids[name] = token_ids[text]
        elif isinstance(model_cfg.get(f"{name}_token_id"), int):
            ids[name] = model_cfg[f"{name}_token_id"]
    return ids


def _template_adds(post: Json | None) -> tuple[bool, bool]:
    """Whether the post-processor's single-sequence template starts / ends with a special token."""
    for step in _steps(post, "processors"):
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            single = step["single"]
            return "SpecialToken" in single[0], "SpecialToken" in single[-1]
    return False, False

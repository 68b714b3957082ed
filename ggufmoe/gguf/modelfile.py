"""Ollama Modelfile for a GGUF: ``FROM``, a ``TEMPLATE`` translated from the chat template, stop
tokens and ``num_ctx``; and a checker of the Modelfile format.

Everything is read from the GGUF's own metadata (gguf-py's ``GGUFReader``), so any GGUF works,
not only ours. Ollama templates are Go templates, not Jinja: the chat template is not translated
statement by statement but recognised by family from its special tokens (ChatML, Llama-3 headers,
Mistral ``[INST]``, DeepSeek-V3), and the family's Go template is written. An unrecognised
template gets no ``TEMPLATE`` (Ollama then derives one from the GGUF's ``tokenizer.chat_template``
when it knows it, else sends the prompt verbatim), said so in a comment line.

The templates use Ollama's ``.Messages`` form; system messages come from ``.System`` or from the
messages themselves, never both. The BOS token is not in them: llama.cpp adds it according to
``tokenizer.ggml.add_bos_token``, as for any prompt. Tool calls and thinking switches are not
translated.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ggufmoe.errors import GgufmoeError
from ggufmoe.outputs import check_outputs, write_output
from ggufmoe.source.gguf_file import ShardName, read_gguf

DEFAULT_MAX_CTX = 8192  # num_ctx when none is given: the model's context, at most this


CHATML_TEMPLATE = """\
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

LLAMA3_TEMPLATE = """\
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

# Mistral/Mixtral: the system prompt goes into the last user turn; "{close}" is " [/INST]" (v0.1,
# Mixtral-8x7B) or "[/INST]" (later versions, whose assistant turns start with a space).
MISTRAL_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}{close}
{{- else if eq .Role "assistant" }}{answer}{{ .Content }}</s>
{{- end }}
{{- end }}"""

DEEPSEEK3_TEMPLATE = """\
{{- if .System }}{{ .System }}{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>
{{- end }}
{{- end }}<｜Assistant｜>{think}"""


@dataclass(frozen=True)
class ChatFamily:
    """A chat-template family: the text that identifies it in a Jinja template and its stop tokens."""

    name: str
    marker: str
    stops: tuple[str, ...]  # end-of-turn (and start-of-turn) tokens, used when in the vocabulary


FAMILIES: tuple[ChatFamily, ...] = (  # first match wins
    ChatFamily("deepseek3", "<｜Assistant｜>", ("<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")),
    ChatFamily("llama3", "<|start_header_id|>", ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                                                 "<|start_header_id|>")),
    ChatFamily("chatml", "<|im_start|>", ("<|im_end|>", "<|im_start|>", "<|endoftext|>")),
    ChatFamily("mistral", "[INST]", ("</s>", "[INST]", "[/INST]")),
)


@dataclass
class Modelfile:
    """The parts of an Ollama Modelfile."""

    from_path: str  # as written after FROM: relative to the Modelfile (``./x.gguf``) or absolute
    template: str | None = None  # Go template; None: no TEMPLATE instruction
    stops: list[str] = field(default_factory=list)
    num_ctx: int | None = None
    comments: list[str] = field(default_factory=list)  # one line each, without the "# "


@dataclass(frozen=True)
class Instruction:
    """One instruction of a parsed Modelfile; ``value`` unquoted."""

    command: str  # lower case: from, parameter, template, system, adapter, license, message
    value: str
    key: str = ""  # the parameter name (PARAMETER) or the role (MESSAGE)
    line: int = 0


def chat_family(chat_template: str) -> ChatFamily | None:
    """The family of a Jinja chat template, recognised by its special tokens; None if unknown."""
    return next((f for f in FAMILIES if f.marker in chat_template), None)


def go_template(family: ChatFamily, chat_template: str) -> str:
    """The Ollama (Go) template for ``family``, with the variant details read from the Jinja text."""
    if family.name == "chatml":
        return CHATML_TEMPLATE
    if family.name == "llama3":
        return LLAMA3_TEMPLATE
    if family.name == "mistral":
        spaced = " [/INST]" in chat_template
        return MISTRAL_TEMPLATE.replace("{close}", " [/INST]" if spaced else "[/INST]") \
                               .replace("{answer}", "" if spaced else " ")
    # DeepSeek-R1 opens the answer with <think>
    think = "<think>\n" if "<｜Assistant｜><think>" in chat_template else ""
    return DEEPSEEK3_TEMPLATE.replace("{think}", think)


def resolve_gguf(path: str | Path) -> tuple[Path, int]:
    """The file holding a GGUF's metadata and its shard count: ``path`` itself, or the first shard
    of a split GGUF (``path`` may name any shard, or the unsplit name the shards were made from)."""
    path = Path(path)
    shard = ShardName.parse(path.name)
    if shard:
        first = path.with_name(shard.name(1))
        if not first.is_file():
            raise GgufmoeError(f"{first}: no such file (first shard of {path.name})")
        return first, shard.count
    if path.is_file():
        return path, 1
    shards = sorted(path.parent.glob(f"{glob.escape(path.stem)}-00001-of-*.gguf"))
    if path.suffix == ".gguf" and len(shards) == 1:
        return shards[0], ShardName.parse(shards[0].name).count
    raise GgufmoeError(f"{path}: no such file")


def modelfile_path(gguf_path: str | Path) -> Path:
    """Where a GGUF's Modelfile goes by default: ``<stem>.Modelfile`` beside it (shard suffix dropped)."""
    path = Path(gguf_path)
    shard = ShardName.parse(path.name)
    return path.with_name(f"{shard.base if shard else path.stem}.Modelfile")


def build_modelfile(gguf_path: str | Path, modelfile: str | Path, ctx: int | None = None) -> Modelfile:
    """The Modelfile for ``gguf_path`` to be written at ``modelfile``; ``num_ctx`` is ``ctx`` when
    given, else the model's context length, at most :data:`DEFAULT_MAX_CTX`."""
    first, n_shards = resolve_gguf(gguf_path)
    meta = _read_metadata(first)
    m = Modelfile(from_path=_relative(first, Path(modelfile).parent))
    if n_shards > 1:
        m.comments.append(f"FROM names the first of {n_shards} shards; an Ollama without split-GGUF "
                          "support needs them merged (llama-gguf-split --merge)")

    chat_template = meta.get("tokenizer.chat_template")
    family = chat_family(chat_template) if isinstance(chat_template, str) else None
    if family:
        m.template = go_template(family, chat_template)
    elif chat_template:
        m.comments.append("chat template not recognised (not ChatML, Llama-3, [INST] or DeepSeek-V3): "
                          "no TEMPLATE; Ollama derives one from the GGUF's tokenizer.chat_template if it knows it")
    else:
        m.comments.append("the GGUF has no chat template: no TEMPLATE (Ollama sends prompts verbatim)")
    m.stops = _stop_tokens(meta, family)

    arch = meta.get("general.architecture")
    context_length = meta.get(f"{arch}.context_length")
    if ctx is not None:
        m.num_ctx = int(ctx)
    elif isinstance(context_length, int) and context_length > 0:
        m.num_ctx = min(context_length, DEFAULT_MAX_CTX)
    else:
        m.comments.append(f"no {arch}.context_length in the GGUF: num_ctx left to Ollama")
    return m


def render_modelfile(m: Modelfile) -> str:
    """The text of a Modelfile: FROM first, then comments, TEMPLATE and PARAMETERs."""
    lines = [f"FROM {m.from_path}"]
    lines += [f"# {c}" for c in m.comments]
    if m.template is not None:
        if '"""' in m.template:
            raise GgufmoeError('a Modelfile TEMPLATE cannot contain """')
        lines.append(f'TEMPLATE """{m.template}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in m.stops]
    if m.num_ctx is not None:
        lines.append(f"PARAMETER num_ctx {m.num_ctx}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, out: str | Path | None = None, ctx: int | None = None) -> Path:
    """Write the Modelfile of ``gguf_path`` to ``out`` (default :func:`modelfile_path`; a directory
    gets ``<stem>.Modelfile`` inside it); returns the path written."""
    default = modelfile_path(resolve_gguf(gguf_path)[0])
    out = default if out is None else Path(out) / default.name if Path(out).is_dir() else Path(out)
    check_outputs([out], [gguf_path])
    text = render_modelfile(build_modelfile(gguf_path, out, ctx))
    parse_modelfile(text)  # never write a file Ollama would refuse
    return write_output(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- the Modelfile format ------------------------------------------------------------------------

COMMANDS = ("from", "parameter", "template", "system", "adapter", "license", "message")
MESSAGE_ROLES = ("system", "user", "assistant")
#: Ollama's parameters (``api.Options`` and its runner options, deprecated ones included) and value types.
PARAMETERS: dict[str, str] = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
                     "num_gpu", "main_gpu", "num_thread", "mirostat"), "int"),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "mirostat_tau", "mirostat_eta"), "float"),
    **dict.fromkeys(("numa", "use_mmap", "use_mlock", "low_vram", "f16_kv", "logits_all", "vocab_only",
                     "penalize_newline"), "bool"),
    "stop": "string",
}
_VALUE_RE = {  # what Go's strconv.ParseInt / ParseFloat / ParseBool accept (decimal forms)
    "int": re.compile(r"[+-]?[0-9]+"),
    "float": re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?i:inf|infinity|nan)"),
    "bool": re.compile(r"1|t|T|TRUE|true|True|0|f|F|FALSE|false|False"),
    "string": re.compile(r".+", re.S),
}


def parse_modelfile(text: str) -> list[Instruction]:
    """Parse and check a Modelfile as Ollama reads it: ``#`` comment lines, ``INSTRUCTION value``
    with the value to the end of the line, or quoted in ``"..."`` / ``\"\"\"...\"\"\"`` over several
    lines; the first instruction FROM; known instructions, MESSAGE roles, PARAMETER names and value
    types. Raises :class:`GgufmoeError` naming the line."""
    lines = re.split(r"\r\n|\r|\n", text)
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        start, line = i + 1, lines[i].lstrip(" \t")
        i += 1
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z]+)(?:[ \t]+(.*))?$", line)
        if not m or m[1].lower() not in COMMANDS:
            word = re.match(r"\S*", line)[0]
            raise GgufmoeError(f"line {start}: unknown instruction {word!r} "
                               f"(one of {', '.join(c.upper() for c in COMMANDS)})")
        command, rest, key = m[1].lower(), m[2] or "", ""
        if command in ("parameter", "message"):
            km = re.match(r"([A-Za-z0-9_]+)[ \t]+(.*)$", rest)
            if not km:
                what = "a name" if command == "parameter" else "a role"
                raise GgufmoeError(f"line {start}: {command.upper()} needs {what} and a value")
            key, rest = km[1], km[2]
        value = _unquote(rest.strip())
        while value is None:  # a quoted value goes on until a line ends its closing quotes
            if i == len(lines):
                raise GgufmoeError(f"line {start}: unbalanced quotes in the {command.upper()} value")
            rest += "\n" + lines[i]
            i += 1
            value = _unquote(rest.strip())
        if not value:
            raise GgufmoeError(f"line {start}: {command.upper()} has no value")
        out.append(Instruction(command, value, key, start))
        _check(out[-1])
    if not out:
        raise GgufmoeError("no FROM line")
    if out[0].command != "from":
        raise GgufmoeError(f"line {out[0].line}: the first instruction must be FROM, not {out[0].command.upper()}")
    return out


def _check(ins: Instruction) -> None:
    if ins.command == "message" and ins.key not in MESSAGE_ROLES:
        raise GgufmoeError(f"line {ins.line}: MESSAGE role {ins.key!r} is not one of {', '.join(MESSAGE_ROLES)}")
    if ins.command == "parameter":
        kind = PARAMETERS.get(ins.key)
        if kind is None:
            raise GgufmoeError(f"line {ins.line}: unknown parameter {ins.key!r}")
        if not _VALUE_RE[kind].fullmatch(ins.value):
            raise GgufmoeError(f"line {ins.line}: parameter {ins.key} needs {'an' if kind == 'int' else 'a'} "
                               f"{kind} value, got {ins.value!r}")


def _unquote(s: str) -> str | None:
    """A value without its quotes; None while the quotes are not closed (Ollama's rule)."""
    if s.startswith('"""'):
        return s[3:-3] if len(s) >= 6 and s.endswith('"""') else None
    if s.startswith('"'):
        return s[1:-1] if len(s) >= 2 and s.endswith('"') else None
    return s


def _quote(s: str) -> str:
    return f'"""{s}"""' if '"' in s else f'"{s}"'


def _relative(target: Path, base: Path) -> str:
    """``target`` as written after FROM: relative to ``base`` (``./`` for a file beside it)."""
    try:
        rel = os.path.relpath(target.resolve(), base.resolve())
    except ValueError:  # another drive
        return str(target.resolve())
    rel = rel.replace(os.sep, "/")
    return rel if rel.startswith("../") else f"./{rel}"


def _read_metadata(path: Path) -> dict:
    """The GGUF's scalar and string keys, and ``tokenizer.ggml.tokens``."""
    reader = read_gguf(path)
    keys = ("general.architecture", "tokenizer.chat_template", gguf.Keys.Tokenizer.EOS_ID,
            gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.LIST)
    meta = {k: reader.fields[k].contents() for k in keys if k in reader.fields}
    arch = meta.get("general.architecture")
    key = f"{arch}.context_length"
    if key in reader.fields:
        meta[key] = reader.fields[key].contents()
    return meta


def _stop_tokens(meta: dict, family: ChatFamily | None) -> list[str]:
    """EOS (and EOT) first, then the family's turn tokens that are in the vocabulary."""
    tokens = meta.get(gguf.Keys.Tokenizer.LIST) or []
    stops = [tokens[i] for i in (meta.get(gguf.Keys.Tokenizer.EOS_ID), meta.get(gguf.Keys.Tokenizer.EOT_ID))
             if isinstance(i, int) and 0 <= i < len(tokens)]
    if family:
        vocab = set(tokens)
        stops += [t for t in family.stops if t in vocab]
    return list(dict.fromkeys(s for s in stops if s and "\n" not in s))

"""A Hugging Face model card (``README.md``) for a set of GGUF files, written with ``huggingface_hub``.

The metadata names the model the files were made from (``base_model``, ``base_model_relation:
quantized``), its license and the tags ``gguf``, ``moe`` and, when a file has fewer experts than its
source, ``pruned``. The body has one row per file — size, bits per weight, experts kept, top-k, KL
divergence (mean, p99, p99.9), top-1, same-top-p, perplexity and llama.cpp's memory at a context —
then the calibration text, the commands that made the files and the Pareto plot when there is one.
What a file is comes from its GGUF header; how good it is from ``eval --json`` results or a sweep's
rows (``–`` where none is given).

``base_model`` is the source's Hugging Face repository (``general.source.repo_url`` / ``.url``, as
llama.cpp's converter writes it), else ``general.name``, else ggufmoe's ``ggufmoe.source``. The
``general.base_model.*`` keys are not used: they name the source's own parent, not the source.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
from huggingface_hub import ModelCard, ModelCardData

from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError
from ggufmoe.outputs import check_outputs, write_output
from ggufmoe.plan.budget import DEFAULT_CTX
from ggufmoe.plan.kv_types import DEFAULT_KV_TYPE, KvType
from ggufmoe.plan.memory import gguf_runtime_memory
from ggufmoe.prune.apply import KEY_EXPERT_COUNT_SOURCE, KEY_SOURCE
from ggufmoe.source.gguf_file import gguf_files
from ggufmoe.source.gguf_in import GGUFSource
from ggufmoe.stats.imatrix import KV_CHUNKS, KV_DATASET
from ggufmoe.units import format_size

QUALITY = ("kld_mean", "kld_p99", "kld_p999", "top1", "same_top_p", "ppl")
HF_URL = "https://huggingface.co/"
DASH = "–"


@dataclass
class FileFacts:
    """What a GGUF's header says about it."""

    path: Path  # the file, or the first shard
    file_bytes: int  # all shards
    params_source: int  # parameters of the source model: the pruned experts counted back
    n_expert: int
    n_expert_source: int
    top_k: int
    memory: int  # file + llama.cpp runtime memory at the card's context
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # the keys a card reads

    @property
    def bpw(self) -> float:
        """Bits per weight of the source model (pruned experts count as removed weights)."""
        return 8 * self.file_bytes / self.params_source

    @property
    def pruned(self) -> bool:
        return self.n_expert < self.n_expert_source


CARD_KEYS = (gguf.Keys.General.NAME, gguf.Keys.General.LICENSE, gguf.Keys.General.SOURCE_REPO_URL,
             gguf.Keys.General.SOURCE_URL, KEY_SOURCE, KV_DATASET, KV_CHUNKS)


def file_facts(path: Path, ctx: int, kv_type: KvType = DEFAULT_KV_TYPE) -> FileFacts:
    """Size, source parameters, expert counts and runtime memory of the GGUF at ``path``."""
    files = gguf_files(path)  # a missing file or one without the GGUF magic: one line
    src = GGUFSource(files[0])
    arch = architecture_for(src)
    n_source = int(src.value(KEY_EXPERT_COUNT_SOURCE, arch.n_expert))
    params = sum(s.n_elements // s.n_parts * n_source if s.is_expert else s.n_elements for s in arch.tensors())
    return FileFacts(path=files[0], file_bytes=sum(f.stat().st_size for f in files), params_source=params,
                     n_expert=arch.n_expert, n_expert_source=n_source, top_k=arch.top_k,
                     memory=gguf_runtime_memory(arch, files, ctx, kv_type).total,
                     meta={k: src.value(k) for k in CARD_KEYS if src.value(k) is not None})


@dataclass
class CardInputs:
    """What the card says beyond the files' headers and their quality rows."""

    ctx: int = DEFAULT_CTX  # context the memory column is computed at
    kv_type: KvType = DEFAULT_KV_TYPE
    base_model: str | None = None  # default: from the files' keys
    license: str | None = None  # default: general.license of the files
    title: str | None = None
    evaluation: list[str] = field(default_factory=list)  # how the quality columns were measured
    calib_text: Path | None = None  # the calibration text, for its name and size
    commands: list[str] = field(default_factory=list)  # steps every file shares (calibrate, base conversion)
    plot: str | None = None  # link to the Pareto plot, relative to the card


def base_model_of(facts: list[FileFacts]) -> str:
    """The source model's name from the files' keys (module docstring); an error when none has one."""
    for key in (gguf.Keys.General.SOURCE_REPO_URL, gguf.Keys.General.SOURCE_URL):
        for f in facts:
            url = str(f.meta.get(key, ""))
            if url.startswith(HF_URL):
                return url.removeprefix(HF_URL).strip("/")
    for key in (gguf.Keys.General.NAME, KEY_SOURCE):
        for f in facts:
            if f.meta.get(key):
                return str(f.meta[key])
    raise GgufmoeError("the files do not name the model they were made from; give --base-model")


def build_card(facts: list[FileFacts], quality: dict[str, dict], inputs: CardInputs) -> ModelCard:
    """The card for ``facts`` (in that order); ``quality``: file name -> an ``eval --json`` result or a
    sweep row (its ``commands`` too)."""
    if not facts:
        raise GgufmoeError("no GGUF files given")
    base = inputs.base_model or base_model_of(facts)
    licenses = {str(f.meta[gguf.Keys.General.LICENSE]) for f in facts if gguf.Keys.General.LICENSE in f.meta}
    tags = ["gguf", "moe"] + (["pruned"] if any(f.pruned for f in facts) else [])
    data = ModelCardData(base_model=base, base_model_relation="quantized", tags=tags,
                         license=inputs.license or (licenses.pop() if len(licenses) == 1 else None))
    body = [f"# {inputs.title or base.split('/')[-1] + ' GGUF'}", "",
            f"Mixture-of-Experts GGUF files of {f'[{base}]({HF_URL}{base})' if '/' in base else f'`{base}`'} "
            "for llama.cpp, made with ggufmoe"
            f"{' (experts pruned, then quantized)' if 'pruned' in tags else ' (quantized)'}.", "",
            *_table(facts, quality, inputs), ""]
    if inputs.evaluation:
        body += [*inputs.evaluation, ""]
    calibration = _calibration(facts, inputs.calib_text)
    if calibration:
        body += ["## Calibration", "", calibration, ""]
    commands = inputs.commands + [c for f in facts for c in quality.get(f.path.name, {}).get("commands", [])]
    if commands:
        body += ["## How the files were made", "", "```sh", *commands, "```", ""]
    if inputs.plot:
        body += ["## Size against quality", "", f"![file size against KL divergence]({inputs.plot})", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _table(facts: list[FileFacts], quality: dict[str, dict], inputs: CardInputs) -> list[str]:
    lines = ["| file | size | bits/weight | experts | top-k | KLD | KLD p99 | KLD p99.9 | top-1 | same top-p | PPL | "
             f"memory at ctx {inputs.ctx} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in facts:
        q = quality.get(f.path.name, {})
        cells = [_num(q.get("kld_mean"), "{:.4f}"), _num(q.get("kld_p99"), "{:.3f}"), _num(q.get("kld_p999"), "{:.3f}"),
                 _num(q.get("top1"), "{:.1%}"), _num(q.get("same_top_p"), "{:.1%}"), _num(q.get("ppl"), "{:.3f}")]
        lines.append(f"| {f.path.name} | {format_size(f.file_bytes)} | {f.bpw:.2f} | "
                     f"{f.n_expert}/{f.n_expert_source} | {f.top_k} | {' | '.join(cells)} | {format_size(f.memory)} |")
    return lines


QUALITY_COLUMNS = ("kld_mean", "kld_p99", "kld_p999", "top1", "same_top_p", "ppl")


def _num(value: float | None, fmt: str) -> str:
    return DASH if value is None else fmt.format(value)


def _calibration(facts: list[FileFacts], text: Path | None) -> str:
    """The calibration text's name and size: the file when given, else the ``quantize.imatrix.*`` keys."""
    seen = {(str(f.meta.get(KV_DATASET, "")), f.meta.get(KV_CHUNKS)) for f in facts if KV_DATASET in f.meta}
    chunks = {c for _, c in seen if c}
    counted = f", {chunks.pop()} chunks" if len(chunks) == 1 else ""
    if text is not None:
        return f"Importance matrix and expert statistics from `{text.name}` ({text.stat().st_size:,} bytes{counted})."
    if not seen:
        return ""
    named = (f"`{d}`" + (f" ({c} chunks)" if c else "") for d, c in sorted(seen, key=str))
    return "Importance matrix from " + ", ".join(named) + "."


def write_card(card: ModelCard, out: Path) -> Path:
    """Save ``card`` at ``out`` atomically (a temporary file beside it, then renamed)."""
    return write_output(Path(out), card.save)


def load_quality(eval_json: list[Path], results: Path | None) -> dict[str, dict]:
    """File name -> quality row: the rows of a sweep's ``results.json`` and ``eval --json`` outputs (later win)."""
    out: dict[str, dict] = {}
    if results is not None:
        rows = _read_json(results, "a sweep's results.json")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "file" in r for r in rows):
            raise GgufmoeError(f"{results}: not a sweep's results.json")
        out.update({r["file"]: _numbers(r, results) for r in rows})
    for path in eval_json:
        rows = _read_json(path, "the output of `ggufmoe eval --json`")
        for row in rows if isinstance(rows, list) else [rows]:
            if not isinstance(row, dict) or "path" not in row or "kld_mean" not in row:
                raise GgufmoeError(f"{path}: not the output of `ggufmoe eval --json`")
            out[Path(str(row["path"])).name] = _numbers(row, path)
    return out


def _numbers(row: dict, path: Path) -> dict:
    """``row`` when every quality column it has is a number (or null), else one clear error."""
    for key in QUALITY_COLUMNS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise GgufmoeError(f"{path}: {key} of {row.get('file') or row.get('path')} is {value!r}, not a number")
    if not isinstance(row.get("commands", []), list):
        raise GgufmoeError(f"{path}: commands of {row.get('file') or row.get('path')} is not a list")
    return row


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError:
        raise GgufmoeError(f"{path}: not JSON (expected {what})") from None


def card(files: list[Path], out: Path, inputs: CardInputs, eval_json: list[Path] = (),
         results: Path | None = None) -> Path:
    """``ggufmoe card``: read every file and quality source first, then write the card at ``out``."""
    check_outputs([out], [*files, *eval_json, results])
    facts = [file_facts(p, inputs.ctx, inputs.kv_type) for p in files]
    quality = load_quality(list(eval_json), results)
    plot = Path(results).parent / "pareto.png" if results is not None else None
    inputs = replace(inputs, evaluation=inputs.evaluation or _evaluation(quality.values()),
                     plot=inputs.plot or (os.path.relpath(plot, Path(out).parent) if plot and plot.is_file() else None))
    return write_card(build_card(facts, quality, inputs), out)


def _evaluation(rows) -> list[str]:
    """One line per distinct ``eval --json`` setting: base, tokens, chunk size, p."""
    seen = sorted({(Path(r["base"]).name, r.get("tokens"), r.get("ctx"), r.get("top_p")) for r in rows if "base" in r},
                  key=str)
    return [f"Quality against `{b}` over {t} tokens in chunks of {c}; same top-p: the share of tokens whose "
            f"top-{p} set (the fewest most probable tokens reaching probability {p}) is the base's."
            for b, t, c, p in seen]

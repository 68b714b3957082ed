"""One streaming pass from a model (Hugging Face checkpoint or GGUF) to a GGUF file: read, quantize, write.

A tensor whose type stays what the source stores (a GGUF source) is copied byte for byte, expert
slices included: no dequantization, no requantization loss.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .arch import Architecture, TensorSpec, architecture_for
from .arch.base import RowLoader
from .errors import GgufmoeError, Interrupted
from .gguf_out import GGUFOutput
from .imatrix import Imatrix, QuantizeKeys, load_imatrix, quantize_keys, write_quantize_keys
from .prune import PrunePlan, PruneRequest, apply_plan, make_plan, write_provenance
from .quant import FLOAT_TYPES, Quantizer, one_torch_thread, requires_imatrix, row_bytes
from .read_ahead import read_ahead
from .source.config import check_shapes, open_source
from .stats import load_stats
from .tensor_types import DEFAULT_TYPE, FILE_TYPE, TypeRules
from .validate import gguf_files


CHUNK_BYTES = 64 << 20  # float32 bytes of one row chunk of a big tensor (token_embd, output, dense FFN)
CHUNK_ALIGN = 256  # rows per chunk are a multiple of this: whole 128-row FP8 scale blocks


@dataclass
class ConvertOptions:
    out: Path
    types: TypeRules
    imatrix: Path | None = None
    threads: int | None = None
    split_max_size: int = 0
    progress: bool = True
    stats: Path | None = None
    prune: PruneRequest | None = None
    prune_plan: PrunePlan | None = None  # decided already (a budget plan); overrides ``prune``
    resume: bool = False  # continue an interrupted conversion to ``out`` (same plan and inputs)


@dataclass
class TensorPlan:
    spec: TensorSpec
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        ne0 = self.spec.shape[-1]
        return row_bytes(self.qtype, ne0) * (self.spec.n_elements // ne0)

    @property
    def copies(self) -> bool:
        """Whether the source's bytes are written as they are (the type stays)."""
        return self.spec.raw is not None and self.spec.source_type == self.qtype


def plan_tensors(specs: list[TensorSpec], types: TypeRules, imatrix: Imatrix | None) -> list[TensorPlan]:
    """A type for every tensor; fails before anything is written if an imatrix is needed but missing,
    or has an entry that does not fit its tensor."""
    plans = [TensorPlan(spec, types.type_for(spec)) for spec in specs]
    for p in plans:
        if p.copies:
            continue
        rows = importance(p.spec, 0, imatrix)
        if rows is None and requires_imatrix(p.qtype):
            what = "no --imatrix given" if imatrix is None else "the imatrix has no entry for it"
            raise GgufmoeError(f"{p.spec.name}: type {p.qtype.name} needs an importance matrix, but {what}")
    return plans


def importance(spec: TensorSpec, part: int, imatrix: Imatrix | None) -> np.ndarray | None:
    """Importance rows of part ``part``: (1, ne0) — one row for all of it — or, for a 3-D tensor without
    experts whose entry has one row per slice (llama.cpp's per-head rows of MLA's ``attn_k_b``/``attn_v_b``),
    (ne2, ne0); None without an entry."""
    if imatrix is None:
        return None
    if spec.is_expert:
        row = imatrix.row(spec.name, spec.source_expert(part))
        rows = None if row is None else row[None]
    else:
        rows = imatrix.slice_rows(spec.name, spec.shape[0] if len(spec.shape) == 3 else 1)
    if rows is not None and rows.shape[1] != spec.shape[-1]:
        raise GgufmoeError(f"imatrix entry {spec.name} has rows of {rows.shape[1]} values, "
                           f"the tensor's rows have {spec.shape[-1]}")
    return rows


def write_general_metadata(w: gguf.GGUFWriter, src, arch: Architecture, types: TypeRules) -> None:
    """Name, file type (the default type's mix; the source's own when its types are kept) and quant version."""
    w.add_name(src.name)
    file_type = types.file_type
    if file_type is None:  # tensors keep the source's types: the file keeps its mix
        file_type = arch.source_file_type if arch.source_file_type is not None else FILE_TYPE[DEFAULT_TYPE]
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass
class Piece:
    """One part of a tensor as read from the source, in write order: the stored bytes to copy, or
    float32 rows to quantize with their importance rows (one row, or one per outermost slice)."""

    plan: TensorPlan
    data: np.ndarray
    importance: np.ndarray | None = None


def read_pieces(plans: list[TensorPlan], imatrix: Imatrix | None) -> Iterator[Piece]:
    """Every tensor's data, one part (expert slice, or row chunk of a big tensor) at a time."""
    for p in plans:
        for i in range(p.spec.n_parts):
            if p.copies:
                yield Piece(p, p.spec.raw(i))
                continue
            rows = importance(p.spec, i, imatrix)
            for r0, data in part_chunks(p.spec, i):
                yield Piece(p, data.numpy(), rows if rows is None or len(rows) == 1 else rows[r0:])


def encode(piece: Piece, q: Quantizer) -> np.ndarray:
    """The bytes written for ``piece``. Quantized rows are contiguous in GGUF, so parts are written in order."""
    p, rows = piece.plan, piece.importance
    if p.copies:
        return piece.data
    if rows is not None and len(rows) > 1:
        return np.concatenate([q.quantize(s, p.qtype, r) for s, r in zip(piece.data, rows)])
    return q.quantize(piece.data, p.qtype, None if rows is None else rows[0])


def encoded(pieces: Iterable[Piece], q: Quantizer, bar: tqdm) -> Iterator[np.ndarray]:
    for piece in pieces:
        data = encode(piece, q)
        bar.update(data.nbytes)
        yield data


def part_chunks(spec: TensorSpec, i: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Part ``i`` as float32, with the index of its first row: whole, or in row chunks when the tensor
    is big and its loader reads rows (see :func:`chunk_rows`)."""
    step = chunk_rows(spec)
    if step is None:
        yield 0, checked_shape(spec, spec.load(i), spec.shape[1:] if spec.is_expert else spec.shape)
        return
    n = spec.shape[0]
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        yield r0, checked_shape(spec, spec.load.rows(r0, r1), (r1 - r0, *spec.shape[1:]))


def chunk_rows(spec: TensorSpec) -> int | None:
    """Rows per chunk for a tensor over ``CHUNK_BYTES`` in float32 whose loader reads rows, else None.
    Chunks are whole multiples of ``CHUNK_ALIGN`` rows (whole FP8 scale blocks) unless the tensor ends."""
    if not isinstance(spec.load, RowLoader) or 4 * spec.n_elements <= CHUNK_BYTES:
        return None
    row_bytes = 4 * spec.n_elements // spec.shape[0]
    return max(CHUNK_ALIGN, CHUNK_BYTES // row_bytes // CHUNK_ALIGN * CHUNK_ALIGN)


def checked_shape(spec: TensorSpec, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(data.shape) != tuple(shape):
        raise GgufmoeError(f"{spec.name}: source has shape {tuple(data.shape)}, expected {tuple(shape)}")
    return data


def imatrix_keys(plans: list[TensorPlan], imatrix: Imatrix | None, path: str | Path | None) -> QuantizeKeys:
    """llama-quantize's ``quantize.imatrix.*`` keys (file name, not path) when ``imatrix`` shapes a quantized tensor."""
    if imatrix is None or path is None or all(p.copies or p.qtype in FLOAT_TYPES for p in plans):
        return []
    return quantize_keys(imatrix, Path(path).name)


def prepare_output(src, arch: Architecture, plans: list[TensorPlan], prune: PrunePlan, types: TypeRules,
                   out: Path, split_max_size: int = 0, imatrix: Imatrix | None = None,
                   imatrix_path: str | Path | None = None) -> GGUFOutput:
    """Everything the file will hold but the tensor data: metadata and tensor infos (nothing written yet).
    ``imatrix``, read from ``imatrix_path``: the importance matrix used, if any (recorded as llama-quantize does)."""
    output = GGUFOutput(out, arch.gguf_arch, split_max_size)
    write_general_metadata(output.writer, src, arch, types)
    arch.write_metadata(output.writer)
    write_provenance(output.writer, src.name, prune)
    write_quantize_keys(output.writer, imatrix_keys(plans, imatrix, imatrix_path))
    arch.write_tokenizer(output.writer)
    for p in plans:
        output.add_tensor_info(p.spec.name, p.spec.shape, p.qtype, p.nbytes)
    return output


def convert(src_dir: str | Path, opts: ConvertOptions) -> list[Path]:
    """Convert ``src_dir`` (a Hugging Face directory or a GGUF) to ``opts.out``; returns the written file(s)."""
    refuse_overwriting_inputs(input_files(src_dir, opts), [opts.out], opts.split_max_size > 0)
    src = open_source(src_dir, config_ok=False)
    arch = architecture_for(src)
    check_shapes(src)
    stats = load_stats(opts.stats, top_k=arch.top_k) if opts.stats else None
    imatrix = load_imatrix(opts.imatrix) if opts.imatrix else stats.imatrix if stats else None
    prune = opts.prune_plan or make_plan(arch, stats, opts.prune or PruneRequest())
    if prune.n_expert != arch.n_expert:
        raise GgufmoeError(f"the plan is for a model with {prune.n_expert} experts per layer, "
                           f"{src.path} has {arch.n_expert}")
    plans = plan_tensors(apply_plan(arch, prune), opts.types, imatrix)
    out = prepare_output(src, arch, plans, prune, opts.types, opts.out, opts.split_max_size, imatrix,
                         opts.imatrix or opts.stats)
    try:
        with out:
            done = out.begin(opts.resume, inputs_identity(src_dir, opts))
            if done:
                tqdm.write(f"resuming: {done} of {len(plans)} tensors are written already", file=sys.stderr)
            with (Quantizer(opts.threads) as q, one_torch_thread(),
                  read_ahead(read_pieces(plans[done:], imatrix)) as pieces,
                  tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc="convert",
                       disable=not opts.progress) as bar):
                bar.update(sum(p.nbytes for p in plans[:done]))
                for name, group in itertools.groupby(pieces, key=lambda piece: piece.plan.spec.name):
                    out.write_tensor(name, encoded(group, q, bar))
            return out.finish()
    except KeyboardInterrupt:
        if not out.kept:
            raise
        raise Interrupted(f"{out.tensors_done} of {len(plans)} tensors are kept in {out.state_dir}: "
                          f"run the same command with --resume to continue") from None
    except OSError as e:
        kept = f"; {out.tensors_done} tensors are kept in {out.state_dir} for --resume" if out.kept else ""
        raise GgufmoeError(f"{opts.out}: write failed ({e.strerror or e}){kept}") from None


def input_files(src_dir: str | Path, opts: ConvertOptions) -> list[Path]:
    """Every input file that decides the output's data: the source's files, the imatrix and the statistics."""
    src = Path(src_dir)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file())
    else:  # a GGUF and its shards; a missing source is left for open_source to report
        files = gguf_files(src) if src.is_file() else []
    return files + [p for p in (opts.imatrix, opts.stats) if p is not None and p.exists()]


def inputs_identity(src_dir: str | Path, opts: ConvertOptions) -> str:
    """Path, size and modification time of every input file that decides the output's data, as one string."""
    return "\n".join(f"{p.resolve()} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in input_files(src_dir, opts))


def refuse_overwriting_inputs(inputs: list[Path], outputs: list[Path], split: bool = False) -> None:
    """Fail, before anything is read, when an output would replace an input: the same file (same inode,
    through symlinks and hard links too) or, for a split output, one of its shard names."""
    for out in outputs:
        shard = re.compile(re.escape(out.stem) + r"-\d{5}-of-\d{5}\.gguf")
        for f in inputs:
            same = out.exists() and os.path.samefile(out, f)
            if not same and split and out.parent.is_dir() and shard.fullmatch(f.name):
                same = os.path.samefile(out.parent, f.parent)
            if same:
                raise GgufmoeError(f"{out}: the output would overwrite the input {f}; choose another output path")

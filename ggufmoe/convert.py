"""One streaming pass from a model (Hugging Face checkpoint or GGUF) to a GGUF file: read, quantize, write.

A tensor whose type stays what the source stores (a GGUF source) is copied byte for byte, expert
slices included: no dequantization, no requantization loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from tqdm import tqdm

from .arch import Architecture, TensorSpec, architecture_for
from .errors import GgufmoeError
from .gguf_out import GGUFOutput
from .imatrix import Imatrix, load_imatrix
from .prune import PrunePlan, PruneRequest, apply_plan, make_plan, write_provenance
from .quant import Quantizer, requires_imatrix, row_bytes
from .source.config import open_source
from .stats import load_stats
from .tensor_types import DEFAULT_TYPE, FILE_TYPE, TypeRules


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
    """A type for every tensor; fails before anything is written if an imatrix is needed but missing."""
    plans = [TensorPlan(spec, types.type_for(spec)) for spec in specs]
    for p in plans:
        first = p.spec.source_expert(0) if p.spec.is_expert else None
        if requires_imatrix(p.qtype) and not p.copies and (imatrix is None or imatrix.row(p.spec.name, first) is None):
            what = "no --imatrix given" if imatrix is None else "the imatrix has no entry for it"
            raise GgufmoeError(f"{p.spec.name}: type {p.qtype.name} needs an importance matrix, but {what}")
    return plans


def write_general_metadata(w: gguf.GGUFWriter, src, arch: Architecture, types: TypeRules) -> None:
    """Name, file type (the default type's mix; the source's own when its types are kept) and quant version."""
    w.add_name(src.name)
    file_type = types.file_type
    if file_type is None:  # tensors keep the source's types: the file keeps its mix
        file_type = arch.source_file_type if arch.source_file_type is not None else FILE_TYPE[DEFAULT_TYPE]
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_parts(p: TensorPlan, q: Quantizer, imatrix: Imatrix | None, bar: tqdm) -> Iterator[np.ndarray]:
    """The bytes of one tensor, one part (expert slice) at a time: copied from the source or quantized."""
    for i in range(p.spec.n_parts):
        out = p.spec.raw(i) if p.copies else quantized_part(p, i, q, imatrix)
        bar.update(out.nbytes)
        yield out


def quantized_part(p: TensorPlan, i: int, q: Quantizer, imatrix: Imatrix | None) -> np.ndarray:
    spec = p.spec
    part_shape = spec.shape[1:] if spec.is_expert else spec.shape
    data = spec.load(i)
    if tuple(data.shape) != tuple(part_shape):
        raise GgufmoeError(f"{spec.name}: source has shape {tuple(data.shape)}, expected {tuple(part_shape)}")
    row = imatrix.row(spec.name, spec.source_expert(i) if spec.is_expert else None) if imatrix else None
    return q.quantize(data.numpy(), p.qtype, row)


def prepare_output(src, arch: Architecture, plans: list[TensorPlan], prune: PrunePlan, types: TypeRules,
                   out: Path, split_max_size: int = 0) -> GGUFOutput:
    """Everything the file will hold but the tensor data: metadata and tensor infos (nothing written yet)."""
    output = GGUFOutput(out, arch.gguf_arch, split_max_size)
    write_general_metadata(output.writer, src, arch, types)
    arch.write_metadata(output.writer)
    write_provenance(output.writer, src.name, prune)
    arch.write_tokenizer(output.writer)
    for p in plans:
        output.add_tensor_info(p.spec.name, p.spec.shape, p.qtype, p.nbytes)
    return output


def convert(src_dir: str | Path, opts: ConvertOptions) -> list[Path]:
    """Convert ``src_dir`` (a Hugging Face directory or a GGUF) to ``opts.out``; returns the written file(s)."""
    src = open_source(src_dir, config_ok=False)
    arch = architecture_for(src)
    stats = load_stats(opts.stats, top_k=arch.top_k) if opts.stats else None
    imatrix = load_imatrix(opts.imatrix) if opts.imatrix else stats.imatrix if stats else None
    prune = opts.prune_plan or make_plan(arch, stats, opts.prune or PruneRequest())
    if prune.n_expert != arch.n_expert:
        raise GgufmoeError(f"the plan is for a model with {prune.n_expert} experts per layer, "
                           f"{src.path} has {arch.n_expert}")
    plans = plan_tensors(apply_plan(arch, prune), opts.types, imatrix)
    out = prepare_output(src, arch, plans, prune, opts.types, opts.out, opts.split_max_size)
    try:
        with out:
            out.begin()
            total = sum(p.nbytes for p in plans)
            with Quantizer(opts.threads) as q, tqdm(total=total, unit="B", unit_scale=True, desc="convert",
                                                    disable=not opts.progress) as bar:
                for p in plans:
                    out.write_tensor(p.spec.name, tensor_parts(p, q, imatrix, bar))
            return out.finish()
    except OSError as e:
        raise GgufmoeError(f"{opts.out}: write failed ({e.strerror or e})") from None

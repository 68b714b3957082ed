"""One streaming pass from a Hugging Face checkpoint to a GGUF file: read, quantize, write."""

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
from .source.hf import HFSource
from .stats import load_stats
from .tensor_types import TypeRules
from .tokenizer import write_tokenizer


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


def plan_tensors(specs: list[TensorSpec], types: TypeRules, imatrix: Imatrix | None) -> list[TensorPlan]:
    """A type for every tensor; fails before anything is written if an imatrix is needed but missing."""
    plans = [TensorPlan(spec, types.type_for(spec)) for spec in specs]
    for p in plans:
        first = p.spec.source_expert(0) if p.spec.is_expert else None
        if requires_imatrix(p.qtype) and (imatrix is None or imatrix.row(p.spec.name, first) is None):
            what = "no --imatrix given" if imatrix is None else "the imatrix has no entry for it"
            raise GgufmoeError(f"{p.spec.name}: type {p.qtype.name} needs an importance matrix, but {what}")
    return plans


def write_general_metadata(w: gguf.GGUFWriter, src: HFSource, types: TypeRules) -> None:
    w.add_name(src.name)
    w.add_file_type(int(types.file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_parts(p: TensorPlan, q: Quantizer, imatrix: Imatrix | None, bar: tqdm) -> Iterator[np.ndarray]:
    """The quantized bytes of one tensor, one part (expert slice) at a time."""
    spec = p.spec
    part_shape = spec.shape[1:] if spec.is_expert else spec.shape
    for i in range(spec.n_parts):
        data = spec.load(i)
        if tuple(data.shape) != tuple(part_shape):
            raise GgufmoeError(f"{spec.name}: source has shape {tuple(data.shape)}, expected {tuple(part_shape)}")
        row = imatrix.row(spec.name, spec.source_expert(i) if spec.is_expert else None) if imatrix else None
        out = q.quantize(data.numpy(), p.qtype, row)
        bar.update(out.nbytes)
        yield out


def prepare_output(src: HFSource, arch: Architecture, plans: list[TensorPlan], prune: PrunePlan, types: TypeRules,
                   out: Path, split_max_size: int = 0) -> GGUFOutput:
    """Everything the file will hold but the tensor data: metadata and tensor infos (nothing written yet)."""
    output = GGUFOutput(out, arch.gguf_arch, split_max_size)
    write_general_metadata(output.writer, src, types)
    arch.write_metadata(output.writer)
    write_provenance(output.writer, src.name, prune)
    if (src.path / "tokenizer.json").is_file() or getattr(src, "has_weights", True):
        write_tokenizer(output.writer, src.path, int(arch.cfg.vocab_size))
    for p in plans:
        output.add_tensor_info(p.spec.name, p.spec.shape, p.qtype, p.nbytes)
    return output


def convert(src_dir: str | Path, opts: ConvertOptions) -> list[Path]:
    """Convert ``src_dir`` to ``opts.out``; returns the written file(s)."""
    src = HFSource(src_dir)
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

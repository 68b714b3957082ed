"""One streaming pass from a model (Hugging Face checkpoint or GGUF) to a GGUF file: read, quantize, write.

A tensor whose type stays what the source stores (a GGUF source) is copied byte for byte, expert
slices included: no dequantization, no requantization loss.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ggufmoe.arch.base import Architecture
from ggufmoe.errors import GgufmoeError, Interrupted, Resumable
from ggufmoe.model.finite import NonFinite
from ggufmoe.stats.imatrix import Imatrix, load_imatrix
from ggufmoe.gguf.writer import CONVERSION
from ggufmoe.outputs import check_outputs
from ggufmoe.prune.criteria import Pruning, PruneRequest, choose_experts
from ggufmoe.prune.redirect import with_table_orders
from ggufmoe.prune.apply import prune_model
from ggufmoe.plan.per_layer import spread_experts
from ggufmoe.prune.merge import merge_experts
from ggufmoe.pipeline.pieces import Conversion, LocalEncoder
from ggufmoe.source.config import check_shapes
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.quant.rules import TypedTensor, TypeRules
from ggufmoe.plan.budget import Plan
from ggufmoe.plan.layout import assign_types, prepare_output
from ggufmoe.source.fingerprint import file_identity, model_files

if TYPE_CHECKING:
    from ggufmoe.pipeline.distributed import Cluster
    from ggufmoe.pipeline.rounding import RoundingOptions


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
    pruning: Pruning | None = None  # decided already (a budget plan); overrides ``prune``
    resume: bool = False  # continue an interrupted conversion to ``out`` (same plan and inputs)
    zero_nonfinite: bool = False  # replace NaN/Inf in the weights with 0 instead of refusing them
    rounding: RoundingOptions | None = None  # output-aware rounding from these inputs (else llama.cpp's)
    cluster: Cluster | None = None  # where the pieces are quantized and a calibration runs (None: here)
    plan: Plan | None = None  # the budget plan these options carry out (priced with the rounding it gets)
    device: str = "cpu"  # where the model runs over the calibration text (a budget's calibration, the rounding pass)


def convert(source: str | Path | OpenedModel, opts: ConvertOptions) -> list[Path]:
    """Convert ``source`` (a Hugging Face directory or a GGUF, or one opened already) to ``opts.out``; returns the
    written file(s)."""
    src_dir = source.path if isinstance(source, OpenedModel) else source
    check_outputs([opts.out], [src_dir, opts.imatrix, opts.stats], kind=CONVERSION, split=opts.split_max_size > 0,
                  gguf=True)
    model = OpenedModel.open(source, opts.stats, config_ok=False)
    for caveat in model.arch.caveats():
        print(f"note: {caveat}", file=sys.stderr)
    arch, prune, typed, imatrix = prepare(model, opts)
    out = prepare_output(model.source, arch, typed, prune, opts.types, opts.out, opts.split_max_size, imatrix,
                         opts.imatrix or opts.stats)
    rounded = None
    if opts.rounding is not None:
        rounded = _rounding().round_ahead(model, typed, imatrix, opts.rounding, opts.out, opts.resume, opts.progress,
                                          opts.plan, opts.device, opts.threads)
    conv = Conversion(model.path, opts, typed, imatrix, rounded, NonFinite(opts.zero_nonfinite))
    try:
        with out:
            done = out.begin(opts.resume, file_identity(input_files(src_dir, opts)))
            if done:
                tqdm.write(f"resuming: {done} of {len(typed)} tensors are written already", file=sys.stderr)
            encoder = opts.cluster.encoder() if opts.cluster else LocalEncoder(opts.threads)
            with tqdm(total=sum(p.nbytes for p in typed), unit="B", unit_scale=True, desc="convert",
                      disable=not opts.progress) as bar:
                bar.update(sum(p.nbytes for p in typed[:done]))
                for name, parts in encoder.tensors(conv, done, bar):
                    out.write_tensor(name, parts)
            paths = out.finish()
            if rounded is not None:
                shutil.rmtree(rounded.path.parent, ignore_errors=True)  # the rounding folder, done with
            if (replaced := conv.nonfinite.summary()) is not None:
                tqdm.write(f"note: {replaced}", file=sys.stderr)
            return paths
    except KeyboardInterrupt:
        if not out.kept:
            raise
        raise Interrupted(f"{out.tensors_done} of {len(typed)} tensors are kept in {out.state_dir}: "
                          f"run the same command with --resume to continue") from None
    except Resumable as e:
        kept = f": {out.tensors_done} tensors are kept in {out.state_dir} for --resume" if out.kept else ""
        raise GgufmoeError(f"{e}{kept}") from None
    except OSError as e:
        kept = f"; {out.tensors_done} tensors are kept in {out.state_dir} for --resume" if out.kept else ""
        raise GgufmoeError(f"{opts.out}: write failed ({e.strerror or e}){kept}") from None


def prepare(model: OpenedModel, opts: ConvertOptions) -> tuple[Architecture, Pruning, list[TypedTensor], Imatrix | None]:
    """What ``opts`` converts ``model`` to: the (pruned) architecture, the pruning, every tensor at its type in write
    order and the importance matrix. The same in every process given the same inputs."""
    src, arch = model.source, model.arch
    check_shapes(src)
    stats = model.stats if opts.stats else None
    imatrix = load_imatrix(opts.imatrix) if opts.imatrix else stats.imatrix if stats else None
    prune = opts.pruning or choose_experts(arch, stats, opts.prune or PruneRequest())
    if opts.prune is not None and not opts.pruning:  # the request's refinements of the chosen experts
        if opts.prune.per_layer:
            prune = spread_experts(arch, stats, prune)
        if opts.prune.merge:
            prune = merge_experts(arch, stats, prune)
    if prune.n_expert != arch.n_expert:
        raise GgufmoeError(f"the plan is for a model with {prune.n_expert} experts per layer, "
                           f"{src.path} has {arch.n_expert}")
    prune = with_table_orders(list(arch.tensors()), stats, prune)
    arch, specs = prune_model(arch, prune)
    return arch, prune, assign_types(specs, opts.types, imatrix), imatrix


def input_files(src_dir: str | Path, opts: ConvertOptions) -> list[Path]:
    """Every input file that decides the output's data: the source's files, the imatrix and the statistics
    (a missing source is left for ``open_source`` to report)."""
    return model_files(src_dir) + [p for p in (opts.imatrix, opts.stats) if p is not None and p.exists()]


def check_rounding_text(model: OpenedModel, opts: ConvertOptions) -> None:
    """With ``--rounding aware``, refuse a calibration text too short for it before any pass over the model."""
    if opts.rounding is not None:
        _rounding().check_text(model, opts.rounding)


def _rounding():
    from ggufmoe.pipeline import rounding  # torch and transformers: only when the model runs

    return rounding

"""What the output file holds but tensor data: metadata and tensor infos, and their exact bytes.

``convert`` prepares its output with :func:`prepare_output` before writing any tensor; the planner
prepares the same output for the types it considers (:func:`planned_output`, nothing written) so
that planned bytes are the file's bytes.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T

from ggufmoe.arch import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.gguf.header import file_bytes
from ggufmoe.gguf.writer import GGUFOutput
from ggufmoe.model.qtypes import FILE_TYPE, FLOAT_TYPES
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.prune.apply import write_provenance
from ggufmoe.prune.criteria import Pruning
from ggufmoe.quant.ggml import requires_imatrix
from ggufmoe.quant.rules import DEFAULT_TYPE, TypedTensor, TypeRules
from ggufmoe.stats.file import Stats
from ggufmoe.stats.imatrix import Imatrix, QuantizeKeys, importance, quantize_keys, write_quantize_keys

ALIGN = 32  # GGUF data alignment: every tensor's data starts on a multiple of this

# Without weights (a configuration alone) the tokenizer is unknown: metadata bytes per vocabulary
# entry assumed for it (token text, type, merge). Stated in the plan as an estimate.
TOKENIZER_BYTES_PER_TOKEN = 32


def padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def assign_types(specs: list[TensorSpec], types: TypeRules, imatrix: Imatrix | None) -> list[TypedTensor]:
    """A type for every tensor; fails before anything is written if an imatrix is needed but missing,
    or has an entry that does not fit its tensor."""
    typed = [TypedTensor(spec, types.type_for(spec)) for spec in specs]
    for p in typed:
        if p.copies:
            continue
        rows = importance(p.spec, 0, imatrix)
        if rows is None and requires_imatrix(p.qtype):
            what = "no --imatrix given" if imatrix is None else "the imatrix has no entry for it"
            raise GgufmoeError(f"{p.spec.name}: type {p.qtype.name} needs an importance matrix, but {what}")
    return typed


def write_general_metadata(w: gguf.GGUFWriter, src, arch: Architecture, types: TypeRules) -> None:
    """Name, file type (the default type's mix; the source's own when its types are kept) and quant version."""
    w.add_name(src.name)
    file_type = types.file_type
    if file_type is None:  # tensors keep the source's types: the file keeps its mix
        file_type = arch.source_file_type if arch.source_file_type is not None else FILE_TYPE[DEFAULT_TYPE]
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def imatrix_keys(typed: list[TypedTensor], imatrix: Imatrix | None, path: str | Path | None) -> QuantizeKeys:
    """llama-quantize's ``quantize.imatrix.*`` keys (file name, not path) when ``imatrix`` shapes a quantized tensor."""
    if imatrix is None or path is None or all(p.copies or p.qtype in FLOAT_TYPES for p in typed):
        return []
    return quantize_keys(imatrix, Path(path).name)


def prepare_output(src, arch: Architecture, typed: list[TypedTensor], prune: Pruning, types: TypeRules,
                   out: Path, split_max_size: int = 0, imatrix: Imatrix | None = None,
                   imatrix_path: str | Path | None = None) -> GGUFOutput:
    """Everything the file will hold but the tensor data: metadata and tensor infos (nothing written yet).
    ``imatrix``, read from ``imatrix_path``: the importance matrix used, if any (recorded as llama-quantize does)."""
    output = GGUFOutput(out, arch.gguf_arch, split_max_size)
    write_general_metadata(output.writer, src, arch, types)
    arch.write_metadata(output.writer)
    write_provenance(output.writer, src.name, prune)
    write_quantize_keys(output.writer, imatrix_keys(typed, imatrix, imatrix_path))
    arch.write_tokenizer(output.writer)
    for p in typed:
        output.add_tensor_info(p.spec.name, p.spec.shape, p.qtype, p.nbytes)
    return output


def planned_output(src, arch: Architecture, specs: list[TensorSpec], types: dict[str, T], pruning: Pruning,
                   stats: Stats | None, stats_path: str | None) -> GGUFOutput:
    """The output convert will prepare for these types (nothing written): its header gives exact bytes."""
    typed = [TypedTensor(s, types[s.name]) for s in specs]
    return prepare_output(src, arch, typed, pruning, TypeRules(T.Q8_0), Path("plan.gguf"),
                          imatrix=stats.imatrix if stats else None, imatrix_path=stats_path)


def overhead_bytes(src, arch: Architecture, specs: list[TensorSpec], types: dict[str, T], pruning: Pruning,
                   stats: Stats | None, stats_path: str | None) -> int:
    """Bytes of the file that are not (padded) tensor data: header, metadata, tensor infos."""
    out = planned_output(src, arch, specs, types, pruning, stats, stats_path)
    return file_bytes(out.writer) - sum(padded(ti.nbytes) for t in out.writer.tensors for ti in t.values())

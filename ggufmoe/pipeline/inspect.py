"""What a model holds: architecture, layers, experts, parameters, size at a few types and the memory
llama.cpp needs to run it at a context; for a GGUF also the types it stores (the per-tensor type mix)
and its bytes by tensor class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.arch import architecture_for
from ggufmoe.plan.budget import DEFAULT_CTX
from ggufmoe.plan.kv_types import DEFAULT_KV_TYPE, KvType
from ggufmoe.plan.memory import RuntimeMemory, gguf_runtime_memory, is_repacked, runtime_memory
from ggufmoe.plan.target import HOST, Target
from ggufmoe.source import open_source
from ggufmoe.source.gguf_file import gguf_files
from ggufmoe.quant.rules import TypedTensor, TypeRules
from ggufmoe.units import format_size

SIZE_TYPES = ("F16", "Q8_0", "Q6_K", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S")


@dataclass
class Stored:
    """Tensors and bytes of one stored type, or of one tensor class (then ``types``: type -> tensors)."""

    tensors: int = 0
    nbytes: int = 0
    params: int = 0
    types: dict[str, int] = field(default_factory=dict)

    def add(self, spec: TensorSpec) -> None:
        self.tensors += 1
        self.nbytes += TypedTensor(spec, spec.source_type).nbytes
        self.params += spec.n_elements
        self.types[spec.source_type.name] = self.types.get(spec.source_type.name, 0) + 1


@dataclass(frozen=True)
class RunAt:
    """Where the memory of a model is counted: llama.cpp's context, KV cache type and the machine."""

    ctx: int = DEFAULT_CTX
    kv_type: KvType = DEFAULT_KV_TYPE
    target: Target = HOST

    def __str__(self) -> str:
        return f"ctx {self.ctx}, KV {self.kv_type}" + (f", target {self.target}" if self.target != HOST else "")


@dataclass
class Summary:
    source: str
    hf_architecture: str
    gguf_arch: str
    layers: int
    moe_layers: int
    experts: int
    experts_used: int
    params_total: int
    params_expert: int
    size_at: dict[str, int]
    by_type: dict[str, Stored] = field(default_factory=dict)  # a GGUF's stored types
    by_class: dict[str, Stored] = field(default_factory=dict)  # a GGUF's bytes per tensor class
    run: RunAt | None = None  # the context the memory is for
    memory: RuntimeMemory | None = None  # a GGUF's, on run.target
    memory_at: dict[str, int] = field(default_factory=dict)  # a checkpoint's whole process at each size_at type

    @property
    def params_active(self) -> int:
        per_expert = self.params_expert / max(self.experts, 1)
        return int(self.params_total - self.params_expert + per_expert * self.experts_used)


def summarize(path: str | Path, run: RunAt = RunAt()) -> Summary:
    src = open_source(path, config_ok=False)
    arch = architecture_for(src)
    specs = list(arch.tensors())
    experts = {s.n_parts for s in specs if s.is_expert}
    moe_layers = {s.layer for s in specs if s.is_expert}
    size_at = {t: sum(TypedTensor(s, TypeRules.parse(t).type_for(s)).nbytes for s in specs) for t in SIZE_TYPES}
    by_type: dict[str, Stored] = {}
    by_class: dict[str, Stored] = {}
    for s in specs:
        if s.source_type is not None:
            by_type.setdefault(s.source_type.name, Stored()).add(s)
            by_class.setdefault(s.kind, Stored()).add(s)
    if by_type:
        memory, memory_at = gguf_runtime_memory(arch, gguf_files(src.path), run.ctx, run.kv_type, run.target), {}
    else:  # a file of those types: its tensor data mapped, and the copies the target repacks
        memory, memory_at = None, {t: _memory_at(arch, specs, TypeRules.parse(t), run) for t in SIZE_TYPES}
    return Summary(
        source=str(src.path), hf_architecture=src.architecture, gguf_arch=arch.gguf_arch,
        layers=arch.n_layer, moe_layers=len(moe_layers), experts=max(experts, default=0),
        experts_used=arch.top_k,
        params_total=sum(s.n_elements for s in specs), params_expert=sum(s.n_elements for s in specs if s.is_expert),
        size_at=size_at, by_type=by_type, by_class=by_class, run=run, memory=memory, memory_at=memory_at)


def _memory_at(arch, specs: list[TensorSpec], rules: TypeRules, run: RunAt) -> int:
    """The whole process's memory with a file of ``rules``' types (no GPU offload counted)."""
    repack = run.target.repack_types()
    typed = [TypedTensor(s, rules.type_for(s)) for s in specs]
    mapped = sum(t.nbytes for t in typed)
    repacked = sum(t.nbytes for t in typed if is_repacked(t.spec.name, t.spec.shape, t.qtype, repack))
    return runtime_memory(arch, mapped, run.ctx, run.kv_type, repacked_bytes=repacked).total


def file_memory(path: Path, run: RunAt) -> RuntimeMemory:
    """The memory llama.cpp needs to run the written GGUF at ``path`` (a file or its first shard)."""
    files = gguf_files(path)
    return gguf_runtime_memory(architecture_for(open_source(files[0])), files, run.ctx, run.kv_type, run.target)


def written_memory_line(path: Path, run: RunAt) -> str:
    """:func:`memory_line` of a file just written; a file this model of llama.cpp's memory cannot read (a per-layer
    expert count) says so instead of failing the command that wrote it."""
    try:
        return memory_line(file_memory(path, run), run)
    except GgufmoeError as e:
        return f"memory to run: not counted ({e})"


def memory_line(m: RuntimeMemory, run: RunAt) -> str:
    """One line: the whole process's memory and its parts."""
    gpu = f"; GPU {format_size(m.gpu_total)}" if m.gpu_total else ""
    return (f"memory to run {format_size(m.total)} at {run}: weights {format_size(m.weights)} + KV cache "
            f"{format_size(m.kv_cache)} + compute {format_size(m.compute)} + process {format_size(m.reserve)}{gpu}")


def format_summary(s: Summary) -> str:
    lines = [
        f"source        {s.source}",
        f"architecture  {s.hf_architecture} -> llama.cpp {s.gguf_arch}",
        f"layers        {s.layers} ({s.moe_layers} MoE)",
        f"experts       {s.experts} routed, {s.experts_used} used per token",
        f"parameters    {s.params_total / 1e6:,.1f} M total, {s.params_expert / 1e6:,.1f} M in routed experts, "
        f"{s.params_active / 1e6:,.1f} M active per token",
    ]
    if s.by_type:
        stored = sum(t.nbytes for t in s.by_type.values())
        lines.append(f"stored types  {format_size(stored)} of tensor data, "
                     f"{8 * stored / s.params_total:.2f} bits/weight:")
        for name, t in sorted(s.by_type.items(), key=lambda kv: -kv[1].nbytes):
            lines.append(f"  {name:<8} {t.tensors:>5} tensors {format_size(t.nbytes):>12}  "
                         f"{8 * t.nbytes / t.params:5.2f} bits/weight")
        lines.append("bytes by tensor class (as stored):")
        for kind, c in sorted(s.by_class.items(), key=lambda kv: -kv[1].nbytes):
            mix = ", ".join(f"{t} x{n}" for t, n in sorted(c.types.items()))
            lines.append(f"  {kind:<20} {format_size(c.nbytes):>12}  {mix}")
    if s.memory is not None:
        lines.append(memory_line(s.memory, s.run))
    lines.append("size by type (weights only; norms and routers stay F32)"
                 + (f", and the memory to run it at {s.run}:" if s.memory_at else ":"))
    lines += [f"  {t:<8} {format_size(n):>12}  {8 * n / s.params_total:5.2f} bits/weight"
              + (f"  {format_size(s.memory_at[t]):>12}" if s.memory_at else "") for t, n in s.size_at.items()]
    return "\n".join(lines)


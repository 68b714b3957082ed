"""What a model holds: architecture, layers, experts, parameters, size at a few types; for a
GGUF also the types it stores (the per-tensor type mix) and its bytes by tensor class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ggufmoe.model.tensor import TensorSpec
from ggufmoe.arch import architecture_for
from ggufmoe.source import open_source
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

    @property
    def params_active(self) -> int:
        per_expert = self.params_expert / max(self.experts, 1)
        return int(self.params_total - self.params_expert + per_expert * self.experts_used)


def summarize(path: str | Path) -> Summary:
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
    return Summary(
        source=str(src.path), hf_architecture=src.architecture, gguf_arch=arch.gguf_arch,
        layers=arch.n_layer, moe_layers=len(moe_layers), experts=max(experts, default=0),
        experts_used=arch.top_k,
        params_total=sum(s.n_elements for s in specs), params_expert=sum(s.n_elements for s in specs if s.is_expert),
        size_at=size_at, by_type=by_type, by_class=by_class)


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
    lines.append("size by type (weights only; norms and routers stay F32):")
    lines += [f"  {t:<8} {format_size(n):>12}  {8 * n / s.params_total:5.2f} bits/weight" for t, n in s.size_at.items()]
    return "\n".join(lines)


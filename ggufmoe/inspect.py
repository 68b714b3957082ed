"""What a checkpoint holds: architecture, layers, experts, parameters, size at a few types."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .arch import architecture_for
from .convert import TensorPlan
from .source.hf import HFSource
from .tensor_types import TypeRules
from .units import format_size

SIZE_TYPES = ("F16", "Q8_0", "Q6_K", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S")


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

    @property
    def params_active(self) -> int:
        per_expert = self.params_expert / max(self.experts, 1)
        return int(self.params_total - self.params_expert + per_expert * self.experts_used)


def summarize(path: str | Path) -> Summary:
    src = HFSource(path)
    arch = architecture_for(src)
    specs = list(arch.tensors())
    experts = {s.n_parts for s in specs if s.is_expert}
    moe_layers = {s.layer for s in specs if s.is_expert}
    size_at = {t: sum(TensorPlan(s, TypeRules.parse(t).type_for(s)).nbytes for s in specs) for t in SIZE_TYPES}
    return Summary(
        source=str(src.path), hf_architecture=src.architecture, gguf_arch=arch.gguf_arch,
        layers=int(arch.cfg.num_hidden_layers), moe_layers=len(moe_layers), experts=max(experts, default=0),
        experts_used=arch.top_k,
        params_total=sum(s.n_elements for s in specs), params_expert=sum(s.n_elements for s in specs if s.is_expert),
        size_at=size_at)


def format_summary(s: Summary) -> str:
    lines = [
        f"source        {s.source}",
        f"architecture  {s.hf_architecture} -> llama.cpp {s.gguf_arch}",
        f"layers        {s.layers} ({s.moe_layers} MoE)",
        f"experts       {s.experts} routed, {s.experts_used} used per token",
        f"parameters    {s.params_total / 1e6:,.1f} M total, {s.params_expert / 1e6:,.1f} M in routed experts, "
        f"{s.params_active / 1e6:,.1f} M active per token",
        "size by type (weights only; norms and routers stay F32):",
    ]
    lines += [f"  {t:<8} {format_size(n):>12}  {8 * n / s.params_total:5.2f} bits/weight" for t, n in s.size_at.items()]
    return "\n".join(lines)

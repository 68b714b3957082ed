"""What a plan says to a reader: a summary of pruning, types and memory, and notes on a GGUF source's types."""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

from ggufmoe.model.names import TensorName
from ggufmoe.model.qtypes import bits_per_weight
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.plan.budget import Plan
from ggufmoe.units import format_size


def source_notes(specs: list[TensorSpec], types: dict[str, T]) -> list[str]:
    """What a GGUF source's types did to the plan: tensors kept as stored, and any planned above them."""
    stored = [s for s in specs if s.source_type is not None]
    if not stored:
        return []
    kept = sum(types[s.name] == s.source_type for s in stored)
    notes = [f"precision capped at the source's types: {kept} of {len(stored)} tensors keep theirs (copied)"]
    above: dict[tuple[str, str, str], int] = {}  # only --tensor-type pins go there
    for s in stored:
        if bits_per_weight(types[s.name]) > bits_per_weight(s.source_type):
            key = (s.kind, types[s.name].name, s.source_type.name)
            above[key] = above.get(key, 0) + 1
    notes += [f"above the source: {kind} {t} over {st} ({n} tensors, --tensor-type)" for (kind, t, st), n in above.items()]
    return notes


def format_plan(plan: Plan) -> str:
    """A readable summary: pruning, types per tensor class and layer range, memory breakdown."""
    by_class: dict[tuple[str, str], list[int]] = {}
    class_bytes: dict[tuple[str, str], int] = {}
    for name, t in plan.types.items():
        parsed = TensorName.parse(name)  # a tensor without suffix (llama.cpp's ``ssm_a``) keeps its class
        layer = -1 if parsed.layer is None else parsed.layer
        kind = parsed.base
        by_class.setdefault((kind, t), []).append(layer)
        class_bytes[kind, t] = class_bytes.get((kind, t), 0) + plan.tensor_bytes.get(name, 0)
    lines = [f"source       {plan.source} ({plan.architecture})",
             f"experts      keep {plan.keep} of {plan.n_expert} per layer ({plan.criterion}), "
             f"{plan.top_k} used per token (source: {plan.top_k_source})",
             "", f"{'tensor class':<22} {'type':<8} {'bytes':>12}  layers"]
    for (kind, t), layers in sorted(by_class.items()):
        span = "-" if layers == [-1] else _ranges(sorted(layers))
        lines.append(f"{kind:<22} {t:<8} {format_size(class_bytes[kind, t]):>12}  {span}")
    m = plan.memory
    lines += ["", f"file         {format_size(plan.file_bytes)} ({plan.file_bytes} bytes)",
              f"{'host memory' if 'gpu_total' in m else 'memory':<13}weights {format_size(m['weights'])} + KV cache "
              f"{format_size(m['kv_cache'])} (ctx {plan.ctx}, {plan.kv_type}) + compute {format_size(m['compute'])} + "
              f"process {format_size(m['reserve'])} = {format_size(m['total'])} (the whole process's peak RSS, "
              f"which validate measures)"]
    if "gpu_total" in m:
        lines.append(f"GPU memory   weights {format_size(m['gpu_weights'])} + KV cache {format_size(m['gpu_kv_cache'])} "
                     f"+ compute {format_size(m['gpu_compute'])} + reserve {format_size(m['gpu_reserve'])} = "
                     f"{format_size(m['gpu_total'])} (a model not checked against a GPU)")
    lines += [f"budget       {format_size(plan.budget)}" + (" (weights only)" if plan.weights_only else ""),
              f"target       {plan.target}",
              f"predicted    KL {plan.predicted_kld['total']:.4f} (pruning {plan.predicted_kld['prune']:.4f}, "
              f"quantization {plan.predicted_kld['quant']:.4f})"
              + (" on the probe texts together" if plan.predicted_by_text else ""),
              *(f"{'':<13}KL {kl['total']:.4f} on text like {t}" for t, kl in plan.predicted_by_text.items()),
              *([f"rounded      KL {plan.rounding['predicted_kld']['total']:.4f} with output-aware rounding "
                 f"(quantization x{plan.rounding['quant_factor']:.2f})"] if plan.rounding else []),
              f"per token    {format_size(plan.active_bytes)} of weights read"]
    if len(plan.candidates) > 1:
        lines.append("candidates   " + ", ".join(
            f"keep {c['keep']}" + (f" top-k {c['top_k']}" if c.get("top_k", plan.top_k_source) != plan.top_k_source
                                   else "") + f": KL {c['predicted_kld']:.4f}" for c in plan.candidates))
    lines += [f"note         {n}" for n in plan.notes]
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)

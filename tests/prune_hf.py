"""Apply a pruning plan to a transformers model in memory — the reference for parity tests and
for measuring what pruning costs through transformers.

transformers 5 MoE blocks share one shape: a router module (``weight`` (E, hidden), ``top_k``,
``num_experts``, DeepSeek's ``e_score_correction_bias``, which MiniMax-M2 keeps on the block) and a fused experts module
(``gate_up_proj`` / ``down_proj`` (E, ...), ``num_experts``). Gemma 4's router is apart: ``proj`` (E, hidden),
``per_expert_scale`` (E), an input ``scale`` (hidden, untouched) and its top-k in the configuration.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ggufmoe.errors import GgufmoeError
from ggufmoe.prune.criteria import Pruning
from ggufmoe.model.expert_table import redirected

EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
ROUTER_TENSORS = ("weight", "bias", "e_score_correction_bias")


def _gather(module: nn.Module, names: tuple[str, ...], kept: list[int]) -> None:
    """Keep ``kept`` along each tensor's expert axis: the first one longer than every kept index (ERNIE's
    routing bias is 1 x experts)."""
    idx = torch.tensor(kept)
    for name in names:
        t = getattr(module, name, None)
        if not isinstance(t, torch.Tensor):
            continue
        axis = next(i for i, n in enumerate(t.shape) if n > max(kept))
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(t.data.index_select(axis, idx).clone(), requires_grad=False))
        else:
            module.register_buffer(name, t.index_select(axis, idx).clone())
    module.num_experts = len(kept)


def _fold(module: nn.Module, names: tuple[str, ...], folds: list[list[tuple[int, float]]]) -> None:
    """Each kept expert becomes the weighted average of its fold's source experts (expert axis first)."""
    for name in names:
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            merged = torch.stack([sum(w * t.data[j] for j, w in fold) for fold in folds])
            setattr(module, name, nn.Parameter(merged, requires_grad=False))
    module.num_experts = len(folds)


def prune_hf_model(model: nn.Module, plan: Pruning) -> nn.Module:
    """Keep ``plan.kept[layer]`` experts in every MoE layer (averaged as ``plan.folds`` says when merging) and
    route to ``plan.top_k``; in place."""
    touched = set()
    for name, mod in model.named_modules():
        m = re.search(r"layers\.(\d+)\.", name)
        if m is None:
            continue
        il = int(m.group(1))
        kept = plan.kept.get(il)
        if hasattr(mod, "gate_up_proj") and kept is not None and plan.folds.get(il):
            _fold(mod, EXPERT_TENSORS, plan.folds[il])
        elif hasattr(mod, "gate_up_proj") and kept is not None:
            _gather(mod, EXPERT_TENSORS, kept)
        elif hasattr(mod, "top_k") and isinstance(getattr(mod, "weight", None), torch.Tensor):
            if kept is not None:
                _gather(mod, ROUTER_TENSORS, kept)
                table = getattr(mod, "tid2eid", None)  # DeepSeek-V4's hash routing: token -> experts
                if table is not None:
                    mod.tid2eid = torch.from_numpy(redirected(table.numpy(), kept, plan.orders[il]))
            mod.top_k = plan.top_k
            touched.add(il)
        elif isinstance(getattr(mod, "per_expert_scale", None), torch.Tensor):  # Gemma 4's router
            if kept is not None:
                _gather(mod, ("per_expert_scale",), kept)
                _gather(mod.proj, ("weight",), kept)
            mod.config.top_k_experts = plan.top_k
            touched.add(il)
        elif isinstance(getattr(mod, "e_score_correction_bias", None), torch.Tensor):  # a block's routing bias
            if kept is not None:
                _gather(mod, ("e_score_correction_bias",), kept)
            if hasattr(mod, "top_k"):
                mod.top_k = plan.top_k
    if not touched:
        raise GgufmoeError(f"{type(model).__name__}: no MoE router found to prune")
    return model

"""The routed experts of a fused transformers experts module, computed as transformers' kernels compute
them, recording statistics from what is computed anyway (:func:`route_experts`); the whole-model path's
experts and output forwards (:func:`experts_forward`, :func:`output_forward`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ggufmoe.stats.accumulate import Accumulator, RoutingAccumulator


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ weight if transposed else x @ weight.T
    return y if bias is None else y + bias


@dataclass
class ExpertsState:
    """What a patched experts module records into: ``m._ggufmoe``."""

    x_acc: Accumulator  # inputs of the gate/up matmuls, one row per expert
    mid_acc: Accumulator  # inputs of the down matmul
    routing: RoutingAccumulator
    # the streamed path's phase 1: receives (hidden_states, top_k_index, top_k_weights) of a forward
    sink: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass
class ExpertWeights:
    """One routed expert's matrices in the fused module's layout (``gate_up`` = cat(gate, up) on the output side)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def module_weights(m: nn.Module) -> Callable[[int], ExpertWeights]:
    """Expert ``e``'s weights as the fused module holds them (the whole-model path)."""
    has_bias = getattr(m, "has_bias", False)

    def get(e: int) -> ExpertWeights:
        return ExpertWeights(m.gate_up_proj[e], m.down_proj[e], m.gate_up_proj_bias[e] if has_bias else None,
                             m.down_proj_bias[e] if has_bias else None)

    return get


def expert_output(m: nn.Module, ew: ExpertWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the down matmul, output) of one routed expert of the fused module ``m`` for rows ``x``."""
    transposed = getattr(m, "is_transposed", False)
    mid = m._apply_gate(_expert_linear(x, ew.gate_up, ew.gate_up_bias, transposed))
    y = _expert_linear(mid, ew.down, ew.down_bias, transposed)
    if getattr(m, "has_post_expert_norm", False):
        y = m.post_expert_norm(y)
    return mid, y


def route_experts(m: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  weights: Callable[[int], ExpertWeights], out: torch.Tensor, step: int | None = None,
                  device: torch.device | None = None, on_expert: Callable | None = None) -> None:
    """Add the weighted routed-experts output of ``hidden`` (tokens, hidden) to ``out`` and record statistics.

    What transformers' experts kernels compute: routing slots sorted by expert with one sort, per
    expert one gate/up and one down matmul (``weights(e)``, asked for in ascending order of the
    experts that got tokens, each once), the module's ``_apply_gate`` and post-expert norm, the
    weighted outputs added per token. Recorded from what it computes anyway, into ``m._ggufmoe``
    (:class:`ExpertsState`): the inputs of the gate/up and down matmuls (float32 sums over at most
    ``step`` rows, folded into float64), routing slots, routing-weight mass and REAP. ``hidden`` and
    ``out`` may live on the CPU (the streamed path's stores) while the experts run on ``device``.
    Ids at or beyond the expert count (expert-parallel sentinels) contribute nothing, as in transformers.
    ``on_expert(e, weights, tokens, routing weights, gate/up input sums, down input sums)`` is called after
    each expert with its routing slots (the streamed path's local errors and output-aware rounding), once its
    output is added.
    """
    state: ExpertsState = m._ggufmoe
    x_acc, mid_acc, routing = state.x_acc, state.mid_acc, state.routing
    n_expert = x_acc.n_expert
    n_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    ids = top_k_index.reshape(-1).to(hidden.device)
    order = torch.argsort(ids, stable=True)  # routing slots grouped by expert; sentinels (ids >= n_expert) last
    counts = torch.bincount(ids.clamp(0, n_expert), minlength=n_expert + 1)[:n_expert]
    order = order[: int(counts.sum())]
    token = order // top_k
    w = top_k_weights.reshape(-1).to(hidden.device)[order]
    x2 = torch.zeros(n_expert, hidden.shape[-1], dtype=torch.float64)
    mid2 = torch.zeros(n_expert, mid_acc.ne0, dtype=torch.float64)
    reap = torch.zeros(n_expert, dtype=torch.float64)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if not c:
            continue
        ew = weights(e)
        for a in range(start, start + c, step or c):
            b = min(a + (step or c), start + c)
            tok = token[a:b]
            xe, we = hidden[tok], w[a:b]
            if device is not None:
                xe, we = xe.to(device), we.to(device)
            mid, ye = expert_output(m, ew, xe)
            out.index_add_(0, tok, (ye * we[:, None].to(ye.dtype)).to(out.device, out.dtype))
            # statistics, float32 within these rows
            xf, mf, wf = xe.float(), mid.float(), we.float()
            x2[e] += (xf * xf).sum(0).to("cpu", torch.float64)
            mid2[e] += (mf * mf).sum(0).to("cpu", torch.float64)
            reap[e] += float((wf * torch.linalg.vector_norm(ye.float(), dim=-1)).sum())
        if on_expert is not None:
            on_expert(e, ew, token[start:start + c], w[start:start + c], x2[e], mid2[e])
        start += c
    counts64 = counts.double().cpu()
    x_acc.fold(x2, counts64)  # one importance row per routing slot, as llama.cpp counts
    mid_acc.fold(mid2, counts64)
    routing.counts += counts64
    routing.weight_mass += torch.bincount(ids[order], weights=w.double(), minlength=n_expert).cpu()
    routing.reap_sum += reap
    routing.n_tokens += n_tokens


def experts_forward(m: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The fused experts module's forward, recording statistics (see :func:`route_experts`).

    Bound to the module by :meth:`Collector.hook_experts`; ``m._ggufmoe`` is its :class:`ExpertsState`.
    """
    h = hidden_states.reshape(top_k_index.shape[0], -1)
    final = torch.zeros_like(h)
    route_experts(m, h, top_k_index, top_k_weights, module_weights(m), final)
    return final.to(hidden_states.dtype)


def output_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output matmul during calibration: records its input, computes no logits."""
    m._ggufmoe.add(x)
    return x.new_empty(*x.shape[:-1], 0)

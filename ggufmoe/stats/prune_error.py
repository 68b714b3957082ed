"""Local pruning errors, measured in the streamed calibration: how much a MoE layer's routed output
changes when the layer is pruned to a candidate set of experts and its tokens are routed as the
pruned model routes them.

On a sample of the layer's tokens (every ``stride``-th token, at most ``max_tokens``), every routed
expert's output is computed while the expert is loaded anyway (phase 2 of the run); outputs wider
than ``dim`` are kept as a seeded Gaussian projection to ``dim`` values (Johnson-Lindenstrauss: the
squared norms of differences are kept in expectation). Then, for every candidate set of kept experts
(per criterion and keep count, given by the caller), the layer's own MoE block runs on the sampled
tokens with its router cut to the kept experts (:func:`pruned_router`: the rows of the router's
per-expert tensors gathered, its expert count set, as a pruned GGUF routes in llama.cpp), its
experts module capturing the new routes instead of computing. The error is the mean over the sampled
tokens of ``||y - y_pruned||^2`` with ``y`` the routed output of the unpruned model, relative to the
mean squared norm of the layer's input hidden state, as the quantization errors of
:mod:`ggufmoe.stats.local_errors` are. Experts that got no calibration token are never loaded: a token
re-routed to one is counted as losing that share of its output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.expert_table import redirected
from ggufmoe.stats.routed_experts import ExpertWeights, expert_output
from ggufmoe.stats.file import ExpertStats

# (layer statistics) -> criterion -> candidate name -> (experts kept (original indices), experts per token);
# from the pruning stage (ggufmoe.prune.criteria.kept_sets)
KeptSets = Callable[[ExpertStats], dict[str, dict[str, tuple[list[int], int]]]]
COUNT = "num_experts"  # the expert count a transformers router reads
PROBE_DIM = 512  # expert outputs wider than this are kept as a projection to this many values


def router_of(block: nn.Module, n_expert: int, top_k: bool = True) -> nn.Module | None:
    """The router module of a transformers MoE block: a child with ``top_k`` (unless not ``top_k``) and an
    (n_expert, hidden) weight."""
    for m in block.modules():
        w = getattr(m, "weight", None)
        if (hasattr(m, "top_k") or not top_k) and isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] == n_expert:
            return m
    return None


@dataclass
class ResidualRouting:
    """A router that routes on the layer's residual, not on the experts' input (Gemma 4:
    :attr:`~ggufmoe.arch.base.Architecture.residual_router`): the module, its input at the sampled tokens, how it
    routes rows at a number of experts per token (``Architecture.route_residual``), and the layer's output from
    those rows and their routed output (``Architecture.routed_tail``): the pruning errors are the changes of the
    layer's output, the routed output passing through the norms after it."""

    router: nn.Module
    x: torch.Tensor
    route: Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    tail: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def logits(self, n_expert: int) -> torch.Tensor | None:
        """(tokens, n_expert): the output of the router's matmul on the sampled tokens."""
        matmul = router_of(self.router, n_expert, top_k=False)
        if matmul is None:
            return None
        got = []
        handle = matmul.register_forward_hook(lambda _m, _a, out: got.append(out.detach()))
        try:
            self.route(self.router, self.x.to(matmul.weight.device), 1)
        finally:
            handle.remove()
        return got[0]


@contextlib.contextmanager
def pruned_router(router: nn.Module, kept: list[int], per_expert: tuple[str, ...], n_expert: int) -> Iterator[None]:
    """The router routes to ``kept`` only (new indices are positions in ``kept``) while inside.

    ``per_expert`` names (dotted paths below ``router``) its tensors with an axis of experts, the first
    of ``n_expert`` entries (the architecture's ``router_tensors``: ERNIE's bias is 1 x experts in a child).
    Used on the MoE block too, for a routing bias the block holds and hands its router (MiniMax-M2)."""
    found: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for path in per_expert:
        owner_path, _, leaf = path.rpartition(".")
        try:
            owner = router.get_submodule(owner_path)  # "" is the router itself
        except AttributeError:
            continue
        t = getattr(owner, leaf, None)
        if isinstance(t, torch.Tensor) and n_expert in t.shape:
            found[path] = (owner, leaf, t)
    counts = {n: getattr(router, n) for n in (COUNT,) if hasattr(router, n) and found}
    try:
        for owner, leaf, t in found.values():
            idx = torch.tensor(kept, device=t.device)
            _set(owner, leaf, t.data.index_select(list(t.shape).index(n_expert), idx))
        for n in counts:
            setattr(router, n, len(kept))
        yield
    finally:
        for owner, leaf, t in found.values():
            _set(owner, leaf, t)
        for n, v in counts.items():
            setattr(router, n, v)


@contextlib.contextmanager
def routing_top_k(router: nn.Module, top_k: int) -> Iterator[None]:
    """The router picks ``top_k`` experts per token while inside."""
    before = router.top_k
    router.top_k = top_k
    try:
        yield
    finally:
        router.top_k = before


@dataclass
class RouterTable:
    """A router's token -> experts table (the name of its buffer) and, per expert, every expert from the most to
    the least similar (:func:`ggufmoe.prune.redirect.ranking`)."""

    name: str
    order: np.ndarray


@contextlib.contextmanager
def redirected_table(router: nn.Module, table: RouterTable | None, kept: list[int]) -> Iterator[None]:
    """The router's table redirected to ``kept`` (:func:`ggufmoe.prune.redirect.redirected`) while inside."""
    if table is None:
        yield
        return
    before = getattr(router, table.name)
    _set(router, table.name, torch.from_numpy(redirected(before.cpu().numpy(), kept, table.order)).to(before.device))
    try:
        yield
    finally:
        _set(router, table.name, before)


def _set(m: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter, buffer or plain tensor attribute without the checks ``setattr`` makes."""
    for table in (m._parameters, m._buffers):
        if name in table:
            table[name] = value
            return
    setattr(m, name, value)


def _cosines(rows: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of ``rows`` (0 where a row is all zeros)."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    unit = torch.where(norms > 0, rows / norms.clamp(min=1e-300), torch.zeros_like(rows))
    return unit @ unit.T


class PruneProbe:
    """Gathers the sampled tokens' expert outputs of one MoE layer, then measures each candidate pruning."""

    def __init__(self, positions: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                 dim: int = PROBE_DIM, routing: ResidualRouting | None = None, tokens: torch.Tensor | None = None):
        self.positions = positions  # (m,): the sampled tokens' rows in the calibration
        self.tokens = tokens  # (m,): their token ids, for a block that routes by them (None: it does not)
        self.x = x  # (m, hidden): the experts' input at the sampled positions
        self.idx, self.weights = idx, weights  # (m, top_k): the unpruned routes
        self.routing = routing  # None: the MoE block routes the experts' input
        width = x.shape[-1]
        gen = torch.Generator().manual_seed(0)
        # the layer's tail needs the routed output whole
        self.proj = None if width <= dim or routing is not None else torch.randn(width, dim, generator=gen) / dim ** 0.5
        self.out: dict[int, torch.Tensor] = {}  # expert -> (m, dim) output on every sampled token

    def expert(self, experts: nn.Module, e: int, ew: ExpertWeights) -> None:
        _, y = expert_output(experts, ew, self.x.to(ew.down.device, ew.down.dtype))
        y = y.to("cpu", torch.float32)
        self.out[e] = y @ self.proj if self.proj is not None else y

    def routed(self, outputs: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed output of every sampled token for routes ``idx`` (original expert ids) and their weights,
        from ``outputs`` (n_expert, m, dim)."""
        rows = torch.arange(len(idx))[:, None]
        return (outputs[idx, rows] * weights[..., None].float()).sum(1)

    def similarity(self, block: nn.Module, n_expert: int) -> list[list[float]] | None:
        """Experts x experts: the mean of two cosines over the sampled tokens, of the experts' outputs and of
        their router logits (what expert merging folds by; 0 for an expert that got no token)."""
        with torch.no_grad():
            if self.routing is not None:
                logits = self.routing.logits(n_expert)
            else:
                router = router_of(block, n_expert)
                logits = None if router is None else self.x.to(router.weight.device) @ router.weight.T
        if logits is None:
            return None
        by_logit = _cosines(logits.T.to("cpu", torch.float64))
        outputs = torch.zeros(n_expert, len(self.x) * next(iter(self.out.values())).shape[1], dtype=torch.float64)
        for e, y in self.out.items():
            outputs[e] = y.reshape(-1).double()
        return ((_cosines(outputs) + by_logit) / 2).tolist()

    def errors(self, block: nn.Module, experts: nn.Module, n_expert: int,
               kept: dict[str, dict[str, tuple[list[int], int]]], residual: float,
               router_tensors: tuple[str, ...], layer_out: torch.Tensor | None = None,
               table: RouterTable | None = None) -> dict[str, dict[str, float]]:
        """criterion -> candidate -> mean ||y - y_pruned||^2 / residual, the block rerouting as pruned (to the
        candidate's kept experts, with its experts per token). ``y`` is the routed output, or with a residual router
        the layer's output through its tail, checked against ``layer_out`` (the real one at the sampled tokens).
        ``table``: the router's token -> experts table and the redirection order of its removed experts' entries."""
        routing = self.routing
        router = router_of(block, n_expert) if routing is None else routing.router
        if router is None or residual <= 0:
            return {}
        device = next(router.parameters()).device
        dim = self.proj.shape[1] if self.proj is not None else self.x.shape[1]
        outputs = torch.zeros(n_expert, len(self.x), dim)  # experts never loaded (no token): no output
        for e, y in self.out.items():
            outputs[e] = y

        def output(idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            y = self.routed(outputs, idx, weights)
            if routing is None:
                return y
            with torch.no_grad():
                return routing.tail(routing.x.to(device), y.to(device)).cpu()

        full = output(self.idx, self.weights)
        if layer_out is not None and not torch.allclose(full, layer_out, rtol=1e-4,
                                                        atol=1e-4 * float(layer_out.abs().max())):
            raise GgufmoeError("pruning errors: the layer's output computed after its experts differs from its real "
                               "output (transformers' layer changed?)")
        out: dict[str, dict[str, float]] = {}
        for criterion, sets in kept.items():
            for name, (members, top_k) in sets.items():
                routes = self.reroute(block, experts, router, members, top_k, router_tensors, n_expert, device, table)
                if routes is None:
                    return {}
                new_idx, new_w = routes
                diff = full - output(torch.tensor(members)[new_idx.clamp(0, len(members) - 1)], new_w)
                out.setdefault(criterion, {})[name] = float((diff.double() ** 2).sum(1).mean()) / residual
        return out

    def reroute(self, block: nn.Module, experts: nn.Module, router: nn.Module, members: list[int], top_k: int,
                router_tensors: tuple[str, ...], n_expert: int, device: torch.device,
                table: RouterTable | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(expert ids as positions in ``members``, weights) of the sampled tokens, the router cut to ``members``
        choosing ``top_k`` per token: the block's own routing (its experts module capturing the routes instead of
        computing), or the residual router's on its input. None where the block never called its experts."""
        got: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(hs: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *_, **__):
            got.append((top_k_index, top_k_weights))
            return torch.zeros_like(hs)

        with torch.no_grad(), pruned_router(router, members, router_tensors, n_expert):
            if self.routing is not None:
                got.append(self.routing.route(router, self.routing.x.to(device), top_k))
            else:
                experts.forward = capture
                tokens = {} if self.tokens is None else {"input_ids": self.tokens.to(device).reshape(1, -1)}
                try:
                    with (pruned_router(block, members, router_tensors, n_expert), routing_top_k(router, top_k),
                          redirected_table(router, table, members)):
                        block(self.x.to(device).reshape(1, len(self.x), -1), **tokens)
                finally:
                    del experts.forward
        return (got[0][0].to("cpu"), got[0][1].to("cpu", torch.float32)) if got else None

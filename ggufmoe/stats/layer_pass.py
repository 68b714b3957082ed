"""One decoder layer of a streamed calibration (:mod:`ggufmoe.stats.stream`), made real, run over every token
and put back: phase 1 (the layer's own forward, its fused experts deferred) and phase 2 (the routed experts read
from the checkpoint one at a time and run over their tokens), with the layer's statistics and local errors.

Where the layer adds its routed output to its output as it is (checked on a few tokens first: most families),
phase 2 adds each expert's weighted output to phase 1's output. Where it does not (Gemma 4 normalises the routed
output twice before the residual), phase 2 sums the routed output per token and phase 3 runs the layer again, its
experts module handing back that sum, for the layer's output. The experts' local errors are measured on the routed
output: the routed output's measured gain at the layer's output (:meth:`LayerPasses.routed_gain`) then scales
them, and the pruning errors too unless the family states the layer's computation after its experts
(:meth:`~ggufmoe.arch.base.Architecture.routed_tail`, Gemma 4), which measures them at the layer's output."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ggufmoe.arch.base import Architecture
from ggufmoe.model.expert_table import ranking
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.rules import quantizable
from ggufmoe.stats.collect import Collector
from ggufmoe.stats.error_meter import LocalMeter
from ggufmoe.stats.expert_loader import ExpertLoader
from ggufmoe.stats.file import ExpertStats
from ggufmoe.stats.held_weights import put_values
from ggufmoe.stats.hidden import RowStore
from ggufmoe.stats.imatrix import ImatrixEntry
from ggufmoe.stats.local_errors import LocalErrors
from ggufmoe.stats.probe_streams import ProbeStreams
from ggufmoe.stats.prune_error import KeptSets, PruneProbe, ResidualRouting, RouterTable, router_of
from ggufmoe.stats.rounding import Rounder
from ggufmoe.stats.routed_experts import expert_output, route_experts
from ggufmoe.stats.skeleton import Skeleton, on_device, unsupported
from ggufmoe.stats.working_set import WorkingSet

PROBE_TOKENS = 16  # tokens the linearity check of a MoE layer runs
GAIN_STEP = 1e-3  # size of the routed-output perturbation measuring its gain, relative to each token's routed output


def layer_half_done(layer: int) -> None:
    """Called in the middle of each decoder layer (0-based): after its phase 1 has overwritten part of the state
    and before its experts run. Does nothing; tests replace it (tests/hooked_cli.py) to interrupt there."""


def deferred_forward(m: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """Phase 1's experts forward: hands its inputs to the run's sink, which returns zeros (computed in phase 2)."""
    return m._ggufmoe.sink(hidden_states, top_k_index, top_k_weights)


class LayerPasses:
    """What of :class:`ggufmoe.stats.stream.StreamedRun` runs one decoder layer (:meth:`layer`)."""

    arch: Architecture
    by_layer: dict[int | None, list[TensorSpec]]
    moe_layers: set[int]
    kept_sets: KeptSets | None
    meter: LocalMeter | None
    device: torch.device
    progress: bool
    rows: int
    width: int  # values of a token's hidden state between layers (every stream)
    hidden_shape: tuple[int, ...]  # a token's hidden state as the layers take it: (width,) or (streams, hidden)
    moe_width: int  # values of a token's input to the routed experts (and of their output)
    n_layers: int
    batches: list[torch.Tensor]
    offsets: list[int]
    phase1_share: float
    # per batch: what the last layer handed the next besides its hidden states (Architecture.layer_output), on the CPU
    carry: list[dict[str, torch.Tensor]]
    streams: ProbeStreams | None
    rounder: Rounder | None
    own_moe_in: RowStore | None  # while the rounding runs a layer in the rounded model: the model's own expert inputs

    def sampler(self) -> Callable[[str, torch.Tensor], None] | None:
        """What every plain matmul's input goes through: the local errors' and the rounding's samplers."""
        takers = [t.sample for t in (self.meter, self.rounder) if t is not None]
        if not takers:
            return None

        def sample(name: str, x: torch.Tensor) -> None:
            for take in takers:
                take(name, x)

        return sample

    def set_offset(self, row: int, end: int) -> None:
        """The calibration rows ``row:end`` of the forward about to run, for those that sample its inputs."""
        for taker in (self.meter, self.rounder):
            if taker is not None:
                taker.offset = row
        if self.rounder is not None:
            self.rounder.tokens = end - row

    def layer(self, skeleton: Skeleton, k: int, h_in: RowStore, h_out: RowStore, moe_in: RowStore | None,
              working: WorkingSet) -> tuple[dict[str, ImatrixEntry], dict[int, ExpertStats], LocalErrors]:
        """Run layer ``k`` over every token: ``h_out`` = its output; returns its statistics and local errors."""
        layer = skeleton.layers[k]
        specs = self.by_layer.get(k, [])
        moe = k in self.moe_layers
        try:
            skeleton.materialize(layer)
            experts = skeleton.experts_module(k) if moe else None
            adds = True
            if moe:
                if experts is None:
                    raise unsupported(self.arch, f"no fused experts module for layer {k}")
                adds = self.adds_routed_output(skeleton, k, layer, experts, h_in)
            collector = Collector(skeleton.model, specs, forward=deferred_forward, sample=self.sampler())
            try:
                entries, layers, local, probe, residual, gain = self._layer(skeleton, k, layer, collector, h_in,
                                                                            h_out, moe_in, working, adds)
            finally:
                collector.remove()
            table = None
            if probe is not None and k in layers:
                block = next(m for m in layer.modules() if any(c is experts for c in m.children()))
                if probe.routing is not None:  # measured at the layer's output
                    gain, layer_out = 1.0, h_out.tensor[probe.positions]
                else:
                    layer_out = None
                similarity = probe.similarity(block, self.arch.n_expert) if probe.out else None
                if similarity is not None:
                    local.similarity[str(k)] = similarity
                table = self.router_table(block, similarity)
                errors = probe.errors(block, experts, self.arch.n_expert, self.kept_sets(layers[k]), residual,
                                      self.arch.router_tensors, layer_out, table)
                local.prune[str(k)] = {c: {n: v * gain for n, v in by.items()} for c, by in errors.items()}
            if self.streams is not None:
                self.streams.layer(skeleton, k, layer, specs, experts, adds, entries, layers.get(k), working.ahead, table)
            if self.rounder is not None:
                self.rounder.finish_layer()
            return entries, layers, local
        finally:
            skeleton.release(layer)

    def _layer(self, skeleton: Skeleton, k: int, layer: nn.Module, collector: Collector, h_in: RowStore,
               h_out: RowStore, moe_in: RowStore | None, working: WorkingSet, adds: bool):
        experts = collector.experts.get(k)
        top_k = self.arch.top_k
        idx = torch.empty(self.rows, top_k, dtype=torch.long) if experts is not None else None
        weights = torch.empty(self.rows, top_k) if experts is not None else None
        where = [0, 0]  # rows of the batch running

        def sink(hs: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
            a, b = where
            if hs.shape[0] != b - a or top_k_index.shape != (b - a, top_k):
                raise unsupported(self.arch, f"layer {k}'s experts got {tuple(hs.shape)} inputs and "
                                             f"{tuple(top_k_index.shape)} routes for {b - a} tokens")
            moe_in.tensor[a:b] = hs.detach().to("cpu", torch.float32)
            idx[a:b] = top_k_index.to("cpu")
            weights[a:b] = top_k_weights.to("cpu", torch.float32)
            return torch.zeros_like(hs)

        if experts is not None:
            experts._ggufmoe.sink = sink
        share = self.phase1_share if experts is not None else 1.0
        again = experts is not None and not adds  # phase 3: the layer runs again on its routed output
        if again:
            share /= 2
        meter = self.meter
        measured = [s for s in self.by_layer.get(k, []) if quantizable(s)]
        residual, probe, pos, routing = 0.0, None, None, None
        if meter is not None:
            residual = meter.residual_energy(h_in.tensor)
            meter.wanted = {s.name for s in measured if not s.is_expert}
            if experts is not None and self.kept_sets is not None:  # the tokens the pruning errors are measured on
                pos = torch.arange(0, self.rows, -(-self.rows // meter.options.prune_tokens))
                pieces: list[torch.Tensor] = []  # the residual router's input at ``pos``, batch by batch
                routing = self.residual_routing(layer, collector, pos, where, pieces)
        if self.rounder is not None:
            self.rounder.want(self.by_layer.get(k, []))
        t0 = time.perf_counter()
        rounds = self.rounder is not None and not self.rounder.recording  # the rounded model's run of the layer
        with torch.no_grad(), tqdm(total=self.rows, unit="tok", unit_scale=True, disable=not self.progress,
                                   desc=f"layer {k + 1}/{self.n_layers}{' (rounded)' if rounds else ''}") as bar:
            def phase1(share: float, last: bool = True) -> None:  # last: the run whose output the layer hands on
                for i, (batch, a, b) in enumerate(zip(self.batches, self.offsets, self.offsets[1:])):
                    where[:] = a, b
                    self.set_offset(a, b)
                    y, carry = self.run_batch(skeleton, k, layer, h_in, i, self.carry[i])
                    if again:  # phase 2 sums the routed output here; phase 3 gives the output and the hand-over
                        h_out.tensor[a:b] = 0
                    elif last:
                        self.carry[i] = carry
                        h_out.tensor[a:b] = y.reshape(b - a, self.width).to("cpu", torch.float32)
                    for store in (h_in, h_out, moe_in):
                        if store is not None:
                            store.drop_pages()  # mapped rows: what this batch touched goes back to the kernel
                    bar.update((b - a) * share)

            phase1(share / 2 if rounds else share, last=not rounds)
            if routing is not None:
                routing.x = torch.cat(pieces)
            layer_half_done(k)
            if rounds:  # the plain tensors rounded one input at a time in forward order, phase 1 again after each
                groups = max(1, self.rounder.inputs_taken())
                for g in range(groups):
                    self.rounder.round_next(self.by_layer.get(k, []), lambda s, v: put_values(skeleton, s, v))
                    phase1(share / 2 / groups, last=g == groups - 1)
            if meter is not None:
                for s in measured:
                    if not s.is_expert and s.name in collector.acc:
                        entry = collector.acc[s.name].entry()
                        meter.plain(s, entry.importance_row(0) if entry.counts.sum() > 0 else None)
            if experts is not None:
                if pos is not None:
                    tokens = torch.cat([t.reshape(-1) for t in self.batches])[pos] if self.arch.layers_read_tokens \
                        else None
                    probe = PruneProbe(pos, moe_in.tensor[pos].clone(), idx[pos], weights[pos], routing=routing,
                                       tokens=tokens)
                t1 = time.perf_counter()
                self.run_experts(k, experts, moe_in, idx, weights, h_out, working, bar, 1.0 - 2 * share if again
                                 else 1.0 - share, probe)
                t2 = time.perf_counter()
                self.phase1_share = min(0.95, max(0.05, (t1 - t0) / max(t2 - t0, 1e-9)))
            gain = 1.0
            if again:
                collector.remove()  # phase 3 records nothing: phase 1 did
                gain = self.again(skeleton, k, layer, experts, h_in, h_out, bar, share, meter is not None)
            local = meter.finish([s.name for s in measured], residual) if meter is not None else LocalErrors()
            if gain != 1.0:
                expert_names = {s.name for s in measured if s.is_expert}
                local.quant = {n: ({t: v * gain for t, v in by.items()} if n in expert_names else by)
                               for n, by in local.quant.items()}
            bar.update(max(0.0, bar.total - bar.n))
        return collector.entries(), collector.layers(), local, probe, residual, gain

    def router_table(self, block: nn.Module, similarity: list[list[float]] | None) -> RouterTable | None:
        """The token -> experts table of the block's router, where it routes by one, with the order its removed
        experts' entries are redirected in: by the experts' measured ``similarity`` (:mod:`ggufmoe.prune.redirect`)."""
        name = self.arch.router_table
        router = router_of(block, self.arch.n_expert)
        if name is None or router is None or not isinstance(getattr(router, name, None), torch.Tensor):
            return None
        if similarity is None:
            raise unsupported(self.arch, "a layer routed by a token table got no expert similarities to redirect by")
        return RouterTable(name, ranking(np.asarray(similarity)))

    def residual_routing(self, layer: nn.Module, collector: Collector, pos: torch.Tensor, where: list[int],
                         pieces: list[torch.Tensor]) -> ResidualRouting | None:
        """Where the layer routes on its residual (:attr:`~ggufmoe.arch.base.Architecture.residual_router`), its
        router's input at rows ``pos`` is gathered into ``pieces`` (in order) while phase 1 runs the batch at rows
        ``where``, by a hook the ``collector`` removes with its own; ``x`` is set from them after phase 1."""
        if self.arch.residual_router is None:
            return None
        router = layer.get_submodule(self.arch.residual_router)
        routing = ResidualRouting(router, torch.empty(0), self.arch.route_residual,
                                  lambda residual, routed: self.arch.routed_tail(layer, residual, routed))

        def gather(_m: nn.Module, args: tuple) -> None:
            a, b = where
            rows = pos[(pos >= a) & (pos < b)] - a
            pieces.append(args[0].reshape(b - a, -1)[rows.to(args[0].device)].detach().to("cpu", torch.float32))

        collector.handles.append(router.register_forward_pre_hook(gather))
        return routing

    def run_batch(self, skeleton: Skeleton, k: int, layer: nn.Module, h_in: RowStore, i: int,
                  carry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Layer ``k`` over batch ``i`` of ``h_in``, given what the layers before handed on for it (``carry``): its
        output and what it hands on (on the CPU)."""
        shape, a, b = tuple(self.batches[i].shape), self.offsets[i], self.offsets[i + 1]
        h = h_in.tensor[a:b].view(*shape, *self.hidden_shape).to(self.device)
        y, out = skeleton.run_layer(k, layer, h, self.batches[i], carry)
        return y, on_device(out, torch.device("cpu"))

    def again(self, skeleton: Skeleton, k: int, layer: nn.Module, experts: nn.Module, h_in: RowStore,
              h_out: RowStore, bar: tqdm, share: float, gain: bool) -> float:
        """Phase 3: layer ``k`` again over every batch, its experts module handing back the routed output phase 2
        summed into ``h_out``, which becomes the layer's output. With ``gain``, returns the routed output's mean
        squared gain at the layer's output (:meth:`routed_gain`), else 1."""
        measured = 1.0
        routed = [None]
        experts.forward = lambda hs, *_, **__: routed[0].reshape(hs.shape).to(hs.device, hs.dtype)
        try:
            for i, (a, b) in enumerate(zip(self.offsets, self.offsets[1:])):
                routed[0] = h_out.tensor[a:b, :self.moe_width].clone()
                y, carry = self.run_batch(skeleton, k, layer, h_in, i, self.carry[i])
                if gain and i == 0:
                    measured = self.routed_gain(skeleton, k, layer, h_in, routed, y)
                self.carry[i] = carry
                h_out.tensor[a:b] = y.reshape(b - a, self.width).to("cpu", torch.float32)
                h_out.drop_pages()
                bar.update((b - a) * share)
        finally:
            del experts.forward
        return measured

    def routed_gain(self, skeleton: Skeleton, k: int, layer: nn.Module, h_in: RowStore, routed: list,
                    y: torch.Tensor) -> float:
        """How much a change of the routed output changes layer ``k``'s output, on the first batch: the ratio of the
        squared norms of the output's change and a small random change of each token's routed output (seeded,
        :data:`GAIN_STEP` of its norm). 1 where the routed output is added as it is; Gemma 4's norms make it differ.
        ``routed[0]`` is what the experts module hands back (changed here and put back)."""
        base = routed[0]
        gen = torch.Generator().manual_seed(k)
        step = torch.randn(base.shape, generator=gen)
        step *= GAIN_STEP * torch.linalg.vector_norm(base, dim=-1, keepdim=True).clamp(min=1e-12) / \
            torch.linalg.vector_norm(step, dim=-1, keepdim=True).clamp(min=1e-12)
        routed[0] = base + step
        try:
            y2, _ = self.run_batch(skeleton, k, layer, h_in, 0, self.carry[0])
        finally:
            routed[0] = base
        change = (y2.reshape(-1, self.width).double().cpu() - y.reshape(-1, self.width).double().cpu())
        return float((change ** 2).sum() / (step.double() ** 2).sum().clamp(min=1e-300))

    def run_experts(self, k: int, experts: nn.Module, moe_in: RowStore, idx: torch.Tensor, weights: torch.Tensor,
                    h_out: RowStore, working: WorkingSet, bar: tqdm, share: float, probe: PruneProbe | None = None) -> None:
        """Phase 2: every routed expert of layer ``k`` over the tokens routed to it, added to ``h_out``."""
        n_expert = experts._ggufmoe.x_acc.n_expert
        counts = torch.bincount(idx.reshape(-1).clamp(0, n_expert), minlength=n_expert + 1)[:n_expert].tolist()
        order = [e for e, c in enumerate(counts) if c]
        total = max(1, sum(counts))
        last, touched = [None], [0]
        window = max(working.ahead, 64 * 1024**2)  # bytes of mapped rows touched before they are handed back

        def advance(e: int) -> None:
            if last[0] is not None:
                bar.update(self.rows * share * counts[last[0]] / total)
                touched[0] += 2 * counts[last[0]] * self.width * 4
                if touched[0] > window:
                    moe_in.drop_pages()
                    h_out.drop_pages()
                    touched[0] = 0
            last[0] = e

        loader = ExpertLoader(self.arch, experts, self.by_layer[k], order, self.device, working.ahead, advance)
        meter = self.meter
        rounder = self.rounder if self.rounder is not None and not self.rounder.recording else None
        specs = {s.name: s for s in self.by_layer[k]}
        out = h_out.tensor[:, :self.moe_width]

        def measure(e: int, ew, tokens: torch.Tensor, w: torch.Tensor, x2: torch.Tensor, mid2: torch.Tensor) -> None:
            if meter is not None:
                local(e, ew, tokens, w, x2, mid2)
            if rounder is not None:
                rounded(e, ew, tokens, w)

        def rounded(e: int, ew, tokens: torch.Tensor, w: torch.Tensor) -> None:
            """Expert ``e`` rounded; its output as rounded replaces what it added."""
            rows = tokens.cpu()
            change = rounder.expert(experts, loader, specs, e, ew, rows, w, moe_in.tensor[rows].to(self.device),
                                    self.own_moe_in.tensor[rows].to(self.device))
            out.index_add_(0, rows, (change * w[:, None].to(change.device, change.dtype)).to(out.device, out.dtype))

        def local(e: int, ew, tokens: torch.Tensor, w: torch.Tensor, x2: torch.Tensor, mid2: torch.Tensor) -> None:
            """The local errors of expert ``e`` on a sample of its routing slots."""
            c = len(tokens)
            pick = torch.from_numpy(np.unique(np.linspace(0, c - 1, min(c, meter.options.expert_tokens)).round()
                                              .astype(np.int64)))
            x = moe_in.tensor[tokens[pick].cpu()].to(self.device)
            mid, _ = expert_output(experts, ew, x)
            parts = loader.parts(ew)
            gate_up_in = (x2 / c).float().numpy()
            inputs = {n: (mid if n == loader.down.name else x) for n in parts}
            imatrix = {n: ((mid2 / c).float().numpy() if n == loader.down.name else gate_up_in) for n in parts}
            meter.expert(parts, e, inputs, w[pick], c, self.rows, imatrix, len(order))
            if probe is not None:
                probe.expert(experts, e, ew)

        try:
            with torch.no_grad():
                route_experts(experts, moe_in.tensor, idx, weights, loader, out, step=working.batch_tokens,
                              device=self.device, on_expert=measure if meter or rounder else None)
        finally:
            loader.close()
        moe_in.drop_pages()
        h_out.drop_pages()

    def adds_routed_output(self, skeleton: Skeleton, k: int, layer: nn.Module, experts: nn.Module,
                           h_in: RowStore) -> bool:
        """Whether the layer's output is its routed output added as it is (linear with slope 1), so phase 2 can add
        it after the layer ran. Checked on the first tokens of the first chunk with zeros and a random output (on
        the whole chunk where the layer takes what the ones before handed it: that is for whole chunks)."""
        carry = {name: t[:1] for name, t in self.carry[0].items()}
        n = self.batches[0].shape[1] if carry else min(PROBE_TOKENS, self.batches[0].shape[1])
        h = h_in.tensor[:n].reshape(1, n, *self.hidden_shape).to(self.device)
        gen = torch.Generator().manual_seed(k)
        probe = (torch.randn(n, self.moe_width, generator=gen) * float(h.std().clamp(min=1e-3))).to(self.device)
        outs = []
        try:
            for r in (torch.zeros_like(probe), probe):
                experts.forward = lambda hs, *_, r=r, **__: r.reshape(hs.shape).to(hs.dtype)
                with torch.no_grad():
                    y, _ = skeleton.run_layer(k, layer, h, self.batches[0][:1, :n], carry)
                outs.append(y.reshape(n, self.width))
        finally:
            del experts.forward
        if self.width != self.moe_width:  # the routed output goes into several streams, each weighed its own way
            return False
        scale = float(outs[0].abs().max()) + float(probe.abs().max())
        return torch.allclose(outs[1] - outs[0], probe, rtol=0, atol=1e-4 * scale)

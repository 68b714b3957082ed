"""One decoder layer of a streamed calibration (:mod:`ggufmoe.stats.stream`), made real, run over every token
and put back: phase 1 (the layer's own forward, its fused experts deferred), the check that its routed output adds
linearly, and phase 2 (the routed experts read from the checkpoint one at a time and run over their tokens), with
the layer's statistics and local errors."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ggufmoe.arch.base import Architecture
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.rules import quantizable
from ggufmoe.stats.collect import Collector
from ggufmoe.stats.error_meter import LocalMeter
from ggufmoe.stats.expert_loader import ExpertLoader
from ggufmoe.stats.file import ExpertStats
from ggufmoe.stats.hidden import RowStore
from ggufmoe.stats.imatrix import ImatrixEntry
from ggufmoe.stats.local_errors import LocalErrors
from ggufmoe.stats.prune_error import KeptSets, PruneProbe
from ggufmoe.stats.routed_experts import expert_output, route_experts
from ggufmoe.stats.skeleton import Skeleton, on_device, unsupported
from ggufmoe.stats.working_set import WorkingSet

PROBE_TOKENS = 16  # tokens the linearity check of a MoE layer runs


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
    width: int
    n_layers: int
    batches: list[torch.Tensor]
    offsets: list[int]
    phase1_share: float
    # per batch: what the last layer handed the next besides its hidden states (Architecture.layer_output), on the CPU
    carry: list[dict[str, torch.Tensor]]

    def layer(self, skeleton: Skeleton, k: int, h_in: RowStore, h_out: RowStore, moe_in: RowStore | None,
              working: WorkingSet) -> tuple[dict[str, ImatrixEntry], dict[int, ExpertStats], LocalErrors]:
        """Run layer ``k`` over every token: ``h_out`` = its output; returns its statistics and local errors."""
        layer = skeleton.layers[k]
        specs = self.by_layer.get(k, [])
        moe = k in self.moe_layers
        try:
            skeleton.materialize(layer)
            experts = skeleton.experts_module(k) if moe else None
            if moe:
                if experts is None:
                    raise unsupported(self.arch, f"no fused experts module for layer {k}")
                self.check_linear(skeleton, k, layer, experts, h_in)
            collector = Collector(skeleton.model, specs, forward=deferred_forward,
                                  sample=self.meter.sample if self.meter else None)
            try:
                entries, layers, local, probe, residual = self._layer(skeleton, k, layer, collector, h_in, h_out,
                                                                      moe_in, working)
            finally:
                collector.remove()
            if probe is not None and k in layers:
                block = next(m for m in layer.modules() if any(c is experts for c in m.children()))
                local.prune[str(k)] = probe.errors(block, experts, self.arch.n_expert, self.kept_sets(layers[k]),
                                                   residual, self.arch.router_tensors)
                similarity = probe.similarity(block, self.arch.n_expert) if probe.out else None
                if similarity is not None:
                    local.similarity[str(k)] = similarity
            return entries, layers, local
        finally:
            layer.to("meta")

    def _layer(self, skeleton: Skeleton, k: int, layer: nn.Module, collector: Collector, h_in: RowStore,
               h_out: RowStore, moe_in: RowStore | None, working: WorkingSet):
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
        meter = self.meter
        measured = [s for s in self.by_layer.get(k, []) if quantizable(s)]
        residual, probe = 0.0, None
        if meter is not None:
            residual = meter.residual_energy(h_in.tensor)
            meter.wanted = {s.name for s in measured if not s.is_expert}
        t0 = time.perf_counter()
        with torch.no_grad(), tqdm(total=self.rows, unit="tok", unit_scale=True, desc=f"layer {k + 1}/{self.n_layers}",
                                   disable=not self.progress) as bar:
            for i, (batch, a, b) in enumerate(zip(self.batches, self.offsets, self.offsets[1:])):
                where[:] = a, b
                if meter is not None:
                    meter.offset = a
                args, kwargs = skeleton.layer_args(tuple(batch.shape), k)
                h = h_in.tensor[a:b].view(*batch.shape, self.width).to(self.device)
                kwargs = {**kwargs, **on_device(self.carry[i], self.device)}  # the earlier layer's hand-over
                y, carry = self.arch.layer_output(layer(h, *args, **kwargs))
                self.carry[i] = on_device(carry, torch.device("cpu"))
                h_out.tensor[a:b] = y.reshape(b - a, self.width).to("cpu", torch.float32)
                for store in (h_in, h_out, moe_in):
                    if store is not None:
                        store.drop_pages()  # mapped rows: what this batch touched goes back to the kernel
                bar.update((b - a) * share)
            layer_half_done(k)
            if meter is not None:
                for s in measured:
                    if not s.is_expert and s.name in collector.acc:
                        entry = collector.acc[s.name].entry()
                        meter.plain(s, entry.importance_row(0) if entry.counts.sum() > 0 else None)
            if experts is not None:
                if meter is not None and self.kept_sets is not None:
                    pos = torch.arange(0, self.rows, -(-self.rows // meter.options.prune_tokens))
                    probe = PruneProbe(moe_in.tensor[pos].clone(), idx[pos], weights[pos])
                t1 = time.perf_counter()
                self.run_experts(k, experts, moe_in, idx, weights, h_out, working, bar, 1.0 - share, probe)
                t2 = time.perf_counter()
                self.phase1_share = min(0.95, max(0.05, (t1 - t0) / max(t2 - t0, 1e-9)))
            local = meter.finish([s.name for s in measured], residual) if meter is not None else LocalErrors()
            bar.update(max(0.0, bar.total - bar.n))
        return collector.entries(), collector.layers(), local, probe, residual

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

        def measure(e: int, ew, tokens: torch.Tensor, w: torch.Tensor, x2: torch.Tensor, mid2: torch.Tensor) -> None:
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
                route_experts(experts, moe_in.tensor, idx, weights, loader, h_out.tensor, step=working.batch_tokens,
                              device=self.device, on_expert=measure if meter is not None else None)
        finally:
            loader.close()
        moe_in.drop_pages()
        h_out.drop_pages()

    def check_linear(self, skeleton: Skeleton, k: int, layer: nn.Module, experts: nn.Module, h_in: RowStore) -> None:
        """Phase 2 adds the routed output after the layer ran: the layer's output must be linear in its experts'
        output with slope 1. Checked on the first tokens of the first chunk with zeros and a random output (on the
        whole chunk where the layer takes what the one before handed it: that is for whole chunks)."""
        carry = on_device({name: t[:1] for name, t in self.carry[0].items()}, self.device)
        n = self.batches[0].shape[1] if carry else min(PROBE_TOKENS, self.batches[0].shape[1])
        h = h_in.tensor[:n].reshape(1, n, self.width).to(self.device)
        args, kwargs = skeleton.layer_args((1, n), k)
        kwargs = {**kwargs, **carry}
        gen = torch.Generator().manual_seed(k)
        probe = (torch.randn(n, self.width, generator=gen) * float(h.std().clamp(min=1e-3))).to(self.device)
        outs = []
        try:
            for r in (torch.zeros_like(probe), probe):
                experts.forward = lambda hs, *_, r=r, **__: r.reshape(hs.shape).to(hs.dtype)
                with torch.no_grad():
                    y, _ = self.arch.layer_output(layer(h, *args, **kwargs))
                outs.append(y.reshape(n, self.width))
        finally:
            del experts.forward
        scale = float(outs[0].abs().max()) + float(probe.abs().max())
        if not torch.allclose(outs[1] - outs[0], probe, rtol=0, atol=1e-4 * scale):
            raise unsupported(self.arch, f"layer {k} does not add its routed experts' output to its output as it is")

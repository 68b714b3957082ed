"""End-to-end probes inside the streamed calibration: several hidden-state streams of held-out tokens carried from
layer to layer beside the calibration's, each through a variant of the model, and each stream's logits compared
with the exact model's at the end (KL divergence per held-out chunk).

A variant (:class:`Variant`) stores some tensors at quantized types (what the file will hold: our quantizer, the
calibration's own importance rows, gguf-py's dequantization, :func:`~ggufmoe.quant.held.held_values`) and may prune
the routed experts to one of the calibration's candidate sets (the router cut to them as a pruned GGUF routes). While
a layer is loaded, after the calibration has run it (so its importance rows and expert statistics are complete):

1. every stream whose variant touches the layer, or whose hidden states already differ from the exact model's, runs
   the layer's own forward with the variant's matmul weights put into its modules (the GGUF rows matched back to the
   checkpoint tensor's elements, :mod:`ggufmoe.stats.held_weights`; one found nowhere stays exact and is listed), its
   experts module recording its input and routes;
2. the routed experts its streams use are read once (:class:`~ggufmoe.stats.expert_loader.ExpertLoader`), each
   computed for every stream at the types that stream's variant gives it (quantized once per type);
3. where the layer adds its routed output as it is, the stream's output is step 1's plus the routed output; where it
   does not (Gemma 4), the layer runs again with its experts handing back the routed output.

A stream whose variant has not touched any layer yet shares the exact model's hidden states (none kept). At the end,
the final norm runs on every stream and the output matrix (at each variant's type) is applied in row chunks, the
KL divergence per token accumulated online over the vocabulary (never a whole row of logits per stream).
Memory: (streams + 1) x tokens x hidden x 4 bytes for the hidden states and as much again for one layer's step
(:meth:`ProbeStreams.nbytes`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn
from tqdm import tqdm

from ggufmoe.arch.base import Architecture
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.held import held_values
from ggufmoe.stats.calib_state import CalibrationState
from ggufmoe.stats.expert_loader import ExpertLoader
from ggufmoe.stats.file import ExpertStats
from ggufmoe.stats.held_weights import PlainWeights
from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry
from ggufmoe.stats.probe_logits import REF, stream_kl
from ggufmoe.stats.probe_results import ProbeRequest, StreamedProbes, Variant
from ggufmoe.stats.prune_error import KeptSets, RouterTable, pruned_router, redirected_table, router_of
from ggufmoe.stats.routed_experts import ExpertWeights, expert_output
from ggufmoe.stats.skeleton import Skeleton, embedding_rows, on_device
from ggufmoe.stats.text import BATCH_TOKENS

STATE_FILE = "probes.npz"
# where the streams' time goes: the embedding rows, the layers' own forwards (and their weights quantized), the routed
# experts (read, quantized and computed), the logits
SECONDS = ("embedding", "layers", "experts", "logits")


@dataclass
class _Step:
    """One stream's pass through one layer."""

    types: dict[str, T]
    members: list[int] | None  # experts kept (pruned routing), else None
    out: torch.Tensor  # step 1's output (the routed output added in step 3)
    carry: list[dict[str, torch.Tensor]]
    x: torch.Tensor | None = None  # the experts' input, routes and their weights
    idx: torch.Tensor | None = None
    w: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # routing slots (token x top_k + j) sorted by expert
    starts: list[int] | None = None  # expert e's slots: slots[starts[e]:starts[e + 1]]


class ProbeStreams:
    """The probe streams of one streamed calibration (see the module docstring)."""

    def __init__(self, arch: Architecture, request: ProbeRequest, device: torch.device, kept_sets: KeptSets | None,
                 progress: bool = True):
        self.arch, self.request, self.device, self.kept_sets = arch, request, device, kept_sets
        self.progress = progress
        self.variants = request.variants
        self.moe_width = int(arch.cfg.hidden_size)
        self.width = arch.hidden_streams * self.moe_width  # every stream of a token's hidden state
        self.hidden_shape = (self.width,) if arch.hidden_streams == 1 else (arch.hidden_streams, self.moe_width)
        order = sorted(range(len(request.chunks)), key=lambda i: -len(request.chunks[i]))  # rows by chunk length
        self.batches: list[torch.Tensor] = []
        group: list[list[int]] = []
        for i in order:
            c = request.chunks[i]
            if group and (len(c) != len(group[0]) or (len(group) + 1) * len(c) > BATCH_TOKENS):
                self.batches.append(torch.tensor(group))
                group = []
            group.append(c)
        if group:
            self.batches.append(torch.tensor(group))
        self.offsets = np.cumsum([0] + [b.numel() for b in self.batches]).tolist()
        self.rows = self.offsets[-1]
        starts = np.cumsum([0] + [len(request.chunks[i]) for i in order]).tolist()
        self.start = {i: starts[j] for j, i in enumerate(order)}  # chunk -> its first row
        self.hidden: dict[str, torch.Tensor | None] = {v.name: None for v in self.variants}
        self.carry: dict[str, list[dict[str, torch.Tensor]] | None] = {v.name: None for v in self.variants}
        self.carry[REF] = [{} for _ in self.batches]
        self.exact: set[str] = set()  # tensors a variant quantizes that no module holds as their rows: left exact
        self.pruned: set[str] = set()  # pruning variants that pruned some layer (others measure nothing)
        self.q = Quantizer()
        self.table: RouterTable | None = None  # the layer running's token -> experts table, if it routes by one
        self.seconds = {part: 0.0 for part in SECONDS}  # where the streams' time went

    def nbytes(self, weights: int, expert: int) -> int:
        """What the streams hold at most, for a layer of ``weights`` bytes of matmul weights and ``expert`` bytes
        per routed expert (float32): every stream's hidden states and one layer's step for each (its output, its
        experts' input and routed output), one held copy of the layer's matmul weights, and one expert at each of the
        types a tensor takes in some probe."""
        by_tensor: dict[str, set] = {}
        for v in self.variants:
            for name, t in v.types.items():
                by_tensor.setdefault(name, set()).add(t)
        n_types = max((len(ts) for ts in by_tensor.values()), default=0)
        return (len(self.variants) + 1) * self.rows * self.width * 4 * 4 + weights + n_types * expert

    def _input(self, name: str) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """A stream's hidden states and hand-over: the exact model's while it has none of its own."""
        h = self.hidden[name]
        return (self.hidden[REF], self.carry[REF]) if h is None else (h, self.carry[name] or self.carry[REF])
    # --- the embedding ----------------------------------------------------------------------------------------

    def embed(self, skeleton: Skeleton, spec: TensorSpec) -> None:
        """Layer 0's input of every stream: the exact embedding rows, or those a variant's type holds."""
        t0 = time.perf_counter()
        types = {v.types.get(spec.name) for v in self.variants}
        hidden = {t: torch.empty(self.rows, self.width) for t in types | {None}}
        for batch, a, b in zip(self.batches, self.offsets, self.offsets[1:]):
            rows = embedding_rows(spec, batch)
            for t, h in hidden.items():
                r = rows if t is None else torch.from_numpy(held_values(rows.numpy(), t, None, self.q))
                records = skeleton.capture(skeleton.input_embeddings(r))
                skeleton.remember(tuple(batch.shape), records)
                h[a:b] = records[0][0].reshape(b - a, self.width)
        self.hidden[REF] = hidden[None]
        for v in self.variants:
            t = v.types.get(spec.name)
            self.hidden[v.name] = None if t is None else hidden[t]
        self.seconds["embedding"] += time.perf_counter() - t0

    # --- one decoder layer ----------------------------------------------------------------------------------

    def layer(self, skeleton: Skeleton, k: int, layer: nn.Module, specs: list[TensorSpec], experts: nn.Module | None,
              adds: bool, entries: dict[str, ImatrixEntry], layer_stats: ExpertStats | None, ahead: int,
              table: RouterTable | None = None) -> None:
        """Every stream through layer ``k`` (made real, its statistics ``entries``/``layer_stats`` complete); ``table``:
        its router's token -> experts table, redirected in the pruned streams."""
        self.table = table
        t0 = time.perf_counter()
        imatrix = Imatrix(entries, [], 0, 0)
        names = {s.name for s in specs}
        kept = self.kept_sets(layer_stats) if self.kept_sets and layer_stats is not None and experts is not None \
            else {}
        weights = PlainWeights(skeleton, [s for s in specs if not s.is_expert], imatrix, self.q, self.exact)
        block = router = None
        if experts is not None:
            block = next(m for m in layer.modules() if any(c is experts for c in m.children()))
            router = layer.get_submodule(self.arch.residual_router) if self.arch.residual_router \
                else router_of(block, self.arch.n_expert)
        steps: dict[str, _Step] = {}
        bar = tqdm(total=len(self.variants) + 1 + (experts is not None), unit="stream", leave=False,
                   desc=f"probes {k + 1}/{self.arch.cfg.num_hidden_layers}", disable=not self.progress)
        for v in [Variant(REF), *self.variants]:
            bar.update()
            types = {n: t for n, t in v.types.items() if n in names}
            members = None
            if v.prune is not None and router is not None:
                members = kept.get(v.prune[0], {}).get(v.prune[1], (None,))[0]
                if members is not None:
                    self.pruned.add(v.name)
            if v.name != REF and self.hidden[v.name] is None and not types and members is None:
                continue  # still the exact model's stream
            steps[v.name] = self._phase1(skeleton, k, layer, experts, block, router, weights, *self._input(v.name),
                                         types, members)
        if experts is not None:
            t1 = time.perf_counter()
            routed = self._experts(k, experts, specs, steps, imatrix, ahead)
            self.seconds["experts"] += time.perf_counter() - t1
            t0 += time.perf_counter() - t1  # "layers" is the rest: the layer's own forwards and its weights quantized
            bar.update()
            for name, step in steps.items():
                if adds:
                    step.out += routed[name]
                else:
                    step.out, step.carry = self._again(skeleton, k, layer, experts, block, router, weights,
                                                       *self._input(name), step, routed[name])
        for name, step in steps.items():
            self.hidden[name], self.carry[name] = step.out, step.carry
        bar.close()
        self.seconds["layers"] += time.perf_counter() - t0

    @contextlib.contextmanager
    def _variant(self, block: nn.Module | None, router: nn.Module | None, weights: PlainWeights, types: dict[str, T],
                 members: list[int] | None) -> Iterator[None]:
        """The layer holds the variant's weights and routes to its kept experts while inside."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(weights.applied(types))
            if members is not None:
                n = self.arch.n_expert
                stack.enter_context(pruned_router(router, members, self.arch.router_tensors, n))
                stack.enter_context(redirected_table(router, self.table, members))
                if not self.arch.residual_router:
                    stack.enter_context(pruned_router(block, members, self.arch.router_tensors, n))
            yield

    def _forward(self, skeleton: Skeleton, k: int, layer: nn.Module, h: torch.Tensor,
                 carry: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        out, handed_on = torch.empty(self.rows, self.width), []
        for i, (batch, a, b) in enumerate(zip(self.batches, self.offsets, self.offsets[1:])):
            h_batch = h[a:b].view(*batch.shape, *self.hidden_shape).to(self.device)
            y, nxt = skeleton.run_layer(k, layer, h_batch, batch, carry[i])
            out[a:b] = y.reshape(b - a, self.width).to("cpu", torch.float32)
            handed_on.append(on_device(nxt, torch.device("cpu")))
        return out, handed_on

    def _phase1(self, skeleton, k, layer, experts, block, router, weights, h, carry, types, members) -> _Step:
        got: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        ids = None if members is None else torch.tensor(members)

        def capture(hs: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *_, **__):
            idx = top_k_index.to("cpu")
            got.append((hs.detach().reshape(len(idx), -1).to("cpu", torch.float32),
                        idx if ids is None else ids[idx.clamp(0, len(ids) - 1)], top_k_weights.to("cpu", torch.float32)))
            return torch.zeros_like(hs)

        with torch.no_grad(), self._variant(block, router, weights, types, members):
            if experts is not None:
                experts.forward = capture
            try:
                out, handed = self._forward(skeleton, k, layer, h, carry)
            finally:
                if experts is not None:
                    del experts.forward
        step = _Step(types, members, out, handed)
        if got:
            step.x, step.idx, step.w = (torch.cat(p) for p in zip(*got))
        return step

    def _experts(self, k: int, experts: nn.Module, specs: list[TensorSpec], steps: dict[str, _Step],
                 imatrix: Imatrix, ahead: int) -> dict[str, torch.Tensor]:
        """Each stream's routed output: every expert its streams use read once, computed at each stream's types."""
        n = self.arch.n_expert
        routed = {name: torch.zeros(self.rows, self.moe_width) for name in steps}
        used = torch.zeros(n + 1, dtype=torch.bool)
        for s in steps.values():
            flat = s.idx.reshape(-1).clamp(0, n)  # ids at or beyond the expert count contribute nothing
            used[flat] = True
            s.slots = torch.argsort(flat, stable=True)
            s.starts = [0, *torch.cumsum(torch.bincount(flat, minlength=n + 1), 0).tolist()]
        order = torch.nonzero(used[:n]).reshape(-1).tolist()
        loader = ExpertLoader(self.arch, experts, specs, order, self.device, ahead)
        parts = (loader.gate.name, loader.up.name, loader.down.name)
        try:
            with torch.no_grad():
                for e in order:
                    ew = loader(e)
                    exact = None
                    held: dict[tuple, ExpertWeights] = {}
                    quantized: dict[tuple[str, T], torch.Tensor] = {}
                    for name, s in steps.items():
                        slots = s.slots[s.starts[e]:s.starts[e + 1]]
                        if not len(slots):
                            continue
                        top_k = s.idx.shape[1]
                        rows, slots = slots // top_k, slots % top_k
                        key = tuple(s.types.get(p) for p in parts)
                        if key not in held:
                            if exact is None:
                                exact = loader.parts(ew)
                            mats = []
                            for p, t in zip(parts, key):
                                if t is None:
                                    mats.append(exact[p])
                                    continue
                                if (p, t) not in quantized:
                                    values = held_values(exact[p].cpu().numpy(), t, imatrix.row(p, e), self.q)
                                    quantized[p, t] = torch.from_numpy(values).to(self.device)
                                mats.append(quantized[p, t])
                            held[key] = ew if all(t is None for t in key) else loader.fuse(*mats, e)
                        _, y = expert_output(experts, held[key], s.x[rows].to(self.device))
                        routed[name].index_add_(0, rows, (y * s.w[rows, slots, None].to(y.device)).to("cpu", torch.float32))
        finally:
            loader.close()
        return routed

    def _again(self, skeleton, k, layer, experts, block, router, weights, h, carry, step: _Step,
               routed: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The layer again with its experts handing back ``routed`` (a layer that does not add it as it is)."""
        where = [0]

        def hand_back(hs: torch.Tensor, *_, **__):
            a = where[0]
            where[0] += hs.reshape(-1, self.moe_width).shape[0]
            return routed[a:where[0]].reshape(hs.shape).to(hs.device, hs.dtype)

        with torch.no_grad(), self._variant(block, router, weights, step.types, step.members):
            experts.forward = hand_back
            try:
                return self._forward(skeleton, k, layer, h, carry)
            finally:
                del experts.forward

    # --- the logits ------------------------------------------------------------------------------------------

    def finish(self, skeleton: Skeleton, specs: list[TensorSpec], out_entries: dict[str, ImatrixEntry]
               ) -> StreamedProbes:
        """Every stream's KL divergence from the exact model, per held-out chunk (the final norm and the output
        matrix at each variant's type; on the CPU, where :meth:`StreamedRun.output` made the final norm real)."""
        t0 = time.perf_counter()
        out = next((s for s in specs if s.parsed.base == "output"), None) or \
            next(s for s in specs if s.parsed.base == "token_embd")  # tied: llama.cpp multiplies by the embedding
        lm = skeleton.model.get_output_embeddings()
        got: list[torch.Tensor] = []

        def capture(x: torch.Tensor) -> torch.Tensor:
            got.append(x.detach().reshape(-1, x.shape[-1]).float())
            return x.new_empty(*x.shape[:-1], 0)

        finals: dict[int, torch.Tensor] = {}  # by the hidden states' identity: streams sharing them share this
        lm.forward = capture
        try:
            with torch.no_grad():
                for name in [REF, *(v.name for v in self.variants)]:
                    h = self._input(name)[0]
                    if id(h) not in finals:
                        got.clear()
                        for batch, a, b in zip(self.batches, self.offsets, self.offsets[1:]):
                            skeleton.output_pass(h[a:b].view(*batch.shape, *self.hidden_shape))
                        finals[id(h)] = torch.cat(got)
        finally:
            del lm.forward
        x = {name: finals[id(self._input(name)[0])] for name in [REF, *(v.name for v in self.variants)]}
        row = Imatrix(out_entries, [], 0, 0).row(out.name, None) if out.name in out_entries else None
        kl = stream_kl(out, x, self.variants, row, self.arch.logit_softcap, self.q)
        measured = [v for v in self.variants if v.prune is None or v.name in self.pruned]
        positions, per_chunk = [], {v.name: [] for v in measured}
        for i, c in enumerate(self.request.chunks):
            a = self.start[i]
            positions.append(len(c) - 1)
            for v in measured:
                per_chunk[v.name].append(float(kl[v.name][a:a + len(c) - 1].mean()))
        self.seconds["logits"] += time.perf_counter() - t0
        info = dict(tokens=self.rows, chunks=len(self.request.chunks), seconds=round(sum(self.seconds.values()), 2),
                    seconds_by_part={k: round(v, 2) for k, v in self.seconds.items()},
                    left_exact=sorted(self.exact))
        return StreamedProbes(self.request.texts, self.request.text_of, positions, per_chunk, info)

    # --- resuming ------------------------------------------------------------------------------------------

    def save(self, state: CalibrationState) -> None:
        """The streams after the last complete layer, durably (``--resume`` continues them)."""
        arrays = {"exact": np.array(sorted(self.exact), dtype=str), "pruned": np.array(sorted(self.pruned), dtype=str),
                  "seconds": np.array([self.seconds[p] for p in SECONDS])}
        for name, h in self.hidden.items():
            if h is not None:
                arrays[f"hidden:{name}"] = h.numpy()
        for name, carry in self.carry.items():
            for i, c in enumerate(carry or []):
                for key, t in c.items():
                    arrays[f"carry:{name}:{i}:{key}"] = t.numpy()
        path = state.path / STATE_FILE
        state.write(path, lambda f: np.savez(f, **arrays), f"{path}: cannot write calibration state")

    def load(self, state: CalibrationState) -> bool:
        """The streams a kept calibration saved; False when it kept none."""
        path = state.path / STATE_FILE
        if not path.exists():
            return False
        with np.load(path) as z:
            for key in z.files:
                kind, _, rest = key.partition(":")
                if kind == "hidden":
                    self.hidden[rest] = torch.from_numpy(z[key])
                elif kind == "carry":
                    name, i, tensor = rest.rsplit(":", 2)
                    if self.carry.get(name) is None:
                        self.carry[name] = [{} for _ in self.batches]
                    self.carry[name][int(i)][tensor] = torch.from_numpy(z[key])
            self.exact, self.pruned = set(z["exact"].tolist()), set(z["pruned"].tolist())
            self.seconds = dict(zip(SECONDS, z["seconds"].tolist()))
        return True

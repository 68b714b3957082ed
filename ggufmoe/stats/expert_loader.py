"""The routed experts of one MoE layer, read from the checkpoint ahead of their use.

A streamed calibration computes a layer's routed experts one at a time over the tokens routed to
them (:func:`ggufmoe.stats.collect.route_experts`), so a 256-expert layer never has all its
experts in memory. :class:`ExpertLoader` reads them (gate, up and down of the layer's specs,
fused into ``gate_up`` as the module holds them: ``cat(gate, up)``, or gate and up interleaved row
by row for gpt-oss) in the order they will be asked for, a
bounded number of bytes ahead in a background thread, so the disk works while the CPU computes.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ggufmoe.arch.base import Architecture
from ggufmoe.model.finite import checked_finite
from ggufmoe.model.names import EXPERT_ORDER, EXPERT_TENSORS
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.stats.routed_experts import ExpertWeights
from ggufmoe.stats.skeleton import unsupported


class ExpertLoader:
    """Routed experts of one layer, read from the checkpoint in the order they will be asked for (``order``),
    up to ``ahead_bytes`` of them ahead in a background thread; ``loader(e)`` is expert ``e``'s
    :class:`ExpertWeights` in the fused module's layout, on the device."""

    def __init__(self, arch: Architecture, m: nn.Module, specs: list[TensorSpec], order: list[int],
                 device: torch.device, ahead_bytes: int, on_next=None):
        by_kind = {s.parsed.tensor: s for s in specs if s.is_expert}
        if set(by_kind) != EXPERT_TENSORS:
            raise unsupported(arch, f"layer experts {sorted(s.name for s in specs if s.is_expert)} are not "
                                    f"gate, up and down")
        if not getattr(m, "has_gate", True):
            raise unsupported(arch, "experts without a gate")
        self.gate, self.up, self.down = (by_kind[t] for t in EXPERT_ORDER)
        self.transposed = getattr(m, "is_transposed", False)
        self.concatenated = getattr(m, "is_concatenated", True)
        self.module = m  # its biases (small, loaded with the layer) are used as they are
        hidden, ff = self.gate.shape[2], self.gate.shape[1]
        want_gu, want_down = (hidden, 2 * ff) if self.transposed else (2 * ff, hidden), \
            (ff, hidden) if self.transposed else (hidden, ff)
        if tuple(m.gate_up_proj.shape[1:]) != want_gu or tuple(m.down_proj.shape[1:]) != want_down \
                or tuple(self.down.shape[1:]) != (hidden, ff):
            raise unsupported(arch, f"expert shapes {tuple(m.gate_up_proj.shape)}/{tuple(m.down_proj.shape)} do not "
                                    f"match the checkpoint's {self.gate.shape}/{self.down.shape}")
        self.nbytes = 3 * hidden * ff * 4
        self.n_ahead = max(1, ahead_bytes // self.nbytes)
        self.order, self.next = order, 0
        self.device, self.on_next = device, on_next
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ggufmoe-experts")
        self.pending: deque[tuple[int, Future]] = deque()

    def _load(self, e: int) -> ExpertWeights:
        gate, up, down = (torch.from_numpy(checked_finite(f"{s.name} (expert {e})", s.load(e)))
                          for s in (self.gate, self.up, self.down))  # (ff, hidden), (ff, hidden), (hidden, ff)
        return self._fused(gate, up, down)

    def _fused(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> ExpertWeights:
        # (2 ff, hidden) as transformers fuses them
        gate_up = torch.cat([gate, up]) if self.concatenated else torch.stack([gate, up], 1).reshape(-1, gate.shape[1])
        if self.transposed:
            gate_up, down = gate_up.T.contiguous(), down.T.contiguous()
        return ExpertWeights(gate_up, down)

    def fuse(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, e: int) -> ExpertWeights:
        """Expert ``e``'s weights from its matrices as the checkpoint stores them (:meth:`parts` undone), with its
        biases from the module."""
        w = self._fused(gate, up, down)
        return ExpertWeights(w.gate_up, w.down, *self.biases(e))

    def parts(self, w: ExpertWeights) -> dict[str, torch.Tensor]:
        """An expert's matrices as the checkpoint (and the GGUF) stores them, by spec name: the fusion undone."""
        gate_up, down = (w.gate_up.T, w.down.T) if self.transposed else (w.gate_up, w.down)
        ff = self.gate.shape[1]
        gate, up = (gate_up[:ff], gate_up[ff:]) if self.concatenated else (gate_up[0::2], gate_up[1::2])
        return {self.gate.name: gate, self.up.name: up, self.down.name: down}

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Expert ``e``'s (gate_up, down) biases from the module, or Nones."""
        m = self.module
        if not getattr(m, "has_bias", False):
            return None, None
        return m.gate_up_proj_bias[e], m.down_proj_bias[e]

    def _fill(self) -> None:
        while len(self.pending) < self.n_ahead and self.next < len(self.order):
            e = self.order[self.next]
            self.pending.append((e, self.pool.submit(self._load, e)))
            self.next += 1

    def __call__(self, e: int) -> ExpertWeights:
        if self.on_next is not None:
            self.on_next(e)
        self._fill()
        if not self.pending or self.pending[0][0] != e:
            raise RuntimeError(f"expert {e} asked for out of order")
        w = self.pending.popleft()[1].result()
        self._fill()
        return ExpertWeights(w.gate_up.to(self.device), w.down.to(self.device), *self.biases(e))

    def close(self) -> None:
        for _, f in self.pending:
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


"""The working-set bound of a streamed calibration (:mod:`ggufmoe.stats.stream`): how ``max_memory`` is spent
(where the hidden states live, the routed experts read ahead, the tokens per forward, what measuring the local
errors holds), and whether the disk has room for the hidden states mapped from files."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import torch

from ggufmoe.arch.base import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.stats.calib_state import HIDDEN, MOE_IN, ROUNDED_HIDDEN, ROUNDED_MOE_IN, CalibrationState
from ggufmoe.stats.error_meter import MAX_PENDING
from ggufmoe.stats.local_errors import LocalOptions
from ggufmoe.stats.probe_streams import ProbeStreams
from ggufmoe.stats.prune_error import PROBE_DIM, KeptSets
from ggufmoe.stats.text import BATCH_TOKENS, batches
from ggufmoe.units import format_size

MAX_AHEAD = 1024**3  # routed experts read ahead at most


@dataclass
class WorkingSet:
    """How the working set is spent (bytes, estimated): where the hidden states live, the experts read
    ahead, and the tokens per forward."""

    fixed: int  # one layer's weights and statistics, the experts in use and read ahead
    ahead: int
    stores: int  # the hidden states and the experts' input of every token
    in_memory: bool
    batch_tokens: int
    per_token: int  # activations of one token in a forward



class WorkingSetBound:
    """What of :class:`ggufmoe.stats.stream.StreamedRun` spends ``max_memory`` and lays out its batches."""

    arch: Architecture
    by_layer: dict[int | None, list[TensorSpec]]
    moe_layers: set[int]
    ids: torch.Tensor
    prefix: list[int]
    ctx: int
    rows: int
    width: int
    n_layers: int
    local: LocalOptions | None
    kept_sets: KeptSets | None
    batches: list[torch.Tensor]
    offsets: list[int]
    streams: ProbeStreams | None

    def working_set(self, max_memory: int, in_memory: bool | None) -> WorkingSet:
        """Spend ``max_memory``: hidden states in memory if they fit beside one layer's step, and as many
        whole chunks per forward as fit (at most ``BATCH_TOKENS`` tokens, as the whole-model path runs)."""
        cfg = self.arch.cfg

        def per_layer(size) -> int:
            return max((sum(size(s) for s in self.by_layer.get(k, [])) for k in range(self.n_layers)), default=0)

        weights = per_layer(lambda s: 0 if s.is_expert else s.n_elements * 4)
        expert = per_layer(lambda s: s.n_elements // s.n_parts * 4 if s.is_expert else 0)
        stats = per_layer(lambda s: s.n_parts * s.shape[-1] * 8)
        ahead = min(MAX_AHEAD, max(expert, max_memory // 16)) if expert else 0
        local = self.local_bytes(per_layer)
        fixed = weights + stats + ahead + expert + local + self.rows * self.arch.layer_output_bytes(self.ctx)
        if self.streams is not None:
            fixed += self.streams.nbytes(weights, expert)
        # a forward's activations per token: a few dozen hidden-wide tensors and a row of attention scores
        per_token = self.width * 4 * 24 + int(cfg.num_attention_heads) * self.ctx * 4
        if fixed + self.ctx * per_token > max_memory:
            raise GgufmoeError(f"--max-memory {format_size(max_memory)} is too small: one layer's step needs about "
                               f"{format_size(fixed + self.ctx * per_token)} (weights {format_size(weights)}, "
                               f"experts {format_size(ahead + expert)}, local-error samples {format_size(local)}, "
                               f"activations of one chunk {format_size(self.ctx * per_token)})")
        stores = (3 if self.moe_layers else 2) * self.rows * self.width * 4
        if in_memory is None:
            in_memory = fixed + stores + min(BATCH_TOKENS, self.rows) * per_token <= max_memory
        room = max_memory - fixed - (stores if in_memory else 0)
        batch_tokens = max(self.ctx, min(BATCH_TOKENS, room // per_token))
        self.batches = list(batches(self.ids, self.prefix, self.ctx, batch_tokens))
        self.offsets = np.cumsum([0] + [b.numel() for b in self.batches]).tolist()
        assert self.offsets[-1] == self.rows
        return WorkingSet(fixed, ahead, stores, in_memory, batch_tokens, per_token)

    def local_bytes(self, per_layer) -> int:
        """What measuring the local errors holds at most in one layer: the sampled inputs of its plain tensors,
        the queued expert samples, and the pruning probe's tokens and expert outputs."""
        o = self.local
        if o is None:
            return 0
        tokens = min(o.max_tokens, self.rows)
        plain = per_layer(lambda s: 0 if s.is_expert else tokens * s.shape[-1] * 4)
        widest = per_layer(lambda s: s.shape[-1] if s.is_expert else 0)
        queued = MAX_PENDING * min(o.expert_tokens, self.rows) * 2 * widest * 4
        # per sampled token: the experts' input (and a residual router's), each expert's output (whole for such
        # a router's layers, which run it through the layer's tail, else projected)
        inputs, kept = (2, self.width) if self.arch.residual_router else (1, min(self.width, PROBE_DIM))
        probe = min(o.prune_tokens, self.rows) * (inputs * self.width + self.arch.n_expert * kept) * 4 \
            if self.moe_layers and self.kept_sets else 0
        return plain + queued + probe

    def _check_disk(self, state: CalibrationState, working: WorkingSet) -> None:
        one = self.rows * self.width * 4
        need = (2 if working.in_memory else 3 if self.moe_layers else 2) * one \
            + 2 * self.rows * self.arch.layer_output_bytes(self.ctx)  # two layers' hand-over, for --resume
        if self.rounder is not None:  # the rounded model's hidden states and the model's own matmul inputs
            need += need + self.rows * 4 * max(sum({s.shape[-1] for s in specs if not s.is_expert})
                                               for specs in self.by_layer.values())
        kept = (*HIDDEN, MOE_IN, *ROUNDED_HIDDEN, ROUNDED_MOE_IN)
        have = sum(f.stat().st_size for f in state.path.iterdir() if f.name in kept)
        free = shutil.disk_usage(state.path).free
        if need - have > free:
            raise GgufmoeError(f"{state.path.parent}: not enough free disk for the calibration activations: "
                               f"needs {format_size(need)}, {format_size(free + have)} free")

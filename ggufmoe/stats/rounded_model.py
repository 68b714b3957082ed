"""The output-aware rounding's rounded model (:mod:`ggufmoe.stats.rounding`), carried through a streamed pass
(:mod:`ggufmoe.stats.stream`) beside the model itself: its hidden states between layers, its experts' input and what
its layers hand on, resumable as the run's own; each layer runs in it right after the model's own run of the layer."""

from __future__ import annotations

import torch

from ggufmoe.model.tensor import TensorSpec
from ggufmoe.stats.calib_state import OWN_INPUTS, ROUNDED_CARRY, ROUNDED_HIDDEN, ROUNDED_MOE_IN, CalibrationState
from ggufmoe.stats.hidden import RowStore
from ggufmoe.stats.layer_pass import LayerPasses
from ggufmoe.stats.rounded_embedding import round_embedding
from ggufmoe.stats.skeleton import Skeleton, embedding_rows
from ggufmoe.stats.working_set import WorkingSet


class RoundedModel:
    """The rounded model of a streamed run with output-aware rounding (``run.rounder``)."""

    def __init__(self, run: LayerPasses, state: CalibrationState, h_in: RowStore, h_out: RowStore,
                 moe_in: RowStore | None, carry: list[dict[str, torch.Tensor]], embedding: TensorSpec | None):
        self.run, self.state = run, state
        self.h_in, self.h_out, self.moe_in, self.carry = h_in, h_out, moe_in, carry
        self.embedding = embedding  # the table whose rows make the first layer's input, until they are made

    @classmethod
    def of(cls, run: LayerPasses, state: CalibrationState, embedding: TensorSpec, start: int,
           mem: bool) -> "RoundedModel":
        """At layer ``start``: when starting, the first layer's input is made from the ``embedding`` table once the
        model's own run of the layer has been seen (:meth:`embed`), else it is what was kept."""
        paths = [state.path / name for name in ROUNDED_HIDDEN]
        if start == 0:
            h_in = RowStore.create(paths[0], run.rows, run.width, mem)
        else:
            h_in = RowStore.open(paths[start % 2], run.rows, run.width, mem)
        h_out = RowStore.create(paths[(start + 1) % 2], run.rows, run.width, mem)
        moe_in = RowStore.create(state.path / ROUNDED_MOE_IN, run.rows, run.moe_width, mem) if run.moe_layers \
            else None
        run.rounder.store = lambda slot, width: RowStore.create(
            state.path / OWN_INPUTS.format(slot=slot, width=width), run.rows, width, mem)
        return cls(run, state, h_in, h_out, moe_in, state.load_carry(start - 1, len(run.batches), ROUNDED_CARRY),
                   embedding if start == 0 else None)

    def embed(self, skeleton: Skeleton, own_in: RowStore) -> None:
        """The first layer's input in the rounded model: the tokens' rows of the embedding table as the file holds
        it, through the model's forward up to its first layer. The table is rounded output-aware for the first
        matmuls that read it (:mod:`~ggufmoe.stats.rounded_embedding`; the model's own run of the layer, whose input
        is ``own_in``, just recorded theirs) unless it is the output matmul as well; else llama.cpp's rounding."""
        run, spec, self.embedding = self.run, self.embedding, None
        tied = not any(s.parsed.base == "output" for s in run.by_layer.get(None, []))
        ids = torch.cat([b.reshape(-1) for b in run.batches])
        table = not tied and round_embedding(run.rounder, spec, run.by_layer.get(0, []), own_in.tensor, ids,
                                             self.h_in.tensor)
        for batch, a, b in zip(run.batches, run.offsets, run.offsets[1:]):
            rows = self.h_in.tensor[a:b].reshape(*batch.shape, run.width).clone() if table \
                else run.rounder.as_written(spec, embedding_rows(spec, batch))
            self.h_in.tensor[a:b] = skeleton.capture(skeleton.input_embeddings(rows))[0][0].reshape(b - a, run.width)

    def layer(self, skeleton: Skeleton, k: int, own_in: RowStore, own_moe_in: RowStore | None,
              working: WorkingSet) -> None:
        """Layer ``k`` in the rounded model, rounded as it runs (the model's own run of it, whose input was
        ``own_in``, just recorded its inputs; ``own_moe_in``: its experts' input); then the rounder records the next
        run's."""
        run = self.run
        if self.embedding is not None:
            self.embed(skeleton, own_in)
        run.rounder.begin(recording=False)
        own_carry, run.carry, run.own_moe_in = run.carry, self.carry, own_moe_in
        try:
            run.layer(skeleton, k, self.h_in, self.h_out, self.moe_in, working)
        finally:
            self.carry, run.carry, run.own_moe_in = run.carry, own_carry, None
            run.rounder.begin(recording=True)

    def save(self, k: int) -> None:
        self.h_out.save()
        self.state.save_carry(k, self.carry, ROUNDED_CARRY)

    def done(self, k: int) -> None:
        self.state.drop_carry(k - 1, ROUNDED_CARRY)
        self.h_in.drop_pages()
        self.h_in, self.h_out = self.h_out, self.h_in

"""Float64 sums that statistics are made of: squared matmul inputs per expert (the importance matrix) and
per-expert routing (slots, routing-weight mass, REAP saliency), accumulated in float32 within a forward and
folded into float64 after it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ggufmoe.errors import GgufmoeError
from ggufmoe.stats.file import ExpertStats
from ggufmoe.stats.imatrix import ImatrixEntry


def square_sums(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(float32 sums of squares per column, number of rows) of ``x`` taken as rows of its last dimension."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return (x * x).sum(0), x.shape[0]


@dataclass
class Accumulator:
    """float64 sums of squared inputs, (n_expert, ne0), and token counts per expert."""

    n_expert: int
    ne0: int
    sum2: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum2 = torch.zeros(self.n_expert, self.ne0, dtype=torch.float64)
        self.counts = torch.zeros(self.n_expert, dtype=torch.float64)

    def add(self, x: torch.Tensor, expert: int = 0) -> None:
        """Add the rows of ``x`` (any leading shape) to ``expert``: float32 sums, folded into float64."""
        self.add_sums(*square_sums(x), expert)

    def add_sums(self, sum2: torch.Tensor, rows: int, expert: int = 0) -> None:
        if sum2.shape[0] != self.ne0:
            raise GgufmoeError(f"calibration: a matmul input has {sum2.shape[0]} columns, expected {self.ne0}")
        self.sum2[expert] += sum2.to("cpu", torch.float64)  # sums made on a GPU come back here
        self.counts[expert] += rows

    def fold(self, sum2: torch.Tensor, counts: torch.Tensor) -> None:
        """Add per-expert sums (n_expert, ne0) and counts (n_expert,) of one forward."""
        self.sum2 += sum2.to("cpu", torch.float64)
        self.counts += counts.to("cpu", torch.float64)

    def entry(self) -> ImatrixEntry:
        return ImatrixEntry(self.sum2.numpy().astype(np.float32), self.counts.numpy().astype(np.float32))


@dataclass
class RoutingAccumulator:
    """Per-expert routing statistics of one MoE layer, float64."""

    n_expert: int
    counts: torch.Tensor = field(init=False)
    weight_mass: torch.Tensor = field(init=False)
    reap_sum: torch.Tensor = field(init=False)
    n_tokens: int = 0

    def __post_init__(self) -> None:
        self.counts, self.weight_mass, self.reap_sum = (torch.zeros(self.n_expert, dtype=torch.float64)
                                                        for _ in range(3))

    def stats(self) -> ExpertStats:
        return ExpertStats(self.counts.numpy().copy(), self.weight_mass.numpy().copy(), self.reap_sum.numpy().copy(),
                           self.n_tokens)

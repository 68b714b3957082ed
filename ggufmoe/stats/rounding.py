"""The output-aware rounding (:mod:`ggufmoe.quant.aware`) carried by a streamed pass over the calibration text.

Each matmul's inputs are there as the pass runs the layer: a plain tensor's in phase 1 (every token), a routed
expert's while phase 2 has it loaded (its routed tokens, each weighted by its routing weight squared: an expert's error
reaches the layer's output scaled by that weight). Their second moments ``sum x x^T`` are kept in two parts: the tokens
of every :data:`HOLD_EVERY`-th chunk, held out to judge the rounding, and the rest, which the rounding fits. A plain
tensor is rounded once phase 1 has seen every token, in the row chunks the conversion reads
(:func:`~ggufmoe.model.parts.part_chunks`); an expert as soon as its tokens are through (one expert's moments at a time).
Each result (whichever of llama.cpp's rounding and ours has the lower output error on the held-out tokens) goes into a
:class:`~ggufmoe.quant.rounded_store.RoundedStore` for the conversion, with the same importance row the conversion gives
llama.cpp's quantizer, so that llama.cpp's candidate is exactly what the conversion would write.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ggufmoe.files import replace_atomically
from ggufmoe.model.parts import part_chunks
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.aware import Feedback, Rounded, can_round, group_of, round_tensor
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.rounded_store import RoundedStore
from ggufmoe.stats.imatrix import Imatrix, importance

HOLD_EVERY = 4  # every 4th chunk of the calibration tokens is held out of the rounding, to judge it
REPORT = "report.json"


@dataclass
class RoundingRequest:
    """What to round: the type each GGUF tensor is written at (the plan's), the importance rows the conversion gives
    llama.cpp's quantizer, and where the rounded tensors go."""

    types: dict[str, T]
    imatrix: Imatrix | None
    store: RoundedStore


@dataclass
class TensorReport:
    """One tensor's parts (expert slices, row chunks): how many kept the output-aware codes, and the held-out output
    errors of both roundings, summed."""

    parts: int = 0
    aware: int = 0
    error_llama: float = 0.0
    error_aware: float = 0.0
    error_kept: float = 0.0

    def add(self, r: Rounded) -> None:
        self.parts += 1
        self.aware += r.aware
        self.error_llama += r.error_llama
        self.error_aware += r.error_aware
        self.error_kept += min(r.error_llama, r.error_aware)

    @property
    def ratio(self) -> float:
        """The held-out output error kept, relative to llama.cpp's rounding's (1 without any)."""
        return self.error_kept / self.error_llama if self.error_llama > 0 else 1.0


@dataclass
class Moments:
    """``sum x x^T`` of a matmul's inputs: the fitted tokens' and the held-out tokens'."""

    fit: torch.Tensor
    held: torch.Tensor
    feedback: dict[int, Feedback] = field(default_factory=dict)  # by column group size, once the moments are complete

    @classmethod
    def of(cls, x: torch.Tensor, held: torch.Tensor, weight: torch.Tensor | None = None) -> "Moments":
        """Of rows ``x`` (float32, on the CPU), ``held`` marking the held-out ones, each row weighted by ``weight``."""
        w = torch.ones(len(x)) if weight is None else weight
        kept = x[held]
        out = (kept * w[held][:, None]).T @ kept
        return cls((x * w[:, None]).T @ x - out, out)

    def add(self, other: "Moments") -> None:
        self.fit += other.fit
        self.held += other.held


@dataclass
class Rounder:
    """The rounding's part of a streamed pass: :meth:`sample` takes plain matmul inputs (the run sets :attr:`offset`,
    the first row of the forward running), :meth:`plain` rounds a layer's plain tensors, :meth:`expert` one routed
    expert, :meth:`finish_layer` records what was done."""

    request: RoundingRequest
    ctx: int
    threads: int | None = None
    offset: int = 0
    wanted: set[str] = field(default_factory=set)
    report: dict[str, TensorReport] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.q = Quantizer(self.threads)
        self.moments: dict[str, Moments] = {}
        self._last: tuple[torch.Tensor, int, Moments] | None = None
        self.report = load_report(self.request.store)  # a resumed pass: the layers done already

    def close(self) -> None:
        self.q.close()

    def roundable(self, spec: TensorSpec) -> bool:
        t = self.request.types.get(spec.name)
        return t is not None and can_round(t) and len(spec.shape) == 2 + spec.is_expert

    def held(self, rows: torch.Tensor) -> torch.Tensor:
        """Which of the calibration rows ``rows`` are held out."""
        return (rows // self.ctx) % HOLD_EVERY == HOLD_EVERY - 1

    def sample(self, name: str, x: torch.Tensor) -> None:
        """A plain matmul's input (one row per token of the forward running)."""
        if name not in self.wanted:
            return
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:  # q, k and v: one input, one set of moments
            self.moments.setdefault(name, last[2])
            return
        flat = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32)
        m = Moments.of(flat, self.held(self.offset + torch.arange(len(flat))))
        acc = self.moments.setdefault(name, m)
        if acc is not m:
            acc.add(m)
        self._last = (x, x._version, acc)  # the reference keeps x alive, so identity is safe

    def plain(self, specs: list[TensorSpec]) -> None:
        """Round the plain tensors of ``specs`` whose inputs were sampled."""
        self._last = None
        for s in specs:
            m = self.moments.pop(s.name, None)
            if m is None or not self.roundable(s):
                continue
            rows = importance(s, 0, self.request.imatrix)
            if rows is not None and len(rows) > 1:
                continue
            for _, data in part_chunks(s, 0):
                self._round(s.name, data, None if rows is None else rows[0], m)

    def expert_rows(self, e: int, tokens: torch.Tensor, x: torch.Tensor, mid: torch.Tensor,
                    weights: torch.Tensor) -> None:
        """Some of expert ``e``'s routed tokens (calibration rows ``tokens``): its inputs ``x``, the down matmul's
        inputs ``mid`` and the routing ``weights``, added to its moments."""
        held = self.held(tokens.cpu())
        w2 = weights.detach().to("cpu", torch.float32) ** 2
        for key, rows in (("x", x), ("mid", mid)):
            m = Moments.of(rows.detach().to("cpu", torch.float32), held, w2)
            if key in self.moments:
                self.moments[key].add(m)
            else:
                self.moments[key] = m

    def expert(self, specs: dict[str, TensorSpec], e: int, parts: dict[str, torch.Tensor], down: str) -> None:
        """Round expert ``e``'s matrices (``parts``: by GGUF name, as the GGUF stores them) from the moments
        :meth:`expert_rows` gathered (``down``: the matrix whose inputs are the ``mid`` ones); then forget them."""
        x, mid = self.moments.pop("x", None), self.moments.pop("mid", None)
        for name, matrix in parts.items():
            spec = specs[name]
            if x is None or not self.roundable(spec):
                continue
            row = importance(spec, e, self.request.imatrix)
            self._round(name, matrix.detach().to("cpu", torch.float32).numpy(), None if row is None else row[0],
                        mid if name == down else x)

    def _round(self, name: str, rows: np.ndarray, importance_row: np.ndarray | None, m: Moments) -> None:
        t = self.request.types[name]
        fit = m.fit.double().numpy()
        group = group_of(t)
        if group not in m.feedback:  # once per input and group size: an expert's gate and up share it
            m.feedback[group] = Feedback.of(fit, group)
        r = round_tensor(rows, t, importance_row, fit, m.held.double().numpy(), self.q, m.feedback[group])
        self.request.store.put(rows, t, r.data)
        self.report.setdefault(name, TensorReport()).add(r)

    def finish_layer(self) -> None:
        """Forget the layer's inputs and record what was rounded so far (the report survives an interrupted pass)."""
        self.moments.clear()
        self._last = None
        path = self.request.store.path / REPORT
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({n: asdict(r) for n, r in sorted(self.report.items())}, indent=1)
        replace_atomically(path, lambda tmp: Path(tmp).write_text(text))


def load_report(store: RoundedStore) -> dict[str, TensorReport]:
    """What the pass kept in ``store`` has rounded so far, by tensor (nothing before its first layer)."""
    path = store.path / REPORT
    if not path.exists():
        return {}
    return {n: TensorReport(**r) for n, r in json.loads(path.read_text()).items()}


def summary(report: dict[str, TensorReport]) -> str:
    """One line: tensors and parts rounded, how many kept the output-aware codes, and the held-out output error kept
    against llama.cpp's rounding."""
    parts = sum(r.parts for r in report.values())
    aware = sum(r.aware for r in report.values())
    llama = sum(r.error_llama for r in report.values())
    kept = sum(r.error_kept for r in report.values())
    ratio = kept / llama if llama > 0 else 1.0
    return (f"output-aware rounding: {len(report)} tensors ({parts} parts), the output-aware codes kept in {aware}; "
            f"output error on held-out tokens {ratio:.3f}x llama.cpp's rounding")

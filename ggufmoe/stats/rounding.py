"""The output-aware rounding (:mod:`ggufmoe.quant.aware`) carried by a streamed pass over the calibration text.

The pass carries two models through every layer: the model itself and the model as rounded so far (every layer
before this one written as the file will hold it). Each layer runs first in the model itself, whose matmul inputs
are kept (:attr:`Rounder.recording`; the routed experts' input is the run's own store of it), then in the rounded
model, where each matmul's inputs ``x'`` are paired with the model's own ``x`` for the same tokens: the rounding
chooses codes that bring ``Q x'`` near ``W x`` (:func:`~ggufmoe.quant.aware.shift_of`), so a layer corrects part of
what the layers before it lost, and the rounded layer's outputs feed the next layer. On the reference model at uniform
Q4_K (``eval/results/rounding_inputs.md``, in transformers) this gave 0.65x llama.cpp's KL where fitting the model's
own inputs gave 0.75x and the rounded model's inputs alone 0.77x; through llama.cpp, 0.70x on eval_doc.txt and 0.74x
on the project's sources where the pass fitting the model's own inputs gave 0.78x and 0.87x
(``eval/results/rounding.md``).

The second moments ``sum x' x'^T`` and ``sum (x - x') x'^T`` are kept in two parts: the tokens of every
:data:`HOLD_EVERY`-th chunk, held out to judge the rounding, and the rest, which the rounding fits. A layer's plain
tensors are rounded one input at a time, in the order the forward reads them (q, k and v together, then the attention
output, ...; :meth:`Rounder.round_next`): each input's tensors once the rounded model's phase 1 has seen every token
with the tensors before them rounded, in the row chunks the conversion reads
(:func:`~ggufmoe.model.parts.part_chunks`), and handed back for the rounded model to run with (fitting the attention
output to inputs of a rounded q, k and v rather than of the layer as it came gave 0.65x llama.cpp's KL instead of
0.75x in ``eval/results/rounding_inputs.md``); a routed expert as soon as the rounded model has routed its tokens to
it (one expert's inputs at a time), its gate and up first (the down matmul's inputs are then those of the rounded gate
and up). Each result (whichever of llama.cpp's rounding and ours
has the lower error on the held-out tokens) goes into a :class:`~ggufmoe.quant.rounded_store.RoundedStore` for the
conversion, with the same importance row the conversion gives llama.cpp's quantizer, so that llama.cpp's candidate is
exactly what the conversion would write.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from gguf import GGMLQuantizationType as T

from ggufmoe.errors import GgufmoeError
from ggufmoe.files import replace_atomically
from ggufmoe.model.parts import part_chunks
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.aware import Feedback, Rounded, can_round, group_of, round_tensor, shift_of
from ggufmoe.quant.ggml import Quantizer, requires_imatrix
from ggufmoe.quant.held import held_values
from ggufmoe.quant.rounded_store import RoundedStore
from ggufmoe.stats.expert_loader import ExpertLoader
from ggufmoe.stats.hidden import RowStore
from ggufmoe.stats.imatrix import Imatrix, importance
from ggufmoe.stats.routed_experts import ExpertWeights, expert_output

HOLD_EVERY = 4  # every 4th chunk of the calibration tokens is held out of the rounding, to judge it
REPORT = "report.json"


@dataclass
class RoundingRequest:
    """What to round: the type each GGUF tensor is written at (the plan's), the importance rows the conversion gives
    llama.cpp's quantizer, where the rounded tensors go, and on how many threads (None: one per core)."""

    types: dict[str, T]
    imatrix: Imatrix | None
    store: RoundedStore
    threads: int | None = None


@dataclass
class TensorReport:
    """One tensor's parts (expert slices, row chunks): how many kept the output-aware codes, the held-out output
    errors of both roundings, and the tokens fitted per input column, summed."""

    parts: int = 0
    aware: int = 0
    error_llama: float = 0.0
    error_aware: float = 0.0
    error_kept: float = 0.0
    tokens: float = 0.0

    def add(self, r: Rounded, tokens_per_column: float) -> None:
        self.parts += 1
        self.tokens += tokens_per_column
        self.aware += r.aware
        self.error_llama += r.error_llama
        self.error_aware += r.error_aware
        self.error_kept += min(r.error_llama, r.error_aware)

    @property
    def ratio(self) -> float:
        """The held-out output error kept, relative to llama.cpp's rounding's (1 without any)."""
        return self.error_kept / self.error_llama if self.error_llama > 0 else 1.0

    @property
    def tokens_per_column(self) -> float:
        """The calibration tokens a part was fitted to, over its input's width, on average (an expert's: those routed
        to it)."""
        return self.tokens / self.parts if self.parts else 0.0


@dataclass
class Moments:
    """Of a matmul's inputs in the rounded model (``x'``) paired with the model's own (``x``): ``sum x' x'^T`` and
    ``sum (x - x') x'^T``, the fitted tokens' and the held-out tokens'."""

    fit: torch.Tensor
    held: torch.Tensor
    cross_fit: torch.Tensor
    cross_held: torch.Tensor
    tokens: int  # fitted
    feedback: dict[int, Feedback] = field(default_factory=dict)  # by column group size, once the moments are complete
    _shift: np.ndarray | None = None

    @classmethod
    def of(cls, x: torch.Tensor, own: torch.Tensor, held: torch.Tensor, weight: torch.Tensor | None = None) -> "Moments":
        """Of rows ``x`` and the model's own rows ``own`` (float32, on the CPU), ``held`` marking the held-out ones,
        each row weighted by ``weight``."""
        w = torch.ones(len(x)) if weight is None else weight
        wx, wd = x * w[:, None], (own - x) * w[:, None]
        both = wx.T @ x, wd.T @ x
        kept = wx[held].T @ x[held], wd[held].T @ x[held]
        return cls(both[0] - kept[0], kept[0], both[1] - kept[1], kept[1], int((~held).sum()))

    def add(self, other: "Moments") -> None:
        self.fit += other.fit
        self.held += other.held
        self.cross_fit += other.cross_fit
        self.cross_held += other.cross_held
        self.tokens += other.tokens

    def shift(self, device: torch.device | None = None) -> np.ndarray:
        """:func:`~ggufmoe.quant.aware.shift_of` for these inputs (once; solved on ``device``)."""
        if self._shift is None:
            self._shift = shift_of(self.fit.double().numpy(), self.cross_fit.double().numpy(), device)
        return self._shift


def require_held_out(rows: int, ctx: int) -> None:
    """Refuse calibration rows (tokens) that make no chunk of ``ctx`` to hold out of the rounding and judge it by."""
    if rows <= (HOLD_EVERY - 1) * ctx:
        raise GgufmoeError(f"--rounding aware: the calibration text makes {rows:,} tokens; the rounding fits "
                           f"{HOLD_EVERY - 1} of every {HOLD_EVERY} chunks of {ctx} tokens and is judged on the "
                           f"others: give a text of more than {(HOLD_EVERY - 1) * ctx:,} tokens (far more to gain: "
                           f"each routed expert is fitted to the tokens routed to it)")


@dataclass
class Rounder:
    """The rounding's part of a streamed pass. While :attr:`recording`, the model itself runs and :meth:`sample`
    keeps its plain matmul inputs (in stores ``store(slot, width)`` makes); else the rounded model runs: :meth:`sample`
    pairs its inputs with those, :meth:`plain` rounds a layer's plain tensors, :meth:`expert` one routed expert,
    :meth:`finish_layer` records what was done. The run sets :attr:`offset`, the first row of the forward running,
    and :attr:`tokens`, its count of tokens."""

    request: RoundingRequest
    ctx: int
    store: Callable[[int, int], RowStore] | None = None  # set by the run
    threads: int | None = None
    device: torch.device | None = None  # where the n^3 work of each input's factor and shift runs (the model's)
    offset: int = 0
    tokens: int = 0
    recording: bool = True
    wanted: set[str] = field(default_factory=set)
    report: dict[str, TensorReport] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.q = Quantizer(self.threads)
        self.moments: dict[str, Moments] = {}
        self.inputs: dict[str, RowStore] = {}  # the model's own inputs of the layer's plain matmuls, by tensor
        self._stores: dict[tuple[int, int], RowStore] = {}
        self._last: tuple[torch.Tensor, int, str] | None = None
        self.unfed: set[str] = set()  # rounded, but run as the model holds them (the run could not put them back)
        self.report = load_report(self.request.store)  # a resumed pass: the layers done already

    @classmethod
    def for_rows(cls, request: RoundingRequest, ctx: int, rows: int, device: torch.device | None = None) -> "Rounder":
        """The rounder of a pass over ``rows`` calibration rows in chunks of ``ctx``; refused when none of them would
        be held out to judge the rounding."""
        require_held_out(rows, ctx)
        return cls(request, ctx, threads=request.threads, device=device)

    def close(self) -> None:
        self.q.close()
        if self.unfed:
            names = sorted(self.unfed)
            print(f"output-aware rounding: {len(names)} tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                  f" rounded but run as the model holds them by the rounded model (the conversion changes their rows)",
                  file=sys.stderr)

    def roundable(self, spec: TensorSpec) -> bool:
        t = self.request.types.get(spec.name)
        return t is not None and can_round(t) and len(spec.shape) == 2 + spec.is_expert

    def want(self, specs: list[TensorSpec]) -> None:
        """A layer's (or the output's) tensors ``specs`` about to run: the plain ones to round are those whose inputs
        :meth:`sample` takes. What the report holds of them goes: a resumed pass reruns a layer that an interruption
        may have reported already, and counts its parts once."""
        self.wanted = {s.name for s in specs if not s.is_expert and self.roundable(s)}
        for s in specs:
            self.report.pop(s.name, None)

    def held(self, rows: torch.Tensor) -> torch.Tensor:
        """Which of the calibration rows ``rows`` are held out."""
        return (rows // self.ctx) % HOLD_EVERY == HOLD_EVERY - 1

    def table_type(self, spec: TensorSpec) -> tuple[T, np.ndarray | None] | None:
        """The type the file writes the token embedding ``spec`` at and the importance row the conversion gives
        llama.cpp's quantizer for it; None where the conversion does not quantize it so (no type, or one that needs an
        importance matrix the statistics do not have for it)."""
        t = self.request.types.get(spec.name)
        imp = importance(spec, 0, self.request.imatrix)
        if t is None or (imp is None and requires_imatrix(t)) or (imp is not None and len(imp) > 1):
            return None
        return t, None if imp is None else imp[0]

    def as_written(self, spec: TensorSpec, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` of the token embedding where the pass does not round it for its readers
        (:mod:`~ggufmoe.stats.rounded_embedding`) as the file will hold them: llama.cpp's rounding at its type, as the
        conversion makes it (rows are rounded independently); as they are where :meth:`table_type` has none."""
        typed = self.table_type(spec)
        if typed is None:
            return rows
        return torch.from_numpy(held_values(rows.numpy(), *typed, self.q))

    def begin(self, recording: bool) -> None:
        """A layer (or the output) about to run in the model itself (``recording``) or in the rounded model."""
        self.recording = recording
        self._last = None
        if recording:
            self.inputs.clear()

    def sample(self, name: str, x: torch.Tensor) -> None:
        """A plain matmul's input (one row per token of the forward running)."""
        if name not in self.wanted:
            return
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:  # q, k and v: one input
            if self.recording:
                self.inputs.setdefault(name, self.inputs[last[2]])
            else:
                self.moments.setdefault(name, self.moments[last[2]])
            return
        flat = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32)
        if len(flat) != self.tokens:  # not one row per token (compressed or widened streams): llama.cpp's rounding
            self.wanted.discard(name)
            return
        rows = slice(self.offset, self.offset + len(flat))
        self._last = (x, x._version, name)  # the reference keeps x alive, so identity is safe
        if self.recording:
            if name not in self.inputs:
                slot = len({id(s) for s in self.inputs.values()})
                self.inputs[name] = self._stores.get((slot, flat.shape[1])) or self._new_store(slot, flat.shape[1])
            self.inputs[name].tensor[rows] = flat
            return
        m = Moments.of(flat, self.inputs[name].tensor[rows], self.held(torch.arange(rows.start, rows.stop)))
        if name in self.moments:
            self.moments[name].add(m)
        else:
            self.moments[name] = m

    def _new_store(self, slot: int, width: int) -> RowStore:
        store = self._stores[(slot, width)] = self.store(slot, width)
        return store

    def plain(self, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
        """Round the plain tensors of ``specs`` whose inputs were sampled in the rounded model: their values as
        rounded (as the GGUF stores them), by name."""
        self._last = None
        out = {}
        for s in specs:
            m = self.moments.pop(s.name, None)
            if m is None or not self.roundable(s):
                continue
            rows = importance(s, 0, self.request.imatrix)
            if rows is not None and len(rows) > 1:
                continue
            out[s.name] = np.concatenate([self._round(s.name, data, None if rows is None else rows[0], m)
                                          for _, data in part_chunks(s, 0)])
        return out

    def inputs_taken(self) -> int:
        """How many distinct matmul inputs the rounded model's run has paired (q, k and v read one)."""
        return len({id(m) for m in self.moments.values()})

    def round_next(self, specs: list[TensorSpec], put: Callable[[TensorSpec, np.ndarray], bool]) -> None:
        """Round the plain tensors of ``specs`` that read the input the rounded model's run reached first (q, k and v
        together), handing each to ``put`` to run rounded from now on (False: it could not). The other inputs'
        moments are forgotten: they are taken again from a run with these rounded."""
        first = next(iter(self.moments.values()), None)
        group = [s for s in specs if first is not None and self.moments.get(s.name) is first]
        rounded = self.plain(group)
        self.wanted -= {s.name for s in group}
        self.moments.clear()
        for spec in group:
            if spec.name in rounded and not put(spec, rounded[spec.name]):
                self.unfed.add(spec.name)

    def expert(self, experts: nn.Module, loader: ExpertLoader, specs: dict[str, TensorSpec], e: int,
               ew: ExpertWeights, tokens: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
               own: torch.Tensor) -> torch.Tensor:
        """Round routed expert ``e`` of ``experts`` (its weights ``ew``, read by ``loader``; ``specs``: its
        matrices' by name) for the tokens the rounded model routed to it (calibration rows ``tokens``, routing
        ``weights``; ``x`` their inputs there, ``own`` the model's own): gate and up first, then down for what the
        rounded gate and up give it. Each token weighs its routing weight squared (an expert's error reaches the
        layer's output scaled by it). Returns how the expert's output on ``x`` changes, rounded."""
        held = self.held(tokens.cpu())
        w2 = weights.detach().to("cpu", torch.float32) ** 2
        parts = loader.parts(ew)
        names = (loader.gate.name, loader.up.name, loader.down.name)
        out = dict(parts)

        def run(matrices: dict[str, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return expert_output(experts, loader.fuse(*(matrices[n] for n in names), e), rows)

        def round_parts(which: tuple[str, ...], a: torch.Tensor, b: torch.Tensor) -> None:
            m = Moments.of(a.detach().to("cpu", torch.float32), b.detach().to("cpu", torch.float32), held, w2)
            for name in which:
                if not self.roundable(specs[name]):
                    continue
                row = importance(specs[name], e, self.request.imatrix)
                matrix = parts[name].detach().to("cpu", torch.float32).numpy()
                values = self._round(name, matrix, None if row is None else row[0], m)
                out[name] = torch.from_numpy(values).to(parts[name].device)

        round_parts(names[:2], x, own)
        round_parts(names[2:], run(out, x)[0], run(parts, own)[0])
        return run(out, x)[1] - expert_output(experts, ew, x)[1]

    def _round(self, name: str, rows: np.ndarray, importance_row: np.ndarray | None, m: Moments) -> np.ndarray:
        """``rows`` of tensor ``name`` rounded into the store; the values kept."""
        t = self.request.types[name]
        group = group_of(t)
        fit = m.fit.double().numpy()
        if group not in m.feedback:  # once per input and group size: an expert's gate and up share it
            m.feedback[group] = Feedback.of(fit, group, self.device)
        r = round_tensor(rows, t, importance_row, fit, m.held.double().numpy(), self.q, m.feedback[group],
                         m.shift(self.device), m.cross_held.double().numpy())
        self.request.store.put(rows, t, r.data)
        self.report.setdefault(name, TensorReport()).add(r, m.tokens / rows.shape[1])
        return gguf.quants.dequantize(r.data.reshape(len(rows), -1), t).astype(np.float32)

    def finish_layer(self) -> None:
        """Forget the layer's inputs; after the rounded model's run, record what was rounded so far (the report
        survives an interrupted pass)."""
        self.moments.clear()
        self._last = None
        if self.recording:
            return
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
    """One line: tensors and parts rounded, how many kept the output-aware codes, the held-out output error kept
    against llama.cpp's rounding, and the tensor fitted to the fewest tokens per input column (the gain shrinks with
    them: ``eval/results/rounding_inputs.md``)."""
    parts = sum(r.parts for r in report.values())
    aware = sum(r.aware for r in report.values())
    llama = sum(r.error_llama for r in report.values())
    kept = sum(r.error_kept for r in report.values())
    ratio = kept / llama if llama > 0 else 1.0
    counted = [n for n, r in report.items() if r.tokens]  # (a pass resumed from an older version's report: not)
    fewest = min(counted, key=lambda n: report[n].tokens_per_column, default=None)
    least = "" if fewest is None else (f"; the fewest fitted tokens per input column: {fewest}'s parts, "
                                       f"{report[fewest].tokens_per_column:.1f} on average")
    return (f"output-aware rounding: {len(report)} tensors ({parts} parts), the output-aware codes kept in {aware}; "
            f"output error on held-out tokens {ratio:.3f}x llama.cpp's rounding{least}")

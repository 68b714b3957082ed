"""The end-to-end probes of a streamed calibration (:mod:`ggufmoe.stats.probe_streams`): what they are
(:class:`Variant`, :class:`ProbeRequest`) and what they measured (:class:`StreamedProbes`, stored in the statistics
file as the JSON key :data:`KEY`; llama.cpp ignores it). Plain data: no torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
from gguf import GGMLQuantizationType as T

KEY = "ggufmoe.streamed_probes"
VERSION = 1
TARGET_STDERR = 0.05  # the relative standard error the summary says how many chunks would take


@dataclass(frozen=True)
class Variant:
    """One probe: the tensors a file would store at quantized types (GGUF name -> the type written; the others
    exact), and optionally a pruning: (criterion, candidate) of the calibration's kept sets."""

    name: str
    types: Mapping[str, T] = field(default_factory=dict)
    prune: tuple[str, str] | None = None


@dataclass
class ProbeRequest:
    """The probes a calibration carries and the held-out chunks (token ids, by text) they run on."""

    variants: list[Variant]
    texts: list[str]  # names
    chunks: list[list[int]]
    text_of: list[int]  # per chunk

    def key(self) -> str:
        """A digest of the probes and their tokens (a kept calibration resumes only with the same)."""
        h = hashlib.sha256(repr([(v.name, sorted((n, t.name) for n, t in v.types.items()), v.prune)
                                 for v in self.variants]).encode())
        h.update(repr((self.texts, self.chunks, self.text_of)).encode())
        return h.hexdigest()


@dataclass
class StreamedProbes:
    """Per probe (a variant's name), the mean KL divergence from the exact model of each held-out chunk; which text
    each chunk is from and how many positions it scores."""

    texts: list[str]  # the held-out texts' names
    text_of: list[int]  # per chunk: its text
    positions: list[int]  # per chunk: the positions scored (its tokens less one)
    kl: dict[str, list[float]] = field(default_factory=dict)  # probe -> per-chunk mean KL
    info: dict = field(default_factory=dict)  # how they were measured (tokens, seconds, tensors left exact)

    def mean(self, probe: str) -> float:
        """The probe's KL over every scored position of every text."""
        return float(np.average(self.kl[probe], weights=self.positions))

    def by_text(self, probe: str) -> dict[str, float]:
        """The probe's KL on each text."""
        kl, w, of = np.array(self.kl[probe]), np.array(self.positions), np.array(self.text_of)
        return {t: float(np.average(kl[of == i], weights=w[of == i])) for i, t in enumerate(self.texts)
                if (of == i).any()}

    def of_text(self, text: str) -> "StreamedProbes":
        """The probes of one text's chunks alone."""
        i = self.texts.index(text)
        mine = [c for c, of in enumerate(self.text_of) if of == i]
        return StreamedProbes([text], [0] * len(mine), [self.positions[c] for c in mine],
                              {p: [kl[c] for c in mine] for p, kl in self.kl.items()}, self.info)

    def rel_stderr(self, probe: str) -> float:
        """The relative standard error of :meth:`mean` over the chunks (inf with one chunk)."""
        kl = np.array(self.kl[probe])
        m = self.mean(probe)
        if len(kl) < 2 or m <= 0:
            return float("inf")
        return float(kl.std(ddof=1) / np.sqrt(len(kl)) / m)

    def chunks_for(self, probe: str, target: float = TARGET_STDERR) -> int:
        """Chunks per text that would bring the probe's relative standard error to ``target`` (it falls as the
        square root of the chunks); needs two chunks or more."""
        per_text = len(self.positions) / max(1, len(self.texts))
        return max(1, int(np.ceil(per_text * (self.rel_stderr(probe) / target) ** 2)))

    def summary(self) -> str:
        """One line: what the probes ran on and how precise they are, with the chunks a 5% error would take."""
        head = f"probes: {len(self.kl)} on {sum(self.positions):,} held-out tokens of {len(self.texts)} text(s); "
        if len(self.positions) < 2:
            return head + "one chunk: no standard error (--probe-chunks 2 or more gives one)"
        kinds = {"quantization": [p for p in self.kl if not p.startswith("prune:")],
                 "pruning": [p for p in self.kl if p.startswith("prune:")]}
        parts = []
        for kind, probes in kinds.items():
            if probes:
                worst = max(probes, key=self.rel_stderr)
                parts.append(f"{kind} up to {100 * self.rel_stderr(worst):.0f}% ({self.chunks_for(worst)} chunks per "
                             f"text for {100 * TARGET_STDERR:.0f}%)")
        return head + "relative standard error " + ", ".join(parts)

    def to_json(self) -> str:
        return json.dumps(dict(version=VERSION, **asdict(self)))

    @classmethod
    def from_json(cls, text: str) -> "StreamedProbes | None":
        """None for another version (measured again)."""
        d = json.loads(text)
        if d.pop("version", None) != VERSION:
            return None
        return cls(**d)

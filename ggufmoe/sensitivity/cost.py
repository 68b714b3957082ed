"""The cost model: the KL divergence each tensor adds at each llama.cpp type.

The memory-budget planner (:mod:`ggufmoe.plan.allocate`) picks one type per tensor; it needs, for every
quantizable tensor (GGUF name; the 3-D expert tensor of a layer is one tensor) and every type in
:data:`CANDIDATES`, a predicted cost: the mean KL divergence (nats/token) added when that tensor
alone is stored at that type and everything else is exact. The planner adds them up; what a whole
plan costs is that sum through :meth:`Sensitivity.combined`, a power law measured on whole-model probes
(tensors quantized together are not additive: on the reference model the sum of the one-class probes
at Q3_K is 1.3x the KL of the model at Q3_K, and 2x at Q5_K).

A :class:`Sensitivity` holds those costs, measured (:mod:`ggufmoe.pipeline.measure`: errors from
:mod:`.quant_error`, calibrated by :mod:`.fit`) or from shapes alone (:mod:`.defaults`), and is cached
in the stats file (:mod:`.cache`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Mapping

from gguf import GGMLQuantizationType as T

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.qtypes import CANDIDATES
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import requires_imatrix
from ggufmoe.model.names import EMBEDDING, role
from ggufmoe.quant.rules import EMBEDDING_SUBSTITUTE

PROBE_TYPE = T.Q3_K  # the anchor type: each class is calibrated there (see :mod:`.fit`)
JOINT_TYPES = (T.IQ2_XXS, T.Q3_K, T.Q5_K)  # whole-model probes that measure what tensors cost together
PROBE_CHUNKS = 8  # held-out chunks per text the streamed probes run on (relative standard error ~5% on the reference)
METHOD_VERSION = 3  # part of the cache key: a new version measures again


class SensitivityMode(StrEnum):
    """How a budget plan's costs are made from the statistics (``--sensitivity``): probes through llama.cpp, the
    end-to-end probes the streamed calibration carried, the calibration's local errors alone, or ``auto`` (probes
    through llama.cpp for a small model; for a big one the streamed probes, else the local errors)."""

    AUTO = "auto"
    PROBES = "probes"
    STREAMED = "streamed"
    LOCAL = "local"


@dataclass
class Sensitivity:
    cost: dict[str, dict[str, float]]  # tensor -> type name -> predicted KL (nats/token), that tensor alone
    measured: bool  # calibrated against KL measured through llama.cpp (False: defaults)
    scales: dict[str, float]  # tensor class -> KL per unit of error
    error: dict[str, dict[str, float]] = field(default_factory=dict)  # the error the costs scale
    probes: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> type -> measured KL
    exponents: dict[str, float] = field(default_factory=dict)  # class -> KL-vs-error exponent (power_costs)
    layer_probes: dict[str, float] = field(default_factory=dict)  # layer group ("0-2") -> measured KL at the anchor
    layer_factors: dict[str, float] = field(default_factory=dict)  # layer group -> factor on its tensors' costs
    info: dict = field(default_factory=dict)  # how it was measured (sampling, tokens, times, checks)
    joint: list[float] = field(default_factory=lambda: [1.0, 1.0])  # (a, b): a whole plan's KL = a * sum ** b

    def combined(self, total: float) -> float:
        """Predicted KL of a whole assignment whose costs sum to ``total`` (:attr:`joint`)."""
        a, b = self.joint
        return a * total ** b if total > 0 else 0.0

    def predict(self, types: Mapping[str, str | T] | str | T) -> float:
        """Predicted KL of an assignment (tensor -> type; tensors not named stay exact), or of one type
        for every tensor (the embedding takes ``EMBEDDING_SUBSTITUTE`` when the type needs an
        importance matrix, as ``convert --type`` does)."""
        if not isinstance(types, (str, T)):
            return sum(self.cost[n][_name(t)] for n, t in types.items() if n in self.cost)
        t = _name(types)
        total = 0.0
        for name, c in self.cost.items():
            if t not in c and role(name) == EMBEDDING:
                t_here = EMBEDDING_SUBSTITUTE.name
            elif t not in c:
                raise GgufmoeError(f"{name}: no cost for type {t} (it needs an importance matrix)")
            else:
                t_here = t
            total += c[t_here]
        return total

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Sensitivity":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        return cls(**{k: d[k] for k in ("cost", "measured", "scales", "error", "probes", "exponents", "layer_probes",
                                         "layer_factors", "info", "joint")
                      if k in d})


def _name(t: str | T) -> str:
    return t.name if isinstance(t, T) else str(t).upper()


def candidates_for(spec: TensorSpec, has_imatrix: bool) -> list[T]:
    """Candidate types of a tensor: those needing an importance matrix only when it has one."""
    return [t for t in CANDIDATES if has_imatrix or not requires_imatrix(t)]


def active_elements(spec: TensorSpec, n_expert: int, top_k: int) -> float:
    """Elements a token uses: expert tensors count ``top_k / n_expert`` of theirs."""
    return spec.n_elements * (top_k / n_expert if spec.is_expert else 1.0)


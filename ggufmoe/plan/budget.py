"""A memory budget, and the plan that meets it: which experts to keep and one llama.cpp type per
tensor, as written to PLAN.json and executed by ``convert --plan``.

The plan is chosen by :mod:`ggufmoe.plan.allocate` (made by ``ggufmoe plan``:
:func:`ggufmoe.pipeline.budget.build_plan`) and shown by :mod:`ggufmoe.plan.report`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType as T

from ggufmoe.errors import GgufmoeError
from ggufmoe.outputs import write_output
from ggufmoe.plan.target import HOST, Target, parse_target
from ggufmoe.prune.criteria import Pruning
from ggufmoe.quant.rules import TypeRules


@dataclass
class Budget:
    """What a plan must fit (``total`` bytes of memory, or of file with ``weights_only``), and how it may get
    there: ``top_k_auto`` lets it change the experts used per token; ``max_active`` caps the weight bytes one
    token reads (a speed target: decoding is bound by them); ``keep`` fixes the experts kept per layer (only the
    types are chosen). ``target``: the machine it runs on; with a cuda target ``total`` is host memory and the
    target's GPU memory must hold the offloaded rest."""

    total: int
    ctx: int = 8192
    kv_type: str = "f16"
    weights_only: bool = False
    top_k_auto: bool = False
    max_active: int | None = None
    target: Target = HOST
    keep: int | None = None


@dataclass
class Plan:
    """A plan as written to PLAN.json and executed by ``convert --plan``."""

    source: str
    architecture: str
    budget: int
    ctx: int
    kv_type: str
    weights_only: bool
    n_expert: int
    top_k_source: int
    keep: int
    top_k: int
    criterion: str
    kept: dict[int, list[int]]
    types: dict[str, str]
    tensor_bytes: dict[str, int]
    file_bytes: int
    memory: dict[str, int]
    predicted_kld: dict[str, float]
    stats: str | None = None
    active_bytes: int = 0  # weight bytes one token reads (the routed experts it uses, one embedding row)
    candidates: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target: str = "host"  # the --target planned for (plans saved before targets existed: host)

    def save(self, path: Path) -> None:
        """Write PLAN.json atomically."""
        text = json.dumps(asdict(self), indent=1)
        write_output(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            d = json.loads(Path(path).read_text())
            d["kept"] = {int(k): v for k, v in d["kept"].items()}
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise GgufmoeError(f"{path}: not a ggufmoe plan ({e})") from None

    def machine(self) -> Target:
        """The target planned for."""
        return parse_target(self.target)

    def pruning(self) -> Pruning:
        return Pruning(self.n_expert, self.top_k_source, self.keep, self.top_k, self.criterion, 0.5, self.kept)

    def type_rules(self) -> TypeRules:
        return TypeRules.exact({name: T[t] for name, t in self.types.items()})


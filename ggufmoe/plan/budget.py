"""A memory budget, and the plan that meets it: which experts to keep and one llama.cpp type per
tensor, as written to PLAN.json and executed by ``convert --plan``.

The plan is chosen by :mod:`ggufmoe.plan.allocate` (made by ``ggufmoe plan``:
:func:`ggufmoe.pipeline.planning.build_plan`) and shown by :mod:`ggufmoe.plan.report`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from gguf import GGMLQuantizationType as T

from ggufmoe.arch import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.outputs import write_output
from ggufmoe.plan.kv_types import DEFAULT_KV_TYPE, KvType
from ggufmoe.plan.target import HOST, Target, parse_target
from ggufmoe.prune.apply import prune_model
from ggufmoe.prune.criteria import DEFAULT_CRITERION, Criterion, Pruning
from ggufmoe.quant.rules import TypedTensor, TypeRules
from ggufmoe.sensitivity.cost import SensitivityMode


# The context every command plans, validates and reports memory at unless told (llama-server's default)
DEFAULT_CTX = 4096


@dataclass
class Budget:
    """What a plan must fit (``total`` bytes of memory, or of file with ``weights_only``), and how it may get
    there: ``top_k_auto`` lets it change the experts used per token; ``max_active`` caps the weight bytes one
    token reads (a speed target: decoding is bound by them); ``keep`` fixes the experts kept per layer (only the
    types are chosen); ``criterion`` which experts a pruning keeps; ``sensitivity`` how costs are made
    (:func:`ggufmoe.pipeline.planning.build_plan`). ``target``: the machine it runs on; with a cuda target ``total``
    is host memory and the target's GPU memory must hold the offloaded rest."""

    total: int
    ctx: int = DEFAULT_CTX
    kv_type: KvType = DEFAULT_KV_TYPE
    weights_only: bool = False
    top_k_auto: bool = False
    max_active: int | None = None
    target: Target = HOST
    keep: int | None = None
    criterion: Criterion = DEFAULT_CRITERION  # which experts a pruning keeps
    sensitivity: SensitivityMode = SensitivityMode.AUTO  # how tensor and pruning costs are made

    def command_options(self) -> list[str]:
        """The ``plan``/``convert --budget`` options that give this budget, but for its total (``--budget``)."""
        return ["--ctx", str(self.ctx), "--kv-type", str(self.kv_type),
                *(["--weights-only"] if self.weights_only else []),
                *(["--target", str(self.target)] if self.target != HOST else []),
                *(["--top-k", "auto"] if self.top_k_auto else []),
                *(["--max-active", str(self.max_active)] if self.max_active else []),
                *(["--keep", str(self.keep)] if self.keep else []),
                "--criterion", str(self.criterion), "--sensitivity", str(self.sensitivity)]


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
    model_fingerprint: str | None = None  # :func:`model_fingerprint` of the source (plans saved before it: None)
    # probe text -> predicted KL (prune, quant, total) on text like it (streamed probes on several texts)
    predicted_by_text: dict[str, dict[str, float]] = field(default_factory=dict)
    costs: dict[str, list[float]] = field(default_factory=dict)  # tensor -> [its cost alone, its KL-vs-error exponent]
    joint: list[float] = field(default_factory=lambda: [1.0, 1.0])  # the costs' joint map (a, b): KL = a * sum ** b
    rounding: dict = field(default_factory=dict)  # what the KL is predicted to be with output-aware rounding

    def price_rounding(self, error_ratio: Mapping[str, float]) -> None:
        """Price the planned types as rounded output-aware (fills :attr:`rounding`): a tensor's cost follows its
        error to the power of its exponent, so each cost is scaled by the ratio of its output error (held-out tokens)
        to llama.cpp's rounding's to that power; the quantization KL by the joint map's ratio of the sums (the
        pruning's is unchanged). Tensors without a ratio keep their cost."""
        plain = sum(c for c, _ in self.costs.values())
        rounded = sum(c * error_ratio.get(n, 1.0) ** b for n, (c, b) in self.costs.items())
        factor = (rounded / plain) ** self.joint[1] if plain > 0 else 1.0

        def scaled(kl: dict[str, float]) -> dict[str, float]:
            return dict(prune=kl["prune"], quant=kl["quant"] * factor, total=kl["prune"] + kl["quant"] * factor)

        self.rounding = dict(method="aware", quant_factor=factor, predicted_kld=scaled(self.predicted_kld),
                             predicted_by_text={t: scaled(kl) for t, kl in self.predicted_by_text.items()})

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

    def mismatch(self, arch: Architecture) -> str | None:
        """Why the plan is not one for ``arch``'s model, or None: another :func:`model_fingerprint`, another
        expert count, a tensor of the conversion without a planned type (or a planned one it lacks), or a
        tensor whose planned bytes are not what its type makes of it here."""
        why = self._tensor_mismatch(arch)
        if self.model_fingerprint not in (None, model_fingerprint(arch)):
            return f"its source {self.source} has other tensors" + (f": {why}" if why else "")
        return why

    def _tensor_mismatch(self, arch: Architecture) -> str | None:
        if self.n_expert != arch.n_expert:
            return f"{self.n_expert} experts per layer, this model has {arch.n_expert}"
        _, specs = prune_model(arch, self.pruning())
        names = {s.name for s in specs}
        missing = next((s.name for s in specs if s.name not in self.types), None)
        if missing:
            return f"no type for {missing}"
        extra = next((n for n in self.types if n not in names), None)
        if extra:
            return f"this model has no {extra}"
        for s in specs:
            n = TypedTensor(s, T[self.types[s.name]]).nbytes
            if n != self.tensor_bytes.get(s.name):
                return f"{s.name} is {n} bytes in this model, {self.tensor_bytes.get(s.name)} planned"
        return None


def model_fingerprint(arch: Architecture) -> str:
    """What a plan is made for: SHA-256 of the architecture and the conversion's tensors before pruning (names
    and shapes, in order).

    Not :mod:`ggufmoe.source.fingerprint` (files' paths, sizes and times, what caches of the very same files
    compare): a plan is a type and planned bytes per tensor, which any source giving these tensors executes
    exactly, so a checkpoint moved or copied, or the checkpoint of the configuration a plan was made from
    alone, must still take it. A model of the very same shapes (a fine-tune) is not told apart: its plan
    still writes the planned bytes, with experts chosen from the other model's statistics."""
    h = hashlib.sha256(arch.gguf_arch.encode())
    for s in arch.tensors():
        h.update(f"\n{s.name} {tuple(s.shape)}".encode())
    return h.hexdigest()

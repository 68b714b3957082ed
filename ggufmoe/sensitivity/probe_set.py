"""Which probes calibrate the cost model, through llama.cpp (:mod:`ggufmoe.pipeline.measure`) or inside the streamed
calibration (:mod:`ggufmoe.sensitivity.streamed`): each tensor class at the anchor type
(:data:`~ggufmoe.sensitivity.cost.PROBE_TYPE`), each run of consecutive layers at the anchor
(:func:`~ggufmoe.sensitivity.fit.layer_groups`), the whole model at each of
:data:`~ggufmoe.sensitivity.cost.JOINT_TYPES`, and prunings (:func:`~ggufmoe.sensitivity.prune_cost.probe_prunings`)."""

from __future__ import annotations

import re

from gguf import GGMLQuantizationType as T

from ggufmoe.arch.base import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.prune.criteria import PruneRequest, prune_key
from ggufmoe.quant.held import EXACT
from ggufmoe.quant.rules import TypeRules, quantizable
from ggufmoe.sensitivity.cost import JOINT_TYPES, PROBE_CHUNKS, PROBE_TYPE
from ggufmoe.sensitivity.fit import layer_groups
from ggufmoe.sensitivity.prune_cost import probe_prunings
from ggufmoe.stats.probe_results import ProbeRequest, Variant
from ggufmoe.stats.text import MAX_TEXT_TOKENS, spread_chunks, token_chunks

LAYER_PROBES = 8  # runs of consecutive layers probed at most
PROBE_MAX_BYTES = 2 * 1024**3  # F16 size up to which a model is probed through llama.cpp (``--sensitivity auto``)
STREAMED_EXACT = EXACT | {T.F16, T.BF16}  # types a streamed probe holds as the exact model does (as the F16 base)


def probe_kinds(specs: list[TensorSpec]) -> dict[str, list[str]]:
    """Tensor class -> its tensors (of ``specs``, the quantizable ones)."""
    kinds: dict[str, list[str]] = {}
    for s in specs:
        kinds.setdefault(s.kind, []).append(s.name)
    return kinds


def class_rules(names: list[str], t: T) -> TypeRules:
    """``names`` at type ``t``, everything else F16 (a probe's conversion)."""
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return TypeRules(T.F16, [(re.compile(pattern), t)])


def streamed_variants(arch: Architecture, specs: list[TensorSpec]) -> list[Variant]:
    """The probes a streamed calibration carries, named ``class:KIND:TYPE``, ``layers:FIRST-LAST:TYPE``,
    ``all:TYPE`` and ``prune:CRITERION:KEY``."""
    specs = [s for s in specs if quantizable(s)]

    def types(rules: TypeRules) -> dict[str, T]:
        return {s.name: t for s in specs if (t := rules.type_for(s)) not in STREAMED_EXACT}

    anchor = PROBE_TYPE
    out = [Variant(f"class:{kind}:{anchor.name}", types(class_rules(names, anchor)))
           for kind, names in probe_kinds(specs).items()]
    out += [Variant(f"layers:{g}:{anchor.name}", types(class_rules(names, anchor)))
            for g, names in layer_groups(specs, LAYER_PROBES).items()]
    # the anchor's first: the layer probes' held copies of the weights at it are used again (streams/held_weights.py)
    out += [Variant(f"all:{t.name}", types(TypeRules(t))) for t in sorted(JOINT_TYPES, key=lambda t: t != anchor)]
    if any(s.is_expert for s in specs):
        out += [Variant(prune_name(req, arch), prune=(str(req.criterion), prune_key(req.keep, arch.top_k, arch.top_k)))
                for req in probe_prunings(arch, True)]
    return out


def prune_name(req: PruneRequest, arch: Architecture) -> str:
    """The streamed probe's name of pruning ``req`` (at the model's top-k)."""
    return f"prune:{req.criterion}:{prune_key(req.keep, arch.top_k, arch.top_k)}"


def too_big_to_probe(arch: Architecture) -> bool:
    """Whether a model is above :data:`PROBE_MAX_BYTES` in F16: planned from streamed probes, not through llama.cpp."""
    return 2 * sum(s.n_elements for s in arch.tensors()) > PROBE_MAX_BYTES


def probe_request(arch: Architecture, tokenizer, texts: dict[str, str], ctx: int,
                  chunks: int = PROBE_CHUNKS) -> ProbeRequest:
    """The streamed probes of ``arch`` on ``chunks`` chunks of ``ctx`` tokens spread over each of ``texts`` (name ->
    held-out text; an empty one is left out)."""
    names, all_chunks, text_of = [], [], []
    for name, text in texts.items():
        if not text.strip():
            continue
        picked = spread_chunks(token_chunks(tokenizer, text, ctx, MAX_TEXT_TOKENS), chunks)
        names.append(name)
        all_chunks += picked
        text_of += [len(names) - 1] * len(picked)
    if not all_chunks:
        raise GgufmoeError("the streamed probes need held-out text: the calibration text is too short to hold pieces "
                           "out of it; pass --probe-text FILE")
    return ProbeRequest(streamed_variants(arch, list(arch.tensors())), names, all_chunks, text_of)

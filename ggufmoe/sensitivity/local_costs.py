"""Costs from local errors alone: the streamed calibration's measurements (:mod:`ggufmoe.stats.local_errors`,
:mod:`ggufmoe.stats.prune_error`) mapped to KL divergence without a single run through llama.cpp —
how a model too big to probe is planned.

Quantization: ``cost = LOCAL_SCALES[class] * depth(x) * r(Q3_K) * (r(t) / r(Q3_K)) ** LOCAL_EXPONENTS[class]``
with ``r`` the tensor's relative local error at each type and ``x = (layer + 0.5) / layers`` its
relative depth (``depth`` interpolates :data:`LOCAL_DEPTH`; 1 outside the blocks). Pruning:
``cost = PRUNE_SCALE * (sum over MoE layers of depth(x) * r_prune) ** PRUNE_EXPONENT`` (:mod:`ggufmoe.sensitivity.prune_cost`). A plan's quantization
cost is the sum of its tensors' through :data:`LOCAL_JOINT` (:meth:`~ggufmoe.sensitivity.cost.Sensitivity.combined`).

The tables are the reference model's (refmoe-qwen3): its class costs per unit of local error and their
log-log slopes, the depth profile of its layer probes, and its measured pruning KL, from
:func:`derive_local_defaults` (``python eval/derive_defaults.py``, which prints them). Classes the
reference lacks take their closest relative's (:func:`ggufmoe.sensitivity.defaults.default_class`);
tensors with no local error (MLA's ``attn_k_b``/``attn_v_b``) take the shape defaults of
:mod:`ggufmoe.sensitivity.defaults`.

A model small enough to probe is measured instead (:mod:`ggufmoe.pipeline.measure`): the same local
errors, with the class scales, slopes and depth factors fitted to its own probes.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.rules import quantizable
from ggufmoe.sensitivity.cost import METHOD_VERSION, PROBE_TYPE, Sensitivity
from ggufmoe.sensitivity.defaults import default_class, default_exponent, default_sensitivity
from ggufmoe.sensitivity.fit import power_costs
from ggufmoe.stats.local_errors import LocalErrors

# Derived on refmoe-qwen3 by `python eval/derive_defaults.py` (see derive_local_defaults): streamed statistics
# with local errors on the first 400,000 characters of calib.txt less its held-out pieces, and probes on those
# pieces (stats.text.hold_out), at Q3_K, Q2_K and Q4_K on
# 4 chunks of 512 tokens, one layer probe per layer; pruning probes at 21, 18 and 15 of 24 experts by REAP and
# by routing score.
LOCAL_SCALES: dict[str, float] = {
    "attn_k": 0.274385, "attn_output": 1.09803, "attn_q": 0.0916453, "attn_v": 1.05346, "ffn_down_exps": 0.690419,
    "ffn_gate_exps": 0.357494, "ffn_up_exps": 0.28513, "output": 3.92094, "token_embd": 0.842077,
}
LOCAL_EXPONENTS: dict[str, float] = {
    "attn_k": 0.742, "attn_output": 0.71, "attn_q": 0.654, "attn_v": 0.769, "ffn_down_exps": 0.775,
    "ffn_gate_exps": 0.816, "ffn_up_exps": 0.717, "output": 0.99, "token_embd": 0.715,
}
# The first block's factor (its residual is the embedding alone, so its relative errors are the largest), then
# (relative depth, factor) of the others; interpolated linearly, constant beyond the ends.
LOCAL_FIRST_LAYER = 0.0201
LOCAL_DEPTH: list[tuple[float, float]] = [(0.25, 1.727), (0.4167, 1.9995), (0.5833, 2.2904), (0.75, 2.4509),
                                          (0.9167, 2.5693)]
# (a, b) of a plan's quantization KL = a * (sum of its costs) ** b (cost.Sensitivity.joint)
LOCAL_JOINT = (0.927204, 1.07206)


Profile = tuple[float, list[tuple[float, float]]]  # (first block's factor, the others' (relative depth, factor))


def depth(layer: int | None, n_layers: int, profile: Profile | None = None) -> float:
    """The depth factor of a block; 1 outside the blocks (the embedding, the output matrix)."""
    if layer is None:
        return 1.0
    first, pts = profile or (LOCAL_FIRST_LAYER, LOCAL_DEPTH)
    if layer == 0:
        return first
    return float(np.interp((layer + 0.5) / n_layers, [x for x, _ in pts], [f for _, f in pts]))


def local_sensitivity(specs: list[TensorSpec], local: LocalErrors, n_layers: int, n_expert: int, top_k: int,
                      aliases: Mapping[str, str] | None = None) -> Sensitivity:
    """Costs of every quantizable tensor from its local errors and the reference tables (module docstring)."""
    specs = [s for s in specs if quantizable(s)]
    fallback = [s for s in specs if s.name not in local.quant]
    sens = default_sensitivity(fallback, n_expert, top_k, imatrix=True, aliases=aliases) if fallback else None
    anchor = PROBE_TYPE.name
    unknown = math.exp(np.mean(np.log(list(LOCAL_SCALES.values())))) if LOCAL_SCALES else 1.0
    cost, error, scales, exponents = {}, {}, {}, {}
    for s in specs:
        if s.name not in local.quant:
            continue
        cls = default_class(s.kind, aliases)
        scale = scales.setdefault(s.kind, LOCAL_SCALES.get(cls, unknown) if cls else unknown)
        b = exponents.setdefault(s.kind, LOCAL_EXPONENTS.get(cls, default_exponent(s.kind, aliases)))
        e = local.quant[s.name]
        error[s.name] = e
        cost.update(power_costs({s.name: e}, anchor, scale * depth(s.layer, n_layers), b))
    if sens is not None:
        cost.update(sens.cost)
        error.update(sens.error)
    info = dict(method="local", version=METHOD_VERSION, anchor=anchor, n_layers=n_layers,
                shape_defaults=sorted(s.name for s in fallback),
                note="local errors x the reference model's class scales, slopes and depth profile (no probes)")
    return Sensitivity(cost, False, scales, error, {}, exponents, info=info, joint=list(LOCAL_JOINT))


def derive_local_defaults(sens: Sensitivity, specs: list[TensorSpec], local: LocalErrors, n_layers: int
                          ) -> tuple[dict[str, float], dict[str, float], Profile]:
    """From a measured sensitivity made on local errors: (LOCAL_SCALES, LOCAL_EXPONENTS, (LOCAL_FIRST_LAYER,
    LOCAL_DEPTH)).

    The depth profile is the measured layer groups' factors (normalised to a geometric mean of 1): the
    group of the first block alone as its factor, the others at their mean relative depth; a class's scale
    is its measured cost at the anchor over its tensors' depth x local error there."""
    anchor = sens.info.get("anchor", PROBE_TYPE.name)
    factors = list(sens.layer_factors.values())
    norm = math.exp(np.mean(np.log(factors))) if factors else 1.0
    first, pts = None, []
    for g, f in sens.layer_factors.items():
        lo, _, hi = g.partition("-")
        if g == "0":
            first = f / norm
        else:
            pts.append((((int(lo) + int(hi or lo)) / 2 + 0.5) / n_layers, f / norm))
    pts = sorted(pts) or [(0.5, 1.0)]
    profile = (first if first is not None else pts[0][1], pts)
    scales = {}
    for kind in sorted({s.kind for s in specs if s.name in local.quant and s.name in sens.cost}):
        names = [s for s in specs if s.kind == kind and s.name in local.quant and s.name in sens.cost]
        measured = sum(sens.cost[s.name][anchor] for s in names)
        unit = sum(depth(s.layer, n_layers, profile) * local.quant[s.name][anchor] for s in names)
        if unit > 0:
            scales[kind] = measured / unit
    return scales, {k: sens.exponents[k] for k in scales if k in sens.exponents}, profile

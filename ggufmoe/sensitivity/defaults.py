"""Default sensitivities from shapes alone (a 671B model planned from config.json): no weights, no statistics.

``cost = DEFAULT_SCALES[class] * g * r(Q3_K) * (r(t) / r(Q3_K)) ** DEFAULT_EXPONENTS[class] *
active elements``, where ``r`` is each type's relative error ``E(w - w_hat)^2 / E w^2`` measured
with our quantizer on seeded Gaussian rows (:data:`GAUSSIAN_REL_ERROR`, :func:`gaussian_rel_errors`),
active elements are ``n_elements`` times ``top_k / n_expert`` for expert tensors, and
``DEFAULT_SCALES`` / ``DEFAULT_EXPONENTS`` are the reference model's measured class costs per unit
of relative error and active element, and its slopes (:func:`derive_defaults` on refmoe-qwen3:
first 400,000 characters of calib.txt, probes at Q3_K, Q2_K and Q4_K on 4 chunks of 512 tokens;
reproduce with ``python eval/derive_defaults.py``). Classes the reference lacks use their closest
relative (:data:`DEFAULT_CLASS`: dense and shared FFN -> the routed one, per active element; and
the architecture's own ``sensitivity_aliases``, e.g. DeepSeek's MLA ``attn_q_a``/``attn_q_b`` -> ``attn_q``).
``g = N_REF_ACTIVE / active elements of the model`` keeps totals at the reference model's scale: a
whole model at one type is predicted to cost about what the reference costs at that type, while the
split between tensors follows their active size and class. Types that need an importance matrix are
left out (``imatrix=True`` prices them too).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.model.names import EMBEDDING, role
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.qtypes import effective_type
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.held import held_values
from ggufmoe.quant.rules import quantizable
from ggufmoe.sensitivity.cost import METHOD_VERSION, PROBE_TYPE, Sensitivity, active_elements, candidates_for


# Relative error E(w - w_hat)^2 / E w^2 of each type (candidates and their fallbacks) with our
# quantizer on Gaussian data: 256 rows of 256 values from numpy's default_rng(0), importance all
# ones. Computing it takes seconds (llama.cpp builds IQ lookup tables on first use), so it is kept
# here; gaussian_rel_errors() recomputes it and the tests check that it still agrees.
GAUSSIAN_REL_ERROR: dict[str, float] = {
    "IQ1_S": 0.237194, "IQ1_M": 0.205848, "IQ2_XXS": 0.11874, "IQ2_XS": 0.0905738, "IQ2_S": 0.0622478,
    "Q2_K": 0.072034, "IQ3_XXS": 0.0331575, "IQ3_S": 0.0188533, "Q3_K": 0.0210717, "IQ4_XS": 0.00576195,
    "Q4_K": 0.00502778, "Q5_K": 0.00125966, "Q6_K": 0.000300997, "Q8_0": 2.88222e-05, "F16": 4.27768e-08,
    "IQ4_NL": 0.00565746, "Q5_0": 0.00164318, "Q5_1": 0.00115316, "MXFP4": 0.0133629,
}

# KL (nats/token) at the anchor type per unit of (Gaussian relative error x active elements) per
# class, and the reference's active quantizable elements: derive_defaults() on refmoe-qwen3 measured
# with `python eval/derive_defaults.py` (statistics and probes on the first 400,000 characters of
# calib.txt, 4 chunks of 512 tokens, probes at Q3_K, Q2_K and Q4_K, 256 rows per tensor).
DEFAULT_SCALES: dict[str, float] = {
    "token_embd": 5.985e-07, "output": 7.89e-07, "attn_q": 8.034e-07, "attn_k": 2.015e-06, "attn_v": 7.132e-06,
    "attn_output": 3.097e-06, "ffn_gate_exps": 5.844e-07, "ffn_up_exps": 4.523e-07, "ffn_down_exps": 7.714e-07,
}
# Log-log slope of KL against error per class, fitted to probes at Q2_K, Q3_K and Q4_K (same run).
DEFAULT_EXPONENTS: dict[str, float] = {
    "token_embd": 0.714, "output": 1.012, "attn_q": 0.667, "attn_k": 0.721, "attn_v": 0.768, "attn_output": 0.793,
    "ffn_gate_exps": 0.821, "ffn_up_exps": 0.798, "ffn_down_exps": 0.792,
}
N_REF_ACTIVE = 9043968
# Classes the reference model lacks -> the reference class they default to (an architecture adds its
# own: ``Architecture.sensitivity_aliases``).
DEFAULT_CLASS: dict[str, str] = {
    "attn_qkv": "attn_v",
    "ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps",
    "ffn_gate_shexp": "ffn_gate_exps", "ffn_up_shexp": "ffn_up_exps", "ffn_down_shexp": "ffn_down_exps",
}


def gaussian_rel_errors(types=None, rows: int = 256, ne0: int = 256, seed: int = 0) -> dict[str, float]:
    """Relative squared error of each type on seeded Gaussian data (our quantizer, importance ones)."""
    types = types or [T[n] for n in GAUSSIAN_REL_ERROR]
    x = np.random.default_rng(seed).standard_normal((rows, ne0)).astype(np.float32)
    ones = np.ones(ne0, np.float32)
    out = {}
    with Quantizer(1) as q:
        for t in types:
            d = held_values(x, t, ones, q)
            out[t.name] = float(np.mean((d.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
    return out


def default_class(kind: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """The reference class whose default scale a tensor class takes (None: none fits); ``aliases``
    are the architecture's own (``Architecture.sensitivity_aliases``)."""
    if kind in DEFAULT_SCALES:
        return kind
    return (aliases or {}).get(kind) or DEFAULT_CLASS.get(kind)


def default_exponent(kind: str, aliases: Mapping[str, str] | None = None) -> float:
    cls = default_class(kind, aliases)
    if cls in DEFAULT_EXPONENTS:
        return DEFAULT_EXPONENTS[cls]
    return float(np.median(list(DEFAULT_EXPONENTS.values()))) if DEFAULT_EXPONENTS else 1.0


def default_sensitivity(specs: list[TensorSpec], n_expert: int, top_k: int, imatrix: bool = False,
                        aliases: Mapping[str, str] | None = None) -> Sensitivity:
    """Costs from shapes alone (no weights, no statistics); see the module docstring.

    ``imatrix``: also price the types that need an importance matrix (when the model will be
    converted with one); never for the token embedding, which no imatrix covers. ``aliases``: the
    architecture's classes -> the reference class whose defaults they take.
    """
    specs = [s for s in specs if quantizable(s)]
    if not specs:
        raise GgufmoeError("no quantizable tensors")
    act = {s.name: active_elements(s, n_expert, top_k) for s in specs}
    g = N_REF_ACTIVE / sum(act.values())
    unknown = math.exp(np.mean(np.log(list(DEFAULT_SCALES.values()))))  # a class no reference class fits
    cost, error, scales, exponents = {}, {}, {}, {}
    for s in specs:
        cls = default_class(s.kind, aliases)
        scale = scales.setdefault(s.kind, (DEFAULT_SCALES[cls] if cls else unknown) * g)
        b = exponents.setdefault(s.kind, default_exponent(s.kind, aliases))
        ne0 = s.shape[-1]
        anchor = GAUSSIAN_REL_ERROR[effective_type(PROBE_TYPE, ne0).name] * act[s.name]
        error[s.name] = {t.name: GAUSSIAN_REL_ERROR[effective_type(t, ne0).name] * act[s.name]
                         for t in candidates_for(s, imatrix and role(s.name) != EMBEDDING)}
        cost[s.name] = {t: scale * anchor * (e / anchor) ** b for t, e in error[s.name].items()}
    info = dict(method="default", version=METHOD_VERSION, anchor=PROBE_TYPE.name, g=g, n_active=sum(act.values()),
                note="Gaussian relative error x active elements, reference per-class scale and exponent, x g")
    return Sensitivity(cost, False, scales, error, {}, exponents, info=info)


def derive_defaults(sens: Sensitivity, specs: list[TensorSpec], n_expert: int, top_k: int,
                    types=(T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)) -> tuple[dict[str, float], dict[str, float], float]:
    """From a measured sensitivity: (DEFAULT_SCALES, DEFAULT_EXPONENTS, N_REF_ACTIVE).

    Per class, the scale is the geometric mean over ``types`` of the class's measured cost divided
    by what :func:`default_sensitivity` would predict with scale 1 (Gaussian relative error at the
    anchor x active elements x (relative error ratio) ** exponent); the exponent is the measured one.
    """
    specs = [s for s in specs if quantizable(s) and s.name in sens.cost]
    by_class: dict[str, list[TensorSpec]] = {}
    for s in specs:
        by_class.setdefault(s.kind, []).append(s)
    anchor = sens.info.get("anchor", PROBE_TYPE.name)
    scales, exponents = {}, {}
    for kind, members in by_class.items():
        b = sens.exponents.get(kind, 1.0)
        n_act = sum(active_elements(s, n_expert, top_k) for s in members)
        rel = {t: GAUSSIAN_REL_ERROR[effective_type(t, members[0].shape[-1]).name] for t in types}
        ra = GAUSSIAN_REL_ERROR[effective_type(T[anchor], members[0].shape[-1]).name]
        ratios = [sum(sens.cost[s.name][t.name] for s in members) / (n_act * ra * (rel[t] / ra) ** b) for t in types]
        scales[kind] = float(math.exp(np.mean(np.log(ratios))))
        exponents[kind] = b
    return scales, exponents, float(sum(active_elements(s, n_expert, top_k) for s in specs))


"""Steps 2-4 of a measured sensitivity: from errors (:mod:`.quant_error`) and the KL the probes
measured through llama.cpp (:mod:`ggufmoe.pipeline.measure`) to costs.

Calibration. ``scale[class] = KL / sum of the class's errors at the anchor`` (:func:`scales_from_probes`), the
KL being the class's probe: that class (all layers) at the anchor type
:data:`~ggufmoe.sensitivity.cost.PROBE_TYPE` (Q3_K), everything else F16.

Costs. ``cost = scale * e(Q3_K) * (e(t) / e(Q3_K)) ** b[class]`` per tensor
(:func:`power_costs`): exactly ``scale * error`` at the anchor, and with ``b = 1`` everywhere.
KL is not linear in the error: probing every class of the reference model at Q2_K, Q3_K and
Q4_K gives log-log slopes of 0.67-0.82 (``output``, which feeds the logits directly: 1.01).
With ``b = 1`` a whole model at Q6_K is predicted at 0.40x its measured KL (Q5_K 0.76x, Q4_K
1.04x, Q2_K 1.19x); with the slopes at 0.98x (1.36x, 1.40x, 0.92x) — costs of tensors alone
add up to 1.0-1.4x the joint KL. ``b`` comes from
:data:`~ggufmoe.sensitivity.defaults.DEFAULT_EXPONENTS` (measured on the reference model) unless
``probe_types`` names more than one type; then each class's power law (factor and slope) is fitted
to its own probes by least squares in log-log (:func:`fit_power`). Q3_K as anchor: the middle of
the range a budget plan chooses from (2-4 bits), one class at Q3_K moves KL by 0.005-0.02 nats (far
above llama.cpp's run-to-run noise, which is zero on CPU), and its quantizer is fast.

Depth. The same error costs more in early layers than in late ones (the residual stream
it is added to grows with depth): class scales alone predicted the reference model's layer-0
experts at IQ2_XXS at 0.28x their measured KL and layer 5's at 1.7x. So up to ``layer_probes``
runs of consecutive blocks (default 8, :func:`layer_groups`) are probed too, each with all its
tensors at the anchor type, and costs are scaled per run so that the runs' shares follow those
probes while each class keeps its total (:func:`apply_layer_factors`).

Together. Tensors quantized together cost less than their costs alone add up to, and the more so the
finer the type: on the reference model, with probes on held-out text, the sum is 1.3x the whole model's
KL at Q3_K, 1.75x at Q4_K and 2x at Q5_K, but 0.76x at IQ2_XXS. So whole-model probes at
:data:`~ggufmoe.sensitivity.cost.JOINT_TYPES` fit ``KL = a * sum ** b`` (:func:`fit_joint`), and a plan's
quantization cost is its sum through that map (:meth:`~ggufmoe.sensitivity.cost.Sensitivity.combined`).
Within one keep count the map is monotone, so the allocation of types is the same; it changes what the
planner weighs against pruning.
"""

from __future__ import annotations

import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.sensitivity.cost import Sensitivity
from ggufmoe.sensitivity.defaults import default_exponent


def power_costs(errors: dict[str, dict[str, float]], anchor: str, scale: float,
                exponent: float) -> dict[str, dict[str, float]]:
    """``cost = scale * e(anchor) * (e(t) / e(anchor)) ** exponent`` for each tensor of one class:
    the class total at the anchor type is ``scale * sum e(anchor)``, other types follow each
    tensor's own error with the class's KL-vs-error exponent (1: ``cost = scale * error``)."""
    out = {}
    for name, e in errors.items():
        ea = e.get(anchor, 0.0)
        out[name] = {t: scale * ea * (v / ea) ** exponent if ea > 0 and v > 0 else 0.0 for t, v in e.items()}
    return out


def fit_power(errors: list[float], kls: list[float]) -> tuple[float, float]:
    """(exponent b, factor a) of ``KL = a * error ** b`` by least squares in log-log, b clipped to [0.5, 1.5]."""
    x, y = np.log(errors), np.log(kls)
    b = float(np.clip(np.polyfit(x, y, 1)[0], 0.5, 1.5)) if len(x) >= 2 and np.ptp(x) > 0 else 1.0
    return b, float(np.exp(np.mean(y - b * x)))


def fit_joint(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of ``measured = a * summed ** b`` through whole-model probes, each (the sum of its tensors' costs,
    its measured KL): a power law through two or more, a factor through one, none without any."""
    pts = [(s, m) for s, m in points if s > 0 and m > 0]
    if not pts:
        return 1.0, 1.0
    b, a = fit_power([s for s, _ in pts], [m for _, m in pts])
    return a, b


def scales_from_probes(error: dict[str, dict[str, float]], classes: dict[str, list[str]], probes: dict[str, dict[str, float]],
              anchor: str) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float]]:
    """(cost, scales, exponents) from the errors and the probes' measured KL (see the module docstring).

    With one probe per class the class's cost at the anchor type is its measured KL and the exponent
    is from :data:`~ggufmoe.sensitivity.defaults.DEFAULT_EXPONENTS`; with more, both come from a power
    law fitted to the probes.
    """
    cost, scales, exponents = {}, {}, {}
    for kind, names in classes.items():
        e_class = {t: sum(error[n].get(t, 0.0) for n in names) for t in probes[kind]}
        pts = [(e_class[t], v) for t, v in probes[kind].items() if e_class[t] > 0 and v > 0]
        if len({e for e, _ in pts}) >= 2:
            b, a = fit_power(*zip(*pts))
            kl_anchor = a * e_class[anchor] ** b
        else:
            b, kl_anchor = default_exponent(kind), probes[kind][anchor]
        scales[kind] = max(kl_anchor, 1e-12) / e_class[anchor] if e_class[anchor] > 0 else 0.0
        exponents[kind] = b
        cost.update(power_costs({n: error[n] for n in names}, anchor, scales[kind], b))
    return cost, scales, exponents


def layer_groups(specs: list[TensorSpec], max_groups: int) -> dict[str, list[str]]:
    """Tensors of the blocks in at most ``max_groups`` runs of consecutive layers, keyed "first-last"."""
    layers = sorted({s.layer for s in specs if s.layer is not None})
    if max_groups < 1 or not layers:
        return {}
    runs = np.array_split(np.array(layers), min(max_groups, len(layers)))
    return {(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}"): [s.name for s in specs if s.layer in set(r.tolist())]
            for r in runs}


def apply_layer_factors(cost: dict[str, dict[str, float]], kinds: dict[str, list[str]],
                        groups: dict[str, list[str]], layer_kl: dict[str, float], anchor: str,
                        iterations: int = 100) -> dict[str, float]:
    """Scale ``cost`` in place so that each layer group's share of the blocks' anchor cost is its
    share of the measured layer probes while every class keeps its total (iterative proportional
    fitting of a class x layer-group table); returns the factor of each group.

    Errors are absolute, but what a given output error does to the logits depends on the size of
    the residual stream it is added to, which grows with depth: with class scales alone the
    reference model's first layer was predicted at a third of its measured cost and its last at
    1.7 times it."""
    in_group = {n: g for g, names in groups.items() for n in names if n in cost}
    kind_of = {n: k for k, names in kinds.items() for n in names if n in in_group}
    base = {n: cost[n].get(anchor, 0.0) for n in kind_of}
    total, measured = sum(base.values()), sum(layer_kl.values())
    if total <= 0 or measured <= 0:
        return {g: 1.0 for g in groups}
    target = {g: layer_kl[g] / measured * total for g in groups}
    class_total = {k: sum(base[n] for n in kind_of if kind_of[n] == k) for k in set(kind_of.values())}
    f = {g: 1.0 for g in groups}
    r = {k: 1.0 for k in class_total}
    for _ in range(iterations):
        for g in groups:
            got = sum(base[n] * f[g] * r[kind_of[n]] for n in kind_of if in_group[n] == g)
            f[g] = max(f[g] * target[g] / got, 1e-3) if got > 0 else f[g]
        for k in class_total:
            got = sum(base[n] * f[in_group[n]] * r[k] for n in kind_of if kind_of[n] == k)
            r[k] = r[k] * class_total[k] / got if got > 0 else r[k]
    for n in kind_of:
        m = f[in_group[n]] * r[kind_of[n]]
        cost[n] = {t: v * m for t, v in cost[n].items()}
    return f



def calibrated(error: dict[str, dict[str, float]], kinds: dict[str, list[str]], probes: dict[str, dict[str, float]],
               groups: dict[str, list[str]], layer_kl: dict[str, float], anchor: str) -> Sensitivity:
    """The costs of every tensor from its errors, the classes' probes and the layer groups' probes (measured KL;
    :func:`scales_from_probes`, :func:`apply_layer_factors`)."""
    cost, scales, exponents = scales_from_probes(error, kinds, probes, anchor)
    factors = apply_layer_factors(cost, kinds, groups, layer_kl, anchor)
    return Sensitivity(cost, True, scales, error, probes, exponents, layer_kl, factors)


def join(sens: Sensitivity, measured: dict[str, float]) -> dict[str, dict]:
    """Fit ``sens.joint`` through whole-model probes (type name -> measured KL; a type some tensor has no cost for
    is left out); returns, per type, the sum of its costs, the measured and predicted KL and their ratio."""
    uniform = {}
    for t, kl in measured.items():
        try:
            uniform[t] = dict(summed=sens.predict(t), measured=kl)
        except GgufmoeError:
            continue
    sens.joint = list(fit_joint([(u["summed"], u["measured"]) for u in uniform.values()]))
    for u in uniform.values():
        u["predicted"] = sens.combined(u["summed"])
        u["ratio"] = u["predicted"] / u["measured"] if u["measured"] > 0 else None
    return uniform

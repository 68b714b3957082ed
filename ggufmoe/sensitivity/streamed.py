"""Costs from the end-to-end probes the streamed calibration carried (:mod:`ggufmoe.stats.probe_streams`): the
plan of a model too big to probe through llama.cpp, measured on that model.

The same fits as the probes through llama.cpp (:mod:`ggufmoe.pipeline.measure`): the calibration's local errors
scaled per tensor class by the class probes (:func:`~ggufmoe.sensitivity.fit.calibrated`), spread over depth by the
layer-group probes, what tensors cost together from the whole-model probes (:func:`~ggufmoe.sensitivity.fit.join`),
and what pruning costs fitted through the pruning probes (:func:`~ggufmoe.sensitivity.prune_cost.fit_pruning`). The
KL of each probe is its mean over every held-out chunk of every text; the spread over texts and the chunks'
standard error are kept in ``info``. Probed on several texts, the same fits on each text's probes alone say what a
plan costs on text like that one (KL depends on the text: a plan is planned on all of them, and predicted on each)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.prune.criteria import Pruning, choose_experts
from ggufmoe.quant.rules import quantizable
from ggufmoe.sensitivity.cost import JOINT_TYPES, METHOD_VERSION, PROBE_TYPE, Sensitivity
from ggufmoe.sensitivity.defaults import default_sensitivity
from ggufmoe.sensitivity.fit import calibrated, join, layer_groups
from ggufmoe.sensitivity.probe_set import LAYER_PROBES, probe_kinds, prune_name
from ggufmoe.sensitivity.prune_cost import (PRUNE_FIT, PRUNE_LOCAL_KEY, fit_pruning, local_prune_kl, probe_prunings,
                                          prune_unit)
from ggufmoe.sensitivity.quant_error import measure_errors
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.stats.probe_results import StreamedProbes


Predictor = tuple[Sensitivity, Callable[[Pruning], float]]  # costs, and the predicted KL of a pruning


def streamed_sensitivity(model: OpenedModel, progress: bool = True) -> tuple[Predictor, dict[str, Predictor]]:
    """(costs, predicted KL of a pruning) of ``model`` from its statistics' streamed probes and local errors, fitted
    on every text's probes together; and, when the probes ran on more than one text, the same fitted on each text's
    alone (text name -> predictor: what a plan costs on text like that one)."""
    arch, stats, local, probes = model.arch, model.stats, model.local, model.probes
    if probes is None or local is None:
        raise GgufmoeError(f"{model.stats_path}: the statistics hold no streamed probes (they come from `ggufmoe "
                           "calibrate --probes`)")
    specs = [s for s in arch.tensors() if quantizable(s)]
    # a class the streams left exact (no module holds its elements as they are) measured nothing: priced from
    # shapes, as a model without statistics is
    left_exact = set(probes.info.get("left_exact", []))
    unprobed = [s for s in specs if s.name in left_exact]
    specs = [s for s in specs if s.name not in left_exact]
    error = {s.name: local.quant[s.name] for s in specs if s.name in local.quant}
    rest = [s for s in specs if s.name not in error]  # no local error: the diagonal one
    if rest:
        error.update(measure_errors(rest, stats, None, arch.n_expert, arch.top_k, progress=progress))
    shapes = default_sensitivity(unprobed, arch.n_expert, arch.top_k, imatrix=True,
                                 aliases=arch.sensitivity_aliases) if unprobed else None
    fitted = _fit(model, specs, error, shapes, probes)
    fitted[0].info.update(shape_defaults=sorted(s.name for s in unprobed), diagonal_errors=sorted(s.name for s in rest))
    by_text = {t: _fit(model, specs, error, shapes, probes.of_text(t)) for t in probes.texts} \
        if len(probes.texts) > 1 else {}
    return fitted, by_text


def _fit(model: OpenedModel, specs: list[TensorSpec], error: dict[str, dict[str, float]],
         shapes: Sensitivity | None, probes: StreamedProbes) -> Predictor:
    """The fits of the module docstring through ``probes``; ``shapes`` prices what they left exact."""
    arch, stats, local = model.arch, model.stats, model.local
    anchor = PROBE_TYPE.name
    kinds = probe_kinds(specs)
    missing = [p for p in [f"class:{k}:{anchor}" for k in kinds] + [f"all:{t.name}" for t in JOINT_TYPES]
               if p not in probes.kl]
    if missing:
        raise GgufmoeError(f"{model.stats_path}: the streamed probes lack {', '.join(missing)} (made for another "
                           "model?): calibrate again")
    groups = layer_groups(specs, LAYER_PROBES)
    layer_kl = {g: probes.mean(f"layers:{g}:{anchor}") for g in groups if f"layers:{g}:{anchor}" in probes.kl}
    sens = calibrated(error, kinds, {k: {anchor: probes.mean(f"class:{k}:{anchor}")} for k in kinds},
                      {g: n for g, n in groups.items() if g in layer_kl}, layer_kl, anchor)
    if shapes:
        sens.cost.update(shapes.cost)
        sens.error.update(shapes.error)
    uniform = join(sens, {t.name: probes.mean(f"all:{t.name}") for t in JOINT_TYPES})
    n_layers = int(arch.cfg.num_hidden_layers)
    pruning = {}  # probe -> (its local pruning errors' unit, measured KL)
    for req in probe_prunings(arch, stats.has_routing):
        name = prune_name(req, arch)
        if name in probes.kl:
            pruning[name] = (prune_unit(local, choose_experts(arch, stats, req), n_layers) or 0.0, probes.mean(name))
    sens.scales[PRUNE_LOCAL_KEY], sens.scales[PRUNE_FIT] = fit_pruning([u for u, _ in pruning.values()],
                                                                       [kl for _, kl in pruning.values()])
    spread = {p: probes.by_text(p) for p in probes.kl if p.startswith("all:")}
    sens.info = dict(method="streamed", version=METHOD_VERSION, anchor=anchor, texts=probes.texts,
                     summary=probes.summary().removeprefix("probes: "),
                     chunks=len(probes.positions), kl_tokens=int(np.sum(probes.positions)), uniform=uniform,
                     by_text=spread, rel_stderr={p: round(probes.rel_stderr(p), 4) for p in probes.kl
                                                 if len(probes.positions) > 1},
                     pruning=pruning)
    return sens, local_prune_kl(local, n_layers, sens.scales[PRUNE_LOCAL_KEY], stats, sens.scales[PRUNE_FIT])

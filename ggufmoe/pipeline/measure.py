"""Measured sensitivity (weights + calibration statistics + text): the conversions and llama.cpp
runs that calibrate the cost model, and the cache around them.

1. **Error** of every tensor at every candidate type: the local errors the streamed calibration
   measured (:mod:`ggufmoe.stats.local_errors`) where the statistics hold them, else from the weights and the
   importance matrix (:mod:`ggufmoe.sensitivity.quant_error`, the diagonal approximation).
2. **Calibration.** Per tensor class (:attr:`TensorSpec.kind`: ``attn_q``, ``ffn_down_exps``,
   ``token_embd``, ...) one probe: ``convert`` with that class (all layers) at the anchor type
   :data:`~ggufmoe.sensitivity.cost.PROBE_TYPE` (Q3_K) and everything else F16, mean KL divergence
   through llama.cpp against the all-F16 conversion over ``chunks`` chunks of ``ctx`` tokens spread
   over the text (F32 KV cache; :func:`ggufmoe.runtime.logprobs.score_against`, averaged over chunks
   weighted by their predicted tokens). ``scale[class] = KL / sum of the class's errors at Q3_K``.
   Here and below a class is all its layers: ``measured`` probes need ``classes + 1`` conversions
   (10 for Qwen3-MoE), whatever the depth. More ``probe_types`` probe each class at more types.
3. **Costs** from errors and probes, 4. **Depth**: up to ``layer_probes`` runs of consecutive
   blocks probed the same way, each with all its tensors at the anchor type
   (:mod:`ggufmoe.sensitivity.fit`), 5. **Together**: the whole model at each of :data:`JOINT_TYPES`,
   whose KL against the sum of its costs fits what a plan's tensors cost together.

Caching (:func:`load_or_measure`): the result is kept in the stats file
(:mod:`ggufmoe.sensitivity.cache`); a second call returns it at once.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from ggufmoe.model.names import EMBEDDING, role
from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.logprobs import base_logprobs, score_against
from ggufmoe.sensitivity import cache
from ggufmoe.sensitivity.cost import JOINT_TYPES, METHOD_VERSION, PROBE_TYPE, Sensitivity
from ggufmoe.quant.rules import quantizable
from ggufmoe.sensitivity.fit import calibrated, join, layer_groups
from ggufmoe.sensitivity.probe_set import class_rules, probe_kinds
from ggufmoe.sensitivity.quant_error import measure_errors, token_frequency
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.stats.text import MAX_TEXT_TOKENS, spread_chunks, token_ids



def _kl(scorer_path: Path, seqs: list[list[int]], base: list[np.ndarray], threads: int) -> float:
    """Mean KL of ``scorer_path`` against ``base`` over ``seqs``, chunks weighted by their predicted tokens."""
    kls = [c.kld_mean for c in score_against(scorer_path, seqs, base, threads)]
    weights = [len(s) - 1 for s in seqs]
    return float(np.average(kls, weights=weights))


def measure_sensitivity(model: OpenedModel, text: str, threads: int | None = None, progress: bool = True,
                        *, chunks: int = 4, ctx: int = 512, max_rows: int = 256, max_experts: int = 64,
                        probe_types: tuple[T, ...] = (PROBE_TYPE,), uniform_types: tuple[T, ...] = JOINT_TYPES,
                        layer_probes: int = 8) -> Sensitivity:
    """Costs of ``model``'s tensors from its weights and statistics, calibrated by probes through llama.cpp (see
    the module docstring).

    ``probe_types``: the first is the anchor each class is calibrated at; with more, each class's
    exponent is fitted to its probes (else :data:`~ggufmoe.sensitivity.defaults.DEFAULT_EXPONENTS`).
    ``uniform_types``: whole-model conversions at these types; their measured KL against the sum of the
    costs fits :attr:`~ggufmoe.sensitivity.cost.Sensitivity.joint`, what tensors cost together
    (:func:`~ggufmoe.sensitivity.fit.fit_joint`; ``info['uniform']``). ``layer_probes``: at most this many
    runs of consecutive blocks, each probed with all its tensors at the anchor type, set how cost is spread
    over depth (:func:`~ggufmoe.sensitivity.fit.apply_layer_factors`; 0: by error alone).
    """
    from transformers import AutoTokenizer  # heavy: only when measuring

    t_start = time.perf_counter()
    threads = max(1, threads or os.cpu_count() or 1)
    arch, stats = model.arch, model.stats
    n_expert, top_k = arch.n_expert, arch.top_k
    specs = [s for s in arch.tensors() if quantizable(s)]
    if not text or not text.strip():
        raise GgufmoeError("measuring sensitivity needs calibration text (it is empty)")
    if not probe_types:
        raise GgufmoeError("at least one probe type is needed")
    anchor = probe_types[0].name
    tok = AutoTokenizer.from_pretrained(model.path)
    ids = token_ids(tok, text, max_tokens=MAX_TEXT_TOKENS)
    vocab = next((s.shape[0] for s in specs if role(s.name) == EMBEDDING), arch.n_vocab)
    freq = token_frequency(ids.astype(np.int64), vocab)
    if len(ids) < 2:
        raise GgufmoeError("calibration text too short to measure KL divergence")
    prefix = tok("", add_special_tokens=True)["input_ids"]  # BOS, if the tokenizer adds one (as calibrate does)
    body = ctx - len(prefix)
    if body < 1:
        raise GgufmoeError(f"context {ctx} is too small")
    seqs = spread_chunks([prefix + ids[i: i + body].tolist() for i in range(0, len(ids), body)], chunks)
    if sum(len(s) - 1 for s in seqs) < 1:
        raise GgufmoeError("calibration text too short to measure KL divergence")

    # the local errors the streamed calibration measured where there are some, else the diagonal approximation
    local = model.local
    measured_locally = {s.name: local.quant[s.name] for s in specs if local and s.name in local.quant}
    rest = [s for s in specs if s.name not in measured_locally]
    error = measure_errors(rest, stats, freq, n_expert, top_k, threads, max_rows, max_experts, progress) if rest else {}
    error.update(measured_locally)
    t_error = time.perf_counter() - t_start

    kinds = probe_kinds(specs)
    probes: dict[str, dict[str, float]] = {k: {} for k in kinds}
    runs = [(k, t) for k in kinds for t in probe_types]
    groups = layer_groups(specs, layer_probes)
    layer_kl: dict[str, float] = {}
    uniform = {}
    with tempfile.TemporaryDirectory(prefix="ggufmoe-sens-") as tmp:
        tmp = Path(tmp)

        def build(name: str, rules: TypeRules) -> Path:  # the statistics' imatrix, as read once with the model
            return convert(model, ConvertOptions(out=tmp / name, types=rules, stats=model.stats_path, threads=threads,
                                                 progress=False))[0]

        with tqdm(total=1 + len(runs) + len(groups) + len(uniform_types), desc="KL probes", unit="probe",
                  disable=not progress) as bar:
            bar.set_postfix_str("F16")
            base_path = build("base.gguf", TypeRules(T.F16))
            base = base_logprobs(base_path, seqs, threads)
            base_path.unlink()
            bar.update()
            for kind, t in runs:
                bar.set_postfix_str(f"{kind}={t.name}")
                path = build("probe.gguf", class_rules(kinds[kind], t))
                probes[kind][t.name] = _kl(path, seqs, base, threads)
                path.unlink()
                bar.update()
            for g, names in groups.items():
                bar.set_postfix_str(f"layers {g}={anchor}")
                path = build("probe.gguf", class_rules(names, T[anchor]))
                layer_kl[g] = _kl(path, seqs, base, threads)
                path.unlink()
                bar.update()
            sens = calibrated(error, kinds, probes, groups, layer_kl, anchor)
            measured = {}
            for t in uniform_types:
                bar.set_postfix_str(f"all={t.name}")
                try:
                    sens.predict(t)
                except GgufmoeError:  # a type some tensor takes another type for: no sum to compare
                    bar.update()
                    continue
                path = build("uniform.gguf", TypeRules(t))
                measured[t.name] = _kl(path, seqs, base, threads)
                path.unlink()
                bar.update()
            uniform = join(sens, measured)
    cost = sens.cost
    fit = {k: {t: sum(cost[n][t] for n in kinds[k]) / v for t, v in p.items() if v > 0} for k, p in probes.items()}
    sens.info = dict(method="measured", version=METHOD_VERSION, anchor=anchor,
                     probe_types=[t.name for t in probe_types],
                     exponents_fitted=len(probe_types) > 1, chunks=len(seqs), ctx=ctx,
                     kl_tokens=sum(len(s) - 1 for s in seqs), max_rows=max_rows, max_experts=max_experts,
                     error_seconds=round(t_error, 2), total_seconds=round(time.perf_counter() - t_start, 2),
                     probe_fit=fit, uniform=uniform, local_errors=sorted(measured_locally))
    return sens


def load_or_measure(source: str | Path | OpenedModel, stats_path: str | Path, text: str | None,
                    threads: int | None = None, progress: bool = True, **kw) -> Sensitivity:
    """The sensitivity cached in the stats file when it matches (source, statistics, text, method and
    parameters), else :func:`measure_sensitivity` (``kw`` are its keyword options), then cached
    there as the key ``ggufmoe.sensitivity`` (the file stays a valid llama.cpp imatrix).

    ``text`` None: a cached result for this source and these statistics is used whatever text it
    was measured on; without one, it is an error. A legacy ``.dat`` imatrix cannot hold the cache:
    then nothing is cached.
    """
    model = OpenedModel.open(source, stats_path, config_ok=False)
    sens = cache.cached_sensitivity(model, text, **kw)
    if sens is not None:
        return sens
    if text is None:
        raise GgufmoeError(f"{stats_path}: no sensitivity measured for this model and these statistics yet; "
                           "measuring it needs calibration text")
    sens = measure_sensitivity(model, text, threads, progress, **kw)
    cache.store(model, text, sens, **kw)
    return sens

"""Per-tensor quantization sensitivity: the KL divergence each tensor adds at each llama.cpp type.

The memory-budget planner (:mod:`ggufmoe.plan`) picks one type per tensor; it needs, for every
quantizable tensor (GGUF name; the 3-D expert tensor of a layer is one tensor) and every type in
:data:`CANDIDATES`, a predicted cost: the mean KL divergence (nats/token) added when that tensor
alone is stored at that type and everything else is exact. Costs are additive across tensors.

Measured (:func:`measure_sensitivity`): weights + calibration statistics + text
----------------------------------------------------------------------------------
1. **Error.** Each tensor's rows are quantized with our quantizer (llama.cpp's own,
   :class:`ggufmoe.quant.Quantizer`, with the tensor's — for experts the expert's — importance
   row, exactly as ``convert`` does) and read back with ``gguf.quants.dequantize``. The error is
   ``sum_rows r_w * sum_j imp_j * (w - w_hat)^2`` with ``imp`` the importance row (mean squared
   input): the expected squared output error per token the tensor adds (diagonal approximation).
   Expert tensors sum their experts' errors weighted by routing frequency (``counts / n_tokens``
   of the layer; experts never routed cost nothing). The token embedding has no importance
   matrix (a row lookup): its rows are weighted by token frequency in the text instead (add-one
   smoothed) and its columns equally. A type a row does not fit is measured as its fallback
   (:func:`ggufmoe.quant.effective_type`), as ``convert`` writes it.

   Sampling: at most ``max_rows`` rows per tensor (default 256), the same rows for every type.
   Plain tensors: a uniform sample without replacement, scaled by rows/sampled. Expert tensors:
   ``max_rows // experts`` rows (at least 1) from each routed expert, scaled per expert; with more
   than ``max_experts`` routed experts, that many are taken evenly over the frequency ranking and
   the sum is scaled by the routing mass of all over the mass of those taken. The embedding: the
   ``max_rows / 2`` most frequent tokens exactly plus a uniform sample of the rest. The sample is
   seeded by the tensor name (deterministic).
2. **Calibration.** Per tensor class (:attr:`TensorSpec.kind`: ``attn_q``, ``ffn_down_exps``,
   ``token_embd``, ...) one probe: ``convert`` with that class (all layers) at the anchor type
   :data:`PROBE_TYPE` (Q3_K) and everything else F16, mean KL divergence through llama.cpp
   against the all-F16 conversion over ``chunks`` chunks of ``ctx`` tokens spread over the text
   (F32 KV cache). ``scale[class] = KL / sum of the class's errors at Q3_K``. Here and below a
   class is all its layers: ``measured`` probes need ``classes + 1`` conversions (10 for
   Qwen3-MoE), whatever the depth.
3. **Costs.** ``cost = scale * e(Q3_K) * (e(t) / e(Q3_K)) ** b[class]`` per tensor
   (:func:`power_costs`): exactly ``scale * error`` at the anchor, and with ``b = 1`` everywhere.
   KL is not linear in the error: probing every class of the reference model at Q2_K, Q3_K and
   Q4_K gives log-log slopes of 0.67-0.82 (``output``, which feeds the logits directly: 1.01).
   With ``b = 1`` a whole model at Q6_K is predicted at 0.40x its measured KL (Q5_K 0.76x, Q4_K
   1.04x, Q2_K 1.19x); with the slopes at 0.98x (1.36x, 1.40x, 0.92x) — costs of tensors alone
   add up to 1.0-1.4x the joint KL. ``b`` comes from :data:`DEFAULT_EXPONENTS` (measured on the
   reference model) unless ``probe_types`` names more than one type; then each class's power law
   (factor and slope) is fitted to its own probes by least squares in log-log. Q3_K as anchor: the middle of the range a
   budget plan chooses from (2-4 bits), one class at Q3_K moves KL by 0.005-0.02 nats (far above
   llama.cpp's run-to-run noise, which is zero on CPU), and its quantizer is fast.
4. **Depth.** The same error costs more in early layers than in late ones (the residual stream
   it is added to grows with depth): class scales alone predicted the reference model's layer-0
   experts at IQ2_XXS at 0.28x their measured KL and layer 5's at 1.7x. So up to ``layer_probes``
   runs of consecutive blocks (default 8) are probed too, each with all its tensors at the anchor
   type, and costs are scaled per run so that the runs' shares follow those probes while each
   class keeps its total (:func:`apply_layer_factors`).

Defaults (:func:`default_sensitivity`): shapes only (a 671B model planned from config.json)
-------------------------------------------------------------------------------------------
``cost = DEFAULT_SCALES[class] * g * r(Q3_K) * (r(t) / r(Q3_K)) ** DEFAULT_EXPONENTS[class] *
active elements``, where ``r`` is each type's relative error ``E(w - w_hat)^2 / E w^2`` measured
with our quantizer on seeded Gaussian rows (:data:`GAUSSIAN_REL_ERROR`, :func:`gaussian_rel_errors`),
active elements are ``n_elements`` times ``top_k / n_expert`` for expert tensors, and
``DEFAULT_SCALES`` / ``DEFAULT_EXPONENTS`` are the reference model's measured class costs per unit
of relative error and active element, and its slopes (:func:`derive_defaults` on refmoe-qwen3:
first 400,000 characters of calib.txt, probes at Q3_K, Q2_K and Q4_K on 4 chunks of 512 tokens;
reproduce with ``python -m ggufmoe.sensitivity``). Classes the reference lacks use their closest
relative (:data:`DEFAULT_CLASS`: ``attn_q_a``/``attn_q_b`` -> ``attn_q``,
``attn_kv_a_mqa``/``attn_k_b`` -> ``attn_k``, ``attn_v_b`` -> ``attn_v``, dense and shared FFN ->
the routed one, per active element). ``g = N_REF_ACTIVE / active elements of the model`` keeps
totals at the reference model's scale: a whole model at one type is predicted to cost about what
the reference costs at that type, while the split between tensors follows their active size and
class. Types that need an importance matrix are left out (``imatrix=True`` prices them too).

Caching (:func:`load_or_measure`): the result is stored in the stats file as the JSON string key
``ggufmoe.sensitivity``, with a key hashing the source (config, checkpoint file names and sizes),
the statistics, the text, the method and its parameters; a second call returns it at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from .arch import TensorSpec
from .convert import importance
from .errors import GgufmoeError
from .quant import Quantizer, effective_type, one_torch_thread, requires_imatrix
from .stats import Stats
from .tensor_types import EMBEDDING, EMBEDDING_SUBSTITUTE, TypeRules

CANDIDATES: tuple[T, ...] = (
    T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.Q2_K, T.IQ3_XXS, T.IQ3_S, T.Q3_K, T.IQ4_XS,
    T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16)
PROBE_TYPE = T.Q3_K
METHOD_VERSION = 2
KEY = "ggufmoe.sensitivity"  # stats-file key holding the cached result (JSON)

# Relative error E(w - w_hat)^2 / E w^2 of each type (candidates and their fallbacks) with our
# quantizer on Gaussian data: 256 rows of 256 values from numpy's default_rng(0), importance all
# ones. Computing it takes seconds (llama.cpp builds IQ lookup tables on first use), so it is kept
# here; gaussian_rel_errors() recomputes it and the tests check that it still agrees.
GAUSSIAN_REL_ERROR: dict[str, float] = {
    "IQ1_S": 0.237194, "IQ1_M": 0.205848, "IQ2_XXS": 0.11874, "IQ2_XS": 0.0905738, "IQ2_S": 0.0622478,
    "Q2_K": 0.072034, "IQ3_XXS": 0.0331575, "IQ3_S": 0.0188533, "Q3_K": 0.0210717, "IQ4_XS": 0.00576195,
    "Q4_K": 0.00502778, "Q5_K": 0.00125966, "Q6_K": 0.000300997, "Q8_0": 2.88222e-05, "F16": 4.27768e-08,
    "IQ4_NL": 0.00565746, "Q5_0": 0.00164318, "Q5_1": 0.00115316,
}

# KL (nats/token) at the anchor type per unit of (Gaussian relative error x active elements) per
# class, and the reference's active quantizable elements: derive_defaults() on refmoe-qwen3 measured
# with `python -m ggufmoe.sensitivity` (statistics and probes on the first 400,000 characters of
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
# Classes the reference model lacks -> the reference class they default to.
DEFAULT_CLASS: dict[str, str] = {
    "attn_q_a": "attn_q", "attn_q_b": "attn_q", "attn_kv_a_mqa": "attn_k", "attn_k_b": "attn_k",
    "attn_v_b": "attn_v", "attn_qkv": "attn_v",
    "ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps",
    "ffn_gate_shexp": "ffn_gate_exps", "ffn_up_shexp": "ffn_up_exps", "ffn_down_shexp": "ffn_down_exps",
}


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

    def predict(self, types: Mapping[str, str | T] | str | T) -> float:
        """Predicted KL of an assignment (tensor -> type; tensors not named stay exact), or of one type
        for every tensor (the embedding takes ``EMBEDDING_SUBSTITUTE`` when the type needs an
        importance matrix, as ``convert --type`` does)."""
        if not isinstance(types, (str, T)):
            return sum(self.cost[n][_name(t)] for n, t in types.items() if n in self.cost)
        t = _name(types)
        total = 0.0
        for name, c in self.cost.items():
            if t not in c and name == EMBEDDING:
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
                                         "layer_factors", "info")
                      if k in d})


def _name(t: str | T) -> str:
    return t.name if isinstance(t, T) else str(t).upper()


def quantizable(spec: TensorSpec) -> bool:
    """Whether ``convert`` quantizes the tensor (not 1-D, norm, bias or router: those stay F32)."""
    return TypeRules(T.F16).requested(spec) != T.F32


def candidates_for(spec: TensorSpec, has_imatrix: bool) -> list[T]:
    """Candidate types of a tensor: those needing an importance matrix only when it has one."""
    return [t for t in CANDIDATES if has_imatrix or not requires_imatrix(t)]


def active_elements(spec: TensorSpec, n_expert: int, top_k: int) -> float:
    """Elements a token uses: expert tensors count ``top_k / n_expert`` of theirs."""
    return spec.n_elements * (top_k / n_expert if spec.is_expert else 1.0)


# --- defaults -------------------------------------------------------------------------------------

def gaussian_rel_errors(types=None, rows: int = 256, ne0: int = 256, seed: int = 0) -> dict[str, float]:
    """Relative squared error of each type on seeded Gaussian data (our quantizer, importance ones)."""
    types = types or [T[n] for n in GAUSSIAN_REL_ERROR]
    x = np.random.default_rng(seed).standard_normal((rows, ne0)).astype(np.float32)
    ones = np.ones(ne0, np.float32)
    out = {}
    with Quantizer(1) as q:
        for t in types:
            d = gguf.quants.dequantize(q.quantize(x, t, ones).reshape(rows, -1), t)
            out[t.name] = float(np.mean((d.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
    return out


def default_class(kind: str) -> str | None:
    """The reference class whose default scale a tensor class takes (None: none fits)."""
    if kind in DEFAULT_SCALES:
        return kind
    return DEFAULT_CLASS.get(kind)


def default_exponent(kind: str) -> float:
    cls = default_class(kind)
    if cls in DEFAULT_EXPONENTS:
        return DEFAULT_EXPONENTS[cls]
    return float(np.median(list(DEFAULT_EXPONENTS.values()))) if DEFAULT_EXPONENTS else 1.0


def default_sensitivity(specs: list[TensorSpec], n_expert: int, top_k: int, imatrix: bool = False) -> Sensitivity:
    """Costs from shapes alone (no weights, no statistics); see the module docstring.

    ``imatrix``: also price the types that need an importance matrix (when the model will be
    converted with one); never for the token embedding, which no imatrix covers.
    """
    specs = [s for s in specs if quantizable(s)]
    if not specs:
        raise GgufmoeError("no quantizable tensors")
    act = {s.name: active_elements(s, n_expert, top_k) for s in specs}
    g = N_REF_ACTIVE / sum(act.values())
    unknown = math.exp(np.mean(np.log(list(DEFAULT_SCALES.values()))))  # a class no reference class fits
    cost, error, scales, exponents = {}, {}, {}, {}
    for s in specs:
        cls = default_class(s.kind)
        scale = scales.setdefault(s.kind, (DEFAULT_SCALES[cls] if cls else unknown) * g)
        b = exponents.setdefault(s.kind, default_exponent(s.kind))
        ne0 = s.shape[-1]
        anchor = GAUSSIAN_REL_ERROR[effective_type(PROBE_TYPE, ne0).name] * act[s.name]
        error[s.name] = {t.name: GAUSSIAN_REL_ERROR[effective_type(t, ne0).name] * act[s.name]
                         for t in candidates_for(s, imatrix and s.name != EMBEDDING)}
        cost[s.name] = {t: scale * anchor * (e / anchor) ** b for t, e in error[s.name].items()}
    info = dict(method="default", version=METHOD_VERSION, anchor=PROBE_TYPE.name, g=g, n_active=sum(act.values()),
                note="Gaussian relative error x active elements, reference per-class scale and exponent, x g")
    return Sensitivity(cost, False, scales, error, {}, exponents, info)


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


# --- measured -------------------------------------------------------------------------------------

@dataclass
class _Sample:
    rows: np.ndarray  # (n, ne0) float32
    imatrix: np.ndarray | None  # importance row given to the quantizer
    col_w: np.ndarray  # (ne0,) float64 error weight per column
    row_w: np.ndarray  # (n,) float64 weight per sampled row (frequency x rows/sampled)


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _pick(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if k >= n else np.sort(rng.choice(n, k, replace=False))


def _expert_weights(spec: TensorSpec, stats: Stats, n_expert: int, top_k: int) -> np.ndarray:
    """Routing frequency of each part of an expert tensor."""
    layer = stats.layers.get(spec.layer)
    if layer is None or layer.n_tokens <= 0:
        return np.full(spec.n_parts, top_k / n_expert)
    return np.array([layer.counts[spec.source_expert(i)] / layer.n_tokens for i in range(spec.n_parts)])


def _samples(spec: TensorSpec, stats: Stats, token_freq: np.ndarray | None, n_expert: int, top_k: int,
             max_rows: int, max_experts: int) -> list[_Sample]:
    rng = _rng(spec.name)
    ne0 = spec.shape[-1]
    imx = stats.imatrix
    out = []
    if spec.is_expert:
        freq = _expert_weights(spec, stats, n_expert, top_k)
        used = [i for i in np.argsort(-freq, kind="stable") if freq[i] > 0]
        if not used:
            return []
        take = used if len(used) <= max_experts else \
            [used[j] for j in sorted(set(np.linspace(0, len(used) - 1, max_experts).round().astype(int)))]
        mass_ratio = float(freq[used].sum() / freq[take].sum())
        per = max(1, max_rows // len(take))
        for i in sorted(take):
            data = spec.load(int(i)).numpy().reshape(-1, ne0)
            idx = _pick(len(data), per, rng)
            imp = imx.row(spec.name, spec.source_expert(int(i)))
            out.append(_Sample(np.ascontiguousarray(data[idx], np.float32), imp,
                               np.ones(ne0) if imp is None else imp.astype(np.float64),
                               np.full(len(idx), freq[i] * len(data) / len(idx) * mass_ratio)))
        return out
    data = spec.load(0).numpy().reshape(-1, ne0)
    rows = importance(spec, 0, imx)
    imp = None if rows is None else rows.mean(axis=0)  # per-head rows (MLA's attn_k_b/attn_v_b): their mean
    col_w = np.ones(ne0) if imp is None else imp.astype(np.float64)
    n = len(data)
    if spec.name == EMBEDDING and token_freq is not None and len(token_freq) == n:
        p = token_freq
        if n <= max_rows:
            idx, w = np.arange(n), p
        else:
            order = np.argsort(-p, kind="stable")
            top, rest = order[: max_rows // 2], order[max_rows // 2:]
            pick = rest[_pick(len(rest), max_rows - len(top), rng)]
            idx = np.concatenate([top, pick])
            w = np.concatenate([p[top], p[pick] * len(rest) / len(pick)])
        order = np.argsort(idx)
        idx, w = idx[order], w[order]
    else:
        idx = _pick(n, max_rows, rng)
        w = np.full(len(idx), n / len(idx))
    out.append(_Sample(np.ascontiguousarray(data[idx], np.float32), imp, col_w, w))
    return out


def _error(q: Quantizer, samples: list[_Sample], t: T) -> float:
    total = 0.0
    for s in samples:
        n = len(s.rows)
        d = gguf.quants.dequantize(q.quantize(s.rows, t, s.imatrix).reshape(n, -1), t)
        diff2 = (d.astype(np.float64) - s.rows) ** 2
        total += float(s.row_w @ (diff2 @ s.col_w))
    return total


def measure_errors(specs: list[TensorSpec], stats: Stats, token_freq: np.ndarray | None, n_expert: int, top_k: int,
                   threads: int | None = None, max_rows: int = 256, max_experts: int = 64,
                   progress: bool = True) -> dict[str, dict[str, float]]:
    """Importance-weighted squared error of every tensor at every candidate type (module docstring, 1)."""
    threads = max(1, threads or os.cpu_count() or 1)
    q = Quantizer(1)
    tasks = []
    for s in specs:
        has_row = s.name in stats.imatrix.entries and s.name != EMBEDDING
        for t in candidates_for(s, has_row):
            tasks.append((s, t, effective_type(t, s.shape[-1])))
    for eff in sorted({e for _, _, e in tasks}, key=lambda e: e.value):  # lookup tables, before the threads
        if eff != T.F16:
            q.quantize(np.zeros((1, 256), np.float32), eff, np.ones(256, np.float32))
    out: dict[str, dict[str, float]] = {s.name: {} for s in specs}

    def finish(name: str, jobs: list) -> None:
        for t, f in jobs:
            out[name][t.name] = f.result() if f is not None else 0.0
        bar.update(len(jobs))

    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(tasks), desc="quant error", unit="type",
                                                    disable=not progress) as bar:
        pending = None  # one tensor computes while the next one loads
        for s in specs:
            samples = _samples(s, stats, token_freq, n_expert, top_k, max_rows, max_experts)
            effs: dict[T, object] = {}
            jobs = []
            for _, t, eff in (x for x in tasks if x[0] is s):
                if eff not in effs:
                    effs[eff] = pool.submit(_error, q, samples, eff) if samples else None
                jobs.append((t, effs[eff]))
            if pending:
                finish(*pending)
            pending = (s.name, jobs)
        if pending:
            finish(*pending)
    return out


def _token_frequency(ids: np.ndarray, n_vocab: int) -> np.ndarray:
    """Add-one smoothed frequency of each token id."""
    counts = np.bincount(ids[(ids >= 0) & (ids < n_vocab)], minlength=n_vocab).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + n_vocab)


MAX_TEXT_TOKENS = 1_000_000  # tokens of the text looked at (token frequencies, KL chunks)


def _kl(scorer_path: Path, seqs: list[list[int]], base: list[np.ndarray], threads: int) -> float:
    from .logprobs import LlamaScorer, compare

    with LlamaScorer(scorer_path, max(len(s) for s in seqs), threads) as score:
        kls = [compare(score(s), b, s).kld_mean for s, b in zip(seqs, base)]
    weights = [len(s) - 1 for s in seqs]
    return float(np.average(kls, weights=weights))


def _class_rules(names: list[str], t: T) -> TypeRules:
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return TypeRules(T.F16, [(re.compile(pattern), t)])


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


def calibrate(error: dict[str, dict[str, float]], classes: dict[str, list[str]], probes: dict[str, dict[str, float]],
              anchor: str) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float]]:
    """(cost, scales, exponents) from the errors and the probes' measured KL (module docstring, 2-3).

    With one probe per class the class's cost at the anchor type is its measured KL and the exponent
    is from :data:`DEFAULT_EXPONENTS`; with more, both come from a power law fitted to the probes.
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


def _spread(seqs: list[list[int]], n: int) -> list[list[int]]:
    """``n`` chunks evenly spaced over the text (whole chunks only, unless there are none)."""
    full = [c for c in seqs if len(c) == len(seqs[0])] or seqs[:1]
    if len(full) <= n:
        return full
    return [full[i] for i in np.linspace(0, len(full) - 1, n).round().astype(int)]


def measure_sensitivity(src_dir: str | Path, stats: Stats, text: str, threads: int | None = None, progress: bool = True,
                        *, chunks: int = 4, ctx: int = 512, max_rows: int = 256, max_experts: int = 64,
                        probe_types: tuple[T, ...] = (PROBE_TYPE,), uniform_types: tuple[T, ...] = (),
                        layer_probes: int = 8) -> Sensitivity:
    """Costs from the weights, calibrated by probes through llama.cpp (see the module docstring).

    ``probe_types``: the first is the anchor each class is calibrated at; with more, each class's
    exponent is fitted to its probes (else :data:`DEFAULT_EXPONENTS`). ``uniform_types``:
    whole-model conversions at these types, their measured KL against the sum of the costs
    (``info['uniform']``); they only report. ``layer_probes``: at most this many runs of consecutive
    blocks, each probed with all its tensors at the anchor type, set how cost is spread over depth
    (:func:`apply_layer_factors`; 0: by error alone).
    """
    # torch only converts single tensors here (BF16 -> F32): 10 ms instead of 0.1 ms per small tensor
    # on a busy machine with its own threads
    with one_torch_thread():
        return _measure(src_dir, stats, text, threads, progress, chunks, ctx, max_rows, max_experts, probe_types,
                        uniform_types, layer_probes)


def _measure(src_dir, stats, text, threads, progress, chunks, ctx, max_rows, max_experts, probe_types,
             uniform_types, layer_probes) -> Sensitivity:
    from transformers import AutoTokenizer

    from .arch import architecture_for
    from .calibrate import token_ids
    from .convert import ConvertOptions, convert
    from .imatrix import save_imatrix
    from .logprobs import LlamaScorer
    from .source.hf import HFSource

    t_start = time.perf_counter()
    threads = max(1, threads or os.cpu_count() or 1)
    src_dir = Path(src_dir)
    arch = architecture_for(HFSource(src_dir))
    n_expert, top_k = arch.n_expert, arch.top_k
    specs = [s for s in arch.tensors() if quantizable(s)]
    if not text or not text.strip():
        raise GgufmoeError("measuring sensitivity needs calibration text (it is empty)")
    if not probe_types:
        raise GgufmoeError("at least one probe type is needed")
    anchor = probe_types[0].name
    tok = AutoTokenizer.from_pretrained(src_dir)
    ids = token_ids(tok, text, max_tokens=MAX_TEXT_TOKENS)
    vocab = next((s.shape[0] for s in specs if s.name == EMBEDDING), int(arch.cfg.vocab_size))
    freq = _token_frequency(ids.astype(np.int64), vocab)
    if len(ids) < 2:
        raise GgufmoeError("calibration text too short to measure KL divergence")
    prefix = tok("", add_special_tokens=True)["input_ids"]  # BOS, if the tokenizer adds one (as calibrate does)
    body = ctx - len(prefix)
    if body < 1:
        raise GgufmoeError(f"context {ctx} is too small")
    seqs = _spread([prefix + ids[i: i + body].tolist() for i in range(0, len(ids), body)], chunks)
    if sum(len(s) - 1 for s in seqs) < 1:
        raise GgufmoeError("calibration text too short to measure KL divergence")

    error = measure_errors(specs, stats, freq, n_expert, top_k, threads, max_rows, max_experts, progress)
    t_error = time.perf_counter() - t_start

    kinds: dict[str, list[str]] = {}
    for s in specs:
        kinds.setdefault(s.kind, []).append(s.name)
    probes: dict[str, dict[str, float]] = {k: {} for k in kinds}
    runs = [(k, t) for k in kinds for t in probe_types]
    groups = layer_groups(specs, layer_probes)
    layer_kl: dict[str, float] = {}
    uniform = {}
    with tempfile.TemporaryDirectory(prefix="ggufmoe-sens-") as tmp:
        tmp = Path(tmp)
        imx = tmp / "imatrix.gguf"
        save_imatrix(stats.imatrix, imx)

        def build(name: str, rules: TypeRules) -> Path:
            return convert(src_dir, ConvertOptions(out=tmp / name, types=rules, imatrix=imx, threads=threads,
                                                   progress=False))[0]

        with tqdm(total=1 + len(runs) + len(groups) + len(uniform_types), desc="KL probes", unit="probe",
                  disable=not progress) as bar:
            bar.set_postfix_str("F16")
            base_path = build("base.gguf", TypeRules(T.F16))
            with LlamaScorer(base_path, max(len(s) for s in seqs), threads) as score:
                base = [score(s) for s in seqs]
            base_path.unlink()
            bar.update()
            for kind, t in runs:
                bar.set_postfix_str(f"{kind}={t.name}")
                path = build("probe.gguf", _class_rules(kinds[kind], t))
                probes[kind][t.name] = _kl(path, seqs, base, threads)
                path.unlink()
                bar.update()
            for g, names in groups.items():
                bar.set_postfix_str(f"layers {g}={anchor}")
                path = build("probe.gguf", _class_rules(names, T[anchor]))
                layer_kl[g] = _kl(path, seqs, base, threads)
                path.unlink()
                bar.update()
            cost, scales, exponents = calibrate(error, kinds, probes, anchor)
            factors = apply_layer_factors(cost, kinds, groups, layer_kl, anchor)
            sens = Sensitivity(cost, True, scales, error, probes, exponents, layer_kl, factors)
            for t in uniform_types:
                bar.set_postfix_str(f"all={t.name}")
                path = build("uniform.gguf", TypeRules(t))
                measured = _kl(path, seqs, base, threads)
                path.unlink()
                predicted = sens.predict(t)
                uniform[t.name] = dict(measured=measured, predicted=predicted, ratio=predicted / measured)
                bar.update()
    fit = {k: {t: sum(cost[n][t] for n in kinds[k]) / v for t, v in p.items() if v > 0} for k, p in probes.items()}
    sens.info = dict(method="measured", version=METHOD_VERSION, anchor=anchor,
                     probe_types=[t.name for t in probe_types],
                     exponents_fitted=len(probe_types) > 1, chunks=len(seqs), ctx=ctx,
                     kl_tokens=sum(len(s) - 1 for s in seqs), max_rows=max_rows, max_experts=max_experts,
                     error_seconds=round(t_error, 2), total_seconds=round(time.perf_counter() - t_start, 2),
                     probe_fit=fit, uniform=uniform)
    return sens


# --- cache ----------------------------------------------------------------------------------------

def source_fingerprint(src_dir: str | Path) -> str:
    """config.json and the checkpoint's file names and sizes (reading 1 TB of weights is not an option)."""
    p = Path(src_dir)
    h = hashlib.sha256()
    for f in sorted([p / "config.json", *p.glob("*.safetensors"), p / "model.safetensors.index.json"]):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()


def stats_fingerprint(stats: Stats) -> str:
    h = hashlib.sha256()
    for name in sorted(stats.imatrix.entries):
        e = stats.imatrix.entries[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(e.in_sum2, np.float32).tobytes())
        h.update(np.ascontiguousarray(e.counts, np.float32).tobytes())
    for il in sorted(stats.layers):
        h.update(f"{il}:{stats.layers[il].n_tokens}".encode())
        h.update(np.asarray(stats.layers[il].counts, np.float32).tobytes())
    return h.hexdigest()


def _params(kw: dict) -> dict:
    """The measuring parameters that change the result (JSON-able)."""
    def plain(v):
        return v.name if isinstance(v, T) else [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
    return {k: plain(v) for k, v in sorted(kw.items()) if k != "uniform_types"}


def _cache_key(src_dir, stats: Stats, kw: dict) -> str:
    from importlib.metadata import version

    parts = dict(source=source_fingerprint(src_dir), stats=stats_fingerprint(stats), params=_params(kw),
                 candidates=[t.name for t in CANDIDATES], method=METHOD_VERSION, llama_cpp=version("llama_cpp_python"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_sensitivity(src_dir: str | Path, stats: Stats, text: str | None, **kw) -> Sensitivity | None:
    """The sensitivity stored with ``stats`` if it was measured on this source, these statistics, this
    text (any text when None) and with these parameters (``kw`` of :func:`measure_sensitivity`)."""
    raw = stats.extras.get(KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        if d.get("key") != _cache_key(src_dir, stats, kw) or (text is not None and d.get("text") != _text_hash(text)):
            return None
        return Sensitivity.from_dict(d["sensitivity"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # damaged or from another version: measure again


def load_or_measure(src_dir: str | Path, stats_path: str | Path, text: str | None, threads: int | None = None,
                    progress: bool = True, **kw) -> Sensitivity:
    """The sensitivity cached in the stats file when it matches (source, statistics, text, method and
    parameters), else :func:`measure_sensitivity` (``kw`` are its keyword options), then cached
    there as the key ``ggufmoe.sensitivity`` (the file stays a valid llama.cpp imatrix).

    ``text`` None: a cached result for this source and these statistics is used whatever text it
    was measured on; without one, it is an error. A legacy ``.dat`` imatrix cannot hold the cache:
    then nothing is cached.
    """
    from .arch import architecture_for
    from .source.hf import HFSource
    from .stats import load_stats

    stats_path = Path(stats_path)
    arch = architecture_for(HFSource(src_dir))
    stats = load_stats(stats_path, top_k=arch.top_k)
    sens = cached_sensitivity(src_dir, stats, text, **kw)
    if sens is not None:
        return sens
    if text is None:
        raise GgufmoeError(f"{stats_path}: no sensitivity measured for this model and these statistics yet; "
                           "measuring it needs calibration text")
    sens = measure_sensitivity(src_dir, stats, text, threads, progress, **kw)
    store(src_dir, stats_path, text, sens, **kw)
    return sens


def store(src_dir: str | Path, stats_path: str | Path, text: str, sens: Sensitivity, **kw) -> None:
    """Cache ``sens`` (measured on ``text`` with ``kw``) in the stats file; a ``.dat`` imatrix cannot hold it."""
    from .arch import architecture_for
    from .imatrix import GGUF_MAGIC
    from .source.hf import HFSource
    from .stats import load_stats, save_stats

    with open(stats_path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            return
    stats = load_stats(stats_path, top_k=architecture_for(HFSource(src_dir)).top_k)
    stats.extras[KEY] = json.dumps(dict(key=_cache_key(src_dir, stats, kw), text=_text_hash(text),
                                        sensitivity=asdict(sens)))
    save_stats(stats, stats_path)


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Measure the reference model (probes at Q3_K, Q2_K, Q4_K, uniform whole-model checks) and print
    the default tables (GAUSSIAN_REL_ERROR, DEFAULT_SCALES, DEFAULT_EXPONENTS, N_REF_ACTIVE)."""
    import argparse

    from .arch import architecture_for
    from .source.hf import HFSource
    from .stats import collect_stats

    shared = Path(__file__).resolve().parents[2] / "shared"
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", type=Path, default=shared / "models" / "refmoe-qwen3")
    ap.add_argument("--text", type=Path, default=shared / "data" / "calib.txt")
    ap.add_argument("--chars", type=int, default=400_000)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--uniform", default="IQ2_XXS,Q2_K,IQ3_XXS,Q3_K,IQ4_XS,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--out", type=Path, help="write the measured sensitivity (JSON) here")
    args = ap.parse_args(argv)
    rel = {k: float(f"{v:.6g}") for k, v in gaussian_rel_errors().items()}
    GAUSSIAN_REL_ERROR.update(rel)
    print("GAUSSIAN_REL_ERROR =", rel, flush=True)
    text = args.text.read_text()[: args.chars]
    stats = collect_stats(args.model, text, ctx=512)
    uniform = tuple(T[n] for n in args.uniform.split(",") if n)
    sens = measure_sensitivity(args.model, stats, text, chunks=args.chunks, probe_types=(T.Q3_K, T.Q2_K, T.Q4_K),
                               uniform_types=uniform)
    if args.out:
        args.out.write_text(sens.to_json())
    arch = architecture_for(HFSource(args.model))
    scales, exponents, n_act = derive_defaults(sens, list(arch.tensors()), arch.n_expert, arch.top_k)
    for what in ("scales", "exponents", "probes", "info"):
        print(what, json.dumps(getattr(sens, what), indent=1))
    print("DEFAULT_SCALES =", {k: float(f"{v:.6g}") for k, v in scales.items()})
    print("DEFAULT_EXPONENTS =", {k: round(v, 3) for k, v in exponents.items()})
    print("N_REF_ACTIVE =", int(n_act))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Per-tensor quantization sensitivity: measured on the reference model through llama.cpp, defaults
from shapes alone, the cache in the stats file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

import tiny_models
from ggufmoe.model.qtypes import CANDIDATES
from ggufmoe.pipeline import measure
from ggufmoe.pipeline.measure import load_or_measure
from ggufmoe.sensitivity.cache import KEY, cached_sensitivity
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.sensitivity.cost import PROBE_TYPE
from ggufmoe.sensitivity.fit import fit_joint
from ggufmoe.quant.rules import quantizable
from ggufmoe.sensitivity.defaults import GAUSSIAN_REL_ERROR, default_sensitivity, gaussian_rel_errors
from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError
from ggufmoe.stats.imatrix import load_imatrix
from ggufmoe.quant.ggml import requires_imatrix
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.file import Stats, load_stats, save_stats
from ggufmoe.stats.collect import collect_stats
from ggufmoe.model.names import EMBEDDING, role, tensor_name

# Small but real: 1 chunk of 512 tokens per probe, 64 sampled rows per tensor (the defaults are 4 and 256).
MEASURE = dict(chunks=1, max_rows=64)
K_CHAIN = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def calib_text() -> str:
    return (tiny_models.TEST_DATA / "calib.txt").read_text()[:60_000]


def bpw(name: str) -> float:
    bs, ts = GGML_QUANT_SIZES[T[name]]
    return 8 * ts / bs


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch only runs a 33M-parameter model and converts single tensors here: on 2 busy cores its
    intra-op threads cost more than they give (calibration 11 s with 2 threads, 3 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref_specs():
    arch = architecture_for(HFSource(tiny_models.REF_MODEL))
    return list(arch.tensors()), arch.n_expert, arch.top_k


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sens") / "stats.gguf"
    save_stats(collect_stats(tiny_models.REF_MODEL, calib_text(), ctx=512, progress=False), path)
    return path


@pytest.fixture(scope="module")
def measured(stats_path):
    """(sensitivity, seconds) of the first, measuring call."""
    t0 = time.perf_counter()
    sens = load_or_measure(tiny_models.REF_MODEL, stats_path, calib_text(), progress=False, **MEASURE)
    return sens, time.perf_counter() - t0


def test_measured_covers_quantized_tensors(measured, ref_specs):
    sens, seconds = measured
    specs = ref_specs[0]
    assert sens.measured
    quantized = {s.name for s in specs if quantizable(s)}
    assert set(sens.cost) == quantized
    assert not any(n.endswith(("_norm.weight", "ffn_gate_inp.weight")) for n in sens.cost)  # F32 tensors: none
    for name, costs in sens.cost.items():
        expected = [t.name for t in CANDIDATES if role(name) != EMBEDDING or not requires_imatrix(t)]
        assert list(costs) == expected, name  # the embedding has no imatrix: no IQ2_XXS/IQ2_XS/IQ1_S
        assert all(np.isfinite(c) and c >= 0 for c in costs.values())
    kinds = {s.kind for s in specs if quantizable(s)}
    assert set(sens.scales) == kinds == set(sens.probes) == set(sens.exponents)
    assert all(v > 0 for v in sens.scales.values())
    assert all(0.5 <= v <= 1.5 for v in sens.exponents.values())
    # one probe per class, at the anchor type, reproduced exactly by the class's costs
    for kind, probe in sens.probes.items():
        assert list(probe) == [PROBE_TYPE.name] and probe[PROBE_TYPE.name] > 0
        members = {s.name for s in specs if s.kind == kind}
        total = sum(c[PROBE_TYPE.name] for n, c in sens.cost.items() if n in members)
        assert total == pytest.approx(probe[PROBE_TYPE.name], rel=1e-6)
    # one probe per block; the share of each block follows it
    anchor = PROBE_TYPE.name
    assert set(sens.layer_probes) == set(sens.layer_factors) == {str(i) for i in range(6)}
    block = {n: c[anchor] for n, c in sens.cost.items() if n.startswith("blk.")}
    for il, kl in sens.layer_probes.items():
        share = sum(v for n, v in block.items() if n.startswith(f"blk.{il}.")) / sum(block.values())
        assert share == pytest.approx(kl / sum(sens.layer_probes.values()), rel=1e-3)
    # the same error costs more early than late (the residual stream grows with depth)
    assert sens.layer_factors["0"] > sens.layer_factors["5"]
    print(f"\nmeasured in {seconds:.1f} s (error phase {sens.info['error_seconds']} s); scales "
          + json.dumps({k: float(f'{v:.3g}') for k, v in sens.scales.items()}) + "; layer factors "
          + json.dumps({k: round(v, 2) for k, v in sens.layer_factors.items()}))


def test_costs_fall_with_bits(measured):
    sens, _ = measured
    for name, costs in sens.cost.items():
        chain = [costs[t] for t in K_CHAIN]
        assert all(a > b for a, b in zip(chain, chain[1:])), (name, chain)
        assert costs["F16"] <= costs["Q8_0"]
        assert costs["Q8_0"] < 0.05 * costs["Q4_K"]
        # overall ordering: a type at least half a bit per weight larger never costs more; MXFP4 (power-of-two
        # block scales, no importance weighting) is there for weights stored as MXFP4, and measures worse
        for a in costs:
            for b in costs:
                if bpw(b) >= bpw(a) + 0.5 and "MXFP4" not in (a, b):
                    assert costs[b] < costs[a], (name, a, b, costs[a], costs[b])


def test_uniform_prediction_matches_llama_cpp(measured, stats_path, eval_tokens):
    """Whole model at Q4_K and Q3_K: the summed costs through the joint map (fitted on the probe text at
    IQ2_XXS, Q3_K and Q5_K) against KL measured on other text."""
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.runtime.logprobs import LlamaScorer, compare
    from ggufmoe.quant.rules import TypeRules

    sens, _ = measured
    tokens = eval_tokens[:512]
    out = stats_path.parent
    base = convert(tiny_models.REF_MODEL, ConvertOptions(out=out / "F16.gguf", types=TypeRules.parse("F16"),
                                                         progress=False))[0]
    with LlamaScorer(base, len(tokens)) as score:
        ref = score(tokens)
    ratios = {}
    for t in ("Q4_K", "Q3_K"):
        path = convert(tiny_models.REF_MODEL, ConvertOptions(out=out / f"{t}.gguf", types=TypeRules.parse(t),
                                                             imatrix=stats_path, progress=False))[0]
        with LlamaScorer(path, len(tokens)) as score:
            kld = compare(score(tokens), ref, tokens).kld_mean
        path.unlink()
        ratios[t] = (sens.combined(sens.predict(t)), kld)
    print("\npredicted / measured KL: "
          + ", ".join(f"{t} {p:.4f} / {m:.4f} = {p / m:.2f}" for t, (p, m) in ratios.items()))
    for t, (p, m) in ratios.items():
        assert 0.5 < p / m < 2.0, (t, p, m)
    assert ratios["Q3_K"][0] > 2 * ratios["Q4_K"][0]
    assert set(sens.info["uniform"]) == {"IQ2_XXS", "Q3_K", "Q5_K"} and sens.joint != [1.0, 1.0]


def test_joint_fit() -> None:
    """A power law through whole-model probes, a factor through one, none without any."""
    a, b = fit_joint([(0.5, 0.8), (0.2, 0.24), (0.05, 0.04)])
    assert b == pytest.approx(np.polyfit(np.log([0.5, 0.2, 0.05]), np.log([0.8, 0.24, 0.04]), 1)[0])
    assert a * 0.2 ** b == pytest.approx(0.24, rel=0.1)
    assert fit_joint([(0.2, 0.1)]) == pytest.approx((0.5, 1.0))
    assert fit_joint([]) == (1.0, 1.0)


def test_cache_in_stats_file(measured, stats_path, monkeypatch):
    sens, _ = measured
    kept = stats_path.read_bytes()
    with monkeypatch.context() as m:  # the second call measures nothing and writes nothing
        m.setattr(measure, "measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
        again = load_or_measure(tiny_models.REF_MODEL, stats_path, calib_text(), progress=False, **MEASURE)
    assert again == sens and stats_path.read_bytes() == kept
    # without text: whatever text it was measured on
    assert load_or_measure(tiny_models.REF_MODEL, stats_path, None, progress=False, **MEASURE) == sens
    # the file is still an imatrix llama.cpp reads, and a stats file with the result in its extras
    stats = load_stats(stats_path)
    assert KEY in stats.extras and json.loads(stats.extras[KEY])["sensitivity"]["cost"] == sens.cost
    assert load_imatrix(stats_path).entries.keys() == stats.imatrix.entries.keys()
    # another text, other parameters or other statistics: not the cached result
    model = OpenedModel.open(tiny_models.REF_MODEL, stats_path, config_ok=False)
    assert cached_sensitivity(model, calib_text(), **MEASURE) == sens
    assert cached_sensitivity(model, calib_text() + "x", **MEASURE) is None
    assert cached_sensitivity(model, calib_text(), chunks=2, max_rows=64) is None
    model.stats.layers[0].counts[0] += 1
    assert cached_sensitivity(model, calib_text(), **MEASURE) is None
    # extras are string keys under ggufmoe.*, never the reserved ones
    for bad in ("sensitivity", "ggufmoe.stats.source"):
        with pytest.raises(GgufmoeError, match="extra key"):
            save_stats(Stats(stats.imatrix, {}, extras={bad: "x"}), stats_path.with_name("bad.gguf"))
    # no cache and no text: one clear error
    save_stats(Stats(stats.imatrix, {}, source="x"), stats_path.with_name("bare.gguf"))
    with pytest.raises(GgufmoeError, match="needs calibration text"):
        load_or_measure(tiny_models.REF_MODEL, stats_path.with_name("bare.gguf"), None, progress=False)


def test_gaussian_table_is_current(measured):
    """The module's relative-error table is what our quantizer gives (lookup tables are built by now)."""
    fresh = gaussian_rel_errors()
    assert fresh.keys() == GAUSSIAN_REL_ERROR.keys()
    for t, v in fresh.items():
        assert v == pytest.approx(GAUSSIAN_REL_ERROR[t], rel=1e-4), t


def test_default_on_reference_agrees_with_measured(measured, ref_specs):
    sens, _ = measured
    specs, n_expert, top_k = ref_specs
    default = default_sensitivity(specs, n_expert, top_k)
    assert not default.measured and set(default.cost) == set(sens.cost)
    for name, costs in default.cost.items():
        assert not any(requires_imatrix(T[t]) for t in costs)  # no statistics: no imatrix types
        chain = [costs[t] for t in K_CHAIN]
        assert all(a > b for a, b in zip(chain, chain[1:]))
    with_imatrix = default_sensitivity(specs, n_expert, top_k, imatrix=True)
    assert "IQ2_XXS" in with_imatrix.cost["blk.0.ffn_down_exps.weight"]
    assert "IQ2_XXS" not in with_imatrix.cost[tensor_name(EMBEDDING)]
    with pytest.raises(GgufmoeError, match="needs an importance matrix"):
        default.predict("IQ2_XXS")
    assert with_imatrix.predict("IQ2_XXS") > with_imatrix.predict("Q2_K")  # the embedding at Q2_K, as convert does
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q6_K"):
        ratio = default.predict(t) / sens.predict(t)
        assert 0.5 < ratio < 2.0, (t, ratio)


def test_default_from_config_alone(tmp_path):
    """DeepSeek-V3 (671B) planned from transformers' configuration: shapes only, no weights."""
    import transformers

    from ggufmoe.source.config import ConfigSource

    transformers.DeepseekV3Config().to_json_file(tmp_path / "config.json")
    arch = architecture_for(ConfigSource(tmp_path))
    specs = list(arch.tensors())
    sens = default_sensitivity(specs, arch.n_expert, arch.top_k, aliases=arch.sensitivity_aliases)
    assert set(sens.cost) == {s.name for s in specs if quantizable(s)}
    assert not any(k in sens.cost for k in ("blk.3.ffn_gate_inp.weight", "blk.3.exp_probs_b.bias"))
    for costs in sens.cost.values():
        chain = [costs[t] for t in K_CHAIN]
        assert all(a >= b for a, b in zip(chain, chain[1:])) and chain[-1] > 0
    # attn_k_b rows hold 128 values: K-types fall back (Q2_K and Q3_K are both IQ4_NL)
    kb = sens.cost["blk.0.attn_k_b.weight"]
    assert kb["Q2_K"] == kb["Q3_K"] and kb["Q4_K"] < kb["Q3_K"]
    # a routed expert weighs top_k / n_expert of a shared expert of the same shape and class
    by_name = {s.name: s for s in specs}
    exps, shexp = "blk.3.ffn_down_exps.weight", "blk.3.ffn_down_shexp.weight"
    per_el = [sens.cost[n]["Q4_K"] / by_name[n].n_elements for n in (exps, shexp)]
    assert per_el[0] / per_el[1] == pytest.approx(arch.top_k / arch.n_expert)
    assert set(sens.scales) == {s.kind for s in specs if quantizable(s)} and all(v > 0 for v in sens.scales.values())
    # totals stay at the reference model's scale: a whole model at Q4_K costs what the reference does
    ref = architecture_for(HFSource(tiny_models.REF_MODEL))
    ref_default = default_sensitivity(list(ref.tensors()), ref.n_expert, ref.top_k)
    assert 0.33 < sens.predict("Q4_K") / ref_default.predict("Q4_K") < 3

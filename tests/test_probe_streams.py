"""Streamed probes (ggufmoe.stats.probe_streams): held-out token streams through quantized and pruned variants of every
layer inside the streamed calibration measure the KL that probes through llama.cpp measure, on the same tokens; the
planner plans from them (``--sensitivity streamed``); an interrupted calibration resumes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import tiny_models
from cli_run import run
from hooked_cli import INTERRUPT_LAYER
from ggufmoe.pipeline.calibrate import calibrate
from ggufmoe.pipeline.streamed_calibration import HELD_OUT
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.pipeline.planning import build_plan, options_from_plan, pruning_kl
from ggufmoe.sensitivity.fit import layer_groups
from ggufmoe.plan.allocate import priced
from ggufmoe.plan.budget import Budget
from ggufmoe.plan.report import format_plan
from ggufmoe.prune.apply import prune_model
from ggufmoe.quant.rules import TypeRules, quantizable
from ggufmoe.runtime.logprobs import base_logprobs, score_against
from ggufmoe.sensitivity.cost import PROBE_TYPE, SensitivityMode
from ggufmoe.sensitivity.probe_set import LAYER_PROBES, class_rules, probe_kinds, prune_name
from ggufmoe.sensitivity.prune_cost import probe_prunings
from ggufmoe.sensitivity.streamed import streamed_sensitivity
from ggufmoe.stats.file import load_stats, save_stats
from ggufmoe.stats.held_weights import locate
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.stats.probe_results import KEY, StreamedProbes
from ggufmoe.stats.text import MAX_TEXT_TOKENS, spread_chunks, token_chunks

CTX = 512
CHUNKS = 2
AGREE = 0.10  # streamed / llama.cpp, per probe


def _text(name: str, chars: int) -> str:
    return (tiny_models.TEST_DATA / name).read_text()[:chars]


@pytest.fixture(scope="module")
def ref_stats(tmp_path_factory) -> tuple[Path, str]:
    """The reference model calibrated streamed on 8,192 tokens of the first 130,000 characters of calib.txt, carrying
    the probes on 2 chunks of eval_doc.txt and of the pieces it held out (of all 130,000)."""
    out = tmp_path_factory.mktemp("probes") / "stats.gguf"
    text = _text("eval_doc.txt", 200_000)
    save_stats(calibrate(tiny_models.REF_MODEL, _text("calib.txt", 130_000), probes=True,
                         probe_texts={"eval_doc.txt": text}, probe_chunks=CHUNKS, ctx=CTX, max_tokens=8192,
                         progress=False), out)
    return out, text


def test_streamed_probes_agree_with_the_probes_through_llama_cpp(ref_stats, tmp_path):
    """An attention class and an expert class at Q3_K, the first and the last layer at Q3_K, the whole model at
    IQ2_XXS and the deeper pruning (a llama.cpp conversion each, against the F16 conversion, on the same chunks):
    within 10% of llama.cpp's KL. All 20 probes: ``eval/results/streamed_probes.md`` (``eval/streamed_probes.py``)."""
    stats, text = ref_stats
    model = OpenedModel.open(tiny_models.REF_MODEL, stats)
    streamed = model.probes
    assert streamed.texts == [HELD_OUT, "eval_doc.txt"] and len(streamed.positions) == 2 * CHUNKS
    assert len(streamed.kl) == 6 + 9 + 3 + 2  # every layer, class, whole-model type and pruning
    specs = [s for s in model.arch.tensors() if quantizable(s)]
    kinds, groups = probe_kinds(specs), layer_groups(specs, LAYER_PROBES)
    a = PROBE_TYPE
    rules = {f"class:{k}:{a.name}": class_rules(kinds[k], a) for k in ("attn_v", "ffn_down_exps")}
    rules |= {f"layers:{g}:{a.name}": class_rules(groups[g], a) for g in (min(groups), max(groups))}
    rules["all:IQ2_XXS"] = TypeRules(T.IQ2_XXS)
    from transformers import AutoTokenizer

    seqs = spread_chunks(token_chunks(AutoTokenizer.from_pretrained(model.path), text, CTX, MAX_TEXT_TOKENS), CHUNKS)

    def kl(name: str, **opts) -> float:
        path = convert(model, ConvertOptions(out=tmp_path / f"{name}.gguf", stats=stats, progress=False, **opts))[0]
        return float(np.mean([c.kld_mean for c in score_against(path, seqs, base)]))

    base = base_logprobs(convert(model, ConvertOptions(out=tmp_path / "f16.gguf", types=TypeRules(T.F16),
                                                       progress=False))[0], seqs)
    llama = {probe: kl(f"p{i}", types=r) for i, (probe, r) in enumerate(rules.items())}
    req = probe_prunings(model.arch, True)[-1]
    llama[prune_name(req, model.arch)] = kl("pruned", types=TypeRules(T.F16), prune=req)
    ratios = {p: streamed.by_text(p)["eval_doc.txt"] / v for p, v in llama.items()}
    assert all(abs(r - 1) <= AGREE for r in ratios.values()), ratios


def test_plan_from_streamed_probes(ref_stats, tmp_path):
    """``--sensitivity streamed`` plans without a llama.cpp run, says so, and the plan's bytes are written. Probed on
    two texts, it also predicts its KL on text like each (the costs fitted on that text's probes alone), priced as
    the allocation prices the plan."""
    stats, _ = ref_stats
    plan = build_plan(tiny_models.REF_MODEL, Budget(12_000_000, weights_only=True, sensitivity=SensitivityMode.STREAMED),
                      stats, None, progress=False)
    assert any("end-to-end probes in the streamed calibration" in n for n in plan.notes), plan.notes
    assert set(plan.predicted_by_text) == {HELD_OUT, "eval_doc.txt"}
    assert "on text like eval_doc.txt" in format_plan(plan)
    model = OpenedModel.open(tiny_models.REF_MODEL, stats)
    (sens, prune_kl), by_text = streamed_sensitivity(model, progress=False)
    _, specs = prune_model(model.arch, plan.pruning())
    types = {n: T[t] for n, t in plan.types.items()}
    assert priced(specs, types, TypeRules(None), sens, True) == pytest.approx(plan.predicted_kld["quant"], rel=1e-9)
    for text, (s, kl) in by_text.items():
        on_text = priced(specs, types, TypeRules(None), s, True) + kl(plan.pruning())
        assert on_text == pytest.approx(plan.predicted_by_text[text]["total"], rel=1e-9) and 0 < on_text < 1
    written = convert(tiny_models.REF_MODEL, options_from_plan(plan, ConvertOptions(
        out=tmp_path / "plan.gguf", types=TypeRules.parse("Q8_0"), progress=False)))[0]
    assert written.stat().st_size == plan.file_bytes
    assert 0 < plan.predicted_kld["total"] < 1


def test_stats_without_streamed_probes_are_refused_for_streamed_plans(tmp_path):
    model = tmp_path / "hf"
    tiny_models.build("qwen3moe", model)
    stats = tmp_path / "stats.gguf"
    save_stats(calibrate(model, _text("calib.txt", 30_000), ctx=128, progress=False), stats)
    assert KEY not in load_stats(stats).extras  # a model this small carries none by default
    proc = run("plan", model, "--budget", "1M", "--weights-only", "--stats", stats, "--sensitivity", "streamed")
    assert proc.returncode == 1 and "no streamed probes" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("family", ["gemma4", "deepseek3"])
def test_tiny_family_probes_agree_with_llama_cpp(family, tmp_path):
    """Gemma 4 (the layer runs again on its routed output, soft-capped logits, the shared-KV hand-over) and DeepSeek-V3
    (MLA, grouped sigmoid routing with a bias): the whole model at Q3_K's fallback and the deeper pruning agree with
    llama.cpp's on the same chunks; every quantized tensor is found in its module (MLA's attn_v_b as per-head blocks of
    kv_b_proj's rows, attn_k_b as those blocks transposed)."""
    model_dir = tmp_path / "hf"
    tiny_models.build(family, model_dir)
    calib, held = _text("calib.txt", 60_000), _text("eval_doc.txt", 60_000)
    stats = tmp_path / "stats.gguf"
    save_stats(calibrate(model_dir, calib, probes=True, probe_texts={"eval": held}, probe_chunks=CHUNKS, ctx=128,
                         progress=False), stats)
    model = OpenedModel.open(model_dir, stats)
    streamed = model.probes
    from transformers import AutoTokenizer

    seqs = spread_chunks(token_chunks(AutoTokenizer.from_pretrained(model_dir), held, 128, MAX_TEXT_TOKENS), CHUNKS)
    f16 = convert(model, ConvertOptions(out=tmp_path / "f16.gguf", types=TypeRules(T.F16), progress=False))[0]
    q3 = convert(model, ConvertOptions(out=tmp_path / "q3.gguf", types=TypeRules(T.Q3_K), stats=stats,
                                       progress=False))[0]
    base = base_logprobs(f16, seqs)
    llama = {"all:Q3_K": float(np.mean([c.kld_mean for c in score_against(q3, seqs, base)]))}
    req = probe_prunings(model.arch, True)[-1]
    llama[prune_name(req, model.arch)] = pruning_kl(model, held, [req], 128, CHUNKS)[0]
    ratios = {p: streamed.by_text(p)["eval"] / kl for p, kl in llama.items()}
    assert streamed.info["left_exact"] == []
    assert all(abs(r - 1) <= AGREE for r in ratios.values()), ratios


def test_interrupted_calibration_resumes_its_probes(tmp_path):
    """Interrupted in layer 2 (DeepSeek-V3's second MoE layer) and resumed, the probes' KL are those of an
    uninterrupted run."""
    model, text, held = tmp_path / "hf", tmp_path / "calib.txt", tmp_path / "held.txt"
    tiny_models.build("deepseek3", model)
    text.write_text(_text("calib.txt", 40_000))
    held.write_text(_text("eval_doc.txt", 30_000))
    args = [model, "--text", text, "--chunk", 128, "--probe-text", held, "--probe-chunks", 2, "-q"]
    want, out = tmp_path / "want.gguf", tmp_path / "stats.gguf"
    assert run("calibrate", *args, "-o", want).returncode == 0
    proc = run("calibrate", *args, "-o", out, env={INTERRUPT_LAYER: "2"})
    assert proc.returncode == 130, proc.stderr
    assert (tmp_path / ".stats.gguf.partial" / "probes.npz").exists()
    proc = run("calibrate", *args, "-o", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "relative standard error" in proc.stdout.splitlines()[-2]
    a, b = (StreamedProbes.from_json(load_stats(p).extras[KEY]) for p in (want, out))
    assert a.kl.keys() == b.kl.keys()
    for p in a.kl:
        np.testing.assert_allclose(b.kl[p], a.kl[p], rtol=1e-5, err_msg=p)


def test_tensors_are_found_in_their_parameter_element_by_element():
    """Rows in another order, MLA's attn_v_b (per-head rows of kv_b_proj) and attn_k_b (those blocks transposed) are
    found exactly; a tensor transformed otherwise (scaled) is not (it stays exact in the streams)."""
    w = np.random.default_rng(0).standard_normal((2 * (4 + 3), 8)).astype(np.float32)  # 2 heads, nope 4, v 3, rank 8
    heads = w.reshape(2, 7, 8)
    specs = [TensorSpec("blk.0.attn_k_b.weight", (2, 8, 4), lambda _: heads[:, :4].transpose(0, 2, 1).copy()),
             TensorSpec("blk.0.attn_v_b.weight", (2, 3, 8), lambda _: heads[:, 4:].copy()),
             TensorSpec("blk.0.attn_q.weight", (14, 8), lambda _: w[::-1].copy())]
    for s in specs:
        rows, cols = locate(s, w)
        np.testing.assert_array_equal(w[rows.numpy(), cols.numpy()].reshape(s.shape), s.load(0))
    assert locate(TensorSpec("blk.0.attn_q.weight", (14, 8), lambda _: 2 * w), w) is None


def test_the_summary_says_how_precise_the_probes_are():
    one = StreamedProbes(["a"], [0], [511], {"all:Q3_K": [0.1], "prune:reap:8": [0.2]})
    assert one.summary().endswith("one chunk: no standard error (--probe-chunks 2 or more gives one)")
    four = StreamedProbes(["a", "b"], [0, 0, 1, 1], [511] * 4, {"all:Q3_K": [0.1, 0.12, 0.11, 0.09]})
    assert four.rel_stderr("all:Q3_K") == pytest.approx(np.std([0.1, 0.12, 0.11, 0.09], ddof=1) / 2 / 0.105)
    assert "quantization up to 6% (4 chunks per text for 5%)" in four.summary()


def test_probe_texts_are_named_by_their_files(tmp_path):
    """A plan names each probe text by its file: two of the same name are refused in one line, nothing written."""
    text = tmp_path / "calib.txt"
    text.write_text(_text("calib.txt", 5_000))
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "docs.txt").write_text(_text("eval_doc.txt", 5_000))
    out = tmp_path / "stats.gguf"
    proc = run("calibrate", tiny_models.REF_MODEL, "--text", text, "--probe-text", tmp_path / "a" / "docs.txt",
               "--probe-text", tmp_path / "b" / "docs.txt", "-o", out)
    assert proc.returncode == 1 and "same name" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "calib.txt"]

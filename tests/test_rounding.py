"""Output-aware rounding (``convert --rounding aware``): codes chosen from the layers' real inputs in a streamed pass,
written in llama.cpp's own block formats; per tensor never worse than llama.cpp's rounding on held-out tokens; the file
loads and runs in stock llama.cpp and is closer to the model there."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader

import tiny_models
from cli_run import run
from hooked_cli import INTERRUPT_LAYER
from ggufmoe.model.parts import part_chunks
from ggufmoe.pipeline.calibrate import calibrate
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.pipeline.rounding import RoundingOptions, round_ahead, rounding_dir
from ggufmoe.plan.budget import Plan
from ggufmoe.plan.layout import assign_types
from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.aware import ROWS_PER_THREAD, can_round, gptq_codes, round_table, round_tensor, shift_of
from ggufmoe.quant.ggml import Quantizer, requires_imatrix
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.logprobs import base_logprobs, score_against
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.quant.rounded_store import RoundedStore
from ggufmoe.stats.hidden import RowStore
from ggufmoe.stats.rounded_embedding import MIN_EXPLAINED, norm_gain, reader_moments
from ggufmoe.stats.rounding import REPORT, Rounder, RoundingRequest, TensorReport, summary

# every tensor at one of three types: attention at a lattice type, the routed experts at a K-type, the rest at another
RULES = ("attn_.*=IQ2_XXS", "ffn_.*_exps=Q4_K")
DEFAULT = "Q3_K"


def _text(chars: int) -> str:
    return (tiny_models.TEST_DATA / "calib.txt").read_text()[:chars]


@pytest.mark.parametrize("t", [T.Q4_K, T.Q2_K, T.IQ2_XXS, T.IQ4_XS])
def test_round_tensor_lowers_the_output_error_of_correlated_inputs(t):
    rng = np.random.default_rng(0)
    n = 256
    mix = rng.standard_normal((n, n)) * rng.random(n) ** 3  # inputs with a few strong directions
    x = rng.standard_normal((3000, n)) @ mix + 0.05 * rng.standard_normal((3000, n))
    fit, held = x[:2400], x[2400:]
    w = rng.standard_normal((32, n)).astype(np.float32)
    with Quantizer(1) as q:
        r = round_tensor(w, t, (fit ** 2).mean(0).astype(np.float32), fit.T @ fit, held.T @ held, q)
    assert r.aware and r.error_aware < 0.9 * r.error_llama


@pytest.mark.parametrize("t", [T.Q4_K, T.Q3_K, T.IQ2_XXS])
def test_the_embedding_is_rounded_for_what_its_first_readers_make_of_it(ref_model, eval_tokens, t):
    """Layer 0's input and its q, k and v's input (transformers): the fitted gain is the attention norm's weight up to
    one scale; the table rounded for ``diag(a) (W^T W) diag(a)`` changes what q, k and v compute from the tokens'
    rows less than llama.cpp's rounding does, at the same bytes."""
    layer = ref_model.model.layers[0]
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, a: seen.update(r=a[0][0])),  # (None: the inputs stay)
             layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0][0]))]
    with torch.no_grad():
        ref_model(torch.tensor([eval_tokens[:512]]))
    for h in hooks:
        h.remove()
    gain, explained = norm_gain(seen["x"], seen["r"])
    norm = layer.input_layernorm.weight.detach().double().numpy()
    assert explained > MIN_EXPLAINED and np.corrcoef(gain, norm)[0, 1] > 0.99
    attn = layer.self_attn
    weights = [m.weight.detach().float().numpy() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    h = reader_moments(weights, gain)
    table = ref_model.model.embed_tokens.weight.detach().float().numpy()
    counts = np.bincount(eval_tokens, minlength=len(table)).astype(np.float64)
    imp = np.ones(table.shape[1], np.float32) if requires_imatrix(t) else None
    with Quantizer(1) as q:
        r = round_table(table, t, imp, h, counts, q)
        llama = q.quantize(table, t, imp)
    assert r.aware and len(r.data) == len(llama)
    rows = torch.tensor(eval_tokens[:512])
    change = {}
    for name, data in (("llama", llama), ("aware", r.data)):
        values = torch.from_numpy(gguf.quants.dequantize(data.reshape(len(table), -1), t))
        d = (values[rows] - torch.from_numpy(table)[rows]).double() * torch.from_numpy(gain)
        change[name] = sum(float(((d @ torch.from_numpy(w).double().T) ** 2).sum()) for w in weights)
    assert change["aware"] < 0.9 * change["llama"], change


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K, T.IQ4_XS])
def test_fed_rounding_brings_the_outputs_on_rounded_inputs_near_the_models_own(t):
    """Fed the rounded model's inputs ``x'`` with the model's own ``x``, the rounding makes ``Q x'`` nearer ``W x``
    than rounding for ``x'`` alone, on held-out tokens; its reported error is llama.cpp's own error less what it gains
    over llama.cpp's rounding there (none left when it gains more)."""
    rng = np.random.default_rng(1)
    n = 256
    mix = rng.standard_normal((n, n)) * rng.random(n) ** 3
    x = rng.standard_normal((3000, n)) @ mix + 0.05 * rng.standard_normal((3000, n))
    rounded = x + 0.03 * x @ rng.standard_normal((n, n)) / np.sqrt(n)  # what rounding upstream made of x
    w = rng.standard_normal((32, n)).astype(np.float32)
    fit, held = slice(0, 2400), slice(2400, 3000)

    def moments(part):
        return rounded[part].T @ rounded[part], (x[part] - rounded[part]).T @ rounded[part]

    (h_fit, cross_fit), (h_held, cross_held) = moments(fit), moments(held)
    imp = (rounded[fit] ** 2).mean(0).astype(np.float32)

    def error(data):  # sum over held-out tokens of ||Q x' - W x||^2
        values = gguf.quants.dequantize(data.reshape(len(w), -1), t).astype(np.float64)
        return float(((rounded[held] @ values.T - x[held] @ w.T.astype(np.float64)) ** 2).sum())

    with Quantizer(1) as q:
        fed = round_tensor(w, t, imp, h_fit, h_held, q, shift=shift_of(h_fit, cross_fit), cross_held=cross_held)
        alone = round_tensor(w, t, imp, h_fit, h_held, q)
        llama = q.quantize(w, t, imp)
    assert fed.aware and error(fed.data) < 0.9 * error(alone.data)
    gain = error(llama) - error(fed.data)
    assert fed.error_aware == pytest.approx(max(0.0, fed.error_llama - gain), rel=1e-6, abs=1e-6 * fed.error_llama)


@pytest.mark.parametrize("t", [T.Q4_K, T.IQ2_XXS])
def test_the_feedback_split_among_threads_chooses_the_same_codes(t):
    """Rows are independent: split among a quantizer's threads the error feedback writes the same bytes."""
    rng = np.random.default_rng(2)
    n, rows = 256, 2 * ROWS_PER_THREAD + 40
    x = rng.standard_normal((2000, n)) @ (rng.standard_normal((n, n)) * rng.random(n) ** 3)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    h = x.T @ x
    with Quantizer(1) as one, Quantizer(3) as three:
        raw = one.quantize(w, t, (x ** 2).mean(0).astype(np.float32))
        assert np.array_equal(gptq_codes(w, raw, t, h, q=three), gptq_codes(w, raw, t, h, q=one))


def test_a_rerun_layer_is_reported_once(tmp_path):
    """A resumed pass reruns the layer an interruption stopped in, which may have written its report already: what the
    report holds of that layer's tensors goes when the layer starts again, the rest stays."""
    store = RoundedStore(tmp_path)
    done, again = TensorReport(3, 2, 1.0, 0.5, 0.5), TensorReport(4, 4, 2.0, 1.0, 1.0)
    (tmp_path / REPORT).write_text(json.dumps({"blk.0.ffn_up_exps.weight": asdict(done),
                                               "blk.1.ffn_up_exps.weight": asdict(again)}))
    rounder = Rounder(RoundingRequest({}, None, store), ctx=16, threads=1)
    spec = TensorSpec("blk.1.ffn_up_exps.weight", (2, 8, 16), lambda i: np.zeros((8, 16), np.float32), n_parts=2)
    rounder.want([spec])
    rounder.close()
    assert rounder.report == {"blk.0.ffn_up_exps.weight": done}


def test_a_layer_is_rounded_one_input_at_a_time_in_forward_order(tmp_path):
    """In the rounded model's run q, k and v (one input) and the attention output (another) are paired with the
    model's own inputs; the first input's tensors are rounded and handed back first, the other's moments forgotten
    until a run with them rounded takes them again."""
    width, rows = 32, 64
    gen = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(width, width, generator=gen).numpy() for n in ("q", "k", "v", "o")}
    specs = [TensorSpec(n, (width, width), lambda i, n=n: weights[n]) for n in weights]
    rounder = Rounder(RoundingRequest({n: T.Q8_0 for n in [*weights, "wide"]}, None, RoundedStore(tmp_path)), ctx=16,
                      threads=1)
    rounder.store = lambda slot, w: RowStore.create(tmp_path / f"{slot}.rows", rows, w, in_memory=True)
    rounder.tokens = rows  # one forward of every row
    own = [torch.randn(rows, width, generator=gen) for _ in range(2)]

    def run(recording: bool) -> None:
        rounder.begin(recording)
        x = own if recording else [a + 0.01 * torch.randn(rows, width, generator=gen) for a in own]
        for name in ("q", "k", "v"):
            rounder.sample(name, x[0])
        rounder.sample("o", x[1])
        rounder.sample("wide", torch.randn(2 * rows, width))  # not one row per token: not taken

    rounder.want(specs + [TensorSpec("wide", (width, width), lambda i: weights["o"])])
    run(True)
    assert set(rounder.inputs) == {"q", "k", "v", "o"} and len({id(s) for s in rounder.inputs.values()}) == 2
    run(False)
    assert rounder.inputs_taken() == 2
    put = {}
    rounder.round_next(specs, lambda s, v: put.setdefault(s.name, v) is v)
    assert set(put) == {"q", "k", "v"} and rounder.wanted == {"o"} and rounder.inputs_taken() == 0
    run(False)
    rounder.round_next(specs, lambda s, v: put.setdefault(s.name, v) is v)
    assert set(put) == {"q", "k", "v", "o"} and not rounder.wanted
    rounder.close()
    assert {n: r.parts for n, r in rounder.report.items()} == {"q": 1, "k": 1, "v": 1, "o": 1}


def _rounding_pass(model: OpenedModel, opts: ConvertOptions) -> tuple[list, dict]:
    """The rounding pass of a conversion (kept beside its output as ``--resume`` keeps it): the typed tensors and
    the pass's report."""
    typed = assign_types(list(model.arch.tensors()), opts.types, model.stats.imatrix)
    store = round_ahead(model, typed, model.stats.imatrix, opts.rounding, opts.out, resume=False, progress=False)
    return typed, json.loads((store.path / REPORT).read_text())


@pytest.fixture(scope="module")
def ref_rounded(tmp_path_factory):
    """Statistics of a piece of calib.txt; the reference model's rounding pass from them (kept as ``--resume`` keeps
    it, with its report), and the conversions with both roundings."""
    tmp = tmp_path_factory.mktemp("rounding")
    text = _text(30_000)
    (tmp / "calib.txt").write_text(text)
    stats = tmp / "ref.stats.gguf"
    calibrate(tiny_models.REF_MODEL, text, out=stats, measure_local=False, progress=False, probes=False)
    model = OpenedModel.open(tiny_models.REF_MODEL, stats)
    base = ConvertOptions(out=tmp / "llama.gguf", types=TypeRules.parse(DEFAULT, RULES), stats=stats, progress=False)
    llama = convert(model, base)[0]
    aware = tmp / "aware.gguf"
    opts = replace(base, out=aware, rounding=RoundingOptions(text))
    typed, report = _rounding_pass(model, opts)
    convert(model, replace(opts, resume=True))  # takes the kept rounding: no second pass
    return model, typed, report, llama, aware


def test_every_tensor_is_rounded_and_never_worse_on_held_out_tokens(ref_rounded):
    """Every matmul the plan quantizes was rounded: each part (row chunk; expert slice the rounded model routed tokens
    to) kept the rounding with the lower output error on the held-out tokens, mostly ours."""
    model, typed, report, _, aware = ref_rounded
    matmuls = {p.spec.name: p.spec for p in typed if can_round(p.qtype)}  # and the token embedding (its readers')
    assert set(report) == set(matmuls)
    for name, r in report.items():
        spec = matmuls[name]
        if spec.is_expert:
            assert 0 < r["parts"] <= spec.n_parts, name
        else:
            assert r["parts"] == len(list(part_chunks(spec, 0))), name
        assert r["error_kept"] <= r["error_llama"] and r["error_kept"] <= r["error_aware"]
    parts = sum(r["parts"] for r in report.values())
    assert sum(r["aware"] for r in report.values()) > parts / 2
    assert sum(r["error_kept"] for r in report.values()) < 0.9 * sum(r["error_llama"] for r in report.values())
    assert not rounding_dir(aware).exists()


def test_the_report_says_how_many_tokens_each_part_was_fitted_to(ref_rounded):
    """Plain matmuls are fitted to every fitted token, the same count per input column at the same input width; a
    routed expert to the tokens routed to it, fewer; the token embedding to none (its readers' weights); the summary
    names the tensor fitted to the fewest tokens."""
    _, typed, report, _, _ = ref_rounded
    specs = {p.spec.name: p.spec for p in typed}
    reports = {n: TensorReport(**r) for n, r in report.items()}
    assert reports.pop("token_embd.weight").tokens == 0
    plain = {n: r.tokens_per_column * specs[n].shape[-1] for n, r in reports.items() if not specs[n].is_expert}
    experts = {n: r.tokens_per_column * specs[n].shape[-1] for n, r in reports.items() if specs[n].is_expert}
    tokens = next(iter(plain.values()))
    assert experts and all(v == pytest.approx(tokens) for v in plain.values())  # every plain matmul saw them all
    assert all(0 < e < tokens for e in experts.values()), experts
    fewest = min(reports, key=lambda n: reports[n].tokens_per_column)
    assert specs[fewest].is_expert and f"{fewest}'s parts, {reports[fewest].tokens_per_column:.1f}" in summary(reports)


def test_aware_file_has_llama_cpps_types_and_bytes_and_runs_closer_to_the_model(ref_rounded, ref_f32_gguf,
                                                                               eval_tokens):
    _, _, _, llama, aware = ref_rounded
    a, b = GGUFReader(aware), GGUFReader(llama)
    assert aware.stat().st_size == llama.stat().st_size
    types = {t.name: t.tensor_type for t in b.tensors}
    assert {t.name: t.tensor_type for t in a.tensors} == types
    differ = {t.name for t, u in zip(a.tensors, b.tensors) if not np.array_equal(t.data, u.data)}
    assert {types[n] for n in differ} == {T.IQ2_XXS, T.Q4_K, T.Q3_K}
    seqs = [eval_tokens[:512], eval_tokens[512:1024]]
    ref = base_logprobs(ref_f32_gguf, seqs)
    kl = {p.name: np.mean([c.kld_mean for c in score_against(p, seqs, ref)]) for p in (llama, aware)}
    assert kl[aware.name] < 0.95 * kl[llama.name], kl


def test_rounding_aware_refusals(ref_rounded, tmp_path):
    _, _, _, llama, _ = ref_rounded
    calib = tmp_path.parent / "calib.txt"
    calib.write_text(_text(2000))
    blank = tmp_path.parent / "blank.txt"
    blank.write_text("\n\n")
    ref = str(tiny_models.REF_MODEL)
    cases = [
        ((ref, "-o", str(tmp_path / "a.gguf"), "--type", "Q4_K", "--rounding", "aware"), "give --calib"),
        ((ref, "-o", str(tmp_path / "b.gguf"), "--type", "Q4_K_M", "--rounding", "aware", "--calib",
          str(calib)), "made by llama.cpp's quantizer"),
        ((str(llama), "-o", str(tmp_path / "c.gguf"), "--type", "Q2_K", "--rounding", "aware", "--calib",
          str(calib)), "needs the Hugging Face checkpoint"),
        ((ref, "-o", str(tmp_path / "d.gguf"), "--type", "Q4_K", "--calib", str(calib)),
         "--calib applies only with --budget or --rounding aware"),
        ((ref, "-o", str(tmp_path / "e.gguf"), "--type", "Q4_K", "--rounding", "aware", "--calib", str(blank)),
         "empty"),
        ((ref, "-o", str(tmp_path / "f.gguf"), "--type", "Q4_K", "--device", "cuda"),
         "--device is where the model runs over --calib"),
        ((ref, "-o", str(tmp_path / "g.gguf"), "--type", "Q4_K", "--rounding", "aware", "--calib", str(calib),
          "--device", "gpu0"), "not a device"),
        ((ref, "-o", str(tmp_path / "i.gguf"), "--type", "Q4_K", "--rounding", "aware", "--calib", str(calib)),
         "give a text of more than 1,536 tokens"),  # 500 tokens: no chunk to hold out
        ((ref, "-o", str(tmp_path / "j.gguf"), "--budget", "20M", "--weights-only", "--rounding", "aware", "--calib",
          str(calib)), "give a text of more than 1,536 tokens"),  # before the plan's calibration: no statistics left
    ]
    if not torch.cuda.is_available():
        cases.append(((ref, "-o", str(tmp_path / "h.gguf"), "--type", "Q4_K", "--rounding", "aware", "--calib",
                       str(calib), "--device", "cuda"), "torch sees no GPU"))
    for args, message in cases:
        proc = run("convert", *args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not list(tmp_path.iterdir())


def test_nothing_to_round_runs_no_pass(tmp_path):
    """Every tensor at a type the rounding has no encoder for (F16): no pass over the text, the file written."""
    calib = tmp_path / "calib.txt"
    calib.write_text(_text(2000))  # too short for a pass: it would be refused
    out = tmp_path / "f16.gguf"
    proc = run("convert", str(tiny_models.REF_MODEL), "-o", str(out), "--type", "F16", "--rounding", "aware",
               "--calib", str(calib), "-q")
    assert proc.returncode == 0 and "nothing to round" in proc.stderr, proc.stderr
    assert out.exists() and not rounding_dir(out).exists()


def test_interrupted_rounding_resumes_to_the_same_file(tmp_path):
    """A tiny DeepSeek-V3 (MLA, grouped sigmoid routing) interrupted in its second MoE layer keeps the rounding done so
    far beside the output; without --resume that is refused, with it the file is the uninterrupted run's."""
    model, text, stats = tmp_path / "hf", tmp_path / "calib.txt", tmp_path / "stats.gguf"
    tiny_models.build("deepseek3", model)
    text.write_text(_text(40_000))
    assert run("calibrate", model, "--text", text, "--chunk", 128, "--no-local-errors", "-o", stats,
               "-q").returncode == 0
    args = [model, "--stats", stats, "--type", "Q4_K", "--rounding", "aware", "--calib", text, "-q"]
    want, out = tmp_path / "want.gguf", tmp_path / "out.gguf"
    proc = run("convert", *args, "-o", want)
    assert proc.returncode == 0, proc.stderr
    proc = run("convert", *args, "-o", out, env={INTERRUPT_LAYER: "2"})
    assert proc.returncode == 130, proc.stderr
    assert rounding_dir(out).is_dir() and not out.exists()
    proc = run("convert", *args, "-o", out)
    assert proc.returncode != 0 and "--resume" in proc.stderr and rounding_dir(out).is_dir()
    proc = run("convert", *args, "-o", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == want.read_bytes()
    assert not rounding_dir(out).exists()


# family -> whether its token embedding is rounded for its readers
EMBEDDING_ROUNDED = {"qwen3next": True, "gemma4": True, "ernie4_5-moe": False, "deepseek4": False}


@pytest.mark.parametrize("family", list(EMBEDDING_ROUNDED))
def test_the_pass_rounds_models_of_other_layouts(tmp_path, family):
    """The pass runs on models unlike the reference: Qwen3-Next (linear attention first), Gemma 4 (its embedding
    scaled on the way in), ERNIE 4.5 (its embedding tied to the output: llama.cpp's rounding kept for it), DeepSeek-V4
    (matmul inputs that are not one row per token; rotary modules inside its layers, computed, not loaded, through two
    runs of each layer; a first layer reading four streams of the residual, not a row through a norm: the embedding
    keeps llama.cpp's rounding). Every tensor it rounds keeps the lower held-out error."""
    tiny_models.build(family, tmp_path / "hf")
    text = _text(8_000)
    stats = tmp_path / "stats.gguf"
    calibrate(tmp_path / "hf", text, out=stats, measure_local=False, progress=False, probes=False)
    model = OpenedModel.open(tmp_path / "hf", stats)
    opts = ConvertOptions(out=tmp_path / "out.gguf", types=TypeRules.parse("Q4_K"), stats=stats, progress=False,
                          rounding=RoundingOptions(text))
    _, report = _rounding_pass(model, opts)
    assert len(report) > 10 and all(r["error_kept"] <= r["error_llama"] for r in report.values())
    assert ("token_embd.weight" in report) is EMBEDDING_ROUNDED[family]


def test_a_plan_is_priced_with_the_rounding_it_gets():
    """A tensor's cost follows its error to the power of its exponent: half the output error at exponent 1 is half
    the cost, at 0.5 0.71x; a tensor the rounding did not reach keeps its cost. The quantization KL moves by the joint
    map's ratio of the sums, on every probe text; the pruning's stays."""
    kl = dict(prune=0.1, quant=0.3, total=0.4)
    plan = Plan("m", "qwen3moe", 1, 512, "f16", True, 8, 2, 8, 2, "reap", {}, {}, {}, 1, {}, dict(kl),
                predicted_by_text={"x": dict(prune=0.2, quant=0.6, total=0.8)},
                costs={"a": [0.2, 1.0], "b": [0.2, 0.5], "c": [0.1, 1.0]}, joint=[2.0, 0.8])
    plan.price_rounding({"a": 0.5, "b": 0.5})
    factor = ((0.2 * 0.5 + 0.2 * 0.5 ** 0.5 + 0.1) / 0.5) ** 0.8
    assert plan.rounding["quant_factor"] == pytest.approx(factor)
    assert plan.rounding["predicted_kld"] == pytest.approx(dict(prune=0.1, quant=0.3 * factor, total=0.1 + 0.3 * factor))
    assert plan.rounding["predicted_by_text"]["x"] == pytest.approx(dict(prune=0.2, quant=0.6 * factor,
                                                                         total=0.2 + 0.6 * factor))
    assert plan.predicted_kld == kl


def test_a_budget_conversion_is_priced_with_the_rounding_it_gets(tmp_path):
    """``convert --budget --rounding aware`` says what the KL is predicted to be with the rounding the file got, and
    saves it in the plan beside the output: the quantization's share lower than with llama.cpp's rounding."""
    model, text, out = tmp_path / "hf", tmp_path / "calib.txt", tmp_path / "out.gguf"
    tiny_models.build("qwen3moe", model)
    text.write_text(_text(30_000))
    proc = run("convert", model, "-o", out, "--budget", "1M", "--weights-only", "--calib", text, "--rounding",
               "aware", "--sensitivity", "local", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "predicted KL with this rounding" in proc.stderr
    plan = Plan.load(out.with_suffix(".plan.json"))
    assert set(plan.rounding["predicted_kld"]) == {"prune", "quant", "total"}
    assert 0 < plan.rounding["predicted_kld"]["quant"] < plan.predicted_kld["quant"]
    assert plan.rounding["predicted_kld"]["prune"] == plan.predicted_kld["prune"]

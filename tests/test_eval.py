"""`ggufmoe eval`: KL divergence, perplexity and top-1 through llama.cpp, against a GGUF or transformers."""

import json
from pathlib import Path

import pytest

import tiny_models
from cli_run import run
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.runtime.evaluate import evaluate
from ggufmoe.quant.rules import TypeRules

TEXT = tiny_models.TEST_DATA / "eval_doc.txt"


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "ref-Q4_K.gguf"
    return convert(tiny_models.REF_MODEL, ConvertOptions(out=out, types=TypeRules.parse("Q4_K"), progress=False))[0]


def test_f32_conversion_against_transformers(ref_f32_gguf, tmp_path):
    proc = run("eval", ref_f32_gguf, "--base", tiny_models.REF_MODEL, "--text", TEXT, "--max-tokens", 2048,
               "--cache-dir", tmp_path, "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    print(f"\nF32 GGUF vs transformers: KLD {r['kld_mean']:.2e} (p99 {r['kld_p99']:.2e}), top-1 {r['top1']:.4f}")
    assert r["tokens"] >= 2000 and r["chunks"] == 4
    assert r["kld_mean"] < 1e-4 and r["top1"] > 0.99
    assert r["ppl"] == pytest.approx(r["ppl_base"], rel=1e-3)


def test_quantized_against_gguf_base_is_cached(q4, ref_f32_gguf, tmp_path):
    first = evaluate(q4, ref_f32_gguf, TEXT.read_text(), ctx=256, max_tokens=1024, cache_dir=tmp_path, progress=False)
    cached = list(tmp_path.glob("*.npy"))
    assert len(cached) == 1
    again = evaluate(q4, ref_f32_gguf, TEXT.read_text(), ctx=256, max_tokens=1024, cache_dir=tmp_path,
                     progress=False)
    assert list(tmp_path.glob("*.npy")) == cached  # the base was not scored again
    assert again.kld_mean == first.kld_mean and again.ppl_base == first.ppl_base
    assert first.tokens == 4 * 255 and first.chunks == 4
    assert 1e-4 < first.kld_mean < first.kld_p99 and 0.5 < first.top1 < 1.0
    assert first.ppl > first.ppl_base > 1.0
    # another slice of text is another cache entry
    evaluate(q4, ref_f32_gguf, TEXT.read_text()[5000:], ctx=256, max_tokens=512, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 2


@pytest.mark.parametrize("case", ["missing model", "missing base", "base without config", "empty text"])
def test_bad_inputs_end_in_one_line(case, q4, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("" if case == "empty text" else TEXT.read_text()[:4000])
    model = tmp_path / "nope.gguf" if case == "missing model" else q4
    base = {"missing base": tmp_path / "nope", "base without config": tmp_path}.get(case, q4)
    proc = run("eval", model, "--base", base, "--text", text, "--cache-dir", tmp_path / "c", "-q")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr

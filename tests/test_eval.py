"""`ggufmoe eval`: KL divergence, perplexity and top-1 through llama.cpp, against a GGUF or transformers."""

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from cli_run import assert_one_line_error, run
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.runtime.evaluate import evaluate
from ggufmoe.runtime.logprobs import same_top_p, top_p_sets
from ggufmoe.quant.rules import TypeRules

TEXT = tiny_models.TEST_DATA / "eval_doc.txt"


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "ref-Q4_K.gguf"
    return convert(tiny_models.REF_MODEL, ConvertOptions(out=out, types=TypeRules.parse("Q4_K"), progress=False))[0]


def test_f32_conversion_against_transformers(ref_f32_gguf, tmp_path):
    proc = run("eval", ref_f32_gguf, "--base", tiny_models.REF_MODEL, "--text", TEXT, "--max-tokens", 2048,
               "--kv-type", "f32", "--cache-dir", tmp_path, "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    print(f"\nF32 GGUF vs transformers: KLD {r['kld_mean']:.2e} (p99 {r['kld_p99']:.2e}), top-1 {r['top1']:.4f}")
    assert r["tokens"] >= 2000 and r["chunks"] == 4
    assert r["kld_mean"] < 1e-4 and r["top1"] > 0.99
    assert r["kld_p99"] <= r["kld_p999"] < 1e-2 and r["top_p"] == 0.9 and r["same_top_p"] > 0.95
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
    assert 1e-4 < first.kld_mean < first.kld_p99 < first.kld_p999 and 0.5 < first.top1 < 1.0
    assert 0.1 < first.same_top_p < first.top1  # a whole set kept is rarer than its first token
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


def test_card_of_files_with_an_eval_result(q4, ref_f32_gguf, tmp_path):
    from huggingface_hub import ModelCard

    r = evaluate(q4, ref_f32_gguf, TEXT.read_text(), ctx=256, max_tokens=512, cache_dir=tmp_path, progress=False)
    (tmp_path / "q4.json").write_text(json.dumps(r.to_dict()))
    out = tmp_path / "README.md"
    proc = run("card", q4, ref_f32_gguf, "--eval-json", tmp_path / "q4.json", "--license", "apache-2.0",
               "--ctx", 2048, "-o", out)
    assert proc.returncode == 0, proc.stderr
    card = ModelCard.load(out)  # a local path: nothing is downloaded
    assert card.data.base_model == "refmoe-qwen3"  # general.name of the conversions
    assert card.data.tags == ["gguf", "moe"] and card.data.license == "apache-2.0"  # nothing pruned
    assert card.data.base_model_relation == "quantized"
    rows = {line.split(" | ")[0].strip("| "): line for line in card.text.splitlines() if ".gguf |" in line}
    assert set(rows) == {q4.name, ref_f32_gguf.name} and "memory at ctx 2048" in card.text
    assert f"{r.kld_p999:.3f}" in rows[q4.name] and f"{100 * r.same_top_p:.1f}%" in rows[q4.name]
    assert rows[ref_f32_gguf.name].count("–") == 6  # no quality given for it
    assert " 24/24 | 4 |" in rows[q4.name] and "| 32.0" in rows[ref_f32_gguf.name]  # F32: 32 bits, a bit more


@pytest.mark.parametrize("case", ["not a GGUF", "missing file", "bad eval json"])
def test_card_errors_end_in_one_line_and_write_nothing(case, q4, tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("not a model\n")
    args = {"not a GGUF": [q4, junk], "missing file": [q4, tmp_path / "nope.gguf"],
            "bad eval json": [q4, "--eval-json", junk]}[case]
    proc = run("card", *args, "-o", tmp_path / "README.md")
    assert_one_line_error(proc, {"not a GGUF": "not a GGUF", "missing file": "no such file",
                                 "bad eval json": "not JSON"}[case])
    assert not (tmp_path / "README.md").exists()


# hand-made distributions over 5 tokens, no sum landing on p = 0.9
BASE = [[0.5, 0.3, 0.15, 0.03, 0.02],    # top-0.9 set {0, 1, 2}
        [0.95, 0.02, 0.01, 0.01, 0.01],  # {0}
        [0.13, 0.1, 0.09, 0.35, 0.33],   # {3, 4, 0, 1}
        [0.5, 0.3, 0.15, 0.03, 0.02]]    # {0, 1, 2}
CAND = [[0.3, 0.5, 0.15, 0.03, 0.02],    # {1, 0, 2}: the same set in another order
        [0.85, 0.1, 0.03, 0.01, 0.01],   # {0, 1}: one token more
        [0.1, 0.13, 0.09, 0.35, 0.33],   # {3, 4, 1, 0}: the same set
        [0.4, 0.3, 0.15, 0.1, 0.05]]     # {0, 1, 2, 3}: the base's set and one more


def test_same_top_p_on_hand_made_distributions():
    base, cand = np.log(np.array(BASE)), np.log(np.array(CAND))
    # first=2: rows needing more than the first two tokens go through the widening (to the whole vocabulary)
    assert top_p_sets(base, 0.9, first=2).tolist() == [[0, 1, 2, 5], [0, 5, 5, 5], [0, 1, 3, 4], [0, 1, 2, 5]]
    assert top_p_sets(cand, 0.9).tolist() == [[0, 1, 2, 5], [0, 1, 5, 5], [0, 1, 3, 4], [0, 1, 2, 3]]
    assert same_top_p(cand, base, 0.9).tolist() == [True, False, True, False]
    assert same_top_p(cand, base, 0.45).tolist() == [False, True, True, False]  # {1} vs {0}; {0, 1} vs {0}
    assert same_top_p(base, base, 0.9).all() and same_top_p(cand, cand, 1.0).all()


def test_top_p_sets_match_a_full_sort():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 3000)) * rng.uniform(0.1, 8, size=(100, 1))  # flat rows to peaked ones
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    got = top_p_sets(logp, 0.9, first=4, block=16)
    for row, lp in zip(got, logp):
        order = np.argsort(-lp)
        k = int(np.searchsorted(np.cumsum(np.exp(lp[order])), 0.9)) + 1
        assert row[row < 3000].tolist() == sorted(order[:k].tolist())

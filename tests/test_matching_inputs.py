"""Inputs that must belong together: `eval` refuses a base of another vocabulary, `convert --plan` a plan made
for another model, each with one line before anything is scored or written."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import tiny_models
from cli_run import assert_one_line_error, run
from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.planning import build_plan, options_from_plan
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.plan.budget import Budget, model_fingerprint
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.evaluate import check_same_vocabulary
from ggufmoe.source import open_source

TEXT = tiny_models.TEST_DATA / "eval_doc.txt"


def q8(src: Path, out: Path) -> Path:
    return convert(src, ConvertOptions(out=out, types=TypeRules.parse("Q8_0"), progress=False))[0]


def digests(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths``."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """``a``: a tiny Qwen3-MoE and its Q8_0 GGUF ``a.gguf``; ``b``: another of the same family, vocabulary and
    tensor names but wider experts; ``c``: ``a`` with the ids of its tokens shuffled (another vocabulary of the
    same size) and its GGUF ``c.gguf``."""
    d = tmp_path_factory.mktemp("matching")
    tiny_models.build("qwen3moe", d / "a")
    config = tiny_models.configs()["qwen3moe"]
    config.moe_intermediate_size = 48
    tiny_models.build("qwen3moe", d / "b", seed=1, config=config)
    shutil.copytree(d / "a", d / "c")
    tok = json.loads((d / "c" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    texts = sorted((t for t, i in vocab.items() if i >= 256), key=vocab.get)  # the bytes and <|endoftext|> stay
    ids = sorted(vocab[t] for t in texts)
    vocab.update(zip(texts, reversed(ids)))
    (d / "c" / "tokenizer.json").write_text(json.dumps(tok))
    q8(d / "a", d / "a.gguf")
    q8(d / "c", d / "c.gguf")
    return d


@pytest.mark.parametrize("base", ["c.gguf", "c"])
def test_eval_refuses_a_base_of_another_vocabulary(base, models, tmp_path):
    """A GGUF, or a Hugging Face directory, of another model with as many tokens: one line, nothing scored."""
    proc = run("eval", models / "a.gguf", "--base", models / base, "--text", TEXT, "--cache-dir", tmp_path, "-q")
    assert_one_line_error(proc, "have different vocabularies", "of 6144 tokens differ, first at id 256",
                          "compare files of the same model")
    assert not list(tmp_path.iterdir())  # the base was not scored


def test_same_vocabulary_in_a_gguf_and_its_checkpoint(models):
    check_same_vocabulary(models / "a.gguf", models / "a")
    check_same_vocabulary(models / "c.gguf", models / "c")


@pytest.fixture(scope="module")
def plan_a(models) -> Path:
    """A plan for ``a`` from `ggufmoe plan`."""
    plan = models / "a.plan.json"
    budget = (models / "a.gguf").stat().st_size * 3 // 4
    proc = run("plan", models / "a", "--budget", budget, "--weights-only", "-o", plan)
    assert proc.returncode == 0, proc.stderr
    return plan


def test_a_plan_records_its_model(plan_a, models):
    recorded = json.loads(plan_a.read_text())["model_fingerprint"]
    assert recorded == model_fingerprint(architecture_for(open_source(models / "a")))
    # what a plan is made for is the model's tensors, which its configuration alone gives too
    assert recorded == model_fingerprint(architecture_for(open_source(models / "a" / "config.json")))


@pytest.mark.parametrize("legacy", [False, True], ids=["plan", "plan without fingerprint"])
def test_convert_refuses_a_plan_for_another_model(legacy, plan_a, models, tmp_path):
    plan = tmp_path / "a.plan.json"
    d = json.loads(plan_a.read_text())
    if legacy:  # saved before plans recorded their model: told apart by its tensors
        del d["model_fingerprint"]
    plan.write_text(json.dumps(d))
    out = tmp_path / "out.gguf"
    before = digests(models / "b", plan)
    proc = run("convert", models / "b", "--plan", plan, "-o", out, "-q")
    assert_one_line_error(proc, f"{plan} was made for another model (", "blk.0.ffn_gate_exps.weight is",
                          f"make a plan for {models / 'b'} with ggufmoe plan")
    assert ("has other tensors" in proc.stderr) != legacy
    assert not out.exists() and not (tmp_path / ".out.gguf.partial").exists()
    assert digests(models / "b", plan) == before


@pytest.mark.parametrize("legacy", [False, True], ids=["plan", "plan without fingerprint"])
def test_a_plan_converts_a_copy_of_its_model(legacy, plan_a, models, tmp_path):
    """Another path and other file times: the same model, whose plan writes exactly the planned bytes."""
    shutil.copytree(models / "a", tmp_path / "copy")
    plan = tmp_path / "a.plan.json"
    d = json.loads(plan_a.read_text())
    if legacy:
        del d["model_fingerprint"]
    plan.write_text(json.dumps(d))
    out = tmp_path / "out.gguf"
    proc = run("convert", tmp_path / "copy", "--plan", plan, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == d["file_bytes"]


def test_a_plan_types_every_tensor_or_nothing_is_written(models, tmp_path):
    """A plan of another family's tensor names, executed without the check: no tensor falls back to Q8_0."""
    tiny_models.build("qwen2moe", tmp_path / "qwen2moe")
    plan = build_plan(tmp_path / "qwen2moe", Budget(10**9, weights_only=True), progress=False)
    out = tmp_path / "out.gguf"
    with pytest.raises(GgufmoeError, match="the plan has no type for it"):
        convert(models / "a", options_from_plan(plan, ConvertOptions(out=out, types=TypeRules.parse("Q8_0"),
                                                                     progress=False)))
    assert not out.exists() and not (tmp_path / ".out.gguf.partial").exists()

"""The budget planner: planned bytes are written bytes; DeepSeek-V3 planned from its config alone."""

import json
import subprocess

import pytest

import tiny_models
from cli_run import GGUFMOE
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.planning import build_plan, options_from_plan
from ggufmoe.plan.budget import Budget
from ggufmoe.quant.rules import TypeRules


@pytest.mark.parametrize("budget", [12_000_000, 20_000_000])
def test_planned_bytes_are_written_bytes(budget, tmp_path):
    plan = build_plan(tiny_models.REF_MODEL, Budget(budget, weights_only=True), progress=False)
    assert plan.file_bytes <= budget
    out = convert(tiny_models.REF_MODEL, options_from_plan(plan, ConvertOptions(
        out=tmp_path / "p.gguf", types=TypeRules.parse("Q8_0"), progress=False)))[0]
    assert out.stat().st_size == plan.file_bytes


def test_impossible_budget_names_smallest_size():
    with pytest.raises(GgufmoeError, match="smallest feasible plan needs"):
        build_plan(tiny_models.REF_MODEL, Budget(1_000_000, weights_only=True), progress=False)


def test_deepseek_v3_671b_at_128gib_from_config(tmp_path):
    from transformers import DeepseekV3Config

    DeepseekV3Config().save_pretrained(tmp_path)
    proc = subprocess.run([GGUFMOE, "plan", tmp_path / "config.json", "--budget", "128GiB", "--ctx", "8192",
                           "-o", tmp_path / "plan.json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["memory"]["total"] <= 128 * 2**30
    assert plan["memory"]["kv_cache"] > 0 and "KV cache" in proc.stdout


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_every_family_plans_the_bytes_it_writes(family, tmp_path):
    hf = tmp_path / "hf"
    tiny_models.build(family, hf)
    q8 = convert(hf, ConvertOptions(out=tmp_path / "q8.gguf", types=TypeRules.parse("Q8_0"), progress=False))[0]
    budget = q8.stat().st_size * 3 // 4  # tiny models are mostly embeddings: a smaller budget fits nothing
    plan = build_plan(hf, Budget(budget, weights_only=True), progress=False)
    assert plan.file_bytes <= budget
    out = convert(hf, options_from_plan(plan, ConvertOptions(out=tmp_path / "p.gguf", types=TypeRules.parse("Q8_0"),
                                                             progress=False)))[0]
    assert out.stat().st_size == plan.file_bytes


def test_mxfp4_experts_are_planned_as_stored(tmp_path):
    """A gpt-oss MXFP4 checkpoint: the planner keeps its experts' MXFP4 (copied) or goes below it, and the
    planned bytes are written."""
    from gguf import GGUFReader

    tiny_models.build("gpt-oss", tmp_path / "hf")
    tiny_models.save_mxfp4(tmp_path / "hf", tmp_path / "mx")
    q8 = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "q8.gguf", types=TypeRules.parse("Q8_0"),
                                                 progress=False))[0]
    plan = build_plan(tmp_path / "mx", Budget(q8.stat().st_size * 3 // 4, weights_only=True), progress=False)
    out = convert(tmp_path / "mx", options_from_plan(plan, ConvertOptions(out=tmp_path / "p.gguf",
                                                                          types=TypeRules.parse(None), progress=False)))[0]
    assert out.stat().st_size == plan.file_bytes
    bits = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors if t.name.endswith("_exps.weight")}
    assert "MXFP4" in bits.values() and "Q8_0" not in bits.values(), bits


def test_pruning_cost_fit_through_probes():
    from ggufmoe.sensitivity.prune_cost import fit_pruning
    from ggufmoe.sensitivity.prune_cost import PRUNE_EXPONENT

    scale, exponent = fit_pruning([0.1, 0.4], [0.02, 0.16])  # KL = 0.632 * unit^1.5
    assert exponent == pytest.approx(1.5) and scale * 0.4 ** 1.5 == pytest.approx(0.16)
    assert fit_pruning([0.1, 0.2], [0.02, 1.0])[1] == 2.0  # a steep fit is held at 2
    scale, exponent = fit_pruning([0.1, 0.0], [0.02, 0.0])  # one usable point: the reference exponent
    assert exponent == PRUNE_EXPONENT and scale * 0.1 ** PRUNE_EXPONENT == pytest.approx(0.02)

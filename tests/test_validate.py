"""`ggufmoe validate`: the reference model runs under a limit just above its planned memory and
fails cleanly, in one line, below it; split GGUFs are validated from their first shard."""

from pathlib import Path

import pytest

import tiny_models
from memory_check import model_part_error
from cli_run import run
from ggufmoe.arch import architecture_for
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.errors import GgufmoeError
from ggufmoe.plan.memory import gguf_runtime_memory
from ggufmoe.plan.process import interpreter_baseline
from ggufmoe.source.hf import HFSource
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.validate import validate

CTX = 512


@pytest.fixture(scope="module")
def q4k(tmp_path_factory) -> list[Path]:
    """The reference model at Q4_K (repacked by llama.cpp's CPU backend on x86 and ARM)."""
    out = tmp_path_factory.mktemp("validate") / "ref-q4_k.gguf"
    return convert(tiny_models.REF_MODEL, ConvertOptions(out=out, types=TypeRules.parse("Q4_K"), progress=False))


def planned(files: list[Path]) -> int:
    """Planned runtime memory at CTX: mapped and repacked weights, KV, compute and the reserve."""
    return gguf_runtime_memory(architecture_for(HFSource(tiny_models.REF_MODEL)), files, CTX).total


def test_fits_just_above_planned_memory(q4k):
    total = planned(q4k)
    proc = run("validate", q4k[0], "--memory-limit", int(total * 1.05), "--ctx", CTX, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert "fits and runs" in proc.stdout and "tokens/s" in proc.stdout
    assert "RLIMIT_AS as a backstop" in proc.stdout or "cgroup" in proc.stdout
    r = validate(q4k[0], int(total * 1.05), ctx=CTX, n_predict=8, threads=2)
    assert r.prompt_tokens == CTX and 0 < r.gen_tokens <= 8 and r.text
    assert r.load_s > 0 and r.prompt_tps > 0 and r.gen_tps > 0
    assert model_part_error(total, r.peak_rss, r.baseline_rss) < 0.05, (total, r)  # the memory model's target
    assert r.peak_rss <= r.limit


@pytest.mark.parametrize("what", ["half the planned memory", "the interpreter and half the file"])
def test_fails_cleanly_below(q4k, what):
    limit = (planned(q4k) // 2 if what == "half the planned memory"
             else interpreter_baseline() + q4k[0].stat().st_size // 2)
    proc = run("validate", q4k[0], "--memory-limit", limit, "--ctx", CTX, "--threads", 2)
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "does not fit" in lines[0] and q4k[0].name in lines[0]
    assert "Traceback" not in proc.stderr and "fits and runs" not in proc.stdout


def test_split_gguf(tmp_path):
    files = convert(tiny_models.REF_MODEL, ConvertOptions(out=tmp_path / "ref.gguf", types=TypeRules.parse("Q4_K"),
                                                          split_max_size=8_000_000, progress=False))
    assert len(files) >= 2
    r = validate(files[0], int(planned(files) * 1.05), ctx=CTX, n_predict=4, threads=2)
    assert r.files == files and r.file_bytes == sum(f.stat().st_size for f in files)
    assert r.prompt_tokens == CTX and r.text
    files[-1].unlink()
    with pytest.raises(GgufmoeError, match="no such file"):
        validate(files[0], 1 << 30)


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_text("not a model")
    proc = run("validate", tmp_path / "x.gguf", "--memory-limit", "1G")
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {tmp_path / 'x.gguf'}: not a GGUF file"


def test_planned_gguf_memory_matches_peak_rss(tmp_path):
    """A plan for a memory budget (file + runtime at its ctx): its predicted total is within 5% of the
    peak RSS llama.cpp reaches loading it and filling the context, and it fits its own prediction."""
    from ggufmoe.pipeline.planning import build_plan, options_from_plan
    from ggufmoe.plan.budget import Budget

    plan = build_plan(tiny_models.REF_MODEL, Budget(120 * 2**20, ctx=1024), progress=False)
    assert plan.memory["total"] <= 120 * 2**20
    path = convert(tiny_models.REF_MODEL, options_from_plan(plan, ConvertOptions(
        out=tmp_path / "planned.gguf", types=TypeRules.parse("Q8_0"), progress=False)))[0]
    r = validate(path, plan.memory["total"], ctx=plan.ctx, n_predict=4, threads=2)
    print(f"\npredicted {plan.memory['total'] / 2**20:.1f} MiB, peak RSS {r.peak_rss / 2**20:.1f} MiB")
    assert model_part_error(plan.memory["total"], r.peak_rss, r.baseline_rss) < 0.05


def test_hybrid_fits_just_above_planned_memory(tmp_path):
    """Qwen3.5-MoE, whose graph budget (40 nodes a ubatch token) makes llama.cpp's scheduler reserve ~0.4 GiB of
    address space it never touches: it still runs under a limit just above its planned memory (the RLIMIT_AS
    backstop allows for that reserve), and the peak RSS is within the limit."""
    cfg = tiny_models.qwen35moe_config(hidden_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                                       linear_num_key_heads=4, linear_num_value_heads=8, moe_intermediate_size=128)
    cfg.vision_config.out_hidden_size = 256
    tiny_models.build("qwen35moe", tmp_path / "hf", config=cfg)
    files = convert(tmp_path / "hf", ConvertOptions(out=tmp_path / "m.gguf", types=TypeRules.parse("Q8_0"),
                                                    progress=False))
    total = gguf_runtime_memory(architecture_for(HFSource(tmp_path / "hf")), files, 1024).total
    r = validate(files[0], int(total * 1.05), ctx=1024, n_predict=8, threads=2)
    assert r.peak_rss <= r.limit and r.prompt_tokens == 1024
    assert model_part_error(total, r.peak_rss, r.baseline_rss) < 0.05, (total, r)

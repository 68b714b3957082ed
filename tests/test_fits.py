"""One meaning of "fits" (issue 23.6): a plan's memory, `validate`'s limit and the demo all count the whole
llama.cpp process's peak RSS, and `validate` says "fits" only when the measured peak is within the limit.
At two budgets (plans without statistics, which keep every expert): plan, convert, `validate --plan`, then a limit just below the peak."""

import json
import re

import pytest

import tiny_models
from cli_run import assert_one_line_error, run
from memory_check import model_part_error

MiB = 1 << 20


def peak_rss(report: str) -> tuple[float, float]:
    """The whole process's peak RSS and what it held before loading (MiB), from `validate`'s report."""
    return (float(re.search(r"the whole process peaked at ([\d.]+) MiB", report).group(1)),
            float(re.search(r"Python with llama_cpp ([\d.]+) MiB before loading", report).group(1)))


@pytest.mark.parametrize("budget", ["120MiB", "130MiB"])
def test_plan_validate_and_peak_agree(tmp_path, budget):
    plan, out = tmp_path / "p.json", tmp_path / "m.gguf"
    proc = run("plan", tiny_models.REF_MODEL, "--budget", budget, "--ctx", 1024, "-o", plan)
    assert proc.returncode == 0, proc.stderr
    assert "the whole process's peak RSS" in proc.stdout
    predicted = json.loads(plan.read_text())["memory"]["total"] / MiB
    limit = int(budget.removesuffix("MiB"))
    assert predicted <= limit
    assert run("convert", tiny_models.REF_MODEL, "-o", out, "--plan", plan, "-q").returncode == 0

    proc = run("validate", out, "--plan", plan, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"from the plan: memory limit {limit:.2f} MiB, context 1024, KV type f16, target host"
    assert f"fits and runs in {limit:.2f} MiB" in proc.stdout and "(ctx 1024, KV f16)" in proc.stdout
    peak, before = peak_rss(proc.stdout)
    print(f"\n{budget}: predicted {predicted:.2f} MiB, peak RSS {peak:.2f} MiB")
    assert peak <= limit  # "fits" is the measured peak within the budget the plan was made for
    assert model_part_error(predicted * MiB, peak * MiB, before * MiB) < 0.05, (predicted, peak, before)  # predicted

    # a limit under the measured peak: not "fits", whatever the address space allowed
    below = f"{peak - 1:.2f}MiB"
    proc = run("validate", out, "--plan", plan, "--memory-limit", below, "--threads", 2)
    assert proc.returncode == 1 and "fits and runs" not in proc.stdout and "Traceback" not in proc.stderr
    info, error = proc.stderr.strip().splitlines()
    assert info == "from the plan: context 1024, KV type f16, target host"
    assert re.fullmatch(rf"error: {out.name} ran under a memory limit of {peak - 1:.2f} MiB \((RLIMIT_AS|cgroup v2 "
                        r"memory.max)\) but does not fit: the process's peak RSS, [\d.]+ MiB, exceeds it", error), error


def test_context_other_than_the_plans_is_said(tmp_path):
    plan, out = tmp_path / "p.json", tmp_path / "m.gguf"
    assert run("plan", tiny_models.REF_MODEL, "--budget", "120MiB", "--ctx", 1024, "-o", plan).returncode == 0
    assert run("convert", tiny_models.REF_MODEL, "-o", out, "--plan", plan, "-q").returncode == 0
    proc = run("validate", out, "--plan", plan, "--ctx", 512, "--kv-type", "q8_0", "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "from the plan: memory limit 120.00 MiB, target host"
    assert lines[1] == ("warning: the plan's context is 1024, this run's 512: the measured memory is not the "
                        "plan's")
    assert lines[2].startswith("warning: the plan's KV type is f16, this run's q8_0")
    assert "(ctx 512, KV q8_0)" in proc.stdout


def test_limits_under_the_interpreter_and_without_a_limit(tmp_path):
    gguf = tmp_path / "m.gguf"
    assert run("convert", tiny_models.REF_MODEL, "-o", gguf, "--type", "Q4_K", "-q").returncode == 0
    assert_one_line_error(run("validate", gguf, "--memory-limit", "20MiB"),
                          "not even what Python with llama_cpp holds", "the limit is on the whole process")
    assert_one_line_error(run("validate", gguf), "give --memory-limit, or --plan")

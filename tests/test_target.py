"""`--target`: plans for a machine other than this one. `cpu` and `cpu-repack` predict the peak RSS llama.cpp
reaches with its CPU repacking off and on (here, with the switch llama.cpp has for it); the plan records its
target; `validate` says when it runs as another; bad targets are one line."""

import json

import pytest
from gguf import GGMLQuantizationType as T

import tiny_models
from memory_check import model_part_error
from cli_run import assert_one_line_error, run
from ggufmoe.errors import GgufmoeError
from ggufmoe.pipeline.planning import build_plan, options_from_plan
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.plan.budget import Budget, Plan
from ggufmoe.plan.memory import weight_memory
from ggufmoe.plan.target import CPU, HOST, Target, local_repack_types, parse_target
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.validate import validate

CTX = 512
BUDGET = 160 * 2**20
EXPERTS_Q4_K = TypeRules.parse(None, ["ffn_(gate|up|down)_exps=Q4_K"])  # repacked on x86 AVX2/AVX512


def test_parse_target():
    assert parse_target("host") == HOST and parse_target("CPU") == CPU
    assert parse_target("cpu-repack").repack_types()[T.Q4_K] == 8 and CPU.repack_types() == {}
    gpu = parse_target("cuda:24GiB")
    assert gpu.offload and gpu.gpu_memory == 24 * 2**30 and str(gpu) == "cuda:24GiB"
    assert parse_target(str(parse_target("cuda:1500000000"))) == parse_target("cuda:1.5G")
    for bad, words in (("cuda:", "cuda:24GiB"), ("cuda", "cuda:24GiB"), ("tpu", "unknown target"),
                       ("cuda:lots", "cannot read size")):
        with pytest.raises(GgufmoeError, match=words):
            parse_target(bad)


def test_plan_records_its_target(tmp_path):
    """The plan JSON says its target; one saved before targets existed loads as host; a cuda plan fits
    the host budget and the GPU's memory, with the token embedding alone in host memory."""
    plan = build_plan(tiny_models.REF_MODEL, Budget(400 * 2**20, CTX, target=parse_target("cuda:1GiB")),
                      progress=False)
    plan.save(tmp_path / "p.json")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["target"] == "cuda:1GiB" and Plan.load(tmp_path / "p.json").machine() == parse_target("cuda:1GiB")
    m = plan.memory
    assert m["total"] <= 400 * 2**20 and m["gpu_total"] <= 2**30 and m["kv_cache"] == 0 and m["gpu_kv_cache"] > 0
    assert m["weights"] < plan.tensor_bytes["token_embd.weight"] + 8192 < m["gpu_weights"]
    del saved["target"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    assert Plan.load(tmp_path / "old.json").machine() == HOST


def test_bad_target_is_one_line(tmp_path):
    for target, words in (("cuda:", ("cuda:24GiB",)), ("arm", ("unknown target", "cpu-repack"))):
        proc = run("plan", tiny_models.REF_MODEL, "--budget", "200M", "--target", target, "-o", tmp_path / "p.json")
        assert_one_line_error(proc, *words)
        assert not (tmp_path / "p.json").exists()
    assert_one_line_error(run("plan", tiny_models.REF_MODEL, "--budget", "200M", "--weights-only", "--target",
                              "cuda:8GiB"), "GPU memory", "--weights-only")
    assert_one_line_error(run("convert", tiny_models.REF_MODEL, "-o", tmp_path / "m.gguf", "--budget", "200M",
                              "--calib", tiny_models.TEST_DATA / "calib.txt", "--target", "cuda"), "cuda:24GiB")
    assert_one_line_error(run("sweep", tiny_models.REF_MODEL, "--budgets", "10M", "--calib",
                              tiny_models.TEST_DATA / "calib.txt", "--text", tiny_models.TEST_DATA / "eval_doc.txt",
                              "-o", tmp_path / "s", "--target", "gpu"), "unknown target")
    assert not any(tmp_path.iterdir())


def test_cpu_and_cpu_repack_predict_peak_rss(tmp_path):
    """Plans of the same budget for `cpu` and `cpu-repack` (Q4_K experts) predict different memory, each within
    5% of the peak RSS llama.cpp reaches with repacking off (use_extra_bufts=false) and on."""
    if T.Q4_K not in local_repack_types():
        pytest.skip("this host's llama.cpp does not repack Q4_K (no AVX2/AVX512 or ARM dot products, or a build "
                    "without repacking): cpu-repack cannot be measured here")
    files, predicted = {}, {}
    for name in ("cpu", "cpu-repack"):
        target = parse_target(name)
        plan = build_plan(tiny_models.REF_MODEL, Budget(BUDGET, CTX, target=target), pins=EXPERTS_Q4_K,
                          progress=False)
        assert plan.target == name and plan.memory["total"] <= BUDGET
        key = json.dumps(plan.types, sort_keys=True)
        if key not in files:
            files[key] = convert(tiny_models.REF_MODEL, options_from_plan(plan, ConvertOptions(
                out=tmp_path / f"{name}.gguf", types=TypeRules.parse("Q8_0"), progress=False)))[0]
        path = files[key]
        wm = weight_memory(path, target)
        assert (wm.repacked > 0) == (name == "cpu-repack")
        r = validate(path, plan.memory["total"], ctx=CTX, n_predict=4, threads=2, target=target,
                     planned=plan.machine())
        predicted[name] = plan.memory["total"]
        print(f"\n{name}: predicted {plan.memory['total'] / 2**20:.1f} MiB, peak RSS {r.peak_rss / 2**20:.1f} MiB")
        assert model_part_error(plan.memory["total"], r.peak_rss, r.baseline_rss) < 0.05, (name, plan.memory, r)
    assert predicted["cpu-repack"] > predicted["cpu"] * 1.05


def test_validate_warns_on_another_target(tmp_path):
    """`validate --plan` runs as the plan's target; asked to run as another it says so in one line."""
    plan = build_plan(tiny_models.REF_MODEL, Budget(BUDGET, CTX, target=CPU), pins=EXPERTS_Q4_K, progress=False)
    plan.save(tmp_path / "p.json")
    path = convert(tiny_models.REF_MODEL, options_from_plan(plan, ConvertOptions(
        out=tmp_path / "m.gguf", types=TypeRules.parse("Q8_0"), progress=False)))[0]
    limit = int(plan.memory["total"] * 1.05)
    proc = run("validate", path, "--memory-limit", limit, "--ctx", CTX, "--threads", 2, "--plan", tmp_path / "p.json")
    assert proc.returncode == 0 and "fits and runs" in proc.stdout and "warning" not in proc.stderr, proc
    proc = run("validate", path, "--memory-limit", 2 * limit, "--ctx", CTX, "--threads", 2, "--plan",
               tmp_path / "p.json", "--target", "cpu-repack")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert proc.returncode == 0 and len(warnings) == 1 and "target cpu" in warnings[0], proc
    import llama_cpp
    from ggufmoe.runtime.validate import target_mismatch

    if not llama_cpp.llama_supports_gpu_offload():
        assert "cannot offload to a GPU" in target_mismatch([path], Target("cuda", 2**30))

"""GGUF sources: existing GGUF files (single or split) pruned and re-planned, byte for byte where types stay."""

import filecmp
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

import tiny_models
from cli_run import run
from ggufmoe.arch import architecture_for
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.errors import GgufmoeError
from ggufmoe.runtime.evaluate import evaluate
from ggufmoe.stats.imatrix import save_imatrix
from ggufmoe.runtime.llama_quantize import llama_quantize
from ggufmoe.runtime.logprobs import llama_logprobs
from ggufmoe.pipeline.planning import build_plan, options_from_plan
from ggufmoe.plan.budget import Budget
from ggufmoe.plan.report import format_plan
from ggufmoe.prune.criteria import PruneRequest
from ggufmoe.model.qtypes import bits_per_weight
from ggufmoe.source.gguf_in import GGUFSource
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.file import load_stats, save_stats
from ggufmoe.quant.rules import TypeRules

CALIB_CHARS = 8000
KEEP = 16  # of the reference model's 24 experts
KEEP_TYPES = TypeRules(None)  # no --type: every tensor keeps its stored type


def calib_text() -> str:
    return (tiny_models.TEST_DATA / "calib.txt").read_text()[:CALIB_CHARS]


def tensors(*paths) -> dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...], np.ndarray]]:
    """name -> (type, numpy-order shape, stored bytes per outermost slice), over all shards, in file order."""
    out = {}
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            out[t.name] = (t.tensor_type, shape, np.array(t.data).view(np.uint8).reshape(shape[0], -1))
    return out


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def shards(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf_source")


@pytest.fixture(scope="module")
def ref_stats(work) -> Path:
    path = work / "ref-stats.gguf"
    save_stats(collect_stats(tiny_models.REF_MODEL, calib_text(), ctx=256, progress=False), path)
    return path


@pytest.fixture(scope="module")
def deepseek(work) -> tuple[Path, Path, Path]:
    """The tiny DeepSeek-V3 (16 experts in 4 groups, 2 used): HF directory, F32 GGUF, statistics."""
    hf = work / "ds3"
    tiny_models.build("deepseek3", hf)
    stats = work / "ds3-stats.gguf"
    save_stats(collect_stats(hf, calib_text(), ctx=256, progress=False), stats)
    f32 = convert(hf, ConvertOptions(out=work / "ds3-f32.gguf", types=TypeRules.parse("F32"), progress=False))[0]
    return hf, f32, stats


@pytest.fixture(scope="module")
def q4km(ref_f32_gguf, work) -> Path:
    return llama_quantize(ref_f32_gguf, work / "ref-Q4_K_M.gguf", "Q4_K_M")


@pytest.fixture(scope="module")
def q4km_pruned(q4km, ref_stats, work) -> Path:
    return convert(q4km, ConvertOptions(out=work / "q4km-pruned.gguf", types=KEEP_TYPES, stats=ref_stats,
                                        prune=PruneRequest(keep=KEEP, criterion="reap"), progress=False))[0]


# --- 1. an F32 GGUF pruned = the HF model converted with the same pruning -----------------------

CASES = {  # model, statistics, pruning request
    "qwen3moe-reap": ("ref", "stats", PruneRequest(keep=KEEP, criterion="reap")),
    "deepseek3-routing-topk": ("ds3", "stats", PruneRequest(keep=8, criterion="routing", top_k=4)),
    "deepseek3-imatrix-frequency": ("ds3", "imatrix", PruneRequest(keep=12, criterion="frequency")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_f32_gguf_equals_pruned_hf_conversion(case, request, work):
    model, stats_kind, req = CASES[case]
    if model == "ref":
        hf, f32, stats = tiny_models.REF_MODEL, request.getfixturevalue("ref_f32_gguf"), \
            request.getfixturevalue("ref_stats")
    else:
        hf, f32, stats = request.getfixturevalue("deepseek")
    if stats_kind == "imatrix":  # a plain llama.cpp imatrix: per-expert counts only
        plain = work / f"{case}-imatrix.gguf"
        save_imatrix(load_stats(stats).imatrix, plain)
        stats = plain
        assert not load_stats(stats).has_routing
    from_hf = convert(hf, ConvertOptions(out=work / f"{case}-hf.gguf", types=TypeRules.parse("F32"), stats=stats,
                                         prune=req, progress=False))[0]
    from_gguf = convert(f32, ConvertOptions(out=work / f"{case}-gguf.gguf", types=KEEP_TYPES, stats=stats,
                                            prune=req, progress=False))[0]
    a, b = tensors(from_hf), tensors(from_gguf)
    assert list(a) == list(b)
    for name in a:
        assert a[name][:2] == b[name][:2], name
        assert np.array_equal(a[name][2], b[name][2]), name
    fa, fb = fields(from_hf), fields(from_gguf)
    arch = fa["general.architecture"]
    n_expert = tensors(f32)["blk.1.ffn_up_exps.weight"][1][0]
    assert fb[f"{arch}.expert_count"] == fa[f"{arch}.expert_count"] == req.keep < n_expert
    assert fb[f"{arch}.expert_used_count"] == fa[f"{arch}.expert_used_count"]
    if arch == "deepseek2":
        assert (fb["deepseek2.expert_group_count"], fb["deepseek2.expert_group_used_count"]) == (4, 2)
        for key in (k for k in fb if k.startswith("ggufmoe.prune.kept.")):  # every group keeps the same number
            assert [sum(1 for e in fb[key] if e // 4 == g) for g in range(4)] == [req.keep // 4] * 4
    assert filecmp.cmp(from_hf, from_gguf, shallow=False)  # metadata included: the very same file
    hf_arch, gguf_arch = architecture_for(HFSource(hf)), architecture_for(GGUFSource(f32))
    assert gguf_arch.model_shape() == hf_arch.model_shape()  # hyper-parameters from the keys, as llama.cpp reads them
    assert gguf_arch.kv_elements_per_token() == hf_arch.kv_elements_per_token()
    assert (gguf_arch.n_expert, gguf_arch.top_k, gguf_arch.expert_groups) == \
        (hf_arch.n_expert, hf_arch.top_k, hf_arch.expert_groups)


# --- 2. a Q4_K_M GGUF pruned: every kept byte copied, and it runs --------------------------------

def test_pruned_q4km_copies_every_kept_byte_and_runs(q4km, q4km_pruned, work, capsys):
    src, out = tensors(q4km), tensors(q4km_pruned)
    meta = fields(q4km_pruned)
    kept = {int(k.rsplit(".", 1)[1]): v for k, v in meta.items() if k.startswith("ggufmoe.prune.kept.")}
    assert sorted(kept) == list(range(6)) and all(len(v) == KEEP for v in kept.values())
    assert list(out) == list(src)
    quantized = set()
    for name, (qtype, shape, data) in out.items():
        s_type, s_shape, s_data = src[name]
        assert qtype == s_type, name
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if "_exps." in name or ".ffn_gate_inp." in name:  # expert slices / router rows, in kept order
            assert shape == (KEEP, *s_shape[1:])
            assert np.array_equal(data, s_data[kept[layer]]), name
        else:
            assert np.array_equal(data, s_data), name
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            quantized.add(qtype.name)
    assert {"Q4_K", "Q6_K"} <= quantized  # really a quantized mix, copied
    src_meta = fields(q4km)
    assert meta["qwen3moe.expert_count"] == KEEP and meta["qwen3moe.expert_used_count"] == 4
    assert meta["general.file_type"] == src_meta["general.file_type"] == 15  # MOSTLY_Q4_K_M, kept
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "qwen3moe.rope.freq_base", "general.name"):
        assert meta[key] == src_meta[key], key

    text = (tiny_models.TEST_DATA / "eval_doc.txt").read_text()
    r = evaluate(q4km_pruned, q4km, text, ctx=512, max_tokens=2048, cache_dir=work / "cache", progress=False)
    with capsys.disabled():
        print(f"\npruned Q4_K_M ({KEEP} of 24 experts, reap) vs Q4_K_M: KL {r.kld_mean:.4f} nats/token "
              f"(p99 {r.kld_p99:.3f}), PPL {r.ppl:.3f} vs {r.ppl_base:.3f}, top-1 {100 * r.top1:.1f}%")
    assert r.tokens > 2000 and math.isfinite(r.ppl) and 0 < r.kld_mean < 1 and r.top1 > 0.5


# --- 3. split source, split output ----------------------------------------------------------------

def test_split_source_and_split_output(q4km, q4km_pruned, ref_stats, tmp_path, eval_tokens):
    proc = run("convert", q4km, "-o", tmp_path / "src.gguf", "--split-max-size", "6M", "-q")
    assert proc.returncode == 0, proc.stderr
    src = shards(tmp_path / "src.gguf")
    assert len(src) >= 3
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(tensors(*src).values(), tensors(q4km).values()))
    proc = run("convert", src[0], "-o", tmp_path / "out.gguf", "--stats", ref_stats, "--keep", KEEP,
               "--criterion", "reap", "--split-max-size", "5M", "-q")
    assert proc.returncode == 0, proc.stderr
    out = shards(tmp_path / "out.gguf")
    assert len(out) >= 3 and all(p.stat().st_size <= 5_000_000 + 1_000_000 for p in out)
    a, b = tensors(*out), tensors(q4km_pruned)
    assert list(a) == list(b) and all(np.array_equal(a[n][2], b[n][2]) for n in a)
    tokens = eval_tokens[:128]
    assert np.array_equal(llama_logprobs(out[0], tokens), llama_logprobs(q4km_pruned, tokens))


# --- 4. plans on a GGUF source: exact bytes, never above the source -------------------------------

def test_budget_plan_on_gguf_bytes_exact_and_capped(q4km, ref_stats, tmp_path):
    budget = int(0.65 * q4km.stat().st_size)
    plan = build_plan(q4km, Budget(budget, weights_only=True), ref_stats, progress=False)
    assert plan.file_bytes <= budget and plan.keep <= 24
    out = convert(q4km, options_from_plan(plan, ConvertOptions(out=tmp_path / "p.gguf", types=KEEP_TYPES,
                                                               progress=False)))[0]
    assert out.stat().st_size == plan.file_bytes
    keys = gguf.GGUFReader(out).get_field("quantize.imatrix.file")  # counted in the plan too
    assert keys is not None and keys.contents() == ref_stats.name
    src, written = tensors(q4km), tensors(out)
    copied = 0
    for name, (qtype, _, data) in written.items():
        s_type = src[name][0]
        assert bits_per_weight(qtype) <= bits_per_weight(s_type), (name, qtype, s_type)
        if qtype == s_type and "_exps." not in name and ".ffn_gate_inp." not in name:
            assert np.array_equal(data, src[name][2]), name
            copied += 1
    assert copied > 0 and any(written[n][0] != src[n][0] for n in written)  # some copied, some requantized
    assert "precision capped at the source's types" in format_plan(plan)


def test_pin_above_the_source_is_allowed_and_said(q4km):
    plan = build_plan(q4km, Budget(2 * q4km.stat().st_size, weights_only=True),
                      pins=TypeRules.parse(None, ["attn_q=Q8_0"]), progress=False)
    src = GGUFSource(q4km)
    for name, t in plan.types.items():
        if ".attn_q." in name:
            assert t == "Q8_0"
        else:
            assert bits_per_weight(gguf.GGMLQuantizationType[t]) <= bits_per_weight(src.qtype(name)), name
    assert "above the source: attn_q Q8_0 over Q4_K (6 tensors, --tensor-type)" in format_plan(plan)


def test_convert_budget_cli_on_gguf(q4km, ref_stats, tmp_path):
    out = tmp_path / "b.gguf"
    proc = run("convert", q4km, "-o", out, "--budget", "110M", "--ctx", "512", "--stats", ref_stats, "-q")
    assert proc.returncode == 0, proc.stderr
    import json

    plan = json.loads((tmp_path / "b.plan.json").read_text())
    assert out.stat().st_size == plan["file_bytes"] and plan["memory"]["total"] <= plan["budget"]
    assert "precision capped" in proc.stdout
    bad = run("convert", q4km, "-o", tmp_path / "c.gguf", "--budget", "90M", "--calib",
              tiny_models.TEST_DATA / "calib.txt")
    assert bad.returncode == 1 and "a GGUF cannot be calibrated" in bad.stderr


# --- inspect, errors ------------------------------------------------------------------------------

def test_inspect_gguf_shows_types_and_class_bytes(q4km):
    proc = run("inspect", q4km)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "llama.cpp qwen3moe" in out and "24 routed, 4 used" in out
    assert "stored types" in out and "Q4_K" in out and "Q6_K" in out
    assert "bytes by tensor class" in out and "ffn_down_exps" in out and "Q4_K x4, Q6_K x2" in out


def test_truncated_gguf_is_one_line_error_and_no_output(q4km, ref_stats, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(q4km.read_bytes()[: q4km.stat().st_size // 3])
    for args in (["convert", bad, "-o", tmp_path / "o.gguf"], ["inspect", bad], ["plan", bad, "--budget", "9M"]):
        proc = run(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("error: ") and "truncated or corrupt GGUF" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
    with pytest.raises(GgufmoeError, match="no such file"):
        GGUFSource(tmp_path / "missing-00001-of-00002.gguf")
    with pytest.raises(GgufmoeError, match="no general.architecture"):  # an imatrix is no model
        architecture_for(GGUFSource(ref_stats))

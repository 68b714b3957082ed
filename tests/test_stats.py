"""Calibration statistics: routing counts, weight mass, REAP, the stats file and `ggufmoe calibrate`."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import llama_gguf
import tiny_models
from cli_run import assert_one_line_error, run
from ggufmoe.arch import architecture_for
from ggufmoe.stats.collect import Collector, model_keys
from ggufmoe.errors import GgufmoeError
from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry, load_imatrix, save_imatrix, write_imatrix_gguf
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.file import ExpertStats, Stats, load_stats, save_stats
from ggufmoe.stats.local_errors import KEY as LOCAL_KEY
from ggufmoe.stats.collect import collect_stats
from ggufmoe.stats.hf_model import load_model
from test_imatrix import write_dat

CTX = 512
N_TOKENS = 4096
TOP_K = 4


def calib_text() -> str:
    return (tiny_models.TEST_DATA / "calib.txt").read_text()[:60_000]


@pytest.fixture(scope="module")
def ref_stats() -> Stats:
    return collect_stats(tiny_models.REF_MODEL, calib_text(), ctx=CTX, max_tokens=N_TOKENS, progress=False,
                         dataset="calib.txt")


# --- collection -----------------------------------------------------------------------------------

def test_reference_counts_and_weight_mass(ref_stats):
    assert ref_stats.has_routing and ref_stats.source == str(tiny_models.REF_MODEL)
    assert sorted(ref_stats.layers) == list(range(6))
    for il, s in ref_stats.layers.items():
        assert s.n_tokens == N_TOKENS
        assert s.counts.shape == (24,) and s.counts.dtype == np.float64
        assert s.counts.sum() == N_TOKENS * TOP_K
        assert np.isclose(s.frequency.sum(), TOP_K)
        # Qwen3-MoE renormalises its top-k weights: every token hands out a weight of 1
        assert s.weight_mass.sum() == pytest.approx(N_TOKENS, rel=1e-6)
        assert s.mean_routing.sum() == pytest.approx(1, rel=1e-6)
        assert np.all(s.weight_mass[s.counts == 0] == 0) and np.all(s.reap[s.counts == 0] == 0)
        assert np.all(s.reap[s.counts > 0] > 0)
        # counts are the imatrix's per-expert counts
        np.testing.assert_array_equal(s.counts, ref_stats.imatrix.entries[f"blk.{il}.ffn_down_exps.weight"].counts)
    assert ref_stats.imatrix.chunk_count == N_TOKENS // CTX and ref_stats.imatrix.chunk_size == CTX


def test_reap_recomputed(ref_stats):
    """REAP, weight mass and count of one expert of layer 2, recomputed from the checkpoint without our code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    il = 2
    counts = ref_stats.layers[il].counts
    expert = int(np.argsort(counts)[len(counts) // 2])
    model = AutoModelForCausalLM.from_pretrained(tiny_models.REF_MODEL, dtype=torch.float32).eval()
    moe_in = []
    hook = model.model.layers[il].mlp.register_forward_pre_hook(lambda _m, args: moe_in.append(args[0]))
    ids = AutoTokenizer.from_pretrained(tiny_models.REF_MODEL)(calib_text(), add_special_tokens=False,
                                                                verbose=False)["input_ids"][:N_TOKENS]
    with torch.no_grad():
        for i in range(0, N_TOKENS, CTX):
            model(input_ids=torch.tensor([ids[i: i + CTX]]), use_cache=False)
    hook.remove()
    src = HFSource(tiny_models.REF_MODEL)
    p = f"model.layers.{il}.mlp"
    router = torch.from_numpy(src.get(f"{p}.gate.weight")).double()
    wg, wu, wd = (torch.from_numpy(src.get(f"{p}.experts.{expert}.{n}_proj.weight")).double()
                  for n in ("gate", "up", "down"))
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in moe_in]).double()
    top = torch.topk(torch.softmax(x @ router.T, -1), TOP_K, -1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    routed = (top.indices == expert)
    gate = (weights * routed).sum(-1)[routed.any(-1)]
    xe = x[routed.any(-1)]
    out = (torch.nn.functional.silu(xe @ wg.T) * (xe @ wu.T)) @ wd.T
    s = ref_stats.layers[il]
    assert xe.shape[0] > 0 and s.counts[expert] == xe.shape[0]
    assert s.weight_mass[expert] == pytest.approx(float(gate.sum()), rel=1e-5)
    assert s.reap[expert] == pytest.approx(float((gate * out.norm(dim=-1)).mean()), rel=1e-4)


def test_token_ids_in_pieces():
    """The text is tokenized in pieces cut after newlines, up to max_tokens; the ids are the whole text's."""
    from transformers import AutoTokenizer

    from ggufmoe.stats import text as calibrate

    tok = AutoTokenizer.from_pretrained(tiny_models.REF_MODEL)
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:300_000]
    whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert calibrate._cut_safe(tok, text) and len(calibrate._cuts(text, calibrate.PIECE_CHARS)) >= 3
    for n in (1, 777, 30_000):
        assert calibrate.token_ids(tok, text, n).tolist() == whole[:n]
    assert calibrate.token_ids(tok, text, len(whole) + 10).tolist() == whole == calibrate.token_ids(tok, text).tolist()
    # a tokenizer that marks the start of its input cannot be cut: the whole text is tokenized at once
    class MarksStart:
        def __call__(self, t, **kw):
            return {"input_ids": [0] + tok(t, **kw)["input_ids"]}

    assert not calibrate._cut_safe(MarksStart(), text)
    assert calibrate.token_ids(MarksStart(), text, 100).tolist() == [0] + whole[:99]


def test_deepseek_weight_mass_includes_scaling(tmp_path):
    """DeepSeek-V3 normalises its top-k sigmoid scores, then scales them by routed_scaling_factor."""
    cfg = tiny_models.deepseek3_config()
    assert cfg.norm_topk_prob and cfg.routed_scaling_factor == 2.5
    tiny_models.build("deepseek3", tmp_path, config=cfg)
    stats = collect_stats(tmp_path, calib_text(), ctx=128, max_tokens=512, progress=False)
    assert sorted(stats.layers) == [1, 2]  # layer 0 is dense (first_k_dense_replace=1)
    for s in stats.layers.values():
        assert s.n_tokens == 512 and s.counts.shape == (16,)
        assert s.counts.sum() == 512 * cfg.num_experts_per_tok
        assert s.weight_mass.sum() == pytest.approx(512 * 2.5, rel=1e-5)
        assert s.mean_routing.sum() == pytest.approx(2.5, rel=1e-5)


@pytest.mark.parametrize("arch", ["deepseek3", "mixtral"])
def test_instrumented_model_computes_the_same(tmp_path, arch):
    """The instrumented experts forward gives the hidden states transformers computes."""
    model = tiny_models.build(arch, tmp_path)
    ids = torch.randint(0, tiny_models.VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.model(input_ids=ids, use_cache=False).last_hidden_state
        collector = Collector(model, list(architecture_for(HFSource(tmp_path)).tensors()))
        try:
            got = model.model(input_ids=ids, use_cache=False).last_hidden_state
            assert model(input_ids=ids, use_cache=False).logits.numel() == 0  # no logits computed while calibrating
        finally:
            collector.remove()
        again = model(input_ids=ids, use_cache=False).logits  # restored
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert again.shape == (2, 64, tiny_models.VOCAB)
    assert all(s.n_tokens == 2 * 2 * 64 for s in collector.layers().values())


@pytest.mark.parametrize("arch", tiny_models.CALIBRATED)
def test_recorded_inputs_are_the_gguf_tensors_inputs(tmp_path, arch):
    """What the statistics record for a plain matmul is the input of the GGUF tensor's matmul, in its column order:
    the converted tensor times it gives the checkpoint matmul's outputs (rows cut or reordered on conversion
    included: Qwen3-Next's ``in_proj_qkvz`` split in two, Qwen3.5's ``out_proj`` columns tiled)."""
    tiny_models.build(arch, tmp_path)
    _, model = load_model(tmp_path, progress=False)  # the weights as saved
    specs = {s.name: s for s in architecture_for(HFSource(tmp_path)).tensors() if not s.is_expert}
    modules = dict(model.named_modules())
    outputs: dict[int, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def record(m: torch.nn.Module, args: tuple) -> None:
        outputs.setdefault(id(m), args[0] @ m.weight.T)

    for m in modules.values():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(record)
    ids = torch.randint(0, tiny_models.VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    collector = Collector(model, list(specs.values()), sample=lambda name, x: inputs.setdefault(name, x))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        collector.remove()
    keys = model_keys(model, [s.hf_name for s in specs.values()])
    checked = 0
    for name, x in inputs.items():
        want = outputs.get(id(modules.get(keys[specs[name].hf_name].rpartition(".")[0])))
        if want is None or specs[name].kind == "output":
            continue
        got = x.reshape(-1, x.shape[-1]) @ torch.from_numpy(specs[name].load(0)).reshape(-1, x.shape[-1]).T
        want = want.reshape(-1, want.shape[-1])
        # every output of the GGUF tensor is one of the checkpoint matmul's outputs
        nearest = torch.cdist(got.T.double(), want.T.double()).min(dim=1).values
        assert float(nearest.max()) < 1e-4 * float(want.norm(dim=0).max()), name
        checked += 1
    assert checked >= 4 * int(model.config.get_text_config().num_hidden_layers)


# --- file -----------------------------------------------------------------------------------------

def test_round_trip(ref_stats, tmp_path):
    path = tmp_path / "stats.gguf"
    save_stats(ref_stats, path)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.gguf"]  # no temporary left behind
    back = load_stats(path)
    assert (back.source, back.has_routing) == (ref_stats.source, True)
    assert back.layers.keys() == ref_stats.layers.keys()
    for il, s in ref_stats.layers.items():
        b = back.layers[il]
        assert b.n_tokens == s.n_tokens
        for attr in ("counts", "weight_mass", "reap_sum"):
            np.testing.assert_allclose(getattr(b, attr), getattr(s, attr), rtol=1e-6)
    im, bim = ref_stats.imatrix, back.imatrix
    assert (bim.datasets, bim.chunk_count, bim.chunk_size) == (im.datasets, im.chunk_count, im.chunk_size)
    assert bim.entries.keys() == im.entries.keys()
    for name, e in im.entries.items():
        np.testing.assert_array_equal(bim.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(bim.entries[name].counts, e.counts)
    # the stats file is an imatrix for everything that reads one
    assert load_imatrix(path).entries.keys() == im.entries.keys()
    # statistics known only by counts survive a round trip as such
    plain = Stats(im, {0: ExpertStats(np.array([3.0, 0, 1]), np.zeros(3), np.zeros(3), 2)}, has_routing=False)
    save_stats(plain, path)
    back = load_stats(path)
    assert not back.has_routing and back.source == "" and back.layers[0].counts.tolist() == [3, 0, 1]


def test_llama_cpp_reads_stats_file(ref_stats, tmp_path):
    """llama.cpp's parser opens the file; its imatrix loader's view of it is exactly the imatrix."""
    path = tmp_path / "stats.gguf"
    save_stats(ref_stats, path)
    f = llama_gguf.read_gguf(path)
    assert f is not None, "llama.cpp's gguf parser rejected the stats file"
    assert f.kv["general.type"][2] == "imatrix"
    assert f.kv["imatrix.datasets"][2] == ["calib.txt"]
    assert f.kv["imatrix.chunk_count"] == (llama_gguf.GGUF_UINT32, None, N_TOKENS // CTX)
    assert f.kv["imatrix.chunk_size"] == (llama_gguf.GGUF_UINT32, None, CTX)
    entries = llama_gguf.imatrix_entries(f)
    assert entries.keys() == ref_stats.imatrix.entries.keys()
    for name, e in ref_stats.imatrix.entries.items():
        np.testing.assert_array_equal(entries[name][0], e.in_sum2.reshape(-1))
        np.testing.assert_array_equal(entries[name][1], e.counts)
    layers = sorted(ref_stats.layers)
    assert f.kv["ggufmoe.stats.layers"] == (llama_gguf.GGUF_ARRAY, llama_gguf.GGUF_INT32, layers)
    assert f.kv["ggufmoe.stats.n_tokens"] == (llama_gguf.GGUF_ARRAY, llama_gguf.GGUF_UINT64, [N_TOKENS] * 6)
    assert f.kv["ggufmoe.stats.has_routing"] == (llama_gguf.GGUF_BOOL, None, True)
    for il in layers:
        typ, ne, data = f.tensors[f"blk.{il}.ggufmoe_reap_sum"]
        assert (typ, ne) == (llama_gguf.GGML_F32, (24, 1))
        np.testing.assert_allclose(data, ref_stats.layers[il].reap_sum, rtol=1e-6)


def test_plain_llama_imatrix(ref_stats, tmp_path):
    """A llama.cpp imatrix: counts from the expert tensors, tokens from the router, no routing weights."""
    path = tmp_path / "im.gguf"
    save_imatrix(ref_stats.imatrix, path)
    stats = load_stats(path)
    assert not stats.has_routing and stats.layers.keys() == ref_stats.layers.keys()
    for il, s in stats.layers.items():
        np.testing.assert_array_equal(s.counts, ref_stats.layers[il].counts)
        assert s.n_tokens == N_TOKENS
        assert not s.weight_mass.any() and not s.reap_sum.any() and not s.reap.any()
        np.testing.assert_allclose(s.frequency, ref_stats.layers[il].frequency)
    assert stats.imatrix.entries.keys() == ref_stats.imatrix.entries.keys()

    def imatrix(**entries: ImatrixEntry) -> Path:
        save_imatrix(Imatrix({f"blk.3.{k}.weight": v for k, v in entries.items()}, ["x"], 1, 8), path)
        return path

    exps = ImatrixEntry(np.ones((4, 8), np.float32), np.array([6, 0, 1, 1], np.float32))
    one = ImatrixEntry(np.ones((1, 8), np.float32), np.array([4], np.float32))
    # no router: another matrix every token passes gives the tokens; else top_k; else an error
    stats = load_stats(imatrix(ffn_up_exps=exps, attn_q=one))
    assert stats.layers.keys() == {3} and stats.layers[3].n_tokens == 4
    assert stats.layers[3].counts.tolist() == [6, 0, 1, 1]
    assert load_stats(imatrix(ffn_down_exps=exps), top_k=2).layers[3].n_tokens == 4
    with pytest.raises(GgufmoeError, match="token count of layer 3"):
        load_stats(imatrix(ffn_down_exps=exps))


def test_legacy_dat_has_no_expert_counts(tmp_path):
    path = tmp_path / "im.dat"
    write_dat(path, {"blk.0.ffn_gate_inp.weight": (10, np.ones(8, np.float32)),
                     "blk.0.ffn_gate_exps.weight": (10, np.ones(32, np.float32))}, chunks=10, dataset="d")
    stats = load_stats(path)
    assert stats.layers == {} and not stats.has_routing
    assert stats.imatrix.entries["blk.0.ffn_gate_exps.weight"].in_sum2.shape == (4, 8)


def test_bad_stats_files(ref_stats, tmp_path):
    good = tmp_path / "good.gguf"
    save_stats(ref_stats, good)
    data = good.read_bytes()
    cases = {"empty": b"", "garbage": bytes(range(256)) * 4, "truncated": data[: len(data) // 2]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    paths = [tmp_path / n for n in cases] + [tmp_path / "missing"]

    def ours(name: str, drop: str = "", version: int = 1) -> Path:
        """A stats file with one tensor of ours missing, or another version."""
        p = tmp_path / name
        keep = {f"blk.{il}.{t}": np.ones(24) for il in range(2)
                for t in ("ggufmoe_expert_counts", "ggufmoe_weight_mass", "ggufmoe_reap_sum")}
        keep.pop(drop, None)

        def keys(w: gguf.GGUFWriter) -> None:
            w.add_uint32("ggufmoe.stats.version", version)
            w.add_string("ggufmoe.stats.source", "m")
            w.add_bool("ggufmoe.stats.has_routing", True)
            w.add_key_value("ggufmoe.stats.layers", [0, 1], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
            w.add_key_value("ggufmoe.stats.n_tokens", [5, 5], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT64)

        write_imatrix_gguf(ref_stats.imatrix, p, extra_tensors=keep, extra_kv=keys)
        return p

    assert load_stats(ours("complete")).layers[1].n_tokens == 5
    paths += [ours("no_reap", drop="blk.1.ggufmoe_reap_sum"), ours("future", version=2)]
    for path in paths:
        with pytest.raises(GgufmoeError) as err:
            load_stats(path)
        assert "\n" not in str(err.value), path.name


# --- command line ---------------------------------------------------------------------------------

def test_cli_calibrate(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(calib_text())
    out = tmp_path / "stats.gguf"
    proc = run("calibrate", tiny_models.REF_MODEL, "--text", text, "--max-tokens", N_TOKENS, "-o", out,
               "--no-local-errors")  # the statistics alone (the local errors: test_local.py)
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr  # progress bar with the speed
    lines = proc.stdout.strip().splitlines()
    assert "never activated" in lines[0] and lines[-1] == f"wrote {out}"
    assert len(lines) == 1 + 6 + 1 and all(str(N_TOKENS) in line for line in lines[1:7])
    stats = load_stats(out)
    assert stats.has_routing and stats.imatrix.datasets == ["calib.txt"] and LOCAL_KEY not in stats.extras
    assert all(s.n_tokens == N_TOKENS and s.counts.sum() == N_TOKENS * TOP_K for s in stats.layers.values())
    dead = [", ".join(map(str, np.flatnonzero(s.counts == 0))) or "-" for s in stats.layers.values()]
    assert [line.split("  ")[-1].strip() for line in lines[1:7]] == dead


def test_cli_calibrate_errors(tmp_path):
    out = tmp_path / "stats.gguf"
    text = tmp_path / "calib.txt"
    text.write_text("def main():\n    pass\n")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    ref = tiny_models.REF_MODEL
    assert_one_line_error(run("calibrate", ref, "--text", tmp_path / "nope.txt", "-o", out), "nope.txt")
    assert_one_line_error(run("calibrate", ref, "--text", tmp_path, "-o", out), "directory")
    assert_one_line_error(run("calibrate", ref, "--text", empty, "-o", out), "empty")
    assert_one_line_error(run("calibrate", tmp_path / "no-model", "--text", text, "-o", out), "no-model")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ref.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer.json").write_text("{not json")
    assert_one_line_error(run("calibrate", broken, "--text", text, "-o", out), "broken")
    # an output that cannot be written fails before the model runs
    assert_one_line_error(run("calibrate", ref, "--text", text, "-o", tmp_path / "no-dir" / "s.gguf"), "no-dir")
    assert_one_line_error(run("calibrate", ref, "--text", text, "-o", tmp_path), "directory")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

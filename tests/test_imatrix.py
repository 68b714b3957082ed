"""Importance matrices: llama.cpp's file formats, and collection from the Hugging Face model."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import llama_gguf
import tiny_models

from ggufmoe.arch import architecture_for
from ggufmoe.stats.collect import collect_imatrix
from ggufmoe.errors import GgufmoeError
from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry, load_imatrix, save_imatrix
from ggufmoe.source.hf import HFSource

CTX = 512
CALIB_TOKENS = 8192
TOP_K = 4


def sample_imatrix() -> Imatrix:
    rng = np.random.default_rng(0)
    sums = rng.random((4, 8), dtype=np.float32) * 10
    sums[2] = 0
    return Imatrix(
        entries={
            "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 16), dtype=np.float32), np.array([100], np.float32)),
            "blk.0.ffn_down_exps.weight": ImatrixEntry(sums, np.array([7, 3, 0, 12], np.float32)),
        },
        datasets=["calib.txt"], chunk_count=3, chunk_size=512)


def write_dat(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunks: int | None = None,
              dataset: str | None = None) -> None:
    """A legacy llama.cpp .dat imatrix, written by hand."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    if chunks is not None:
        out += struct.pack("<i", chunks)
        if dataset is not None:
            out += struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(out)


# --- file formats -----------------------------------------------------------------------------

def test_gguf_round_trip(tmp_path):
    im = sample_imatrix()
    path = tmp_path / "im.gguf"
    save_imatrix(im, path)
    assert [p.name for p in tmp_path.iterdir()] == ["im.gguf"]  # no temporary left behind
    back = load_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 3, 512)
    assert back.entries.keys() == im.entries.keys()
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    down = im.entries["blk.0.ffn_down_exps.weight"]
    np.testing.assert_allclose(back.row("blk.0.ffn_down_exps.weight", 1), down.in_sum2[1] / 3, rtol=1e-6)
    np.testing.assert_array_equal(back.row("blk.0.ffn_down_exps.weight", 2), np.ones(8, np.float32))
    np.testing.assert_allclose(back.entries["blk.0.ffn_down_exps.weight"].importance(),
                               np.stack([down.in_sum2[0] / 7, down.in_sum2[1] / 3, np.ones(8), down.in_sum2[3] / 12]),
                               rtol=1e-6)
    assert back.row("blk.0.attn_k.weight", None) is None
    with pytest.raises(GgufmoeError):
        save_imatrix(im, tmp_path / "no-such-dir" / "im.gguf")
    with pytest.raises(GgufmoeError):
        back.row("blk.0.ffn_down_exps.weight", 4)


def test_gguf_layout_as_llama_imatrix_writes_it(tmp_path):
    path = tmp_path / "im.gguf"
    save_imatrix(sample_imatrix(), path)
    r = gguf.GGUFReader(path)
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.datasets").contents() == ["calib.txt"]
    assert r.get_field("imatrix.chunk_count").types == [gguf.GGUFValueType.UINT32]
    assert r.get_field("imatrix.chunk_size").contents() == 512
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [8, 4]  # ggml order: ne0, n_expert
    assert list(t["blk.0.ffn_down_exps.weight.counts"].shape) == [1, 4]
    assert list(t["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)


def test_llama_cpp_reads_our_gguf(tmp_path):
    """Reads the file with llama.cpp's own GGUF parser (libggml-base), as common_imatrix_load does."""
    im = sample_imatrix()
    path = tmp_path / "im.gguf"
    save_imatrix(im, path)
    f = llama_gguf.read_gguf(path)
    assert f is not None, "llama.cpp's gguf parser rejected the file"
    # llama-quantize refuses files without this metadata
    assert f.kv["general.type"] == (llama_gguf.GGUF_STRING, None, "imatrix")
    assert f.kv["imatrix.datasets"] == (llama_gguf.GGUF_ARRAY, llama_gguf.GGUF_STRING, ["calib.txt"])
    assert f.kv["imatrix.chunk_count"] == (llama_gguf.GGUF_UINT32, None, 3)
    assert f.kv["imatrix.chunk_size"] == (llama_gguf.GGUF_UINT32, None, 512)
    assert len(f.tensors) == 2 * len(im.entries)
    for name, e in im.entries.items():
        n_expert, ne0 = e.in_sum2.shape
        assert f.tensors[name + ".in_sum2"][:2] == (llama_gguf.GGML_F32, (ne0, n_expert))
        assert f.tensors[name + ".counts"][:2] == (llama_gguf.GGML_F32, (1, n_expert))
    entries = llama_gguf.imatrix_entries(f)
    assert entries.keys() == im.entries.keys()
    for name, e in im.entries.items():
        np.testing.assert_array_equal(entries[name][0], e.in_sum2.reshape(-1))
        np.testing.assert_array_equal(entries[name][1], e.counts)


def test_legacy_dat(tmp_path):
    rng = np.random.default_rng(1)
    router, gate = rng.random(8, np.float32) * 5, rng.random(4 * 8, np.float32) * 5
    down, attn = rng.random(4 * 6, np.float32) * 5, rng.random(8, np.float32) * 5
    path = tmp_path / "im.dat"
    write_dat(path, {"blk.0.ffn_gate_inp.weight": (10, router), "blk.0.ffn_gate_exps.weight": (10, gate),
                     "blk.0.ffn_down_exps.weight": (10, down), "blk.0.attn_q.weight": (10, attn)},
              chunks=10, dataset="wiki.train.raw")
    im = load_imatrix(path)
    assert (im.datasets, im.chunk_count) == (["wiki.train.raw"], 10)
    np.testing.assert_allclose(im.row("blk.0.attn_q.weight", None), attn / 10, rtol=1e-6)
    for e in range(4):
        np.testing.assert_allclose(im.row("blk.0.ffn_gate_exps.weight", e), gate[8 * e: 8 * e + 8] / 10, rtol=1e-6)
        np.testing.assert_allclose(im.row("blk.0.ffn_down_exps.weight", e), down[6 * e: 6 * e + 6] / 10, rtol=1e-6)
    # the trailer is optional; converting to GGUF keeps the importance values
    write_dat(path, {"blk.0.attn_q.weight": (3, attn)})
    im = load_imatrix(path)
    assert (im.datasets, im.chunk_count) == ([], 0)
    save_imatrix(im, tmp_path / "im.gguf")
    np.testing.assert_allclose(load_imatrix(tmp_path / "im.gguf").row("blk.0.attn_q.weight", None), attn / 3,
                               rtol=1e-6)


def test_bad_files(tmp_path):
    good = tmp_path / "good.gguf"
    save_imatrix(sample_imatrix(), good)
    data = good.read_bytes()
    cases = {
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "truncated_gguf": data[: len(data) // 2],
        "truncated_gguf_header": data[:40],
        "text": b"blk.0.attn_q.weight 1 2 3\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    dat = tmp_path / "dat"
    write_dat(dat, {"blk.0.attn_q.weight": (1, np.ones(64, np.float32))}, chunks=1, dataset="x")
    (tmp_path / "truncated_dat").write_bytes(dat.read_bytes()[:100])
    no_entries = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(no_entries, arch="llama")
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    for path in [*(tmp_path / n for n in cases), tmp_path / "truncated_dat", no_entries, tmp_path / "missing"]:
        with pytest.raises(GgufmoeError) as err:
            load_imatrix(path)
        assert "\n" not in str(err.value)
    # an expert entry whose expert count the legacy format cannot give
    write_dat(dat, {"blk.0.ffn_down_exps.weight": (1, np.ones(64, np.float32))})
    with pytest.raises(GgufmoeError, match="expert count"):
        load_imatrix(dat)


# --- collection ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calib_tokens() -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models.REF_MODEL)
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:100_000]
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:CALIB_TOKENS]
    assert len(ids) == CALIB_TOKENS
    return ids


@pytest.fixture(scope="module")
def ref_imatrix() -> Imatrix:
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:100_000]
    return collect_imatrix(tiny_models.REF_MODEL, text, ctx=CTX, max_tokens=CALIB_TOKENS, progress=False,
                           dataset="calib.txt")


def test_reference_model_entries(ref_imatrix):
    im = ref_imatrix
    assert (im.datasets, im.chunk_count, im.chunk_size) == (["calib.txt"], CALIB_TOKENS // CTX, CTX)
    specs = list(architecture_for(HFSource(tiny_models.REF_MODEL)).tensors())
    kinds = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
             "ffn_down_exps"}
    want = {s.name for s in specs if s.kind in kinds or s.name == "output.weight"}
    assert len(want) == 6 * 8 + 1
    assert set(im.entries) == want
    for s in specs:
        if s.name not in want:
            continue
        e = im.entries[s.name]
        assert e.in_sum2.shape == (s.n_parts, s.shape[-1])
        if s.is_expert:
            assert e.counts.sum() == CALIB_TOKENS * TOP_K
            assert np.all(im.row(s.name, int(np.argmin(e.counts))) > 0)
        else:
            assert e.counts.tolist() == [CALIB_TOKENS]
    for il in range(6):  # gate and up read the same input; all share the routing
        b = f"blk.{il}"
        gate, up, down = (im.entries[f"{b}.ffn_{k}_exps.weight"] for k in ("gate", "up", "down"))
        np.testing.assert_array_equal(gate.in_sum2, up.in_sum2)
        np.testing.assert_array_equal(gate.counts, down.counts)
        # every token feeds the router once and top_k experts once each
        np.testing.assert_allclose(gate.in_sum2.sum(0), TOP_K * im.entries[f"{b}.ffn_gate_inp.weight"].in_sum2[0],
                                   rtol=1e-4)


def test_reference_model_values_recomputed(ref_imatrix, calib_tokens):
    """attn_q and one expert's ffn_down_exps of layer 0, recomputed without hooks from the checkpoint weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models.REF_MODEL, dtype=torch.float32).eval()
    src = HFSource(tiny_models.REF_MODEL)
    layer = model.model.layers[0]
    router = torch.from_numpy(src.get("model.layers.0.mlp.gate.weight")).double()
    expert = int(np.argsort(ref_imatrix.entries["blk.0.ffn_down_exps.weight"].counts)[len(router) // 2])
    wg, wu = (torch.from_numpy(src.get(f"model.layers.0.mlp.experts.{expert}.{p}_proj.weight")).double()
              for p in ("gate", "up"))
    q_sum2 = torch.zeros(256, dtype=torch.float64)
    down_sum2 = torch.zeros(wg.shape[0], dtype=torch.float64)
    n_routed = 0
    with torch.no_grad():
        for i in range(0, CALIB_TOKENS, CTX):
            ids = torch.tensor([calib_tokens[i: i + CTX]])
            hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            x = layer.input_layernorm(hs[0])
            q_sum2 += (x.double() ** 2).sum((0, 1))
            pos = torch.arange(ids.shape[1])[None]
            attn, _ = layer.self_attn(x, position_embeddings=model.model.rotary_emb(x, pos), attention_mask=None)
            resid = hs[0] + attn
            moe_in = layer.post_attention_layernorm(resid)
            torch.testing.assert_close(resid + layer.mlp(moe_in), hs[1], rtol=1e-4, atol=1e-4)  # recomputation holds
            m = moe_in[0].double()
            top = torch.topk(torch.softmax(m @ router.T, -1), TOP_K, -1).indices
            xe = m[(top == expert).any(-1)]
            n_routed += xe.shape[0]
            down_sum2 += ((torch.nn.functional.silu(xe @ wg.T) * (xe @ wu.T)) ** 2).sum(0)
    np.testing.assert_allclose(ref_imatrix.entries["blk.0.attn_q.weight"].in_sum2[0], q_sum2.numpy(), rtol=1e-4)
    down = ref_imatrix.entries["blk.0.ffn_down_exps.weight"]
    assert n_routed > 0 and down.counts[expert] == n_routed
    np.testing.assert_allclose(down.in_sum2[expert], down_sum2.numpy(), rtol=1e-3)


def glu(config, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The experts' gated activation: SwiGLU, Gemma's tanh GELU, or gpt-oss's clamped variant
    ``(u + 1) * g * sigmoid(alpha g)``."""
    if getattr(config, "hidden_activation", None) == "gelu_pytorch_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh") * u
    if config.model_type != "gpt_oss":
        return torch.nn.functional.silu(g) * u
    g, u = g.clamp(max=config.swiglu_limit), u.clamp(-config.swiglu_limit, config.swiglu_limit)
    return (u + 1) * g * torch.sigmoid(config.swiglu_alpha * g)


@pytest.mark.parametrize("arch", tiny_models.CALIBRATED)
def test_tiny_models(tmp_path, arch):
    """Every matmul and expert tensor gets an entry; expert values match the checkpoint's per-expert weights."""
    model = tiny_models.build(arch, tmp_path)
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:20_000]
    ctx, max_tokens = 128, 512
    im = collect_imatrix(tmp_path, text, ctx=ctx, max_tokens=max_tokens, progress=False)
    assert im.chunk_count == max_tokens // ctx

    # reference: the routed tokens seen at each experts module, the checkpoint's own expert tensors
    arch = architecture_for(HFSource(tmp_path))
    specs = list(arch.tensors())
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    shared = {s.hf_name for s in specs if s.name.endswith(("attn_k_b.weight", "attn_v_b.weight"))}
    want = {s.name for s in specs if s.is_expert or (s.hf_name in linear and s.hf_name not in shared)}
    assert want <= set(im.entries)
    routed: dict[int, list] = {}  # layer -> (hidden_states, top_k_index) of each experts call

    def keep(il: int):
        return lambda _m, args: routed.setdefault(il, []).append((args[0], args[1]))

    experts = {il: next((m for m in layer.modules() if hasattr(m, "gate_up_proj")), None)
               for il, layer in enumerate(model.get_decoder().layers)}
    hooks = [m.register_forward_pre_hook(keep(il)) for il, m in experts.items() if m is not None]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False, verbose=False)["input_ids"]
    with torch.no_grad():
        for i in range(0, max_tokens, ctx):
            model(input_ids=torch.tensor([ids[i: i + ctx]]), use_cache=False)
    for h in hooks:
        h.remove()
    n_tokens = im.entries[next(
        n for n in im.entries if n.startswith("blk.0.") and "_exps" not in n)].counts[0]
    assert n_tokens == max_tokens
    top_k = arch.top_k
    by_name = {s.name: s for s in specs}
    assert routed
    for il, calls in routed.items():
        gate, up, down = (by_name[f"blk.{il}.ffn_{k}_exps.weight"] for k in ("gate", "up", "down"))
        assert im.entries[down.name].counts.sum() == n_tokens * top_k
        biases = [by_name.get(f"blk.{il}.ffn_{k}_exps.bias") for k in ("gate", "up")]
        for e in range(gate.n_parts):
            wg, wu = torch.from_numpy(gate.load(e)).double(), torch.from_numpy(up.load(e)).double()
            bg, bu = (torch.from_numpy(b.load(0)[e]).double() if b else 0.0 for b in biases)
            x2, mid2, n = 0, 0, 0
            for h, idx in calls:
                x = h[(idx == e).any(-1)].double()
                x2 = x2 + (x ** 2).sum(0)
                mid2 = mid2 + (glu(model.config.get_text_config(), x @ wg.T + bg, x @ wu.T + bu) ** 2).sum(0)
                n += x.shape[0]
            assert im.entries[gate.name].counts[e] == n
            if n:
                np.testing.assert_allclose(im.entries[up.name].in_sum2[e], x2.numpy(), rtol=1e-4)
                np.testing.assert_allclose(im.entries[down.name].in_sum2[e], mid2.numpy(), rtol=1e-3, atol=1e-12)


# --- MLA's 3-D attn_k_b / attn_v_b: one importance row per head, as llama.cpp's imatrix stores them ----------

def per_head_imatrix(specs, rng: np.random.Generator, n_rows: int | None = None) -> Imatrix:
    """Random per-head entries for every ``attn_k_b``/``attn_v_b`` (one head never seen: its row is ones)."""
    entries = {}
    for s in specs:
        if s.kind in ("attn_k_b", "attn_v_b"):
            n = n_rows or s.shape[0]
            counts = rng.integers(1, 50, n).astype(np.float32)
            counts[-1] = 0
            entries[s.name] = ImatrixEntry(rng.uniform(0.01, 10, (n, s.shape[-1])).astype(np.float32) * counts[:, None],
                                           counts)
    return Imatrix(entries, ["random"], 1, 1)


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 whose k_b rows (32) take Q5_0 (Q4_K's fallback) and v_b rows (256) Q4_K."""
    d = tmp_path_factory.mktemp("mla") / "hf"
    tiny_models.build("deepseek3", d, config=tiny_models.deepseek3_config(
        num_hidden_layers=2, qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=256))
    return d


def test_per_head_imatrix_rows_quantize_each_head(mla_model, tmp_path):
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.ggml import Quantizer
    from ggufmoe.quant.rules import TypeRules

    specs = {s.name: s for s in architecture_for(HFSource(mla_model)).tensors()}
    imatrix = per_head_imatrix(specs.values(), np.random.default_rng(0))
    save_imatrix(imatrix, tmp_path / "im.gguf")
    out = tmp_path / "out.gguf"
    convert(mla_model, ConvertOptions(out=out, types=TypeRules.parse("Q4_K"), imatrix=tmp_path / "im.gguf",
                                      threads=2, progress=False))
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    back = load_imatrix(tmp_path / "im.gguf")
    with Quantizer(2) as q:
        for name, entry in back.entries.items():
            t, heads = written[name], specs[name].load(0)
            assert t.tensor_type == (gguf.GGMLQuantizationType.Q5_0 if "attn_k_b" in name else
                                     gguf.GGMLQuantizationType.Q4_K)
            want = np.concatenate([q.quantize(h, t.tensor_type, entry.importance_row(i)) for i, h in enumerate(heads)])
            assert np.array_equal(np.asarray(t.data).reshape(-1), want), name
            one_row = q.quantize(heads, t.tensor_type, entry.importance_row(0))
            assert not np.array_equal(want, one_row)  # the rows differ, and each head got its own


def test_imatrix_rows_that_fit_no_slicing_fail_before_writing(mla_model, tmp_path):
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.rules import TypeRules

    specs = architecture_for(HFSource(mla_model)).tensors()
    save_imatrix(per_head_imatrix(specs, np.random.default_rng(1), n_rows=3), tmp_path / "im.gguf")
    with pytest.raises(GgufmoeError, match=r"attn_k_b.weight has 3 rows.*1 or 4 \(one per slice\)"):
        convert(mla_model, ConvertOptions(out=tmp_path / "o.gguf", types=TypeRules.parse("Q4_K"),
                                          imatrix=tmp_path / "im.gguf", progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf"]


def test_per_head_imatrix_rows_feed_the_sensitivities(mla_model):
    """The planner's error measurement takes per-head entries too (their mean is the tensor's importance)."""
    from ggufmoe.sensitivity.quant_error import measure_errors
    from ggufmoe.stats.file import Stats

    arch = architecture_for(HFSource(mla_model))
    specs = [s for s in arch.tensors() if s.kind in ("attn_k_b", "attn_v_b")]
    stats = Stats(per_head_imatrix(specs, np.random.default_rng(2)), {})
    errors = measure_errors(specs, stats, None, arch.n_expert, arch.top_k, threads=1, progress=False)
    for s in specs:
        assert errors[s.name]["IQ2_XXS"] > errors[s.name]["Q4_K"] > errors[s.name]["Q8_0"] > 0, s.name

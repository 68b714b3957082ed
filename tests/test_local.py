"""Local errors of the streamed calibration (ggufmoe.stats.local_errors, ggufmoe.stats.prune_error) against
transformers: with sampling switched off, a tensor's error is exactly ``mean ||(W - Q(W)) x||^2`` over the
inputs transformers' own model gives it, and a layer's pruning error is exactly how much transformers' MoE
block output changes when the same experts are pruned (tests/prune_hf.py), DeepSeek groups and routing bias
included. Then the plan made from local errors alone."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import tiny_models
from prune_hf import prune_hf_model
from ggufmoe.arch import architecture_for
from ggufmoe.model.qtypes import effective_type
from ggufmoe.pipeline.planning import build_plan
from ggufmoe.pipeline.calibrate import calibrate
from ggufmoe.plan.budget import Budget
from ggufmoe.prune.criteria import (PruneRequest, choose_experts, keep_counts, prune_key, reachable_experts,
                                    top_k_variants)
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.sensitivity.cost import SensitivityMode
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.hf_model import load_model
from ggufmoe.stats.file import save_stats
from ggufmoe.stats.local_errors import LocalOptions, local_errors
from ggufmoe.stats.text import batches, calibration_tokens

LOCAL = SensitivityMode.LOCAL

CTX = 128
N_TOKENS = 600
EXACT = LocalOptions(max_tokens=10**6, max_rows=10**6, expert_tokens=10**6, prune_tokens=10**6)  # no sampling


def calib_text() -> str:
    return (tiny_models.TEST_DATA / "calib.txt").read_text()[:20_000]


def run_whole(model_dir, hooks: dict[str, str]) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """Every token's input of each hooked module, from transformers' whole model over the calibration batches."""
    tokenizer, model = load_model(model_dir, progress=False)
    return run_model(model, tokenizer, hooks), model


def run_model(model, tokenizer, inputs: dict[str, str], outputs: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every token's input (``inputs``: name -> module path) or output (``outputs``) of each hooked module, from
    ``model`` over the calibration batches."""
    ids, prefix = calibration_tokens(tokenizer, calib_text(), CTX, N_TOKENS)
    got: dict[str, list[torch.Tensor]] = {k: [] for k in [*inputs, *(outputs or {})]}
    mods = dict(model.named_modules())

    def keep(key: str, t: torch.Tensor) -> None:
        got[key].append(t.detach().reshape(-1, t.shape[-1]).clone())

    handles = [mods[path].register_forward_pre_hook(lambda _m, args, key=key: keep(key, args[0]))
               for key, path in inputs.items()]
    handles += [mods[path].register_forward_hook(lambda _m, _a, out, key=key: keep(key, out))
                for key, path in (outputs or {}).items()]
    with torch.no_grad():
        for batch in batches(torch.from_numpy(ids), prefix, CTX):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "qwen3moe"
    tiny_models.build("qwen3moe", path)
    return path


def test_quantization_errors_equal_transformers(qwen3):
    stats = calibrate(qwen3, calib_text(), ctx=CTX, max_tokens=N_TOKENS, progress=False, local=EXACT)
    local = local_errors(stats)
    inputs, _ = run_whole(qwen3, {"h0": "model.layers.0", "q": "model.layers.0.self_attn.q_proj",
                                  "out": "lm_head"})
    specs = {s.name: s for s in architecture_for(HFSource(qwen3)).tensors()}
    residual = float((inputs["h0"].double() ** 2).sum(1).mean())
    with Quantizer(1) as q:
        for name, x, ref in (("blk.0.attn_q.weight", inputs["q"], residual), ("output.weight", inputs["out"], None)):
            w = specs[name].load(0)
            imp = stats.imatrix.row(name, None)
            if ref is None:
                ref = float(((x.double() @ torch.from_numpy(w).double().T) ** 2).sum(1).mean())
            for t in (T.IQ2_XXS, T.Q3_K, T.Q6_K):
                eff = effective_type(t, w.shape[1])  # as convert writes it: the fallback where rows do not fit
                d = gguf.quants.dequantize(q.quantize(w, eff, imp).reshape(len(w), -1), eff)
                err = ((x.double() @ torch.from_numpy(w - d).double().T) ** 2).sum(1).mean()
                assert local.quant[name][t.name] == pytest.approx(float(err) / ref, rel=1e-3), (name, t)
    order = ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]
    for name, e in local.quant.items():  # every tensor measured, errors falling with bits
        assert all(e[a] >= e[b] >= 0 for a, b in zip(order, order[1:])), name
    quantizable = [n for n, s in specs.items() if s.kind not in ("ffn_gate_inp",) and len(s.shape) > 1]
    assert sorted(local.quant) == sorted(quantizable)


def test_pruning_errors_equal_transformers(tmp_path):
    """DeepSeek-V3 layout: groups, sigmoid routing with a correction bias, shared experts, a dense first layer."""
    model_dir = tmp_path / "deepseek3"
    tiny_models.build("deepseek3", model_dir)
    arch = architecture_for(HFSource(model_dir))
    stats = calibrate(model_dir, calib_text(), ctx=CTX, max_tokens=N_TOKENS, progress=False, local=EXACT)
    local = local_errors(stats)
    moe = sorted(stats.layers)
    assert moe and set(local.prune) == {str(k) for k in moe}
    counts = [k for k in keep_counts(arch) if k < arch.n_expert]
    top_k = arch.top_k
    names = {prune_key(c, t, top_k) for c in [*counts, arch.n_expert] for t in [top_k, *top_k_variants(arch)]
             if (c, t) != (arch.n_expert, top_k) and t <= reachable_experts(arch, c)}
    assert f"{counts[-1]}@{top_k + 1}" in names and f"{arch.n_expert}@{top_k - 1}" in names
    for k in moe:
        assert set(local.prune[str(k)]) == {"frequency", "routing", "reap"}
        assert all(set(v) == names for v in local.prune[str(k)].values())
    layer = moe[0]
    inputs, model = run_whole(model_dir, {"h": f"model.layers.{layer}", "x": f"model.layers.{layer}.mlp"})
    residual = float((inputs["h"].double() ** 2).sum(1).mean())
    # pruned, pruned routing one more expert per token, and unpruned routing one fewer
    for criterion, keep, k in (("reap", counts[-1], top_k), ("routing", counts[-1], top_k),
                               ("reap", counts[-1], top_k + 1), ("routing", arch.n_expert, top_k - 1)):
        plan = choose_experts(arch, stats, PruneRequest(keep=keep, criterion=criterion, top_k=k))
        pruned = prune_hf_model(copy.deepcopy(model), plan)
        with torch.no_grad():
            x = inputs["x"][None]
            diff = model.model.layers[layer].mlp(x) - pruned.model.layers[layer].mlp(x)
        want = float((diff[0].double() ** 2).sum(1).mean()) / residual
        assert want > 0
        assert local.prune[str(layer)][criterion][prune_key(keep, k, top_k)] == pytest.approx(want, rel=1e-3)


def test_plan_from_local_errors_only(qwen3, tmp_path):
    stats_path = tmp_path / "stats.gguf"
    save_stats(calibrate(qwen3, calib_text(), ctx=CTX, max_tokens=N_TOKENS, progress=False), stats_path)
    size = sum(s.n_elements for s in architecture_for(HFSource(qwen3)).tensors())  # about 8 bits a weight
    plan = build_plan(qwen3, Budget(size, weights_only=True, sensitivity=LOCAL), stats_path, None, progress=False)
    assert any("local errors" in n and "no probes" in n for n in plan.notes)
    assert plan.file_bytes <= size and plan.predicted_kld["total"] > 0
    assert np.isfinite(plan.predicted_kld["total"])


def test_top_k_auto_and_speed_target(qwen3, tmp_path):
    """--top-k auto weighs one fewer and one more expert per token; --max-active caps the bytes a token reads."""
    from gguf import GGUFReader

    from ggufmoe.errors import GgufmoeError
    from ggufmoe.pipeline.planning import options_from_plan
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.rules import TypeRules

    stats_path = tmp_path / "stats.gguf"
    save_stats(calibrate(qwen3, calib_text(), ctx=CTX, max_tokens=N_TOKENS, progress=False), stats_path)
    arch = architecture_for(HFSource(qwen3))
    size = sum(s.n_elements for s in arch.tensors())
    free = build_plan(qwen3, Budget(size, weights_only=True, top_k_auto=True, sensitivity=LOCAL), stats_path, None,
                      progress=False)
    assert {c["top_k"] for c in free.candidates} == {arch.top_k - 1, arch.top_k, arch.top_k + 1}
    assert all(np.isfinite(c["predicted_kld"]) for c in free.candidates)
    fast = build_plan(qwen3, Budget(size, weights_only=True, top_k_auto=True, max_active=free.active_bytes - 1,
                                    sensitivity=LOCAL),
                      stats_path, None, progress=False)
    assert fast.active_bytes < free.active_bytes and fast.predicted_kld["total"] >= free.predicted_kld["total"]
    out = convert(qwen3, options_from_plan(fast, ConvertOptions(out=tmp_path / "fast.gguf", types=TypeRules.parse("Q8_0"),
                                                                progress=False)))[0]
    assert out.stat().st_size == fast.file_bytes
    assert GGUFReader(out).fields["qwen3moe.expert_used_count"].contents() == fast.top_k
    with pytest.raises(GgufmoeError, match="per token"):
        build_plan(qwen3, Budget(size, weights_only=True, max_active=1, sensitivity=LOCAL), stats_path, None,
                   progress=False)


def test_gemma4_pruning_errors_are_the_layer_output_change(tmp_path):
    """Gemma 4 routes on the residual and normalises the routed output twice before adding it: its pruning errors
    are how much transformers' decoder layer output changes when pruned (the layer's tail run on the pruned routed
    output), a top-k change included (in layer 0, where the shared configuration's top-k changes nothing before),
    and its experts' quantization errors how much it changes when they are quantized."""
    model_dir = tmp_path / "gemma4"
    tiny_models.build("gemma4", model_dir)
    arch = architecture_for(HFSource(model_dir))
    stats = calibrate(model_dir, calib_text(), ctx=CTX, max_tokens=N_TOKENS, progress=False, local=EXACT)
    local = local_errors(stats)
    assert set(local.prune) == {str(k) for k in stats.layers} and set(local.similarity) == set(local.prune)
    counts = [k for k in keep_counts(arch) if k < arch.n_expert]
    layers = {il: f"model.language_model.layers.{il}" for il in (0, 4)}
    tokenizer, model = load_model(model_dir, progress=False)
    whole = run_model(model, tokenizer, {f"h{il}": p for il, p in layers.items()},
                      {f"y{il}": p for il, p in layers.items()})
    for layer, criterion, keep, k in ((0, "reap", counts[0], arch.top_k), (0, "routing", arch.n_expert, arch.top_k - 1),
                                      (4, "routing", counts[-1], arch.top_k)):
        plan = choose_experts(arch, stats, PruneRequest(keep=keep, criterion=criterion, top_k=k))
        plan.kept = {il: kept for il, kept in plan.kept.items() if il == layer}
        pruned = run_model(prune_hf_model(copy.deepcopy(model), plan), tokenizer, {}, {"y": layers[layer]})
        residual = float((whole[f"h{layer}"].double() ** 2).sum(1).mean())
        want = float(((whole[f"y{layer}"] - pruned["y"]).double() ** 2).sum(1).mean()) / residual
        assert want > 0
        assert local.prune[str(layer)][criterion][prune_key(keep, k, arch.top_k)] == pytest.approx(want, rel=1e-3)
    # the experts' quantization errors reach the layer's output through the routed output's measured gain (a
    # linearisation: exact for small errors); the down matrices' output is the routed output
    quantized = copy.deepcopy(model)
    down = quantized.model.language_model.layers[4].experts.down_proj.data
    name, t = "blk.4.ffn_down_exps.weight", T.Q4_K
    with Quantizer(1) as q:
        for e in range(len(down)):
            w = down[e].numpy()
            eff = effective_type(t, w.shape[1])  # as convert writes it
            d = gguf.quants.dequantize(q.quantize(w, eff, stats.imatrix.row(name, e)).reshape(len(w), -1), eff)
            down[e] = torch.from_numpy(d.astype(np.float32))
    got = run_model(quantized, tokenizer, {}, {"y": layers[4]})
    want = float(((whole["y4"] - got["y"]).double() ** 2).sum(1).mean()) / float((whole["h4"].double() ** 2).sum(1).mean())
    assert local.quant[name][t.name] == pytest.approx(want, rel=0.1)

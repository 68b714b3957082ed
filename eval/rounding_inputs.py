"""Which inputs the output-aware rounding should fit: the model's own, the rounded model's, or the rounded model's
paired with the model's own outputs. A lab on the reference model in transformers (its Qwen3-MoE modules, every
decoder matmul rounded, the embeddings and the output left in float32), KL to the float32 model in torch.

    python eval/rounding_inputs.py [--types Q4_K,Q2_K] [--chars 400000]

Rows are kept by type, mode and calibration size: runs at other ``--chars`` add rows (how the gain depends on the
tokens each expert is fitted to: the table says how many fitted tokens were routed to each expert, over its input's
width, on average).

Modes, each rounding layer by layer with :func:`ggufmoe.quant.aware.round_tensor` (held-out chunks as the pass holds
them out): ``llama``: llama.cpp's rounding; ``own``: fitted to the model's own inputs (the pass before this lab);
``rounded``: fitted to the rounded model's inputs (GPTQ's usual sequential inputs); ``fed``: fitted to the rounded
model's inputs to bring its outputs near the model's own, one matmul input after another (q, k and v rounded before
the attention output's inputs are taken: what the pass does, :mod:`ggufmoe.stats.rounding`); ``fed-layer``: the
same, every plain matmul of a layer fitted to the rounded model's inputs before any of the layer is rounded (the pass
before it).
Writes eval/results/rounding_inputs.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SHARED  # noqa: E402

from ggufmoe.quant.aware import round_tensor, shift_of  # noqa: E402
from ggufmoe.quant.ggml import Quantizer  # noqa: E402
from ggufmoe.stats.rounding import HOLD_EVERY  # noqa: E402

MODES = ("llama", "own", "rounded", "fed", "fed-layer")
CTX = 512


class Stop(Exception):
    pass


def key(row: dict) -> tuple[str, str, int]:
    return row["type"], row["mode"], row["chars"]


def inputs(model, k: int, where: str, calib: list[torch.Tensor]) -> torch.Tensor:
    """Layer ``k``'s input rows at ``qkv``, ``o`` or ``moe`` over every calibration chunk."""
    layer = model.model.layers[k]
    mod = {"qkv": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "moe": layer.mlp}[where]
    out = []

    def hook(_m, a):
        out.append(a[0].reshape(-1, a[0].shape[-1]).detach().float())
        raise Stop

    h = mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        for x in calib:
            try:
                model(x)
            except Stop:
                pass
    h.remove()
    return torch.cat(out)


def moments(x: torch.Tensor, own: torch.Tensor, held: torch.Tensor, w: torch.Tensor | None = None) -> dict:
    x, own = x.double(), own.double()
    w = torch.ones(len(x), dtype=torch.float64) if w is None else w.double()
    fit = ~held
    return dict(fit=((x[fit] * w[fit, None]).T @ x[fit]).numpy(), held=((x[held] * w[held, None]).T @ x[held]).numpy(),
                cross=(((own[fit] - x[fit]) * w[fit, None]).T @ x[fit]).numpy(),
                cross_held=(((own[held] - x[held]) * w[held, None]).T @ x[held]).numpy(),
                imp=((x[fit] ** 2).sum(0) / max(int(fit.sum()), 1)).float().numpy())


def rounded(w: torch.Tensor, t: T, m: dict, mode: str, q: Quantizer) -> torch.Tensor:
    a = w.detach().float().numpy()
    if mode == "llama":
        raw = q.quantize(a, t, m["imp"])
    elif mode.startswith("fed"):
        raw = round_tensor(a, t, m["imp"], m["fit"], m["held"], q, shift=shift_of(m["fit"], m["cross"]),
                           cross_held=m["cross_held"]).data
    else:
        raw = round_tensor(a, t, m["imp"], m["fit"], m["held"], q).data
    return torch.from_numpy(gguf.quants.dequantize(raw.reshape(len(a), -1), t).astype(np.float32))


def quantize(path: Path, t: T, mode: str, own_model, calib: list[torch.Tensor], held_rows: torch.Tensor,
             q: Quantizer) -> tuple[object, float]:
    """The model rounded in ``mode``, and its routed experts' mean count of fitted tokens per input column."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    feeds = mode not in ("llama", "own")  # fitted to the rounded model's inputs
    paired = mode.startswith("fed")  # with the model's own
    per_column = []
    for k in range(len(model.model.layers)):
        layer, own_layer = model.model.layers[k], own_model.model.layers[k]
        groups = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)))
        taken = {where: inputs(model, k, where, calib) for where, _ in groups} if mode == "fed-layer" else {}
        for where, names in groups:
            own = inputs(own_model, k, where, calib)
            x = taken[where] if where in taken else inputs(model, k, where, calib) if feeds else own
            m = moments(x, own if paired else x, held_rows[:len(x)])
            for n in names:
                lin = getattr(layer.self_attn, n)
                lin.weight.data = rounded(lin.weight, t, m, mode, q)
        own_h = inputs(own_model, k, "moe", calib)
        h = inputs(model, k, "moe", calib) if feeds else own_h
        with torch.no_grad():
            _, route_w, chosen = layer.mlp.gate(h)
        ex, own_ex = layer.mlp.experts, own_layer.mlp.experts
        ff = ex.intermediate_dim
        for e in range(ex.num_experts):
            tok, slot = torch.where(chosen == e)
            if not len(tok):
                continue
            w2, held = route_w[tok, slot].detach() ** 2, held_rows[tok]
            per_column.append(float((~held).sum()) / h.shape[1])
            x, own = h[tok], own_h[tok] if paired else h[tok]
            m = moments(x, own, held, w2)
            gu = ex.gate_up_proj.data[e]
            ex.gate_up_proj.data[e] = torch.cat([rounded(gu[:ff], t, m, mode, q), rounded(gu[ff:], t, m, mode, q)])
            with torch.no_grad():  # the down matmul's inputs: of the rounded gate and up where fitting those
                g, u = torch.nn.functional.linear(x, (ex if feeds else own_ex).gate_up_proj[e]).chunk(2, dim=-1)
                mid = ex.act_fn(g) * u
                g, u = torch.nn.functional.linear(own, own_ex.gate_up_proj[e]).chunk(2, dim=-1)
                own_mid = own_ex.act_fn(g) * u
            ex.down_proj.data[e] = rounded(ex.down_proj.data[e], t, moments(mid, own_mid if paired else mid,
                                                                            held, w2), mode, q)
    return model, float(np.mean(per_column))


def kl(model, own_model, chunks: list[torch.Tensor]) -> float:
    out = []
    with torch.no_grad():
        for x in chunks:
            p = torch.log_softmax(own_model(x).logits[0].double(), -1)
            r = torch.log_softmax(model(x).logits[0].double(), -1)
            out.append(float((p.exp() * (p - r)).sum(-1).mean()))
    return float(np.mean(out))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "refmoe-qwen3")
    ap.add_argument("--types", default="Q4_K,Q2_K")
    ap.add_argument("--chars", type=int, default=400_000)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    own_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    def chunks(text: str, n: int | None = None) -> list[torch.Tensor]:
        ids = tok(text)["input_ids"]
        count = len(ids) // CTX if n is None else min(n, len(ids) // CTX)
        return [torch.tensor(ids[c * CTX:(c + 1) * CTX])[None] for c in range(count)]

    calib = chunks((SHARED / "data" / "calib.txt").read_text()[:args.chars])
    held_rows = torch.cat([torch.full((CTX,), c % HOLD_EVERY == HOLD_EVERY - 1) for c in range(len(calib))])
    texts = {"eval_doc": chunks((SHARED / "data" / "eval_doc.txt").read_text(), args.chunks),
             "readme": chunks((ROOT / "README.md").read_text(), args.chunks)}
    rows = []
    with Quantizer(1) as q:
        for name in args.types.split(","):
            for mode in args.modes.split(","):
                t0 = time.perf_counter()
                model, per_column = quantize(args.model, T[name], mode, own_model, calib, held_rows, q)
                row = {"type": name, "mode": mode, "chars": args.chars, "tokens_per_column": per_column,
                       "s": time.perf_counter() - t0,
                       **{text: kl(model, own_model, c) for text, c in texts.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = ROOT / "eval" / "results" / "rounding_inputs"
    if out.with_suffix(".json").exists():  # the rows not run this time stay (same --chunks)
        done = {key(r) for r in rows}
        rows += [r for r in json.loads(out.with_suffix(".json").read_text()) if key(r) not in done]
    rows.sort(key=lambda r: (r["type"], -r["chars"], MODES.index(r["mode"])))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    per_column = {r["chars"]: r["tokens_per_column"] for r in rows if r["mode"] != "llama" and "tokens_per_column" in r}
    lines = ["# Which inputs the output-aware rounding fits (reference model, torch)", "",
             "`python eval/rounding_inputs.py --types TYPES --chars CHARS [--modes ...]`: every decoder matmul rounded "
             "layer by layer (embeddings and output in float32), calibration: the first CHARS characters of calib.txt "
             "(a quarter of it held out, as the pass does); KL to the float32 model on "
             f"{args.chunks} x {CTX} tokens of eval_doc.txt and of this README, and the ratio to llama.cpp's rounding "
             "from the same calibration. `tokens per expert column`: the fitted tokens each routed expert had, over "
             "its input's width, on average.", "",
             "| type | calib chars | tokens per expert column | inputs fitted | KL eval_doc | ratio | KL README "
             "| ratio |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if key(b) == (r["type"], "llama", r["chars"]))
        lines.append(f"| {r['type']} | {r['chars']} | {per_column.get(r['chars'], float('nan')):.1f} | {r['mode']} | "
                     f"{r['eval_doc']:.4f} | {r['eval_doc'] / base['eval_doc']:.3f} | "
                     f"{r['readme']:.4f} | {r['readme'] / base['readme']:.3f} |")
    lines += ["", "`llama`: llama.cpp's rounding; `own`: fitted to the model's own inputs; `rounded`: to the rounded "
              "model's inputs; `fed`: to the rounded model's inputs, toward the model's own outputs, one input at a "
              "time (q, k and v rounded before the attention output's inputs are taken: what the pass does); "
              "`fed-layer`: the same, every matmul of a layer fitted before any of it is rounded (the pass before it)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

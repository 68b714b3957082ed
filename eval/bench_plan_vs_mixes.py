"""Budgeted plans against llama.cpp's own mixes at the same file size, on the reference model.

    python eval/bench_plan_vs_mixes.py

For each llama.cpp mix (IQ1_M, IQ2_XXS, IQ2_M, Q2_K, Q3_K_M), made from our F32 conversion with
our importance matrix through `llama_model_quantize`: its file size becomes a weights-only
budget for `ggufmoe plan`; both files are measured on eval_doc.txt (KL divergence to the F32
conversion, through llama.cpp). Calibration on calib.txt, streamed with local errors (`ggufmoe calibrate`).
``--sensitivity probes`` (the default of a model this small) writes eval/results/plan_vs_mixes.{md,json,png};
``--sensitivity local`` (local errors mapped by the reference tables, no probe through llama.cpp)
writes eval/results/plan_vs_mixes_local.{md,json,png}; ``--sensitivity streamed`` (the streamed probes, carried by
the calibration on the pieces of calib.txt it holds out; no llama.cpp run) writes plan_vs_mixes_streamed.*.
Every file is also measured on a second text the calibration did not see, of another kind: this project's README
and sources (``common.source_text``). ``--rounding aware`` also converts each plan with output-aware rounding (its
inputs from the calibration text) and writes plan_vs_mixes[_SENSITIVITY]_aware.*, both roundings side by side.
``--sensitivity streamed --probe-texts``: the calibration also probes two texts of the evaluation texts' kinds
(``common.probe_texts``: Python's language reference, the installed packages' READMEs), and each evaluation text is
compared with what the plan predicts on the probe text of its kind; writes plan_vs_mixes_streamed_texts.*.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from common import eval_chunks, probe_texts, score as score_gguf, source_text  # noqa: E402
from ggufmoe.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ggufmoe.runtime.llama_quantize import llama_quantize  # noqa: E402
from ggufmoe.runtime.logprobs import LlamaScorer  # noqa: E402
from ggufmoe.pipeline.planning import build_plan, options_from_plan  # noqa: E402
from ggufmoe.prune.criteria import Criterion, Pruning  # noqa: E402
from ggufmoe.plan.budget import Budget  # noqa: E402
from ggufmoe.pipeline.calibrate import calibrate  # noqa: E402
from ggufmoe.pipeline.rounding import RoundingOptions  # noqa: E402
from ggufmoe.stats.file import load_stats, save_stats  # noqa: E402
from ggufmoe.quant.rules import TypeRules  # noqa: E402

MIXES = ("IQ1_M", "IQ2_XXS", "IQ2_M", "Q2_K", "Q3_K_M")
KIND = {"eval_doc.txt": "python-reference", "README": "package-readmes"}  # evaluation text -> probe text of its kind


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["mix_bytes"] / 2**20 for r in rows], [r["mix_kld"] for r in rows], "o-", label="llama.cpp mix")
    ax.plot([r["ours_bytes"] / 2**20 for r in rows], [r["ours_kld"] for r in rows], "s-", label="ggufmoe plan")
    for r in rows:
        ax.annotate(r["mix"], (r["mix_bytes"] / 2**20, r["mix_kld"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("KL divergence to F32 (nats/token)")
    ax.set_yscale("log")
    ax.set_title("refmoe-qwen3: same size, llama.cpp mixes vs ggufmoe plans")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "refmoe-qwen3")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, help="keep intermediate files here (stats, sensitivities are cached)")
    ap.add_argument("--sensitivity", choices=("probes", "local", "streamed"), default="probes")
    ap.add_argument("--chars", type=int, help="calibrate on the first CHARS characters of calib.txt [all]")
    ap.add_argument("--rounding", choices=("llama", "aware"), default="llama")
    ap.add_argument("--probe-texts", action="store_true", help="streamed: also probe common.probe_texts()")
    ap.add_argument("--redraw", action="store_true", help="--probe-texts: only write the table again from the JSON")
    ap.add_argument("--mixes", default=",".join(MIXES),
                    help="only these sizes: their rows are printed, the results files are written for all five")
    args = ap.parse_args()
    if args.probe_texts and args.sensitivity != "streamed":
        ap.error("--probe-texts is for --sensitivity streamed")
    if args.redraw:
        if not args.probe_texts:
            ap.error("--redraw is for --probe-texts")
        name = ROOT / "eval" / "results" / f"plan_vs_mixes_streamed_texts{'_aware' if args.rounding == 'aware' else ''}"
        write_texts(json.loads(name.with_suffix(".json").read_text()), name.with_suffix(".md"), args,
                    range(args.chunks))
        return
    planner = dict(sensitivity=args.sensitivity, criterion=Criterion.REAP)  # as the committed results were made
    calib = (SHARED / "data" / "calib.txt").read_text()[: args.chars]
    chunks = eval_chunks(args.model, args.chunks, args.ctx)
    other = eval_chunks(args.model, args.chunks, args.ctx, source_text())
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    stats_path = work / "stats.gguf"
    if not stats_path.exists():
        save_stats(calibrate(args.model, calib, probes=args.sensitivity == "streamed",
                             probe_texts=probe_texts() if args.probe_texts else None), stats_path)
    f32 = work / "F32.gguf"
    if not f32.exists():
        convert(args.model, ConvertOptions(out=f32, types=TypeRules.parse("F32"), progress=False))
    with LlamaScorer(f32, args.ctx) as score:
        base = [score(c) for c in chunks]
        base_other = [score(c) for c in other]
    imatrix = load_stats(stats_path).imatrix
    rows = []
    for mix in args.mixes.split(","):
        theirs = llama_quantize(f32, work / f"mix-{mix}.gguf", mix, imatrix=imatrix)
        size = theirs.stat().st_size
        plan = build_plan(args.model, Budget(size, weights_only=True, **planner), stats_path, calib)
        ours = convert(args.model, options_from_plan(plan, ConvertOptions(out=work / f"plan-{mix}.gguf",
                                                                          types=TypeRules.parse("Q8_0"),
                                                                          progress=False)))[0]
        row = dict(mix=mix, mix_bytes=size, mix_kld=score_gguf(theirs, chunks, base, args.ctx)["kld"],
                   ours_bytes=ours.stat().st_size, planned_bytes=plan.file_bytes, keep=plan.keep,
                   ours_kld=score_gguf(ours, chunks, base, args.ctx)["kld"], predicted_kld=plan.predicted_kld["total"],
                   predicted_by_text=plan.predicted_by_text)
        row["ratio"] = row["ours_kld"] / row["mix_kld"]
        row["mix_kld_source"] = score_gguf(theirs, other, base_other, args.ctx)["kld"]
        row["ours_kld_source"] = score_gguf(ours, other, base_other, args.ctx)["kld"]
        row["ratio_source"] = row["ours_kld_source"] / row["mix_kld_source"]
        if args.rounding == "aware":
            aware = convert(args.model, options_from_plan(plan, ConvertOptions(
                out=work / f"plan-{mix}-aware.gguf", types=TypeRules.parse("Q8_0"), progress=False,
                rounding=RoundingOptions(calib))))[0]
            row["aware_bytes"] = aware.stat().st_size
            row["aware_kld"] = score_gguf(aware, chunks, base, args.ctx)["kld"]
            row["aware_kld_source"] = score_gguf(aware, other, base_other, args.ctx)["kld"]
            row["aware_predicted_kld"] = plan.rounding["predicted_kld"]["total"]  # priced with the rounding it got
            row["aware_predicted_by_text"] = plan.rounding["predicted_by_text"]
            row.update(pruning_alone(args.model, plan.pruning(), work / f"pruned-{mix}.gguf", (chunks, base),
                                     (other, base_other), args.ctx))
        rows.append(row)
        print(row, flush=True)
    if len(rows) < len(MIXES):
        return
    out = ROOT / "eval" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "plan_vs_mixes" + ("" if args.sensitivity == "probes" else f"_{args.sensitivity}")
    if args.probe_texts:
        name += "_texts" + ("_aware" if args.rounding == "aware" else "")
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        write_texts(rows, out / f"{name}.md", args, chunks)
        return
    if args.rounding == "aware":
        write_aware(rows, out / f"{name}_aware.md", args, chunks)
        (out / f"{name}_aware.json").write_text(json.dumps(rows, indent=1))
        return
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / f"{name}.png")
    how = {"local": "local errors only, mapped to KL by the reference tables of ggufmoe/sensitivity/local_costs.py "
                    "(no probe through llama.cpp)",
           "streamed": "from the streamed probes the calibration carried on the pieces of calib.txt it held out (no "
                       "probe through llama.cpp)",
           "probes": "measured with probes through llama.cpp"}[args.sensitivity]
    lines = [
        "# Budgeted plans vs llama.cpp's mixes at the same size",
        "",
        f"Reference model `{args.model.name}`; statistics (streamed, with local errors) from "
        f"{'the first {:,} characters of '.format(args.chars) if args.chars else ''}calib.txt; "
        f"sensitivities and pruning costs {how}; KL divergence to the "
        f"F32 conversion over {len(chunks)} chunks of {args.ctx} tokens of eval_doc.txt (and as many of the source text: README and ggufmoe/*.py) through llama.cpp. "
        "Mixes made by `llama_model_quantize` from our F32 file with our importance matrix; our plan gets the "
        f"mix's file size as a weights-only budget. Machine: {platform.machine()}, {os.cpu_count()} cores. "
        "Reproduce: `python eval/bench_plan_vs_mixes.py`.",
        "",
        "| llama.cpp mix | its size | its KLD | our size | planned = written | experts kept | our KLD | predicted | "
        "predicted / measured | ratio to the mix | source text: its KLD | our KLD | predicted / measured | ratio |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['mix']} | {r['mix_bytes']:,} | {r['mix_kld']:.4f} | {r['ours_bytes']:,} | "
              f"{'yes' if r['planned_bytes'] == r['ours_bytes'] else 'NO'} | {r['keep']} | {r['ours_kld']:.4f} | "
              f"{r['predicted_kld']:.4f} | {r['predicted_kld'] / r['ours_kld']:.2f} | {r['ratio']:.2f} | "
              f"{r['mix_kld_source']:.4f} | {r['ours_kld_source']:.4f} | "
              f"{r['predicted_kld'] / r['ours_kld_source']:.2f} | {r['ratio_source']:.2f} |" for r in rows]
    lines += ["", f"![size vs KL]({name}.png)"]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def pruning_alone(model: Path, pruning: Pruning, out: Path, *texts: tuple[list, list], ctx: int) -> dict:
    """The KL of the plan's pruning alone (every tensor F32) on each text (chunks, base logits): what neither
    rounding changes."""
    path = convert(model, ConvertOptions(out=out, types=TypeRules.parse("F32"), pruning=pruning, progress=False))[0]
    kl = [score_gguf(path, chunks, base, ctx)["kld"] for chunks, base in texts]
    path.unlink()
    return dict(zip(("pruned_kld", "pruned_kld_source"), kl))


def write_texts(rows: list[dict], path: Path, args, chunks: list) -> None:
    """The plans against the mixes on each evaluation text, with what the plan predicts on all probe texts together
    and on the probe text of the evaluation text's kind (and with output-aware rounding, when it was measured)."""
    texts = {"eval_doc.txt": "", "README": "_source"}  # evaluation text -> its rows' key suffix
    aware = "aware_kld" in rows[0]
    lines = ["# Budgeted plans vs llama.cpp's mixes, predicted on probe texts of the evaluation texts' kinds", "",
             f"Reference model; statistics from {'the first {:,} characters of '.format(args.chars) if args.chars else ''}"
             "calib.txt; sensitivities and pruning costs from the streamed probes on three texts: the pieces of calib.txt "
             "the calibration held out, the Python language reference as pydoc renders it (`python-reference`), the "
             "installed packages' READMEs but this project's (`package-readmes`) (`eval/common.py: probe_texts`); no "
             f"probe through llama.cpp. KL to the F32 conversion over {len(chunks)} chunks of {args.ctx} tokens of "
             "eval_doc.txt (CPython's documentation) and of this project's README (the first chunks of "
             "`common.source_text`), neither seen by the calibration nor the probes. The plan minimises its KL on the "
             "three texts together; `on its kind` is what it predicts on the probe text of the evaluation text's kind "
             f"({', '.join(f'{e}: {k}' for e, k in KIND.items())})"
             + ("; `aware`: the same plan written with output-aware rounding (`/ the plan's KL`: against the same "
                "plan rounded by llama.cpp), predicted with the output errors its rounding pass measured "
                "(`Plan.price_rounding`); `pruning alone`: the plan's pruning with every tensor F32, what neither "
                "rounding changes, and `rounding's part`: (aware KL - it) / (plan KL - it), the rounding's own ratio "
                "(- where not measured)" if aware else "")
             + f". Reproduce: `python eval/bench_plan_vs_mixes.py --sensitivity streamed --probe-texts"
             f"{' --rounding aware' if aware else ''}{' --chars {}'.format(args.chars) if args.chars else ''}`.", "",
             "| mix | bytes | kept | text | mix KL | plan KL | / the mix | predicted (together) / measured | "
             "predicted on its kind | / measured |" + (" aware KL | / the mix | / the plan's KL | predicted on its "
                                                       "kind | / measured | pruning alone | rounding's part |"
                                                       if aware else ""),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|---:|---:|---:|" if aware
                                                                       else "")]
    within, better = [], []
    for r in rows:
        for text, k in texts.items():
            mix, ours, kind = r[f"mix_kld{k}"], r[f"ours_kld{k}"], r["predicted_by_text"][KIND[text]]["total"]
            line = (f"| {r['mix']} | {r['ours_bytes']:,} | {r['keep']} | {text} | {mix:.4f} | {ours:.4f} | "
                    f"{ours / mix:.2f} | {r['predicted_kld'] / ours:.2f} | {kind:.4f} | {kind / ours:.2f} |")
            within.append(abs(kind / ours - 1) <= 0.25)
            better.append(ours <= 0.6 * mix)
            if aware:
                measured, predicted = r[f"aware_kld{k}"], r["aware_predicted_by_text"][KIND[text]]["total"]
                line += (f" {measured:.4f} | {measured / mix:.2f} | {measured / ours:.2f} | {predicted:.4f} | "
                         f"{predicted / measured:.2f} |")
                floor = r.get(f"pruned_kld{k}")
                line += " - | - |" if floor is None else f" {floor:.4f} | {(measured - floor) / (ours - floor):.2f} |"
            lines.append(line)
    lines += ["", f"Predicted on its kind within +-25% of measured: {sum(within)} of {len(within)}; the plans' KL "
              f"<= 0.6x the mix: {sum(better)} of {len(better)}."]
    if aware:
        ok = [abs(r["aware_predicted_by_text"][KIND[t]]["total"] / r[f"aware_kld{k}"] - 1) <= 0.25
              for r in rows for t, k in texts.items()]
        half = [r[f"aware_kld{k}"] <= 0.5 * r[f"mix_kld{k}"] for r in rows for k in texts.values()]
        lines.append(f"Aware: predicted on its kind within +-25%: {sum(ok)} of {len(ok)}; KL <= 0.5x the mix: "
                     f"{sum(half)} of {len(half)}.")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_aware(rows: list[dict], path: Path, args, chunks: list) -> None:
    """The plans with both roundings against the mixes, and what the plan predicts for the aware file (priced with
    the output errors its rounding pass measured)."""
    lines = ["# Budgeted plans with output-aware rounding vs llama.cpp's mixes at the same size", "",
             f"Reference model; statistics, sensitivities ({args.sensitivity}) and the rounding's inputs from "
             f"{'the first {:,} characters of '.format(args.chars) if args.chars else ''}calib.txt; KL to the F32 "
             f"conversion over {len(chunks)} chunks of {args.ctx} tokens of eval_doc.txt and of the source text "
             "(README and ggufmoe/*.py) through llama.cpp. The same plan written twice: llama.cpp's rounding and "
             "output-aware rounding (same types, same bytes). Reproduce: "
             f"`python eval/bench_plan_vs_mixes.py --sensitivity {args.sensitivity} --rounding aware"
             f"{' --chars {}'.format(args.chars) if args.chars else ''}`.", "",
             "| mix | bytes | eval_doc: mix KL | plan, llama rounding | plan, aware | aware / mix | predicted / "
             "measured (aware) | sources: mix KL | plan, llama | plan, aware | aware / mix | predicted / measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mix']} | {r['aware_bytes']:,} | {r['mix_kld']:.4f} | {r['ours_kld']:.4f} | "
                     f"{r['aware_kld']:.4f} | {r['aware_kld'] / r['mix_kld']:.2f} | "
                     f"{r['aware_predicted_kld'] / r['aware_kld']:.2f} | {r['mix_kld_source']:.4f} | "
                     f"{r['ours_kld_source']:.4f} | {r['aware_kld_source']:.4f} | "
                     f"{r['aware_kld_source'] / r['mix_kld_source']:.2f} | "
                     f"{r['aware_predicted_kld'] / r['aware_kld_source']:.2f} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

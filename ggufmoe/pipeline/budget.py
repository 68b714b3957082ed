"""``ggufmoe plan`` and ``convert --budget``: statistics, sensitivities (measured or default) and what
pruning costs, then the best plan (:mod:`ggufmoe.plan.allocate`) and its conversion."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ggufmoe.arch import architecture_for
from ggufmoe.errors import GgufmoeError, Interrupted
from ggufmoe.gguf.writer import Progress
from ggufmoe.pipeline.convert import ConvertOptions, convert, input_files, refuse_overwriting_inputs
from ggufmoe.pipeline.measure import load_or_measure
from ggufmoe.plan.allocate import DEFAULT_PRUNE_SCALE, allocate_budget, keep_candidates, prune_cost
from ggufmoe.plan.budget import Budget, Plan
from ggufmoe.plan.layout import TOKENIZER_BYTES_PER_TOKEN
from ggufmoe.prune.criteria import PruneRequest, choose_experts
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.logprobs import base_logprobs, score_against
from ggufmoe.sensitivity.cache import cached_sensitivity, store
from ggufmoe.sensitivity.defaults import default_sensitivity
from ggufmoe.source import open_source
from ggufmoe.source.hf import HFSource
from ggufmoe.state_dir import partial_path
from ggufmoe.stats.file import check_output, load_stats
from ggufmoe.stats.stream import stream_stats
from ggufmoe.stats.text import read_text, token_chunks


def measure_prune_scale(src_dir: Path, stats_path: Path, text: str, ctx: int = 512, chunks: int = 4) -> float:
    """KL (through llama.cpp, F16 weights) of pruning a quarter of the experts, per unit of routing mass removed."""
    from transformers import AutoTokenizer  # heavy: only when measuring

    arch = architecture_for(HFSource(src_dir))
    stats = load_stats(stats_path, top_k=arch.top_k)
    keep = keep_candidates(arch, stats)
    keep = min(keep, key=lambda k: abs(k - 0.75 * arch.n_expert))
    req = PruneRequest(keep=keep, criterion="reap" if stats.has_routing else "frequency")
    removed = prune_cost(choose_experts(arch, stats, req), stats, 1.0)
    if removed <= 0:
        return DEFAULT_PRUNE_SCALE
    tok = AutoTokenizer.from_pretrained(src_dir)
    seqs = [c for c in token_chunks(tok, text, ctx, ctx * chunks) if len(c) == ctx] or \
        token_chunks(tok, text, ctx, ctx * chunks)
    with tempfile.TemporaryDirectory() as tmp:
        base = convert(src_dir, ConvertOptions(out=Path(tmp) / "base.gguf", types=TypeRules.parse("F16"),
                                               progress=False))[0]
        pruned = convert(src_dir, ConvertOptions(out=Path(tmp) / "pruned.gguf", types=TypeRules.parse("F16"),
                                                 stats=stats_path, prune=req, progress=False))[0]
        ref = base_logprobs(base, seqs)
        kld = float(np.mean([c.kld_mean for c in score_against(pruned, seqs, ref)]))  # mean over chunks
    return kld / removed


def build_plan(source: Path, budget: Budget, stats_path: Path | None = None, calib_text: str | None = None,
               pins: TypeRules | None = None, criterion: str = "reap", progress: bool = True) -> Plan:
    """Everything ``ggufmoe plan`` does: sensitivities (measured or default), then the best plan."""
    src = open_source(source)
    arch = architecture_for(src)
    pins = pins or TypeRules(None)
    if stats_path and not src.has_weights:
        raise GgufmoeError("--stats needs the model's weights; a configuration alone is planned with defaults")
    stats = load_stats(stats_path, top_k=arch.top_k) if stats_path else None
    if stats is not None and src.can_calibrate:
        if calib_text is not None and cached_sensitivity(src.path, stats, calib_text) is None:
            # sensitivities will be measured (minutes): say first if the budget is impossible
            rough = default_sensitivity(list(arch.tensors()), arch.n_expert, arch.top_k, imatrix=True,
                                        aliases=arch.sensitivity_aliases)
            allocate_budget(src, arch, stats, rough, budget, pins, DEFAULT_PRUNE_SCALE, criterion, None)
        sens = load_or_measure(src.path, stats_path, calib_text, progress=progress)
        prune_scale = sens.scales.get("prune")
        if prune_scale is None:
            if calib_text is None:
                raise GgufmoeError("measuring what pruning costs needs calibration text: pass --calib FILE")
            prune_scale = sens.scales["prune"] = measure_prune_scale(src.path, stats_path, calib_text)
            store(src.path, stats_path, calib_text, sens)  # cached with the sensitivities
    else:
        # From shapes. Types that need an importance matrix are allowed when there will be one: a
        # configuration alone is calibrated before converting; a GGUF uses the statistics' imatrix.
        sens = default_sensitivity(list(arch.tensors()), arch.n_expert, arch.top_k,
                                   imatrix=stats is not None or not src.has_weights, aliases=arch.sensitivity_aliases)
        prune_scale = DEFAULT_PRUNE_SCALE
    plan = allocate_budget(src, arch, stats, sens, budget, pins, prune_scale, criterion,
                            str(stats_path) if stats_path else None)
    if not sens.measured:
        plan.notes.append("sensitivities are defaults from tensor shapes (not measured)")
    if not arch.writes_tokenizer:
        plan.file_bytes += TOKENIZER_BYTES_PER_TOKEN * arch.n_vocab
    return plan


def options_from_plan(plan: Plan, base: ConvertOptions) -> ConvertOptions:
    """``base`` convert options with the plan's types, pruning and statistics filled in."""
    stats = base.stats or (Path(plan.stats) if plan.stats else None)
    return replace(base, types=plan.type_rules(), pruning=plan.pruning(), stats=stats, prune=None)


def convert_to_budget(src: Path, base, budget: Budget, calib_file: Path | None, pins: TypeRules,
                      criterion: str = "reap") -> tuple[Plan, list[Path]]:
    """calibrate (unless statistics are given, or kept beside the output for --resume) + plan + convert;
    the statistics and the plan are saved beside the output.

    The calibration streams (:func:`ggufmoe.stats.stream.stream_stats`), its state in
    ``.OUT.stats.gguf.partial``: interrupted with complete layers, ``--resume`` continues it. A run
    that fails leaves none of the files it made (statistics, plan, calibration state) behind, except
    what ``--resume`` continues from: an interruption keeps the complete calibration layers or the
    statistics, and a conversion kept for ``--resume`` keeps the statistics and plan it was made from.

    A GGUF source cannot be calibrated here: without ``--stats`` it is planned without pruning."""
    plan_path = base.out.with_suffix(".plan.json")
    outputs = [base.out, plan_path] + ([] if base.stats else [base.out.with_suffix(".stats.gguf")])
    refuse_overwriting_inputs(input_files(src, base) + ([calib_file] if calib_file else []), outputs,
                              base.split_max_size > 0)
    text = read_text(calib_file) if calib_file else None
    stats_path = base.stats
    made: list[Path] = []  # files this run wrote, removed again when it fails
    if stats_path is None and not open_source(src, config_ok=False).can_calibrate:
        if text is not None:
            raise GgufmoeError(f"{src}: a GGUF cannot be calibrated (transformers runs the Hugging Face model); "
                               "pass --stats from `ggufmoe calibrate` on that model, or a llama.cpp imatrix")
    elif stats_path is None:
        if text is None:
            raise GgufmoeError("--budget needs --calib FILE (calibration text) or --stats")
        stats_path = base.out.with_suffix(".stats.gguf")
        check_output(stats_path)
        # a resumed conversion plans from the statistics it was made from (kept beside it); so does a run that
        # finds one kept without --resume, which the writer then refuses, saying so, with those statistics intact
        if not (stats_path.is_file() and (base.resume or _conversion_kept(base.out))):
            stream_stats(src, text, progress=base.progress, dataset=calib_file.name, out=stats_path,
                         resume=base.resume, keep_on_error=False)
            made.append(stats_path)
    try:
        plan = build_plan(src, budget, stats_path, text, pins, criterion, progress=base.progress)
        made.append(plan_path)
        plan.save(plan_path)
        return plan, convert(src, options_from_plan(plan, base))
    except BaseException as e:
        if _conversion_kept(base.out):  # --resume continues it from these statistics
            raise
        interrupted = isinstance(e, KeyboardInterrupt) and stats_path in made
        for f in made:
            if not (interrupted and f == stats_path):
                f.unlink(missing_ok=True)
        if interrupted:
            raise Interrupted(f"the statistics are kept in {stats_path}: run the same command with --resume "
                              f"to continue") from None
        raise


def _conversion_kept(out: Path) -> bool:
    """Whether an interrupted conversion to ``out`` kept complete tensors for --resume."""
    return Progress.load(partial_path(out)) is not None

"""``ggufmoe plan`` and ``convert --budget``: statistics, sensitivities (measured or default) and what
pruning costs, then the best plan (:mod:`ggufmoe.plan.allocate`) and its conversion."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from ggufmoe.errors import GgufmoeError, Interrupted
from ggufmoe.gguf.writer import CONVERSION, Progress
from ggufmoe.outputs import check_outputs
from ggufmoe.pipeline.calibrate import calibrate
from ggufmoe.pipeline.convert import ConvertOptions, check_rounding_text, convert
from ggufmoe.pipeline.measure import measure_sensitivity
from ggufmoe.plan.allocate import allocate_budget
from ggufmoe.plan.budget import Budget, Plan, model_fingerprint
from ggufmoe.plan.layout import TOKENIZER_BYTES_PER_TOKEN
from ggufmoe.prune.criteria import PruneRequest, choose_experts
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.logprobs import base_logprobs, score_against
from ggufmoe.sensitivity.cache import cached_sensitivity, store
from ggufmoe.sensitivity.cost import SensitivityMode
from ggufmoe.sensitivity.defaults import default_sensitivity
from ggufmoe.sensitivity.local_costs import local_sensitivity
from ggufmoe.sensitivity.prune_cost import (DEFAULT_PRUNE_SCALE, PRUNE_FIT, PRUNE_LOCAL_KEY, PRUNE_SCALE, fit_pruning,
                                          local_prune_kl, probe_pruning, probe_prunings, prune_cost, prune_unit)
from ggufmoe.sensitivity.probe_set import too_big_to_probe
from ggufmoe.sensitivity.streamed import streamed_sensitivity
from ggufmoe.state_dir import partial_path
from ggufmoe.stats.calib_state import CALIBRATION
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.stats.text import MAX_TEXT_TOKENS, hold_out, read_text, spread_chunks, token_chunks


def pruning_kl(model: OpenedModel, text: str, requests: list[PruneRequest], ctx: int = 512,
               chunks: int = 4) -> list[float]:
    """KL divergence (through llama.cpp, F16 weights, mean over ``chunks`` chunks of ``ctx`` tokens spread over
    ``text``) of each pruning in ``requests`` of ``model`` (by its statistics) against the unpruned model."""
    from transformers import AutoTokenizer  # heavy: only when measuring

    tok = AutoTokenizer.from_pretrained(model.path)
    seqs = spread_chunks(token_chunks(tok, text, ctx, MAX_TEXT_TOKENS), chunks)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        base = convert(model, ConvertOptions(out=Path(tmp) / "base.gguf", types=TypeRules.parse("F16"),
                                             progress=False))[0]
        ref = base_logprobs(base, seqs)
        for req in requests:
            pruned = convert(model, ConvertOptions(out=Path(tmp) / "pruned.gguf", types=TypeRules.parse("F16"),
                                                   stats=model.stats_path, prune=req, progress=False))[0]
            out.append(float(np.mean([c.kld_mean for c in score_against(pruned, seqs, ref)])))  # mean over chunks
            pruned.unlink()
    return out




def build_plan(source: Path | OpenedModel, budget: Budget, stats_path: Path | None = None,
               calib_text: str | None = None, pins: TypeRules | None = None, progress: bool = True) -> Plan:
    """Everything ``ggufmoe plan`` does: sensitivities and pruning costs, then the best plan.

    With statistics of a model with weights, ``budget.sensitivity`` says how costs are made: ``probes`` measures
    them through llama.cpp (:mod:`ggufmoe.pipeline.measure`: a conversion per tensor class, layer group and
    three whole-model types, on its local errors when the statistics hold them); ``local`` maps the
    statistics' local errors to KL with the reference model's factors (:mod:`ggufmoe.sensitivity.local_costs`;
    nothing is converted); ``streamed`` calibrates the local errors by the end-to-end probes the streamed
    calibration carried (:mod:`ggufmoe.sensitivity.streamed`; nothing is converted either); ``auto``:
    :func:`auto_mode`. The plan's notes say which was used. Without statistics: defaults from shapes.

    Probes measure on the pieces of ``calib_text`` that calibration holds out
    (:func:`~ggufmoe.stats.text.hold_out`), text the statistics did not see; on all of it when it is too
    short to hold any out."""
    model = OpenedModel.open(source)
    src, arch = model.source, model.arch
    pins = pins or TypeRules(None)
    if stats_path and not src.has_weights:
        raise GgufmoeError("--stats needs the model's weights; a configuration alone is planned with defaults")
    model = OpenedModel.open(model, stats_path) if stats_path else model
    stats, local = (model.stats, model.local) if stats_path else (None, None)
    if budget.top_k_auto and local is None:
        raise GgufmoeError("--top-k auto prices each top-k from the local errors of the streamed `ggufmoe "
                           "calibrate`: pass --stats from it")
    notes = []
    by_text = None  # costs fitted on each probe text alone (streamed probes on several texts)
    probe_text = calib_text
    if calib_text is not None:
        probe_text = hold_out(calib_text).probes or calib_text
    if stats is not None and src.can_calibrate:
        n_layers = int(arch.cfg.num_hidden_layers)
        mode = budget.sensitivity
        if mode == SensitivityMode.AUTO:
            mode = auto_mode(model)
        if mode == SensitivityMode.STREAMED:
            (sens, prune_kl), by_text = streamed_sensitivity(model, progress)
            notes.append(f"sensitivities and pruning costs: local errors calibrated by end-to-end probes in the "
                         f"streamed calibration ({sens.info['summary']}; no llama.cpp run)")
        elif mode == SensitivityMode.LOCAL:
            if local is None:
                raise GgufmoeError(f"{stats_path}: the statistics hold no local errors (they come from a streamed "
                                   "`ggufmoe calibrate`); measure with probes instead")
            sens = local_sensitivity(list(arch.tensors()), local, n_layers, arch.n_expert, arch.top_k,
                                     arch.sensitivity_aliases)
            prune_kl = local_prune_kl(local, n_layers, PRUNE_SCALE, stats)
            notes.append("sensitivities and pruning costs: local errors mapped to KL by the reference model's "
                         "factors (no probes)")
        else:
            sens, prune_kl = _probed(model, probe_text, budget, pins, progress)
            notes.append("sensitivities: " + ("local errors" if sens.info.get("local_errors") else "importance-"
                                              "weighted errors") + " calibrated by probes through llama.cpp")
            if probe_text is calib_text and calib_text is not None:
                notes.append("the calibration text is too short to hold pieces out: the probes ran on text the "
                             "statistics saw, which understates what pruning costs elsewhere")
    else:
        # From shapes. Types that need an importance matrix are allowed when there will be one: a
        # configuration alone is calibrated before converting; a GGUF uses the statistics' imatrix.
        sens = default_sensitivity(list(arch.tensors()), arch.n_expert, arch.top_k,
                                   imatrix=stats is not None or not src.has_weights, aliases=arch.sensitivity_aliases)
        prune_kl = partial(prune_cost, stats=stats, scale=DEFAULT_PRUNE_SCALE)
        notes.append("sensitivities are defaults from tensor shapes (not measured)")
    plan = allocate_budget(src, arch, stats, sens, budget, pins, prune_kl, str(stats_path) if stats_path else None,
                           by_text)
    plan.notes += notes
    plan.model_fingerprint = model_fingerprint(arch)
    if not arch.writes_tokenizer:
        plan.file_bytes += TOKENIZER_BYTES_PER_TOKEN * arch.n_vocab
    return plan


def auto_mode(model: OpenedModel) -> SensitivityMode:
    """``--sensitivity auto``: probes through llama.cpp for a small model (or statistics without local errors, from
    the whole-model path); the streamed probes for a big one. The reference model's factors (``local``) are never
    chosen for the user: statistics of a big model without streamed probes are refused, saying what to do."""
    if not too_big_to_probe(model.arch) or model.local is None:
        return SensitivityMode.PROBES
    if model.probes is None:
        raise GgufmoeError(f"{model.stats_path}: the statistics hold no streamed probes, which a model this big is "
                           "planned from: calibrate again (it carries them by default), or pass --sensitivity local to "
                           "plan from the reference model's factors")
    return SensitivityMode.STREAMED


def check_budget_possible(src: Path, budget: Budget, pins: TypeRules | None = None) -> None:
    """Before a calibration or probes (minutes, or hours at 671B): refuse a budget that no plan can meet, from the
    sizes alone (and the types ``pins`` fixes). A plan of the configuration alone may prune as deep and use every
    type, and leaves out the tokenizer's bytes: when even it does not fit, nothing will."""
    config = Path(src) / "config.json"
    if config.is_file():
        build_plan(config, replace(budget, top_k_auto=False, max_active=None), pins=pins, progress=False)


def _probed(model: OpenedModel, calib_text: str | None, budget: Budget, pins: TypeRules, progress: bool):
    """(measured sensitivity, pruning cost) calibrated by probes through llama.cpp, cached in the stats file (written
    once, when something was measured)."""
    arch, stats, local = model.arch, model.stats, model.local
    sens = cached_sensitivity(model, calib_text)
    measured = sens is None
    if measured:
        if calib_text is None:
            raise GgufmoeError(f"{model.stats_path}: no sensitivity measured for this model and these statistics "
                               "yet; measuring it needs calibration text")
        check_budget_possible(model.path, budget, pins)  # from the sizes alone, before minutes of probes
        sens = measure_sensitivity(model, calib_text, progress=progress)
    n_layers = int(arch.cfg.num_hidden_layers)
    key = PRUNE_LOCAL_KEY if local is not None else "prune"
    if key not in sens.scales or (local is not None and PRUNE_FIT not in sens.scales):
        if calib_text is None:
            raise GgufmoeError("measuring what pruning costs needs calibration text: pass --calib FILE")
        measured = True
        if local is not None:
            # the local errors' map to KL, fitted through probes at a quarter and at half the experts pruned
            reqs = probe_prunings(arch, stats.has_routing)
            units = [prune_unit(local, choose_experts(arch, stats, r), n_layers) or 0.0 for r in reqs]
            kls = pruning_kl(model, calib_text, reqs) if any(units) else []
            sens.scales[key], sens.scales[PRUNE_FIT] = fit_pruning(units, kls)
        else:
            req = probe_pruning(arch, stats.has_routing)
            unit = prune_cost(choose_experts(arch, stats, req), stats, 1.0)
            sens.scales[key] = pruning_kl(model, calib_text, [req])[0] / unit if unit else DEFAULT_PRUNE_SCALE
    if measured and calib_text is not None:
        store(model, calib_text, sens)  # the sensitivities and pruning scales, cached together
    if local is not None:
        return sens, local_prune_kl(local, n_layers, sens.scales[key], stats, sens.scales[PRUNE_FIT])
    return sens, partial(prune_cost, stats=stats, scale=sens.scales[key])


def check_plan(plan: Plan, plan_path: Path, src: OpenedModel) -> None:
    """Refuse, before anything is written, a plan made for another model than ``src`` (:meth:`Plan.mismatch`):
    executed, it would give tensors no planned type and miss the planned bytes."""
    why = plan.mismatch(src.arch)
    if why:
        raise GgufmoeError(f"{plan_path} was made for another model ({why}): make a plan for {src.path} with ggufmoe plan")


def options_from_plan(plan: Plan, base: ConvertOptions) -> ConvertOptions:
    """``base`` convert options with the plan's types, pruning and statistics filled in."""
    stats = base.stats or (Path(plan.stats) if plan.stats else None)
    return replace(base, types=plan.type_rules(), pruning=plan.pruning(), stats=stats, prune=None, plan=plan)


def convert_to_budget(src: Path, base, budget: Budget, calib_file: Path | None,
                      pins: TypeRules) -> tuple[Plan, list[Path]]:
    """calibrate (unless statistics are given, or kept beside the output for --resume) + plan + convert;
    the statistics and the plan are saved beside the output.

    The calibration streams (:func:`ggufmoe.stats.stream.stream_stats`), its state in
    ``.OUT.stats.gguf.partial``: interrupted with complete layers, ``--resume`` continues it. A run
    that fails leaves none of the files it made (statistics, plan, calibration state) behind, except
    what ``--resume`` continues from: an interruption keeps the complete calibration layers or the
    statistics, and a conversion kept for ``--resume`` keeps the statistics and plan it was made from.

    A GGUF source cannot be calibrated here: without ``--stats`` it is planned without pruning."""
    plan_path = base.out.with_suffix(".plan.json")
    inputs = [src, base.imatrix, base.stats, calib_file]
    check_outputs([base.out], inputs, kind=CONVERSION, split=base.split_max_size > 0, gguf=True)
    check_outputs([plan_path], inputs)
    if not base.stats:
        check_outputs([base.out.with_suffix(".stats.gguf")], inputs, kind=CALIBRATION, gguf=True)
    text = read_text(calib_file) if calib_file else None
    stats_path = base.stats
    made: list[Path] = []  # files this run wrote, removed again when it fails
    model = OpenedModel.open(src, config_ok=False)  # once, for the plan and the conversion
    if stats_path is None and not model.source.can_calibrate:
        if text is not None:
            raise GgufmoeError(f"{src}: a GGUF cannot be calibrated (transformers runs the Hugging Face model); "
                               "pass --stats from `ggufmoe calibrate` on that model, or a llama.cpp imatrix")
    elif stats_path is None:
        if text is None:
            raise GgufmoeError("--budget needs --calib FILE (calibration text) or --stats")
        check_budget_possible(src, budget, pins)
        check_rounding_text(model, base)  # before the plan's calibration, not after it
        stats_path = base.out.with_suffix(".stats.gguf")
        # a resumed conversion plans from the statistics it was made from (kept beside it); so does a run that
        # finds one kept without --resume, which the writer then refuses, saying so, with those statistics intact
        if not (stats_path.is_file() and (base.resume or _conversion_kept(base.out))):
            calibrate(src, text, progress=base.progress, dataset=calib_file.name, out=stats_path,
                      resume=base.resume, keep_on_error=False, cluster=base.cluster, device=base.device)
            made.append(stats_path)
    try:
        plan = build_plan(model, budget, stats_path, text, pins, progress=base.progress)
        made.append(plan_path)
        plan.save(plan_path)
        written = convert(model, options_from_plan(plan, base))
        if plan.rounding:
            plan.save(plan_path)  # with what the rounding it got predicts
        return plan, written
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

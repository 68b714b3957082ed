"""``convert --rounding aware``: before the conversion writes anything, one streamed pass over the calibration text
rounds every tensor the plan quantizes to a type we have an encoder for (:mod:`ggufmoe.stats.rounding`), into a folder
beside the output (``.NAME.rounding``); the conversion then writes those bytes (found by content,
:class:`~ggufmoe.quant.rounded_store.RoundedStore`) and quantizes the rest as usual. The folder is kept when the pass
or the conversion is interrupted (``--resume`` takes it up); the conversion removes it once the output is complete.
Imported only when rounding (torch and transformers run the model)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ggufmoe.errors import GgufmoeError
from ggufmoe.files import replace_atomically
from ggufmoe.model.finite import ROUNDING_HINT, NonFiniteError
from ggufmoe.plan.budget import Plan
from ggufmoe.quant.aware import can_round
from ggufmoe.quant.rounded_store import RoundedStore
from ggufmoe.quant.rules import TypedTensor
from ggufmoe.stats.imatrix import Imatrix
from ggufmoe.stats.opened import OpenedModel
from ggufmoe.stats.hf_model import load_tokenizer
from ggufmoe.stats.rounding import HOLD_EVERY, RoundingRequest, load_report, require_held_out, summary
from ggufmoe.stats.stream import stream_stats
from ggufmoe.stats.text import CALIB_CTX, calibration_rows, calibration_tokens, hold_out

DONE = "done.json"


@dataclass
class RoundingOptions:
    """``--rounding aware``'s inputs: the calibration text (less the pieces calibration holds out), in chunks of
    ``ctx``."""

    text: str
    ctx: int = CALIB_CTX


def check_text(model: OpenedModel, opts: RoundingOptions) -> None:
    """Refuse, before any pass runs, a calibration text too short for the rounding to hold a chunk out (tokenized
    only as far as the shortest text it takes)."""
    enough = (HOLD_EVERY - 1) * opts.ctx + 1
    ids, prefix = calibration_tokens(load_tokenizer(model.path), hold_out(opts.text).calibration, opts.ctx, enough)
    require_held_out(calibration_rows(len(ids), len(prefix), opts.ctx)[1], opts.ctx)


def rounding_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.rounding")


def round_ahead(model: OpenedModel, typed: list[TypedTensor], imatrix: Imatrix | None, opts: RoundingOptions,
                out: Path, resume: bool, progress: bool, plan: Plan | None = None, device: str = "cpu",
                threads: int | None = None) -> RoundedStore | None:
    """The store of ``typed``'s tensors rounded output-aware (the pass runs unless a finished one for the same text
    and types is kept beside ``out``; the model on ``device``, the rounding on ``threads`` threads); None when no
    tensor is at a type it rounds. A ``plan`` of those types is priced with the rounding's measured output errors
    (:meth:`~ggufmoe.plan.budget.Plan.price_rounding`)."""
    if not model.source.can_calibrate:
        raise GgufmoeError(f"{model.path}: --rounding aware runs the model over the calibration text: it needs the "
                           f"Hugging Face checkpoint, not a GGUF")
    types = {p.spec.name: p.qtype for p in typed if not p.copies and can_round(p.qtype)}
    if not types:
        print("output-aware rounding: no tensor is written at a type it rounds (the K-, IQ- and legacy types): "
              "nothing to round", file=sys.stderr)
        return None
    key = hashlib.sha256(json.dumps([opts.text, opts.ctx, sorted((n, t.name) for n, t in types.items())])
                         .encode()).hexdigest()
    folder = rounding_dir(out)
    store = RoundedStore(folder / "tensors")
    done = folder / DONE
    if folder.exists():
        if not resume:
            raise GgufmoeError(f"{folder} holds the output-aware rounding of an interrupted conversion to {out.name}: "
                               f"add --resume to use it, or delete the folder to start over")
        if done.exists() and json.loads(done.read_text()).get("key") != key:
            raise GgufmoeError(f"{folder}: the rounding kept there was made for other types or another text; delete "
                               f"the folder to start over")
    if not done.exists():
        created = not folder.exists()
        folder.mkdir(exist_ok=True)
        try:
            stream_stats(model.path, hold_out(opts.text).calibration, ctx=opts.ctx, progress=progress,
                         out=folder / "inputs.stats", resume=resume, measure_local=False, device=device,
                         rounding=RoundingRequest(types, imatrix, store, threads),
                         resume_hint="run the same convert command with --resume")
        except BaseException as e:
            if created and not len(store):  # nothing worth keeping for --resume
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, NonFiniteError):
                raise e.hinting(ROUNDING_HINT) from None
            raise
        replace_atomically(done, lambda tmp: Path(tmp).write_text(json.dumps({"key": key})))
    if report := load_report(store):
        print(summary(report), file=sys.stderr)
        if plan is not None and plan.costs:  # (a plan saved before plans kept their costs cannot be priced)
            plan.price_rounding({n: r.ratio for n, r in report.items()})
            kl = plan.rounding["predicted_kld"]
            print(f"predicted KL with this rounding {kl['total']:.4f} (quantization {kl['quant']:.4f}, "
                  f"{plan.predicted_kld['quant']:.4f} with llama.cpp's)", file=sys.stderr)
    return store

"""Re-derive the default sensitivity tables from the reference model: those of
:mod:`ggufmoe.sensitivity.defaults` (from shapes) and of :mod:`ggufmoe.sensitivity.local_costs` (from local errors).

    python eval/derive_defaults.py [--model DIR] [--text FILE] [--out SENS.json] [--whole]

Measures refmoe-qwen3 (statistics on the first 400,000 characters of calib.txt less the pieces held
out of them, probes on those held-out pieces as ``plan`` makes them: at Q3_K, Q2_K and Q4_K on 4 chunks
of 512 tokens, uniform whole-model checks) and prints the tables
to paste there: GAUSSIAN_REL_ERROR, DEFAULT_SCALES, DEFAULT_EXPONENTS, N_REF_ACTIVE; then
LOCAL_SCALES, LOCAL_EXPONENTS, LOCAL_DEPTH, LOCAL_JOINT and PRUNE_SCALE, PRUNE_EXPONENT (pruning probes: F16
conversions pruned to PRUNE_KEEP experts by each of PRUNE_CRITERIA, KL against the unpruned one,
fitted as a power law of the local pruning errors).

The statistics are streamed with local errors (``ggufmoe calibrate``); the quantization errors the
probes calibrate are then those local errors. ``--whole`` calibrates the whole model and uses the
diagonal errors instead, as the shape defaults of defaults.py were derived (no local tables then).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from ggufmoe.arch import architecture_for  # noqa: E402
from ggufmoe.pipeline.measure import measure_sensitivity  # noqa: E402
from ggufmoe.sensitivity.defaults import GAUSSIAN_REL_ERROR, derive_defaults, gaussian_rel_errors  # noqa: E402
from ggufmoe.source.hf import HFSource  # noqa: E402
from ggufmoe.pipeline.planning import pruning_kl  # noqa: E402
from ggufmoe.stats.opened import OpenedModel  # noqa: E402
from ggufmoe.pipeline.calibrate import calibrate  # noqa: E402
from ggufmoe.prune.criteria import PruneRequest, choose_experts  # noqa: E402
from ggufmoe.sensitivity.fit import fit_power  # noqa: E402
from ggufmoe.sensitivity.local_costs import derive_local_defaults  # noqa: E402
from ggufmoe.sensitivity.prune_cost import prune_unit  # noqa: E402
from ggufmoe.stats.collect import collect_stats  # noqa: E402
from ggufmoe.stats.file import save_stats  # noqa: E402
from ggufmoe.stats.local_errors import local_errors  # noqa: E402
from ggufmoe.stats.text import hold_out  # noqa: E402

PRUNE_KEEP = (21, 18, 15)
PRUNE_CRITERIA = ("reap", "routing")


def main(argv: list[str] | None = None) -> None:
    """Measure the reference model (probes at Q3_K, Q2_K, Q4_K, uniform whole-model checks) and print
    the default tables (GAUSSIAN_REL_ERROR, DEFAULT_SCALES, DEFAULT_EXPONENTS, N_REF_ACTIVE)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "refmoe-qwen3")
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "calib.txt")
    ap.add_argument("--chars", type=int, default=400_000)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--uniform", default="IQ2_XXS,Q2_K,IQ3_XXS,Q3_K,IQ4_XS,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--out", type=Path, help="write the measured sensitivity (JSON) here")
    ap.add_argument("--whole", action="store_true", help="whole-model calibration, diagonal errors")
    ap.add_argument("--work", type=Path, help="keep the statistics here (reused when present)")
    args = ap.parse_args(argv)
    rel = {k: float(f"{v:.6g}") for k, v in gaussian_rel_errors().items()}
    GAUSSIAN_REL_ERROR.update(rel)
    print("GAUSSIAN_REL_ERROR =", rel, flush=True)
    text = args.text.read_text()[: args.chars]
    stats_path = (args.work or Path(tempfile.mkdtemp())) / ("stats-whole.gguf" if args.whole else "stats.gguf")
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    if not stats_path.exists():
        save_stats(collect_stats(args.model, text, ctx=512) if args.whole else calibrate(args.model, text, ctx=512),
                   stats_path)
    model = OpenedModel.open(args.model, stats_path, config_ok=False)
    stats = model.stats
    probes = hold_out(text).probes or text  # as ``plan`` probes: on text the statistics did not see
    uniform = tuple(T[n] for n in args.uniform.split(",") if n)
    sens = measure_sensitivity(model, probes, chunks=args.chunks, probe_types=(T.Q3_K, T.Q2_K, T.Q4_K),
                               uniform_types=uniform)
    if args.out:
        args.out.write_text(sens.to_json())
    arch = architecture_for(HFSource(args.model))
    scales, exponents, n_act = derive_defaults(sens, list(arch.tensors()), arch.n_expert, arch.top_k)
    for what in ("scales", "exponents", "probes", "info"):
        print(what, json.dumps(getattr(sens, what), indent=1))
    print("DEFAULT_SCALES =", {k: float(f"{v:.6g}") for k, v in scales.items()})
    print("DEFAULT_EXPONENTS =", {k: round(v, 3) for k, v in exponents.items()})
    print("N_REF_ACTIVE =", int(n_act))
    local = local_errors(stats)
    if local is None:
        return
    n_layers = int(arch.cfg.num_hidden_layers)
    scales, exponents, profile = derive_local_defaults(sens, list(arch.tensors()), local, n_layers)
    print("LOCAL_SCALES =", {k: float(f"{v:.6g}") for k, v in scales.items()})
    print("LOCAL_EXPONENTS =", {k: round(v, 3) for k, v in exponents.items()})
    print("LOCAL_FIRST_LAYER =", round(profile[0], 4))
    print("LOCAL_DEPTH =", [(round(x, 4), round(f, 4)) for x, f in profile[1]])
    print("LOCAL_JOINT =", tuple(float(f"{v:.6g}") for v in sens.joint))
    reqs = [PruneRequest(keep=k, criterion=c) for c in PRUNE_CRITERIA for k in PRUNE_KEEP]
    kls = pruning_kl(model, probes, reqs, chunks=args.chunks)
    units = [prune_unit(local, choose_experts(arch, stats, r), n_layers, profile) for r in reqs]
    for r, u, kl in zip(reqs, units, kls):
        print(f"prune keep {r.keep} {r.criterion}: local unit {u:.5g}, KL {kl:.5f}", flush=True)
    b, a = fit_power([u for u in units], kls)
    print(f"PRUNE_SCALE, PRUNE_EXPONENT = {a:.6g}, {b:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])

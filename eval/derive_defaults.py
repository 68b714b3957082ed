"""Re-derive the default sensitivity tables of :mod:`ggufmoe.sensitivity.defaults` from the reference model.

    python eval/derive_defaults.py [--model DIR] [--text FILE] [--out SENS.json]

Measures refmoe-qwen3 (statistics and probes on the first 400,000 characters of calib.txt, probes
at Q3_K, Q2_K and Q4_K on 4 chunks of 512 tokens, uniform whole-model checks) and prints the tables
to paste there: GAUSSIAN_REL_ERROR, DEFAULT_SCALES, DEFAULT_EXPONENTS, N_REF_ACTIVE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from ggufmoe.arch import architecture_for  # noqa: E402
from ggufmoe.pipeline.measure import measure_sensitivity  # noqa: E402
from ggufmoe.sensitivity.defaults import GAUSSIAN_REL_ERROR, derive_defaults, gaussian_rel_errors  # noqa: E402
from ggufmoe.source.hf import HFSource  # noqa: E402
from ggufmoe.stats.collect import collect_stats  # noqa: E402


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
    args = ap.parse_args(argv)
    rel = {k: float(f"{v:.6g}") for k, v in gaussian_rel_errors().items()}
    GAUSSIAN_REL_ERROR.update(rel)
    print("GAUSSIAN_REL_ERROR =", rel, flush=True)
    text = args.text.read_text()[: args.chars]
    stats = collect_stats(args.model, text, ctx=512)
    uniform = tuple(T[n] for n in args.uniform.split(",") if n)
    sens = measure_sensitivity(args.model, stats, text, chunks=args.chunks, probe_types=(T.Q3_K, T.Q2_K, T.Q4_K),
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


if __name__ == "__main__":
    main(sys.argv[1:])

"""Where the KL of a rounded file is: each class of tensors' share, with llama.cpp's rounding and output-aware.

    python eval/rounding_parts.py --work DIR [--types Q4_K,Q3_K] [--chars 400000]

Takes the files ``eval/rounding.py`` left in ``--work`` (``TYPE-llama.gguf``, ``TYPE-aware.gguf``, ``F32.gguf``, made
there again when missing) and writes, for each file and class of tensors (attention, routed experts, the output matmul,
the token embedding), the file with that class taken from the F32 conversion instead: the KL it loses is the class's
share. Everything else in a file stays as it is (in the aware file, the layers after a class were fitted to that class
rounded, so its share there counts what the fitting downstream made of it too). KL to F32 through llama.cpp on
eval_doc.txt and the README + sources, as ``eval/rounding.py`` measures it. Writes eval/results/rounding_parts.{md,json}.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, eval_chunks, reference_parser, reference_work, score, source_text  # noqa: E402

from ggufmoe.runtime.logprobs import LlamaScorer  # noqa: E402

CLASSES = {"attention": r"\.attn_", "routed experts": r"_exps\.", "output": r"^output\.weight$",
           "token embedding": r"^token_embd\.weight$"}


def splice(base: Path, donor: Path, pattern: str, out: Path) -> None:
    """``base`` with the tensors whose names match ``pattern`` taken from ``donor`` (same names and shapes)."""
    a, b = gguf.GGUFReader(base), gguf.GGUFReader(donor)
    theirs = {t.name: t for t in b.tensors}
    arch = a.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = gguf.GGUFWriter(out, arch)
    for f in a.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in a.tensors:
        src = theirs[t.name] if re.search(pattern, t.name) else t
        data = np.asarray(src.data)
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=src.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = reference_parser(__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_K,Q3_K")
    args = ap.parse_args()
    if args.work is None:
        ap.error("--work: the folder eval/rounding.py converted into")
    work, _, f32, chunks, base = reference_work(args.model, args.work, args.chars, args.chunks, args.ctx)
    src_chunks = eval_chunks(args.model, args.chunks, args.ctx, source_text())
    with LlamaScorer(f32, args.ctx) as s:
        src_base = [s(c) for c in src_chunks]

    def kl(path: Path) -> dict[str, float]:
        return dict(eval_doc=score(path, chunks, base, args.ctx)["kld"],
                    sources=score(path, src_chunks, src_base, args.ctx)["kld"])

    rows = []
    for t in args.types.split(","):
        for mode in ("llama", "aware"):
            path = work / f"{t}-{mode}.gguf"
            if not path.exists():
                sys.exit(f"{path}: missing (run eval/rounding.py --types {t} --work {work} first)")
            row = {"type": t, "mode": mode, "chars": args.chars, "file": kl(path)}
            for name, pattern in CLASSES.items():
                out = work / "part.gguf"
                splice(path, f32, pattern, out)
                row[name] = kl(out)
                out.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    res = ROOT / "eval" / "results"
    (res / "rounding_parts.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Where the KL of a rounded file is (reference model)", "",
             f"`python eval/rounding_parts.py --work DIR`: the files of `eval/rounding.py` (calibration: the first "
             f"{args.chars} characters of calib.txt), each with one class of tensors taken from the F32 conversion; "
             "a class's share is the KL the file loses that way. KL to F32 through llama.cpp, "
             f"{args.chunks} chunks of {args.ctx} tokens of eval_doc.txt / of the README and sources. In the aware "
             "file the layers after a class were fitted to it rounded: its share there counts that too.", "",
             "| type | rounding | KL of the file | " + " | ".join(f"{c} share" for c in CLASSES) + " |",
             "|---|---|---:|" + "---:|" * len(CLASSES)]
    for r in rows:
        f = r["file"]
        shares = [f"{f['eval_doc'] - r[c]['eval_doc']:.4f} / {f['sources'] - r[c]['sources']:.4f}" for c in CLASSES]
        lines.append(f"| {r['type']} | {r['mode']} | {f['eval_doc']:.4f} / {f['sources']:.4f} | "
                     + " | ".join(shares) + " |")
    lines += ["", "Each cell: eval_doc.txt / README + sources. The shares need not add up to the file's KL (the "
              "classes' errors interact)."]
    (res / "rounding_parts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

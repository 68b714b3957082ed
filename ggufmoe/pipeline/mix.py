"""``convert --type Q4_K_M``: llama.cpp's own mixes, made the way llama.cpp users make them. The model is
converted to BF16 (the tensors a plain conversion writes), then quantized by llama.cpp's
``llama_model_quantize`` with the importance matrix (:mod:`ggufmoe.runtime.llama_quantize`), so every
tensor gets the type llama-quantize chooses for that mix.

A name that is also a tensor type (``Q2_K``, ``IQ2_XXS``, ...) keeps its meaning here: every weight matrix
at that type. Only the mix names that are no tensor type (``Q4_K_M``, ``Q3_K_S``, ``IQ2_M``, ...) go through
llama.cpp.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from ggufmoe.errors import GgufmoeError
from ggufmoe.gguf.writer import CONVERSION
from ggufmoe.model.qtypes import MIXES, USER_TYPES
from ggufmoe.outputs import check_outputs
from ggufmoe.pipeline.convert import ConvertOptions, convert
from ggufmoe.quant.rules import TypeRules
from ggufmoe.runtime.llama_quantize import llama_quantize
from ggufmoe.stats.imatrix import load_imatrix

INTERMEDIATE = "BF16"  # what llama.cpp's converter writes for the BF16 checkpoints that mixes are made from
# The mixes llama.cpp refuses without an importance matrix (tools/quantize/quantize.cpp; IQ2_M: its IQ2_S tensors)
NEED_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "IQ1_S", "IQ1_M"})


def mix_name(qtype: str | None) -> str | None:
    """The llama.cpp mix ``qtype`` names when it is not also a tensor type (``Q4_K_M``), else None."""
    key = (qtype or "").upper()
    return key if key in MIXES and key not in USER_TYPES else None


def convert_mix(src: str | Path, opts: ConvertOptions, mix: str, overrides: tuple[str, ...] = ()) -> list[Path]:
    """Convert ``src`` to llama.cpp's mix ``mix`` at ``opts.out``, with ``overrides`` (``REGEX=TYPE``, as
    llama-quantize's ``--tensor-type``) and the importance matrix of ``opts.imatrix`` or ``opts.stats``."""
    asked = [flag for flag, on in (("--split-max-size", opts.split_max_size), ("--resume", opts.resume),
                                   ("pruning", opts.prune and opts.prune.asks),
                                   ("a plan", opts.pruning is not None)) if on]
    if asked:
        raise GgufmoeError(f"--type {mix} is made by llama.cpp from a whole conversion in one call: it takes no "
                           f"{', '.join(asked)} (give a tensor type such as Q4_K, or a plan, instead)")
    check_outputs([opts.out], [src, opts.imatrix, opts.stats], kind=CONVERSION, gguf=True)
    matrix = opts.imatrix or opts.stats
    if mix in NEED_IMATRIX and matrix is None:
        raise GgufmoeError(f"llama.cpp makes {mix} only with an importance matrix: pass --imatrix or --stats")
    imatrix = load_imatrix(matrix) if matrix else None
    pairs = [rule.rpartition("=")[::2] for rule in overrides]
    TypeRules.parse(None, overrides)  # the same checks as any --tensor-type, before the conversion
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.mix.", dir=opts.out.parent))
    except OSError as e:
        raise GgufmoeError(f"{opts.out.parent}: cannot write ({e.strerror or e})") from None
    try:
        # a float file takes no importance matrix: it is read once, above, for llama.cpp
        base = convert(src, replace(opts, out=work / f"{INTERMEDIATE}.gguf", types=TypeRules.parse(INTERMEDIATE),
                                    imatrix=None, stats=None))
        if opts.progress:
            print(f"quantizing to {mix} with llama.cpp", file=sys.stderr)
        return [llama_quantize(base[0], opts.out, mix, imatrix, pairs, opts.threads)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

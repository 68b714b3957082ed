"""Collect an importance matrix from a Hugging Face MoE model over a text file (until ``calibrate`` exists).

    python tools/make_imatrix.py MODEL_DIR TEXT_FILE OUT.gguf [--ctx 512] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ggufmoe.calibrate import collect_imatrix
from ggufmoe.errors import GgufmoeError
from ggufmoe.imatrix import save_imatrix


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("text_file", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    args = ap.parse_args()
    try:
        try:
            text = args.text_file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise GgufmoeError(f"{args.text_file}: cannot read ({e.strerror or e})") from None
        imatrix = collect_imatrix(args.model_dir, text, ctx=args.ctx, max_tokens=args.max_tokens,
                                  dataset=args.text_file.name)
        save_imatrix(imatrix, args.out)
    except GgufmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(imatrix.entries)} entries, {imatrix.chunk_count} chunks of {imatrix.chunk_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

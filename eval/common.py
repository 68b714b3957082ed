"""Pieces the benchmark scripts share: child-process peak RSS, evaluation chunks, scoring a GGUF."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from ggufmoe.runtime.logprobs import LlamaScorer, compare  # noqa: E402


def peak_rss_of(cmd: list[str], quiet: bool = False) -> tuple[int, float]:
    """Run ``cmd`` in a child (stdout dropped when ``quiet``); its peak RSS in bytes and wall time."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if quiet:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # errors still reach stderr
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0


def eval_chunks(model: Path, n: int, ctx: int, text: str | None = None) -> list[list[int]]:
    """The first ``n`` full chunks of ``ctx`` tokens of ``text`` (eval_doc.txt by default)."""
    from transformers import AutoTokenizer

    from ggufmoe.stats.text import token_chunks

    tok = AutoTokenizer.from_pretrained(model)
    text = text if text is not None else (SHARED / "data" / "eval_doc.txt").read_text()
    chunks = token_chunks(tok, text, ctx, ctx * (n + 1))
    return [c for c in chunks if len(c) == ctx][:n]


def score(path: Path, chunks: list[list[int]], base: list[np.ndarray], ctx: int) -> dict:
    """Mean KL divergence to ``base``, perplexity and top-1 agreement of a GGUF over ``chunks``."""
    with LlamaScorer(path, ctx) as s:
        cmp = [compare(s(c), b, c) for c, b in zip(chunks, base)]
    return dict(kld=float(np.mean([c.kld_mean for c in cmp])),
                ppl=float(np.exp(np.mean([np.log(c.ppl) for c in cmp]))),
                top1=float(np.mean([c.top1 for c in cmp])))


def reference_parser(description: str) -> argparse.ArgumentParser:
    """The options every reference-model benchmark takes: --model, --chunks, --ctx, --chars and --work."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "refmoe-qwen3")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of eval_doc.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chars", type=int, default=400_000, help="calibrate on the first CHARS characters of calib.txt")
    ap.add_argument("--work", type=Path, help="keep intermediate files here (statistics and sensitivities reused)")
    return ap


def reference_work(model: Path, work: Path | None, chars: int, n_chunks: int, ctx: int):
    """The pieces a reference-model benchmark starts from, kept in ``work`` (made again only when missing): the
    streamed statistics of the first ``chars`` characters of calib.txt, the F32 conversion, the evaluation chunks
    and their F32 log-probs. Returns (work, stats path, F32 path, chunks, base log-probs)."""
    import tempfile

    from ggufmoe.pipeline.calibrate import calibrate
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.rules import TypeRules
    from ggufmoe.stats.file import save_stats

    work = work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "stats.gguf"
    if not stats.exists():
        save_stats(calibrate(model, (SHARED / "data" / "calib.txt").read_text()[:chars]), stats)
    f32 = work / "F32.gguf"
    if not f32.exists():
        convert(model, ConvertOptions(out=f32, types=TypeRules.parse("F32"), progress=False))
    chunks = eval_chunks(model, n_chunks, ctx)
    with LlamaScorer(f32, ctx) as s:
        base = [s(c) for c in chunks]
    return work, stats, f32, chunks, base


def source_text() -> str:
    """A second held-out text of another kind than the calibration text (prose): this project's README and Python
    sources, concatenated in path order."""
    files = [ROOT / "README.md", *sorted((ROOT / "ggufmoe").rglob("*.py"))]
    return "\n\n".join(f.read_text() for f in files)


def probe_texts() -> dict[str, str]:
    """Probe texts of the kinds of the two evaluation texts, from neither of them nor from the calibration text, and
    found wherever this project is installed: the Python language reference as pydoc renders it (documentation
    prose, the kind of eval_doc.txt) and the descriptions (READMEs, Markdown and reST) of the installed packages but
    this one, in name order (the kind of this project's README)."""
    import importlib.metadata
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    dists = {d.metadata["Name"].lower(): d for d in importlib.metadata.distributions()}
    readmes = [dists[n].metadata.get_payload() or "" for n in sorted(dists) if n != "ggufmoe"]
    return {"python-reference": "\n\n".join(topics[k] for k in sorted(topics)),
            "package-readmes": "\n\n".join(r for r in readmes if r.strip())}

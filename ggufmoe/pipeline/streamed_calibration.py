"""The streamed calibration of :func:`ggufmoe.pipeline.calibrate.calibrate`: in this process, or its chunks split into
shares streamed on a cluster's workers and their sums added up (:func:`calibrate_shares`)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ggufmoe.arch import architecture_for
from ggufmoe.arch.base import Architecture
from ggufmoe.errors import GgufmoeError
from ggufmoe.prune.criteria import kept_sets
from ggufmoe.sensitivity.probe_set import probe_request, too_big_to_probe
from ggufmoe.source.hf import HFSource
from ggufmoe.stats.file import Stats, load_stats, save_stats
from ggufmoe.stats.hf_model import load_tokenizer
from ggufmoe.stats.reduce import summed
from ggufmoe.stats.stream import stream_stats
from ggufmoe.stats.text import CALIB_CTX, HeldOut, Share, calibration_tokens, warn_if_few_tokens

if TYPE_CHECKING:
    from ggufmoe.pipeline.distributed import Cluster

HELD_OUT = "held-out calibration text"  # the name of the text the probes hold out of the calibration text


def calibrate_streamed(src: str | Path, held: HeldOut, probes: bool | None, probe_texts: dict[str, str] | None,
                       probe_chunks: int, cluster: Cluster | None, kw: dict) -> Stats:
    """:func:`ggufmoe.pipeline.calibrate.calibrate` of a text split into ``held`` (its arguments)."""
    arch = architecture_for(HFSource(Path(src)))
    if probes is None:
        probes = bool(probe_texts) or too_big_to_probe(arch)
        if probes and not probe_texts and not held.probes.strip():
            print("warning: the calibration text is too short to hold pieces out of it: no streamed probes (the plan "
                  "will rest on the local errors alone); pass --probe-text FILE", file=sys.stderr)
            probes = False
    request = None
    if probes:
        texts = {HELD_OUT: held.probes, **(probe_texts or {})}
        request = probe_request(arch, load_tokenizer(Path(src)), texts, kw.get("ctx", CALIB_CTX), probe_chunks)
    if cluster is None and kw.get("out") is not None and kept_shares(Path(kw["out"]).resolve()):
        raise GgufmoeError(f"{kw['out']}: an interrupted `--ray` calibration to it kept its shares: continue it with "
                           "--ray --resume, or delete them to start over")
    if cluster is not None:
        return calibrate_shares(src, arch, held.calibration, cluster,
                                dict(kw, kept_sets=kept_sets(arch), probes=request))
    return stream_stats(src, held.calibration, kept_sets=kept_sets(arch), probes=request, **kw)


@dataclass
class ShareTask:
    """One share of a calibration's chunks, streamed by one worker (:func:`~ggufmoe.stats.stream.stream_stats`'s
    options ``kw``; ``out``: this share's own file, beside the output)."""

    src: Path
    text: str
    share: Share
    kw: dict = field(default_factory=dict)

    def run(self) -> Stats:
        return stream_stats(self.src, self.text, share=self.share, **self.kw)


def share_path(out: Path, share: Share) -> Path:
    return out.with_name(f".{out.name}.share-{share[0] + 1}-of-{share[1]}.gguf")


def kept_shares(out: Path) -> set[int]:
    """Into how many shares the kept work of earlier runs to ``out`` was split (share files and their states)."""
    found = re.compile(rf"\.?\.{re.escape(out.name)}\.share-\d+-of-(\d+)\.gguf(\.partial)?")
    return {int(m.group(1)) for p in out.parent.glob(f"*.{out.name}.share-*") if (m := found.fullmatch(p.name))}


def calibrate_shares(src: str | Path, arch: Architecture, text: str, cluster: Cluster, kw: dict) -> Stats:
    """The statistics of ``text``, its chunks split into as many contiguous shares as ``cluster`` has workers, each
    streamed on one and the shares' sums added up (:func:`~ggufmoe.stats.reduce.summed`): the importance matrix and
    routing statistics are those of one pass over all the chunks. The local and pruning errors are split by layer
    (layer k measured by share k mod n, on its tokens), the probes carried by the first share. With ``out``, each
    share is saved beside it as it ends and its state kept as it goes: ``resume`` takes up the shares of the run
    before (as many as it had, whatever the cluster now), and a share whose worker died is resumed by the task Ray
    runs again."""
    src, out, resume = Path(src).resolve(), kw.pop("out", None), kw.pop("resume", False)
    ctx = kw.get("ctx", CALIB_CTX)
    ids, prefix = calibration_tokens(load_tokenizer(src), text, ctx, kw.get("max_tokens"))
    warn_if_few_tokens(len(ids), arch.n_expert, arch.top_k)
    n = max(1, min(cluster.workers, -(-len(ids) // (ctx - len(prefix)))))
    if out is not None:
        out = Path(out).resolve()
        if (kept := kept_shares(out)) and not resume:
            raise GgufmoeError(f"{out.parent} holds shares of an interrupted calibration to {out.name}: add --resume "
                               f"to continue it, or delete them (.{out.name}.share-*) to start over")
        if len(kept) > 1:
            raise GgufmoeError(f"{out.parent} holds shares of two calibrations to {out.name} (split {sorted(kept)} "
                               f"ways): delete them (.{out.name}.share-*) to start over")
        n = kept.pop() if kept else n
    alone = dict(kw, probes=None)
    tasks = [ShareTask(src, text, (i, n), dict(kw if i == 0 else alone, progress=False, resume=True,
                                              out=share_path(out, (i, n)) if out else None)) for i in range(n)]
    done = {t.share: load_stats(t.kw["out"], top_k=arch.top_k) for t in tasks if out and t.kw["out"].is_file()}
    with tqdm(total=n, initial=len(done), desc=f"calibrate ({n} shares)", unit="share",
              disable=not kw.get("progress", True)) as bar:
        for t, stats in cluster.calibrate([t for t in tasks if t.share not in done]):
            done[t.share] = stats
            bar.update()
    stats = summed([done[t.share] for t in tasks])
    if out is not None:
        save_stats(stats, out)
        for t in tasks:
            t.kw["out"].unlink(missing_ok=True)
    return stats

"""Calibration statistics: the importance matrix plus per-expert routing statistics.

Per MoE layer and routed expert, :class:`ExpertStats` holds

- ``counts``: routing slots that selected the expert (tokens routed to it);
- ``weight_mass``: the sum of the routing weights it got, as the experts module receives
  them — after the model's own normalisation and scaling (DeepSeek's ``norm_topk_prob`` and
  ``routed_scaling_factor`` included), so per token they sum to 1 for Qwen3-MoE and to
  ``routed_scaling_factor`` for DeepSeek-V3;
- ``reap_sum``: the sum over its routed tokens of gate weight x L2 norm of its output
  ``down(act(gate(x)) * up(x))`` — REAP saliency (Lasby et al., 2025) is ``reap_sum / counts``;
- ``n_tokens``: tokens that reached the layer.

File layout
-----------
A stats file *is* a llama.cpp GGUF imatrix — ``general.type = "imatrix"``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size`` and ``<tensor>.in_sum2`` / ``<tensor>.counts``
(F32) for every tensor, exactly as ``llama-imatrix`` writes them — so ``llama-quantize
--imatrix`` and ``ggufmoe convert --imatrix`` read it as they read any imatrix. llama.cpp's
loader (common/imatrix-loader.cpp) only looks at tensors ending in ``.in_sum2`` / ``.counts``
and at the ``imatrix.*`` keys, so the additions below are ignored by it:

======================================  ======================  ==========================================
key / tensor                            type                    meaning
======================================  ======================  ==========================================
``ggufmoe.stats.version``               u32                     1
``ggufmoe.stats.source``                string                  model the statistics come from
``ggufmoe.stats.has_routing``           bool                    false: only counts are known (weight mass
                                                                and REAP sums are zeros)
``ggufmoe.stats.layers``                array of i32            MoE layer indices, ascending
``ggufmoe.stats.n_tokens``              array of u64            tokens seen by each of those layers
``blk.{il}.ggufmoe_expert_counts``      F32 (n_expert,)         ``counts``
``blk.{il}.ggufmoe_weight_mass``        F32 (n_expert,)         ``weight_mass``
``blk.{il}.ggufmoe_reap_sum``           F32 (n_expert,)         ``reap_sum``
other ``ggufmoe.*`` keys                string                  :attr:`Stats.extras`: results derived from
                                                                the statistics and cached with them (e.g.
                                                                ``ggufmoe.sensitivity``, JSON)
======================================  ======================  ==========================================

:func:`load_stats` also reads files without these additions, i.e. plain llama.cpp imatrix
files: counts per layer then come from the per-expert counts of ``blk.N.ffn_gate_exps.weight``
(else ``ffn_up_exps``, else ``ffn_down_exps``); ``n_tokens`` from the counts of the router
entry ``blk.N.ffn_gate_inp.weight`` (every token passes the router once), else of any other
single-matrix entry of block N (attention matrices, shared experts: every token passes them),
else ``round(counts.sum() / top_k)`` when ``top_k`` is given; weight mass and REAP sums are
zeros and ``has_routing`` is false. A legacy ``.dat`` imatrix stores only normalised means
and one call count per tensor — per-expert counts are lost — so it loads with no layer
statistics at all (``layers == {}``, ``has_routing`` false); its importance matrix is usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.model.names import EXPERT_ORDER, EXPERT_TENSORS, ROUTER, TensorName, tensor_name
from ggufmoe.source.gguf_file import has_magic
from ggufmoe.stats.imatrix import Imatrix, load_imatrix, read_imatrix_gguf, write_imatrix_gguf

VERSION = 1
KEY_VERSION = "ggufmoe.stats.version"
KEY_SOURCE = "ggufmoe.stats.source"
KEY_HAS_ROUTING = "ggufmoe.stats.has_routing"
KEY_LAYERS = "ggufmoe.stats.layers"
KEY_N_TOKENS = "ggufmoe.stats.n_tokens"
RESERVED_KEYS = (KEY_VERSION, KEY_SOURCE, KEY_HAS_ROUTING, KEY_LAYERS, KEY_N_TOKENS)
EXTRA_PREFIX = "ggufmoe."  # Stats.extras keys: any other string key under this prefix
TENSORS = {"counts": "ggufmoe_expert_counts", "weight_mass": "ggufmoe_weight_mass", "reap_sum": "ggufmoe_reap_sum"}


@dataclass
class ExpertStats:
    """Routing statistics of one MoE layer (float64 arrays of length n_expert)."""

    counts: np.ndarray  # routing slots that selected each expert (tokens routed)
    weight_mass: np.ndarray  # sum of the routing weights the expert got (after normalisation and scaling)
    reap_sum: np.ndarray  # sum over routed tokens of gate weight * L2 norm of the expert's output
    n_tokens: int  # tokens seen by this layer

    @property
    def n_expert(self) -> int:
        return len(self.counts)

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of tokens routed to each expert (sums to top_k)."""
        return self.counts / self.n_tokens if self.n_tokens else np.zeros_like(self.counts)

    @property
    def mean_routing(self) -> np.ndarray:
        """Mean routing weight over all tokens (0 for a token not routed to the expert)."""
        return self.weight_mass / self.n_tokens if self.n_tokens else np.zeros_like(self.weight_mass)

    @property
    def reap(self) -> np.ndarray:
        """REAP saliency: mean over routed tokens of gate weight * ||expert output||; 0 for unused experts."""
        out = np.zeros_like(self.reap_sum)
        used = self.counts > 0
        out[used] = self.reap_sum[used] / self.counts[used]
        return out


@dataclass
class Stats:
    imatrix: Imatrix  # importance matrix (GGUF tensor names)
    layers: dict[int, ExpertStats]  # MoE layer index -> stats
    source: str = ""  # model name/path the stats come from
    has_routing: bool = True  # False when loaded from a plain llama.cpp imatrix (only counts known)
    # other string keys ``ggufmoe.*`` stored with the statistics (results cached with them, e.g.
    # ``ggufmoe.sensitivity``); kept by save/load, ignored by llama.cpp
    extras: dict[str, str] = field(default_factory=dict)


# --- file -----------------------------------------------------------------------------------------

def save_stats(stats: Stats, path: str | Path) -> None:
    """Write ``stats`` as a llama.cpp GGUF imatrix with the additions in the module docstring, atomically."""
    layers = sorted(stats.layers)
    tensors = {}
    for il in layers:
        s = stats.layers[il]
        n = len(s.counts)
        for attr, suffix in TENSORS.items():
            a = np.asarray(getattr(s, attr), dtype=np.float64).reshape(-1)
            if a.size != n:
                raise GgufmoeError(f"stats of layer {il}: {attr} has {a.size} experts, counts {n}")
            tensors[f"blk.{il}.{suffix}"] = a.astype(np.float32)

    for key in stats.extras:
        if not key.startswith(EXTRA_PREFIX) or key in RESERVED_KEYS:
            raise GgufmoeError(f"stats extra key {key!r}: must start with {EXTRA_PREFIX!r} and not be one of "
                               f"{', '.join(RESERVED_KEYS)}")

    def keys(w: gguf.GGUFWriter) -> None:
        w.add_uint32(KEY_VERSION, VERSION)
        w.add_key_value(KEY_SOURCE, stats.source or "", gguf.GGUFValueType.STRING)  # add_string skips ""
        w.add_bool(KEY_HAS_ROUTING, bool(stats.has_routing))
        if layers:  # gguf-py cannot write an empty array; absent means no layers
            w.add_key_value(KEY_LAYERS, [int(il) for il in layers], gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType.INT32)
            w.add_key_value(KEY_N_TOKENS, [int(stats.layers[il].n_tokens) for il in layers],
                            gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)
        for key, value in sorted(stats.extras.items()):
            w.add_key_value(key, str(value), gguf.GGUFValueType.STRING)

    write_imatrix_gguf(stats.imatrix, path, extra_tensors=tensors, extra_kv=keys, what="stats file")


def load_stats(path: str | Path, top_k: int | None = None) -> Stats:
    """Read a stats file, or any llama.cpp imatrix (GGUF or legacy ``.dat``; see the module docstring).

    ``top_k`` (experts per token) is only used for a plain imatrix that has neither router nor
    other single-matrix entries in a MoE block, to estimate that layer's token count.
    """
    path = Path(path)
    if not has_magic(path, "stats"):
        return Stats(load_imatrix(path), {}, source="", has_routing=False)
    imatrix, reader = read_imatrix_gguf(path)
    if reader.get_field(KEY_VERSION) is None:
        return Stats(imatrix, _layers_from_imatrix(path, imatrix, top_k), source="", has_routing=False)
    return _load_ours(path, imatrix, reader)


def _field(reader: gguf.GGUFReader, path: Path, key: str, types: list, required: bool = True):
    f = reader.get_field(key)
    if f is None:
        if required:
            raise GgufmoeError(f"{path}: corrupt stats file: key {key} missing")
        return None
    if f.types != types:
        raise GgufmoeError(f"{path}: corrupt stats file: key {key} has the wrong type")
    return f.contents()


def _load_ours(path: Path, imatrix: Imatrix, reader: gguf.GGUFReader) -> Stats:
    T = gguf.GGUFValueType
    version = _field(reader, path, KEY_VERSION, [T.UINT32])
    if version != VERSION:
        raise GgufmoeError(f"{path}: stats file version {version}; this ggufmoe reads version {VERSION}")
    source = _field(reader, path, KEY_SOURCE, [T.STRING])
    has_routing = _field(reader, path, KEY_HAS_ROUTING, [T.BOOL])
    layers = _field(reader, path, KEY_LAYERS, [T.ARRAY, T.INT32], required=False) or []
    n_tokens = _field(reader, path, KEY_N_TOKENS, [T.ARRAY, T.UINT64], required=len(layers) > 0) or []
    if len(layers) != len(n_tokens) or len(set(layers)) != len(layers) or any(il < 0 for il in layers):
        raise GgufmoeError(f"{path}: corrupt stats file: {len(layers)} layers for {len(n_tokens)} token counts")
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for il, n in zip(layers, n_tokens):
        arrays = {}
        for attr, suffix in TENSORS.items():
            t = tensors.get(f"blk.{il}.{suffix}")
            if t is None or t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise GgufmoeError(f"{path}: corrupt stats file: blk.{il}.{suffix} missing or not F32")
            arrays[attr] = np.array(t.data, dtype=np.float64).reshape(-1)
        if len({a.size for a in arrays.values()}) != 1:
            raise GgufmoeError(f"{path}: corrupt stats file: layer {il} has arrays of different lengths")
        out[int(il)] = ExpertStats(n_tokens=int(n), **arrays)
    return Stats(imatrix, dict(sorted(out.items())), source=source, has_routing=bool(has_routing),
                 extras=_extras(reader))


def _extras(reader: gguf.GGUFReader) -> dict[str, str]:
    """String keys ``ggufmoe.*`` other than the reserved ones (see :attr:`Stats.extras`)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith(EXTRA_PREFIX) and key not in RESERVED_KEYS and f.types == [gguf.GGUFValueType.STRING]:
            out[key] = f.contents()
    return out


def _layers_from_imatrix(path: Path, imatrix: Imatrix, top_k: int | None) -> dict[int, ExpertStats]:
    """Counts of a plain llama.cpp imatrix: per expert from the expert tensors, tokens from the router."""
    e = imatrix.entries
    parsed = {n: TensorName.parse(n) for n in e}
    layers = sorted({p.layer for p in parsed.values() if p.tensor in EXPERT_TENSORS})
    out = {}
    for il in layers:
        entry = next(e[n] for n in (tensor_name(t, il) for t in EXPERT_ORDER) if n in e)
        counts = np.asarray(entry.counts, dtype=np.float64).reshape(-1)
        router = e.get(tensor_name(ROUTER, il))
        if router is None or router.counts.size != 1:
            router = next((v for n, v in sorted(e.items()) if parsed[n].layer == il and v.counts.size == 1), None)
        if router is not None:
            n_tokens = int(round(float(router.counts[0])))
        elif top_k:
            n_tokens = int(round(counts.sum() / top_k))
        else:
            raise GgufmoeError(f"{path}: imatrix has no entry that tells the token count of layer {il} "
                               f"(no {tensor_name(ROUTER, il)}); give the number of experts used per token")
        out[il] = ExpertStats(counts, np.zeros_like(counts), np.zeros_like(counts), n_tokens)
    return out


# --- summary --------------------------------------------------------------------------------------

def format_summary(stats: Stats) -> str:
    """Per MoE layer: tokens, experts used, and those never activated."""
    if not stats.layers:
        return "no MoE layer statistics"
    lines = [f"{'layer':>5}  {'tokens':>9}  {'experts used':>12}  never activated"]
    for il, s in sorted(stats.layers.items()):
        dead = np.flatnonzero(s.counts == 0)
        lines.append(f"{il:>5}  {s.n_tokens:>9}  {s.n_expert - dead.size:>5} of {s.n_expert:<4}  "
                     + (", ".join(map(str, dead)) if dead.size else "-"))
    return "\n".join(lines)

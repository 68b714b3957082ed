"""Run the Hugging Face model over calibration text and collect what quantization and pruning need.

Two kinds of statistics come out of one pass (see :mod:`ggufmoe.stats` for the file):

- the importance matrix: per weight matrix (per expert for expert tensors) the sum of the
  squared inputs of its matmul, per input column, and the token count, as llama.cpp's
  ``llama-imatrix`` collects it;
- per MoE layer and routed expert: routing slots (tokens routed), routing-weight mass and the
  REAP saliency sum (gate weight x L2 norm of the expert's output).

Ordinary matmuls (``nn.Linear`` and the routers, which hold a 2-D ``weight``) are observed
with forward pre-hooks. Experts: transformers 5 keeps them fused in one module
(``gate_up_proj`` (E, 2*ff, hidden), ``down_proj`` (E, hidden, ff), built by
``use_experts_implementation``) whose forward takes ``(hidden_states, top_k_index,
top_k_weights)`` — the weights after the model's own normalisation and scaling (DeepSeek's
``routed_scaling_factor`` included). For the run, that module's forward is replaced by
:func:`experts_forward`, which computes what transformers' experts kernels compute (routing
slots sorted by expert with one sort, one gate/up and one down matmul per expert with the
module's own weights, biases, ``_apply_gate`` and post-expert norm, the weighted outputs
added per token) and records, from what it computes anyway, the inputs of the gate/up and
down matmuls and each routed token's expert output — nothing is computed twice.

The output matmul (``lm_head``) only has its input recorded: the logits are never used, so
its forward returns an empty tensor instead of computing them (a fifth of the model's work
for a small vocabulary, most of it for a large one).

Sums are accumulated in float32 within one forward (a batch of chunks, at most
``BATCH_TOKENS`` tokens) and folded into float64 after it. Chunks of ``ctx`` tokens are
independent sequences, as llama.cpp's imatrix chunks are; several are run as one batch,
which makes the per-expert matmuls large enough to be efficient on a CPU. Memory is bounded
by one batch's activations plus the token ids of the text (int32), which is tokenized in
pieces (:func:`token_ids`).

Checkpoint names map to model parameters through transformers' own loading renames
(Mixtral's ``block_sparse_moe.experts.{e}.w1.weight`` is ``mlp.experts.gate_up_proj``).
"""

from __future__ import annotations

import re
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .arch import TensorSpec, architecture_for
from .errors import GgufmoeError
from .imatrix import Imatrix, ImatrixEntry
from .source.hf import HFSource

if TYPE_CHECKING:
    from .stats import ExpertStats, Stats

BATCH_TOKENS = 4096  # tokens per forward: whole chunks of ctx tokens batched together
PIECE_CHARS = 1 << 16  # characters of text tokenized at a time
CHECK_CHARS = 1 << 14  # opening of the text on which tokenizing in pieces is checked
_CUT = re.compile(r"\n(?=\S)")


def square_sums(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(float32 sums of squares per column, number of rows) of ``x`` taken as rows of its last dimension."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return (x * x).sum(0), x.shape[0]


@dataclass
class Accumulator:
    """float64 sums of squared inputs, (n_expert, ne0), and token counts per expert."""

    n_expert: int
    ne0: int
    sum2: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum2 = torch.zeros(self.n_expert, self.ne0, dtype=torch.float64)
        self.counts = torch.zeros(self.n_expert, dtype=torch.float64)

    def add(self, x: torch.Tensor, expert: int = 0) -> None:
        """Add the rows of ``x`` (any leading shape) to ``expert``: float32 sums, folded into float64."""
        self.add_sums(*square_sums(x), expert)

    def add_sums(self, sum2: torch.Tensor, rows: int, expert: int = 0) -> None:
        if sum2.shape[0] != self.ne0:
            raise GgufmoeError(f"calibration: a matmul input has {sum2.shape[0]} columns, expected {self.ne0}")
        self.sum2[expert] += sum2
        self.counts[expert] += rows

    def fold(self, sum2: torch.Tensor, counts: torch.Tensor) -> None:
        """Add per-expert float32 sums (n_expert, ne0) and counts (n_expert,) of one forward."""
        self.sum2 += sum2
        self.counts += counts

    def entry(self) -> ImatrixEntry:
        return ImatrixEntry(self.sum2.numpy().astype(np.float32), self.counts.numpy().astype(np.float32))


@dataclass
class RoutingAccumulator:
    """Per-expert routing statistics of one MoE layer, float64."""

    n_expert: int
    counts: torch.Tensor = field(init=False)
    weight_mass: torch.Tensor = field(init=False)
    reap_sum: torch.Tensor = field(init=False)
    n_tokens: int = 0

    def __post_init__(self) -> None:
        self.counts, self.weight_mass, self.reap_sum = (torch.zeros(self.n_expert, dtype=torch.float64)
                                                        for _ in range(3))

    def stats(self) -> ExpertStats:
        from .stats import ExpertStats

        return ExpertStats(self.counts.numpy().copy(), self.weight_mass.numpy().copy(), self.reap_sum.numpy().copy(),
                           self.n_tokens)


def model_keys(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> model parameter name, as transformers renames them when loading."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        key, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        out[name] = key if key in params else name
    return out


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ weight if transposed else x @ weight.T
    return y if bias is None else y + bias


def experts_forward(m: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The fused experts module's forward, recording statistics (see the module docstring).

    Bound to the module by :meth:`Collector.hook_experts`; ``m._ggufmoe`` holds the accumulators
    ``(x_acc, mid_acc, routing)``. Ids at or beyond the expert count (expert-parallel sentinels)
    contribute nothing, as in transformers.
    """
    x_acc, mid_acc, routing = m._ggufmoe
    n_expert = x_acc.n_expert
    transposed = getattr(m, "is_transposed", False)
    has_bias = getattr(m, "has_bias", False)
    post_norm = m.post_expert_norm if getattr(m, "has_post_expert_norm", False) else None
    n_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    h = hidden_states.reshape(n_tokens, -1)
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)  # routing slots grouped by expert; sentinels (ids >= n_expert) last
    counts = torch.bincount(ids.clamp(0, n_expert), minlength=n_expert + 1)[:n_expert]
    order = order[: int(counts.sum())]
    token = order // top_k
    x = h[token]  # input of each routed slot, grouped by expert
    w = top_k_weights.reshape(-1)[order]
    final = torch.zeros_like(h)
    x2 = torch.zeros(n_expert, h.shape[-1])
    mid2 = torch.zeros(n_expert, mid_acc.ne0)
    reap = torch.zeros(n_expert, dtype=torch.float64)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if not c:
            continue
        end = start + c
        xe, we = x[start:end], w[start:end]
        mid = m._apply_gate(_expert_linear(xe, m.gate_up_proj[e], m.gate_up_proj_bias[e] if has_bias else None,
                                           transposed))
        ye = _expert_linear(mid, m.down_proj[e], m.down_proj_bias[e] if has_bias else None, transposed)
        if post_norm is not None:
            ye = post_norm(ye)
        final.index_add_(0, token[start:end], ye * we[:, None].to(ye.dtype))
        # statistics, float32 within this forward
        xf, mf, wf = xe.float(), mid.float(), we.float()
        x2[e] = (xf * xf).sum(0)
        mid2[e] = (mf * mf).sum(0)
        reap[e] = float((wf * torch.linalg.vector_norm(ye.float(), dim=-1)).sum())
        start = end
    counts64 = counts.double()
    x_acc.fold(x2, counts64)  # one importance row per routing slot, as llama.cpp counts
    mid_acc.fold(mid2, counts64)
    routing.counts += counts64
    routing.weight_mass += torch.bincount(ids[order], weights=w.double(), minlength=n_expert)
    routing.reap_sum += reap
    routing.n_tokens += n_tokens
    return final.to(hidden_states.dtype)


def output_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output matmul during calibration: records its input, computes no logits."""
    m._ggufmoe.add(x)
    return x.new_empty(*x.shape[:-1], 0)


class Collector:
    """Instruments a loaded model; each forward adds to the accumulators. ``remove()`` restores it."""

    def __init__(self, model: nn.Module, specs: list[TensorSpec]):
        self.acc: dict[str, Accumulator] = {}
        self.routing: dict[int, RoutingAccumulator] = {}
        self.handles: list = []
        self.patched: list[nn.Module] = []
        self._last: tuple[torch.Tensor, int, tuple[torch.Tensor, int]] | None = None
        modules = dict(model.named_modules())
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        shared = Counter(s.hf_name for s in specs)
        plain = [s for s in specs if not s.is_expert and shared[s.hf_name] == 1]  # kv_b_proj feeds two tensors
        experts = [s for s in specs if s.is_expert]
        keys = model_keys(model, [s.hf_name for s in plain] + [s.hf_name.format(e=0) for s in experts])
        for s in plain:
            path, _, leaf = keys[s.hf_name].rpartition(".")
            mod = modules.get(path)
            weight = getattr(mod, "weight", None)
            if leaf == "weight" and isinstance(weight, torch.Tensor) and weight.ndim == 2 \
                    and not isinstance(mod, nn.Embedding):
                self.hook_matmul(s.name, mod, weight.shape[1], is_output=mod is output)
        by_module: dict[str, list[TensorSpec]] = {}
        for s in experts:
            by_module.setdefault(keys[s.hf_name.format(e=0)].rpartition(".")[0], []).append(s)
        for path, group in by_module.items():
            self.hook_experts(path, modules.get(path), group)

    def hook_matmul(self, name: str, mod: nn.Module, ne0: int, is_output: bool = False) -> None:
        acc = self.acc[name] = Accumulator(1, ne0)
        if is_output and isinstance(mod, nn.Linear):
            self.patch(mod, output_forward, acc)
        else:
            def hook(_m: nn.Module, args: tuple) -> None:
                acc.add_sums(*self.square_sums(args[0]))

            self.handles.append(mod.register_forward_pre_hook(hook))

    def square_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """:func:`square_sums`, computed once for matmuls that read the same tensor (q, k and v projections)."""
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            return self._last[2]
        out = square_sums(x)
        self._last = (x, x._version, out)  # the reference keeps x alive, so identity is safe
        return out

    def patch(self, mod: nn.Module, forward, state) -> None:
        mod._ggufmoe = state
        mod.forward = types.MethodType(forward, mod)
        self.patched.append(mod)

    def hook_experts(self, path: str, mod: nn.Module | None, specs: list[TensorSpec]) -> None:
        names = ", ".join(s.name for s in specs)
        if mod is None or not all(hasattr(mod, a) for a in ("gate_up_proj", "down_proj", "_apply_gate")) \
                or not getattr(mod, "has_gate", True):
            raise GgufmoeError(f"calibration: no fused gate/up/down experts module at {path!r} for {names}")
        transposed = getattr(mod, "is_transposed", False)  # (E, in, out) instead of (E, out, in)
        n_expert = mod.down_proj.shape[0]
        hidden = mod.gate_up_proj.shape[1 if transposed else 2]
        ff = mod.down_proj.shape[1 if transposed else 2]
        if n_expert != specs[0].n_parts:
            raise GgufmoeError(f"calibration: {path} has {n_expert} experts, the checkpoint {specs[0].n_parts}")
        layer = specs[0].layer
        if layer is None or layer in self.routing:
            raise GgufmoeError(f"calibration: cannot tell the layer of the experts module {path!r} ({names})")
        x_acc, mid_acc = Accumulator(n_expert, hidden), Accumulator(n_expert, ff)
        for s in specs:
            self.acc[s.name] = mid_acc if s.kind == "ffn_down_exps" else x_acc
        routing = self.routing[layer] = RoutingAccumulator(n_expert)
        self.patch(mod, experts_forward, (x_acc, mid_acc, routing))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for mod in self.patched:
            del mod.forward, mod._ggufmoe
        self.patched.clear()
        self._last = None

    def entries(self) -> dict[str, ImatrixEntry]:
        """Entries of the tensors that saw input (a hooked module never called has none)."""
        return {name: a.entry() for name, a in sorted(self.acc.items()) if a.counts.sum() > 0}

    def layers(self) -> dict[int, ExpertStats]:
        return {il: r.stats() for il, r in sorted(self.routing.items())}


def _cuts(text: str, every: int) -> list[int]:
    """Positions about ``every`` characters apart, each just after a newline followed by a non-space."""
    out, pos = [], 0
    while True:
        m = _CUT.search(text, pos + every)
        if m is None:
            return out
        pos = m.end()
        out.append(pos)


def _pieces(text: str, cuts: list[int]) -> Iterator[str]:
    bounds = [0, *cuts, len(text)]
    return (text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)


def _cut_safe(tokenizer, text: str) -> bool:
    """Whether tokenizing the text in pieces cut after newlines gives the ids the whole text gives.

    True for byte-level BPE with GPT-2/Qwen2-style split rules (a newline followed by a
    non-space always ends a pre-token); false, for instance, for SentencePiece-style
    tokenizers that mark the start of the text. Checked on the opening of the text itself.
    """
    sample = text[:CHECK_CHARS]
    cuts = _cuts(sample, CHECK_CHARS // 16)
    if not cuts:
        return False

    def ids(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]

    return [i for piece in _pieces(sample, cuts) for i in ids(piece)] == ids(sample)


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> np.ndarray:
    """The token ids (int32) of ``text`` without special tokens, at most ``max_tokens`` of them.

    Tokenized lazily, in pieces of about ``PIECE_CHARS`` characters cut after newlines, when
    that gives the ids of the whole text (see :func:`_cut_safe`): memory holds the ids and one
    piece's encoding, never the encoding of the whole text, and tokenizing stops once
    ``max_tokens`` ids are known. Otherwise the whole text is tokenized at once.
    """
    if max_tokens is not None and max_tokens < 1:
        raise GgufmoeError(f"max_tokens must be positive, not {max_tokens}")
    pieces = _pieces(text, _cuts(text, PIECE_CHARS)) if _cut_safe(tokenizer, text) else iter([text])
    out, n = [], 0
    for piece in pieces:
        ids = np.asarray(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int32)
        out.append(ids)
        n += ids.size
        if max_tokens is not None and n >= max_tokens:
            break
    ids = np.concatenate(out) if out else np.zeros(0, np.int32)
    return ids[:max_tokens] if max_tokens is not None else ids


def _special_prefix(tokenizer, ctx: int) -> list[int]:
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    if ctx - len(prefix) < 1:
        raise GgufmoeError(f"context {ctx} is too small")
    return prefix


def token_chunks(tokenizer, text: str, ctx: int, max_tokens: int | None) -> list[list[int]]:
    """Chunks of at most ``ctx`` tokens, each opening with the tokenizer's special prefix (BOS) if any."""
    prefix = _special_prefix(tokenizer, ctx)
    body = ctx - len(prefix)
    ids = token_ids(tokenizer, text, max_tokens).tolist()
    if not ids:
        raise GgufmoeError("calibration text is empty")
    return [prefix + ids[i: i + body] for i in range(0, len(ids), body)]


def batches(ids: torch.Tensor, prefix: list[int], ctx: int, batch_tokens: int = BATCH_TOKENS) -> Iterator[torch.Tensor]:
    """(batch, ctx) tensors of whole chunks (each opening with ``prefix``); the shorter last chunk alone."""
    body = ctx - len(prefix)
    per_batch = max(1, batch_tokens // ctx)
    n_full = len(ids) // body
    head = torch.tensor(prefix, dtype=torch.long)
    for i in range(0, n_full, per_batch):
        n = min(per_batch, n_full - i)
        chunk = ids[i * body: (i + n) * body].view(n, body).long()
        yield torch.cat([head.expand(n, -1), chunk], 1) if prefix else chunk
    if len(ids) % body:
        yield torch.cat([head, ids[n_full * body:].long()])[None]


def load_model(model_dir: Path, progress: bool = True):
    """(tokenizer, float32 model in eval mode) or one clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises many types for unloadable models
        msg = " ".join(str(e).split()) or type(e).__name__
        raise GgufmoeError(f"{model_dir}: transformers cannot load the model or tokenizer ({msg})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, model


def collect(model_dir: Path, text: str, ctx: int = 512, max_tokens: int | None = None, progress: bool = True,
            dataset: str = "calibration") -> Stats:
    """Run the model (float32, CPU) over ``text`` in chunks of ``ctx`` tokens; return its statistics."""
    from .stats import Stats

    model_dir = Path(model_dir)
    specs = list(architecture_for(HFSource(model_dir)).tensors())
    if not text or not text.strip():
        raise GgufmoeError("calibration text is empty")
    tokenizer, model = load_model(model_dir, progress)
    prefix = _special_prefix(tokenizer, ctx)
    ids = torch.from_numpy(token_ids(tokenizer, text, max_tokens))
    if not len(ids):
        raise GgufmoeError("calibration text is empty")
    body = ctx - len(prefix)
    n_chunks = -(-len(ids) // body)
    collector = Collector(model, specs)
    try:
        with torch.no_grad(), tqdm(total=len(ids) + n_chunks * len(prefix), unit="tok", unit_scale=True,
                                   desc="calibrate", disable=not progress) as bar:
            for batch in batches(ids, prefix, ctx):
                model(input_ids=batch, use_cache=False)
                bar.update(batch.numel())
    finally:
        collector.remove()
    imatrix = Imatrix(collector.entries(), [dataset], n_chunks, ctx)
    return Stats(imatrix, collector.layers(), source=str(model_dir), has_routing=True)


def collect_imatrix(model_dir: Path, text: str, ctx: int = 512, max_tokens: int | None = None,
                    progress: bool = True, dataset: str = "calibration") -> Imatrix:
    """Run the model (float32, CPU) over ``text`` in chunks of ``ctx`` tokens; return its imatrix."""
    return collect(model_dir, text, ctx, max_tokens, progress, dataset).imatrix

"""Run the Hugging Face model over calibration text and collect what quantization and pruning need.

Two kinds of statistics come out of one pass (see :mod:`ggufmoe.stats.file` for the file):

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
:func:`~ggufmoe.stats.routed_experts.experts_forward`, which computes what transformers' experts kernels compute (routing
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

This is the whole-model path: the model is loaded with ``from_pretrained``. The streamed path
(:mod:`ggufmoe.stats.stream`, the default of ``ggufmoe calibrate``) runs one decoder layer at a
time with the same :class:`Collector` and the same routed-experts computation
(:func:`~ggufmoe.stats.routed_experts.route_experts`, which takes the expert weights from a getter: the module's fused
tensors here, the checkpoint expert by expert there); this path is its reference.
"""

from __future__ import annotations

import types
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from gguf.constants import MODEL_TENSOR

from ggufmoe.model.tensor import TensorSpec
from ggufmoe.arch import Architecture, architecture_for
from ggufmoe.errors import GgufmoeError
from ggufmoe.model.finite import checked_finite
from ggufmoe.stats.accumulate import Accumulator, RoutingAccumulator, square_sums
from ggufmoe.stats.file import ExpertStats, Stats
from ggufmoe.stats.hf_model import load_model
from ggufmoe.stats.imatrix import Imatrix, ImatrixEntry
from ggufmoe.stats.routed_experts import ExpertsState, experts_forward, output_forward
from ggufmoe.stats.text import batches, calibration_tokens, warn_if_few_tokens
from ggufmoe.source.hf import HFSource


# a vision-language checkpoint's text model, and the same tensors as the text model alone names them (the streamed
# calibration builds the causal LM of the text configuration) where transformers' renames do not map them
NESTED_TEXT, TEXT = "model.language_model.", "model."


def model_keys(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> model parameter (or buffer) name, as transformers renames them when loading."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    out = {}
    for name in names:
        key, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        if key not in params and name.startswith(NESTED_TEXT):
            key, _ = rename_source_key(TEXT + name[len(NESTED_TEXT):], renamings, converters,
                                       model.base_model_prefix, params)
        out[name] = key if key in params else name
    return out


class Collector:
    """Instruments a loaded model; each forward adds to the accumulators. ``remove()`` restores it."""

    def __init__(self, model: nn.Module, specs: list[TensorSpec], forward: Callable = experts_forward,
                 sample: Callable[[str, torch.Tensor], None] | None = None):
        self.forward = forward  # what a fused experts module runs instead of its own forward
        self.sample = sample  # also given every plain matmul's input (the streamed path's local errors)
        self.acc: dict[str, Accumulator] = {}
        self.routing: dict[int, RoutingAccumulator] = {}
        self.experts: dict[int, nn.Module] = {}  # layer -> its patched experts module
        self.handles: list = []
        self.patched: list[nn.Module] = []
        self._last: tuple[torch.Tensor, int, tuple[torch.Tensor, int]] | None = None
        modules = dict(model.named_modules())
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        shared = Counter(s.hf_name for s in specs)
        # a checkpoint tensor cut into GGUF tensors other than by rows (MLA's kv_b) has no one input to hook
        plain = [s for s in specs if not s.is_expert and (shared[s.hf_name] == 1 or s.rows_of_source)]
        experts = [s for s in specs if s.is_expert]
        keys = model_keys(model, [s.hf_name for s in plain] + [s.hf_name.format(e=0) for s in experts])
        for s in plain:
            path, _, leaf = keys[s.hf_name].rpartition(".")
            mod = modules.get(path)
            weight = getattr(mod, "weight", None)
            if leaf == "weight" and isinstance(weight, torch.Tensor) and weight.ndim == 2 \
                    and not isinstance(mod, nn.Embedding):
                self.hook_matmul(s.name, mod, weight.shape[1], is_output=mod is output, order=s.input_order)
        by_module: dict[str, list[TensorSpec]] = {}
        for s in experts:
            by_module.setdefault(keys[s.hf_name.format(e=0)].rpartition(".")[0], []).append(s)
        for path, group in by_module.items():
            self.hook_experts(path, modules.get(path), group)

    def hook_matmul(self, name: str, mod: nn.Module, ne0: int, is_output: bool = False,
                    order: tuple[int, ...] | None = None) -> None:
        """Record the input of ``mod``'s matmul for tensor ``name``, its elements in the tensor's column ``order``."""
        acc = self.acc[name] = Accumulator(1, ne0)
        columns = None if order is None else torch.tensor(order)

        def ordered(x: torch.Tensor) -> torch.Tensor:
            return x if columns is None else x[..., columns.to(x.device)]

        if self.sample is not None:
            sample = self.sample

            def give(_m: nn.Module, args: tuple) -> None:
                sample(name, ordered(args[0]))

            self.handles.append(mod.register_forward_pre_hook(give))
        if is_output and isinstance(mod, nn.Linear):
            self.patch(mod, output_forward, acc)
        else:
            def hook(_m: nn.Module, args: tuple) -> None:  # the square sums of a reordered input are not shared
                acc.add_sums(*(self.square_sums(args[0]) if columns is None else square_sums(ordered(args[0]))))

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
            self.acc[s.name] = mid_acc if s.parsed.tensor == MODEL_TENSOR.FFN_DOWN_EXP else x_acc
        routing = self.routing[layer] = RoutingAccumulator(n_expert)
        self.experts[layer] = mod
        self.patch(mod, self.forward, ExpertsState(x_acc, mid_acc, routing))

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


def calibratable(arch: Architecture) -> Architecture:
    """``arch``, or the error saying why its family cannot be calibrated."""
    if arch.calibration_refused:
        raise GgufmoeError(f"{arch.src.path}: {arch.src.architecture} cannot be calibrated: {arch.calibration_refused}")
    return arch


def collect_stats(model_dir: str | Path, text: str, ctx: int = 512, max_tokens: int | None = None,
                  progress: bool = True, dataset: str = "calibration") -> Stats:
    """Run the Hugging Face model (float32, CPU) over ``text`` in chunks of ``ctx`` tokens; return its statistics."""
    model_dir = Path(model_dir)
    arch = calibratable(architecture_for(HFSource(model_dir)))
    specs = list(arch.tensors())
    if not text or not text.strip():
        raise GgufmoeError("calibration text is empty")
    tokenizer, model = load_model(model_dir, progress)
    for name, p in model.named_parameters():
        checked_finite(name, p.detach().numpy())
    ids, prefix = calibration_tokens(tokenizer, text, ctx, max_tokens)
    warn_if_few_tokens(len(ids), arch.n_expert, arch.top_k)
    ids = torch.from_numpy(ids)
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
    return collect_stats(model_dir, text, ctx, max_tokens, progress, dataset).imatrix

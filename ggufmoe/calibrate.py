"""Collect an importance matrix by running the Hugging Face model over calibration text.

Ordinary matmuls (``nn.Linear`` and the routers, which hold a 2-D ``weight``) are observed
with forward pre-hooks. Experts: transformers 5 keeps them fused in one module
(``gate_up_proj`` (E, 2*ff, hidden), ``down_proj`` (E, hidden, ff), built by
``use_experts_implementation``) whose forward takes ``(hidden_states, top_k_index,
top_k_weights)``. A forward hook on it takes the routed tokens of each expert — the input of
its gate and up matmuls — and recomputes ``act(gate(x)) * up(x)`` from the module's own
weights with its own ``_apply_gate`` — the input of its down matmul — whatever kernel
(eager, batched_mm, grouped_mm) ran the forward.

Checkpoint names map to model parameters through transformers' own loading renames
(Mixtral's ``block_sparse_moe.experts.{e}.w1.weight`` is ``mlp.experts.gate_up_proj``).
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .arch import TensorSpec, architecture_for
from .errors import GgufmoeError
from .imatrix import Imatrix, ImatrixEntry
from .source.hf import HFSource


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
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if x.shape[1] != self.ne0:
            raise GgufmoeError(f"calibration: a matmul input has {x.shape[1]} columns, expected {self.ne0}")
        self.sum2[expert] += (x * x).sum(0)
        self.counts[expert] += x.shape[0]

    def entry(self) -> ImatrixEntry:
        return ImatrixEntry(self.sum2.numpy().astype(np.float32), self.counts.numpy().astype(np.float32))


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


def expert_mid(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert ``e``'s down matmul for its tokens ``x``: act(gate(x)) * up(x)."""
    w = module.gate_up_proj[e]
    y = x @ w if getattr(module, "is_transposed", False) else nn.functional.linear(x, w)
    if getattr(module, "has_bias", False):
        y = y + module.gate_up_proj_bias[e]
    return module._apply_gate(y)


class Collector:
    """Hooks a loaded model; each forward adds its matmul inputs to the accumulators."""

    def __init__(self, model: nn.Module, specs: list[TensorSpec]):
        self.acc: dict[str, Accumulator] = {}
        self.handles: list = []
        modules = dict(model.named_modules())
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
                self.hook_matmul(s.name, mod, weight.shape[1])
        by_module: dict[str, list[TensorSpec]] = {}
        for s in experts:
            by_module.setdefault(keys[s.hf_name.format(e=0)].rpartition(".")[0], []).append(s)
        for path, group in by_module.items():
            self.hook_experts(path, modules.get(path), group)

    def hook_matmul(self, name: str, mod: nn.Module, ne0: int) -> None:
        acc = self.acc[name] = Accumulator(1, ne0)
        self.handles.append(mod.register_forward_pre_hook(lambda _m, args: acc.add(args[0])))

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
        x_acc, mid_acc = Accumulator(n_expert, hidden), Accumulator(n_expert, ff)
        for s in specs:
            self.acc[s.name] = mid_acc if s.kind == "ffn_down_exps" else x_acc
        signature = inspect.signature(type(mod).forward)

        def hook(m: nn.Module, args: tuple, kwargs: dict, _out) -> None:
            call = signature.bind(m, *args, **kwargs).arguments
            h, idx = call["hidden_states"], call["top_k_index"]
            h = h.reshape(-1, h.shape[-1])
            idx = idx.reshape(h.shape[0], -1)
            for e in torch.unique(idx).tolist():
                if 0 <= e < n_expert:  # ids beyond are expert-parallel sentinels
                    x = h[(idx == e).nonzero()[:, 0]]  # one row per routing slot, as llama.cpp counts
                    x_acc.add(x, e)
                    mid_acc.add(expert_mid(m, e, x), e)

        self.handles.append(mod.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def entries(self) -> dict[str, ImatrixEntry]:
        """Entries of the tensors that saw input (a hooked module never called has none)."""
        return {name: a.entry() for name, a in sorted(self.acc.items()) if a.counts.sum() > 0}


def token_chunks(tokenizer, text: str, ctx: int, max_tokens: int | None) -> list[list[int]]:
    """Chunks of at most ``ctx`` tokens, each opening with the tokenizer's special prefix (BOS) if any."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    body = ctx - len(prefix)
    if body < 1:
        raise GgufmoeError(f"context {ctx} is too small")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise GgufmoeError("calibration text is empty")
    return [prefix + ids[i: i + body] for i in range(0, len(ids), body)]


def collect_imatrix(model_dir: Path, text: str, ctx: int = 512, max_tokens: int | None = None,
                    progress: bool = True, dataset: str = "calibration") -> Imatrix:
    """Run the model (float32, CPU) over ``text`` in chunks of ``ctx`` tokens; return its imatrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    specs = list(architecture_for(HFSource(model_dir)).tensors())
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises many types for unloadable models
        raise GgufmoeError(f"{model_dir}: transformers cannot load the model or tokenizer ({e})") from None
    chunks = token_chunks(tokenizer, text, ctx, max_tokens)
    collector = Collector(model, specs)
    try:
        with torch.no_grad(), tqdm(total=sum(map(len, chunks)), unit="tok", unit_scale=True, desc="imatrix",
                                   disable=not progress) as bar:
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]), use_cache=False)
                bar.update(len(chunk))
    finally:
        collector.remove()
    return Imatrix(collector.entries(), [dataset], len(chunks), ctx)

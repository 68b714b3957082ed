"""A decoder layer's matmul weights as a file holds them at some types, put into the layer's transformers modules
while a probe stream runs (:mod:`ggufmoe.stats.probe_streams`)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import Quantizer
from ggufmoe.quant.held import held_values
from ggufmoe.stats.imatrix import Imatrix, importance
from ggufmoe.stats.skeleton import Skeleton


class PlainWeights:
    """A layer's matmul weights as a variant's file holds them, put into the layer's modules while a stream runs:
    each GGUF tensor's rows (its columns in the checkpoint's order) matched back to the rows of the module parameter
    they come from, exactly (transposed, scaled or otherwise cut tensors match nothing and stay exact, listed in
    ``exact``)."""

    def __init__(self, skeleton: Skeleton, specs: list[TensorSpec], imatrix: Imatrix, q: Quantizer, exact: set[str]):
        self.skeleton, self.imatrix, self.q, self.exact = skeleton, imatrix, q, exact
        self.specs = {s.name: s for s in specs}
        self.keys = {name: key for key, name in skeleton.checkpoint.items()}
        self.places: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor] | None] = {}
        self.cache: dict[tuple, torch.Tensor] = {}

    def _place(self, s: TensorSpec):
        """(module, parameter name, its rows, its columns) that tensor ``s`` is, or None."""
        if s.name in self.places:
            return self.places[s.name]
        found = None
        key = self.keys.get(s.hf_name)
        if key is not None and len(s.shape) == 2:
            path, _, leaf = key.rpartition(".")
            owner = self.skeleton.model.get_submodule(path)
            w = getattr(owner, leaf, None)
            if isinstance(w, torch.Tensor) and w.ndim == 2 and not w.is_meta:
                cols = torch.tensor(s.input_order) if s.input_order is not None else torch.arange(w.shape[1])
                if len(cols) == s.shape[1]:
                    source = w.detach()[:, cols.to(w.device)].cpu().numpy()
                    where: dict[bytes, list[int]] = {}
                    for j, row in enumerate(source):
                        where.setdefault(row.tobytes(), []).append(j)
                    rows = []
                    for row in np.ascontiguousarray(s.load(0), np.float32).reshape(s.shape):
                        js = where.get(row.tobytes())
                        if not js:
                            break
                        rows.append(js.pop() if len(js) > 1 else js[0])
                    else:
                        found = (owner, leaf, torch.tensor(rows), cols)
        if found is None:
            self.exact.add(s.name)
        self.places[s.name] = found
        return found

    @contextlib.contextmanager
    def applied(self, types: dict[str, T]) -> Iterator[None]:
        """The modules hold the tensors of ``types`` at those types while inside."""
        by_param: dict[tuple[int, str], list[tuple[TensorSpec, T]]] = {}
        owners: dict[tuple[int, str], nn.Module] = {}
        for name, t in sorted(types.items()):
            s = self.specs.get(name)
            place = self._place(s) if s is not None else None
            if place is None:
                continue
            owner, leaf = place[0], place[1]
            by_param.setdefault((id(owner), leaf), []).append((s, t))
            owners[(id(owner), leaf)] = owner
        saved = []
        try:
            for key, group in by_param.items():
                owner, leaf = owners[key], key[1]
                cached = (key, tuple((s.name, t) for s, t in group))
                if cached not in self.cache:
                    w = getattr(owner, leaf).detach().clone()
                    for s, t in group:
                        _, _, rows, cols = self.places[s.name]
                        at = (rows.to(w.device)[:, None], cols.to(w.device)[None, :])
                        imp = importance(s, 0, self.imatrix)
                        values = held_values(w[at].cpu().numpy(), t, None if imp is None else imp[0], self.q)
                        w[at] = torch.from_numpy(values).to(w.device)
                    self.cache[cached] = w
                saved.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = nn.Parameter(self.cache[cached], requires_grad=False)
            yield
        finally:
            for owner, leaf, p in reversed(saved):
                owner._parameters[leaf] = p

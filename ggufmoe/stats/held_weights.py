"""A decoder layer's matmul weights as a file holds them at some types, put into the layer's transformers modules
while a probe stream runs (:mod:`ggufmoe.stats.probe_streams`), or as the output-aware rounding rounded them
(:func:`put_values`)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from ggufmoe.model.tensor import TensorSpec
from ggufmoe.quant.ggml import Quantizer, requires_imatrix
from ggufmoe.quant.held import held_values
from ggufmoe.stats.imatrix import Imatrix, importance
from ggufmoe.stats.skeleton import Skeleton


def _row_index(rows: np.ndarray) -> dict[int, list[int]]:
    """Hash of each row's bytes -> the rows with it (hashes, not the bytes: no second copy of the parameter)."""
    where: dict[int, list[int]] = {}
    for j, row in enumerate(rows):
        where.setdefault(hash(row.tobytes()), []).append(j)
    return where


def _match(wanted: np.ndarray, where: dict[int, list[int]]) -> np.ndarray | None:
    """The row of the parameter each of ``wanted``'s rows hashes to (identical rows taken in turn), or None; the
    caller checks the values."""
    out = np.empty(len(wanted), np.int64)
    for i, row in enumerate(wanted):
        js = where.get(hash(row.tobytes()))
        if not js:
            return None
        out[i] = js.pop() if len(js) > 1 else js[0]
    return out


def locate(s: TensorSpec, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Indices (rows, columns) into the 2-D parameter ``w``, broadcasting to the elements of GGUF tensor ``s`` (its
    rows flattened, or its shape): its rows as rows of ``w`` (its columns in the checkpoint's order,
    ``input_order``), or the columns of each slice of a 3-D tensor as rows of ``w``; None unless every element is
    found exactly. Small: a row index per row (per slice column), not one per element."""
    data = np.ascontiguousarray(s.load(0), np.float32)
    ne0 = s.shape[-1]
    cols = np.asarray(s.input_order) if s.input_order is not None else np.arange(w.shape[1])
    if len(cols) == ne0:
        source = w if s.input_order is None else np.ascontiguousarray(w[:, cols])
        rows = _match(data.reshape(-1, ne0), _row_index(source))
        if rows is not None and np.array_equal(source[rows], data.reshape(-1, ne0)):
            return torch.from_numpy(rows[:, None]), torch.from_numpy(cols[None, :])
    if len(s.shape) == 3 and s.shape[1] == w.shape[1]:  # slices (n, a, ne0) whose transposes are rows of w
        where = _row_index(w)
        r = np.empty((s.shape[0], ne0), np.int64)  # element (h, i, c) is w[r[h, c], i]
        for h, piece in enumerate(data):
            rows = _match(np.ascontiguousarray(piece.T), where)
            if rows is None or not np.array_equal(w[rows].T, piece):
                return None
            r[h] = rows
        return torch.from_numpy(r[:, None, :]), torch.from_numpy(np.arange(s.shape[1])[None, :, None])
    return None


def parameter_of(skeleton: Skeleton, s: TensorSpec) -> tuple[nn.Module, str, torch.Tensor] | None:
    """The made-real 2-D parameter GGUF tensor ``s`` is converted from, as (module, name, tensor), or None."""
    key = skeleton.model_key.get(s.hf_name)
    if key is None:
        return None
    path, _, leaf = key.rpartition(".")
    owner = skeleton.model.get_submodule(path)
    w = getattr(owner, leaf, None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.is_meta:
        return None
    return owner, leaf, w


def put_values(skeleton: Skeleton, s: TensorSpec, values: np.ndarray) -> bool:
    """Put ``values`` (GGUF tensor ``s`` as the GGUF holds it) into the made-real parameter ``s`` comes from, each
    element where :func:`locate` finds it; False, and nothing changed, where it is not found."""
    param = parameter_of(skeleton, s)
    at = None if param is None else locate(s, param[2].detach().cpu().numpy())
    if at is None:
        return False
    owner, leaf, w = param
    new = w.detach().clone()
    rows, cols = (i.to(new.device) for i in at)
    new[rows, cols] = torch.from_numpy(np.ascontiguousarray(values, np.float32).reshape(s.shape)).to(new.device,
                                                                                                    new.dtype)
    owner._parameters[leaf] = nn.Parameter(new, requires_grad=False)
    return True


class PlainWeights:
    """A layer's matmul weights as a variant's file holds them, put into the layer's modules while a stream runs.

    Each GGUF tensor is found in the module parameter it comes from, element by element, exactly: its rows as rows of
    the parameter (its columns in the checkpoint's order: ``input_order``), or, for a 3-D tensor of transposed slices
    (MLA's ``attn_k_b``, per head a block of ``kv_b_proj``'s rows transposed), each slice's columns as rows of the
    parameter. A tensor found neither way (scaled, or cut otherwise) stays exact and is listed in ``exact``. One held
    copy per parameter is kept (the last types asked for): memory is at most the layer's matmul weights once more."""

    def __init__(self, skeleton: Skeleton, specs: list[TensorSpec], imatrix: Imatrix, q: Quantizer, exact: set[str]):
        self.skeleton, self.imatrix, self.q, self.exact = skeleton, imatrix, q, exact
        self.specs = {s.name: s for s in specs}
        # tensor -> (module, parameter name, (row, column) of the parameter of each of its elements, in its shape)
        self.places: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor] | None] = {}
        self.cache: dict[tuple[int, str], tuple[tuple, torch.Tensor]] = {}  # one held copy per parameter

    def _place(self, s: TensorSpec):
        if s.name in self.places:
            return self.places[s.name]
        found = None
        param = parameter_of(self.skeleton, s) if len(s.shape) in (2, 3) else None
        if param is not None:
            owner, leaf, w = param
            at = locate(s, w.detach().cpu().numpy())
            found = None if at is None else (owner, leaf, *at)
        if found is None:
            self.exact.add(s.name)
        self.places[s.name] = found
        return found

    def _held(self, s: TensorSpec, values: np.ndarray, t: T) -> np.ndarray:
        """``values`` (in ``s``'s shape) as the file holds them at ``t``, with the importance rows ``convert`` uses
        (one per slice where the statistics hold per-head rows)."""
        imp = importance(s, 0, self.imatrix)
        if imp is None and requires_imatrix(t):  # no file holds it so (the planner never chooses it): as it is
            return values
        if imp is not None and len(imp) > 1:
            return np.stack([held_values(v, t, row, self.q) for v, row in zip(values, imp)])
        return held_values(values, t, None if imp is None else imp[0], self.q)

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
                wanted = tuple((s.name, t) for s, t in group)
                if self.cache.get(key, (None,))[0] != wanted:
                    self.cache.pop(key, None)  # the copy held for other types goes first
                    w = getattr(owner, leaf).detach().clone()
                    for s, t in group:
                        _, _, rows, cols = self.places[s.name]
                        at = (rows.to(w.device), cols.to(w.device))
                        values = w[at]
                        held = self._held(s, values.cpu().numpy().reshape(s.shape), t)
                        w[at] = torch.from_numpy(held.reshape(values.shape)).to(w.device)
                    self.cache[key] = (wanted, w)
                saved.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = nn.Parameter(self.cache[key][1], requires_grad=False)
            yield
        finally:
            for owner, leaf, p in reversed(saved):
                owner._parameters[leaf] = p

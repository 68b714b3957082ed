"""The resumable state of a streamed calibration: ``.NAME.partial`` beside the statistics file.

It is a :class:`ggufmoe.state_dir.StateDir` (created, locked, cleared and removed as ``convert``'s
is) that holds:

- the hidden states, the input of the next layer (``HIDDEN[k % 2]`` is layer ``k``'s input) and
  the routed experts' input of the layer running (``MOE_IN``): raw float32 rows
  (:class:`ggufmoe.stats.hidden.RowStore`);
- the statistics of every complete layer, ``layer.K.npz``;
- what the last complete layer handed the next besides its hidden states, per batch, ``carry.K.npz`` (only for
  families whose layers hand something: :meth:`ggufmoe.arch.base.Architecture.layer_output`);
- the progress record, ``state.json`` (:class:`Progress`): layers complete and a fingerprint of
  what decides the statistics (the source's files, the token ids, the chunk prefix, the context).

After every layer its output, its statistics and then the progress record are written durably,
so the record never counts a layer whose files are not on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ggufmoe.errors import GgufmoeError
from ggufmoe.source.fingerprint import file_identity, model_files
from ggufmoe.state_dir import StateDir
from ggufmoe.stats.file import ExpertStats
from ggufmoe.stats.imatrix import ImatrixEntry
from ggufmoe.stats.local_errors import LocalErrors

if TYPE_CHECKING:
    import torch

STATE = "state.json"
STATE_VERSION = 2  # 2: layers keep their local errors
HIDDEN = ("hidden.0.f32", "hidden.1.f32")  # input of layer k: HIDDEN[k % 2]
MOE_IN = "moe_in.f32"
# the output-aware rounding's rounded model (:mod:`ggufmoe.stats.rounding`): its hidden states and experts' input as
# above, and the model's own inputs of the layer's plain matmuls (slot, width)
ROUNDED_HIDDEN = ("rounded.0.f32", "rounded.1.f32")
ROUNDED_MOE_IN = "rounded.moe_in.f32"
OWN_INPUTS = "own_inputs.{slot}.{width}.f32"
CARRY, ROUNDED_CARRY = "carry", "rounded.carry"
CALIBRATION = "calibration"  # the kind of run that owns the state directory


def calibration_fingerprint(model_dir: Path, ids: torch.Tensor, prefix: list[int], ctx: int, local: str = "") -> str:
    """What decides the statistics: the source's files, the token ids, the chunk prefix, the context and how
    local errors are measured (``local``)."""
    sha = hashlib.sha256(f"ggufmoe calibrate {STATE_VERSION}\n{ctx}\n{prefix}\n{local}\n".encode())
    sha.update(file_identity(model_files(model_dir)).encode())
    sha.update(ids.numpy().astype("<i4").tobytes())
    return sha.hexdigest()


@dataclass
class Progress:
    """``state.json``: how far an interrupted calibration got."""

    version: int
    fingerprint: str
    layers_done: int
    n_layers: int
    rows: int
    width: int


class CalibrationState(StateDir):
    """The state directory ``path`` of a calibration to ``what`` (the statistics file's name)."""

    def __init__(self, path: Path, what: str):
        super().__init__(path, f"{path}: another ggufmoe is calibrating to {what} right now", CALIBRATION)
        self.what = what
        self.progress: Progress | None = None

    def kept(self) -> Progress | None:
        """The progress an interrupted run left (None, and the directory emptied, when nothing is complete)."""
        try:
            p = Progress(**json.loads((self.path / STATE).read_text()))
        except (OSError, ValueError, TypeError):
            p = None
        if p is None or p.layers_done < 1:
            self.clear()
            return None
        return p

    def save(self, progress: Progress) -> None:
        """Record ``progress`` atomically (after what it counts is on disk)."""
        self.write(self.path / STATE, lambda f: f.write(json.dumps(asdict(progress)).encode()),
                   f"{self.path}: cannot record calibration progress")
        self.progress = progress

    @property
    def layers_done(self) -> int:
        return self.progress.layers_done if self.progress else 0

    def layer_file(self, k: int) -> Path:
        return self.path / f"layer.{k}.npz"

    def save_layer(self, k: int, entries: dict[str, ImatrixEntry], layers: dict[int, ExpertStats],
                   local: LocalErrors | None = None) -> None:
        """Layer ``k``'s statistics (and local errors), durably and atomically."""
        arrays = {} if local is None else {"local": np.array(local.to_json())}
        for name, e in entries.items():
            arrays[f"sum2:{name}"], arrays[f"counts:{name}"] = e.in_sum2, e.counts
        for il, s in layers.items():
            arrays[f"routing:{il}"] = np.stack([s.counts, s.weight_mass, s.reap_sum])
            arrays[f"n_tokens:{il}"] = np.array(s.n_tokens, dtype=np.int64)
        path = self.layer_file(k)
        self.write(path, lambda f: np.savez(f, **arrays), f"{path}: cannot write calibration statistics")

    def carry_file(self, k: int, model: str = CARRY) -> Path:
        return self.path / f"{model}.{k}.npz"

    def save_carry(self, k: int, carry: list[dict[str, torch.Tensor]], model: str = CARRY) -> None:
        """What layer ``k`` handed the next besides its hidden states, per batch (when it hands anything), durably
        (``model``: :data:`CARRY`, or :data:`ROUNDED_CARRY` for the rounded model's)."""
        if any(carry):
            arrays = {f"{i}:{name}": t.numpy() for i, c in enumerate(carry) for name, t in c.items()}
            path = self.carry_file(k, model)
            self.write(path, lambda f: np.savez(f, **arrays), f"{path}: cannot write calibration state")

    def drop_carry(self, k: int, model: str = CARRY) -> None:
        self.carry_file(k, model).unlink(missing_ok=True)

    def load_carry(self, k: int, n_batches: int, model: str = CARRY) -> list[dict[str, torch.Tensor]]:
        """What layer ``k`` handed the next (per batch; nothing when it kept no file)."""
        import torch

        carry: list[dict[str, torch.Tensor]] = [{} for _ in range(n_batches)]
        path = self.carry_file(k, model)
        if not path.exists():
            return carry
        try:
            with np.load(path) as z:
                for key in z.files:
                    i, _, name = key.partition(":")
                    carry[int(i)][name] = torch.from_numpy(z[key])
        except (OSError, ValueError, IndexError) as e:
            raise GgufmoeError(f"{path}: kept calibration state unreadable ({e}); delete {path.parent} to start over") \
                from None
        return carry

    def load_layer(self, k: int) -> tuple[dict[str, ImatrixEntry], dict[int, ExpertStats], LocalErrors | None]:
        path = self.layer_file(k)
        try:
            with np.load(path) as z:
                arrays = {key: z[key] for key in z.files}
        except (OSError, ValueError) as e:
            raise GgufmoeError(f"{path}: kept statistics unreadable ({e}); delete {path.parent} to start over") \
                from None
        entries, layers = {}, {}
        local = LocalErrors.from_json(str(arrays.pop("local"))) if "local" in arrays else None
        for key, a in arrays.items():
            kind, _, name = key.partition(":")
            if kind == "sum2":
                entries[name] = ImatrixEntry(a, arrays[f"counts:{name}"])
            elif kind == "routing":
                layers[int(name)] = ExpertStats(a[0].copy(), a[1].copy(), a[2].copy(),
                                                int(arrays[f"n_tokens:{name}"]))
        return entries, layers, local
